"""A tiny CPU config for tests: synthetic MOSEI-shaped data, a narrow one-layer model, two seeds,
two epochs. Every code path of the full model runs; nothing is meant to be accurate."""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.dataset.synthetic.num_train = 96
  config.dataset.synthetic.num_valid = 24
  config.dataset.synthetic.num_test = 24
  config.model.d_model = 8
  config.model.num_heads = 2
  config.model.num_layers = 1
  # Compile time dominates a tiny model: the stacked transformers as vmapped computations
  # compile several times faster than branch by branch (the same numbers).
  config.model.stack_compute = "vmap"
  config.gd.homo_hidden = 8
  config.gd.hetero_hidden = 8
  config.dm.num_elements = 16
  config.train.seeds = (1111, 1112)
  config.train.batch_size = 8
  config.train.update_epochs = 2
  config.train.num_epochs = 2
  config.train.eval_batch_size = 32
  config.log.progress_bar = False
  config.log.tensorboard = False
  return config
