"""UR-FUNNY humour detection (MultiBench `humor.pkl`, binary labels, cross-entropy).

The paper's Table 1 column [3] (d 50, 10 heads, 4 layers, kernels 5,5,5) equals the MOSI
column, so this is the MOSI config (with its DMD dropouts: the paper gives none) on other data.
"""

from configs import mosi


def get_config():
  config = mosi.get_config("aligned")
  config.dataset.name = "urfunny"
  config.dataset.format = "multibench"
  config.dataset.task = "binary"
  config.dataset.path = "data/UR-FUNNY/humor.pkl"
  return config
