"""CH-SIMS (MMSA `unaligned_39.pkl`, labels in [-1, 1], SIMS metrics).

Neither the DHMD paper nor the DMD code has SIMS settings; we use the MOSI model and dropouts
(Table 1 column [1], DMD MOSI config), our choice, listed in docs/fidelity.md. SIMS is
unaligned only.
"""

from configs import default as default_lib
from configs import mosi


def get_config():
  config = mosi.get_config("aligned")
  config.dataset.name = "sims"
  config.dataset.path = "data/SIMS/Processed/unaligned_39.pkl"
  # Triplet classes for SIMS labels in [-1, 1]: the sign (round7 would collapse to 3 classes).
  config.loss.triplet_classes = "sign"
  default_lib.long_sequences(config)  # 400 audio frames
  return config
