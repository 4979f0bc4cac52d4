"""CMU-MOSI (MMSA pickles). `--config=configs/mosi.py` (aligned) or `configs/mosi.py:unaligned`;
`configs/mosi.py:bert` / `:unaligned,bert`: text through bert-base-uncased fine-tuned end to end
from `text_bert`, as the DMD code trains it (`--config.model.bert.path`, default
data/bert-base-uncased; docs/bert.md).

Values from the DMD code's own config for MOSI, equal to the paper's Table 1 column [1].
"""

from configs import default as default_lib


def get_config(variant="aligned"):
  variant, bert = default_lib.parse_variant(variant, "configs/mosi.py")
  config = default_lib.get_config()
  config.dataset.name = "mosi"
  config.dataset.format = "mmsa"
  config.dataset.path = f"data/MOSI/Processed/{variant}_50.pkl"
  config.model.d_model = 50  # Table 1 [1]: 50
  config.model.num_heads = 10  # Table 1 [1]: 10
  config.model.num_layers = 4  # Table 1 [1]: 4
  config.model.conv_kernel.text = 5  # Table 1 [1]: 5,5,5
  config.model.conv_kernel.vision = 5
  config.model.conv_kernel.audio = 5
  config.model.text_dropout = 0.5
  config.model.embed_dropout = 0.2
  config.model.attn_dropout = 0.3
  config.model.attn_dropout_a = 0.2
  config.model.attn_dropout_v = 0.0
  config.model.output_dropout = 0.5
  if variant == "unaligned":
    default_lib.long_sequences(config)
  if bert:  # the DMD code's setting: bert-base-uncased fine-tuned from text_bert
    default_lib.use_bert(config)
  return config
