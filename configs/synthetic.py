"""The embedded default: synthetic data shaped like CMU-MOSEI (aligned, 768-d text, 74-d audio,
35-d vision, 50 steps), with the MOSEI model and the reference protocol, sized to finish in
minutes on a 2-core CPU. `python -m dhmd_jax.main` runs it; no file is needed (the generator
writes one into the workdir).
"""

from configs import mosei


def get_config():
  config = mosei.get_config("aligned")
  config.dataset.name = "synthetic"
  config.dataset.path = ""
  config.dataset.synthetic.like = "mosei"
  config.dataset.synthetic.aligned = True
  config.dataset.synthetic.layout = "mmsa"
  # Small enough for a few minutes on 2 CPU cores (the compilation included); everything
  # else is the MOSEI protocol, except one micro-batch per Adam step (the reference's 10 would
  # leave 3 steps per epoch here) and three seeds instead of five.
  config.dataset.synthetic.num_train = 512
  config.dataset.synthetic.num_valid = 128
  config.dataset.synthetic.num_test = 128
  config.train.num_epochs = 6
  config.train.update_epochs = 1
  config.train.seeds = (1111, 1112, 1113)
  return config
