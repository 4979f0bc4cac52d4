"""CH-SIMS (MMSA `unaligned_39.pkl`, labels in [-1, 1], SIMS metrics).

Neither the DHMD paper nor the DMD code has SIMS settings; we use the MOSI column of Table 1 and
the DMD MOSI dropouts (our choice, listed in the README). SIMS is unaligned only.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.dataset.name = "sims"
  config.dataset.format = "mmsa"
  config.dataset.path = "data/SIMS/Processed/unaligned_39.pkl"
  config.model.d_model = 50
  config.model.num_heads = 10
  config.model.num_layers = 4
  config.model.conv_kernel.text = 5
  config.model.conv_kernel.vision = 5
  config.model.conv_kernel.audio = 5
  config.model.text_dropout = 0.5
  config.model.embed_dropout = 0.2
  config.model.attn_dropout = 0.3
  config.model.attn_dropout_a = 0.2
  config.model.attn_dropout_v = 0.0
  config.model.output_dropout = 0.5
  # Triplet classes for SIMS labels in [-1, 1]: the sign (round7 would collapse to 3 classes).
  config.loss.triplet_classes = "sign"
  return config
