"""UR-FUNNY humour detection (MultiBench `humor.pkl`, binary labels, cross-entropy).

Model values from the paper's Table 1 column [3] (50 / 10 heads / 4 layers / kernels 5,5,5);
dropouts from the DMD MOSI config (the paper gives none).
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.dataset.name = "urfunny"
  config.dataset.format = "multibench"
  config.dataset.task = "binary"
  config.dataset.path = "data/UR-FUNNY/humor.pkl"
  config.model.d_model = 50  # Table 1 [3]
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
  return config
