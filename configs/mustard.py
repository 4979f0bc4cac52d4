"""MUStARD sarcasm detection (MultiBench `sarcasm.pkl`, labels -1/1 mapped to 0/1, cross-entropy).

Model values from the paper's Table 1 column [4] (d 32, 8 heads, 2 layers, kernels L5, V3, A5);
dropouts from the DMD MOSI config (the paper gives none).
"""

from configs import mosi


def get_config():
  config = mosi.get_config("aligned")
  config.dataset.name = "mustard"
  config.dataset.format = "multibench"
  config.dataset.task = "binary"
  config.dataset.path = "data/MUStARD/sarcasm.pkl"
  config.model.d_model = 32  # Table 1 [4]
  config.model.num_heads = 8
  config.model.num_layers = 2
  config.model.conv_kernel.vision = 3
  return config
