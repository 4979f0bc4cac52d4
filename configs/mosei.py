"""CMU-MOSEI (MMSA pickles). `--config=configs/mosei.py` (aligned) or `configs/mosei.py:unaligned`;
`configs/mosei.py:bert` / `:unaligned,bert`: text through bert-base-uncased fine-tuned end to end
from `text_bert`, as the DMD code trains it (`--config.model.bert.path`, default
data/bert-base-uncased; docs/bert.md).

Values from the DMD code's own config for MOSEI; the paper's Table 1 column [2] differs only in
the audio kernel (paper 3, code 1): `--config.model.conv_kernel.audio=3` gives the paper's
(docs/fidelity.md lists every difference).
"""

from configs import default as default_lib


def get_config(variant="aligned"):
  variant, bert = default_lib.parse_variant(variant, "configs/mosei.py")
  config = default_lib.get_config()
  config.dataset.name = "mosei"
  config.dataset.format = "mmsa"
  config.dataset.path = f"data/MOSEI/Processed/{variant}_50.pkl"
  config.model.d_model = 30  # Table 1 [2]: 30
  config.model.num_heads = 6  # Table 1 [2]: 6
  config.model.num_layers = 4  # Table 1 [2]: 4
  config.model.conv_kernel.text = 5  # Table 1 [2]: 5
  config.model.conv_kernel.vision = 3  # Table 1 [2]: 3
  config.model.conv_kernel.audio = 1  # DMD code: 1; Table 1 [2]: 3
  config.model.text_dropout = 0.3
  config.model.embed_dropout = 0.0
  config.model.attn_dropout = 0.4
  config.model.attn_dropout_a = 0.0
  config.model.attn_dropout_v = 0.0
  config.model.output_dropout = 0.5
  if variant == "unaligned":
    default_lib.long_sequences(config)
  if bert:  # the DMD code's setting: bert-base-uncased fine-tuned from text_bert
    default_lib.use_bert(config)
  return config
