"""What each "auto" value of the config becomes on this machine: the one place for these choices.

They only choose how the same function is computed (the results agree up to float rounding,
which is why a run's results.json records what they became, under "computed_as"):

- `train.accumulate` (the micro-batches of an Adam step) and `train.seed_compute` (the seeds of
  a run): "scan", one after another, on a CPU; "vmap", one batched program, on a GPU or TPU. On
  a 2-core CPU the batched products run below one item's speed (the DMD protocol's ten
  micro-batches step 1.31x faster scanned; docs/performance.md).
- `model.remat`: on when two or more seeds are vmapped (their activations then sit in memory
  side by side); off when they run one after another (one seed's activations at a time; on a
  CPU remat then only costs time: docs/performance.md, "Memory of long sequences").
- `model.stack_compute`: "loop" on a CPU without remat, else "vmap" (with remat only the scanned
  layers bound the memory: XLA's CPU scheduler runs the independent branches of "loop" side by
  side and their recomputed activations with them).
"""

import jax


def _on_cpu():
  return jax.default_backend() == "cpu"


def _one_after_another_on_cpu(mode: str) -> str:
  """"scan" on a CPU, "vmap" elsewhere, for "auto"; any other mode as it is."""
  if mode != "auto":
    return mode
  return "scan" if _on_cpu() else "vmap"


def accumulate(mode: str) -> str:
  """`train.accumulate`: "scan" or "vmap"."""
  return _one_after_another_on_cpu(mode)


def seed_compute(mode: str) -> str:
  """`train.seed_compute`: "scan" or "vmap"."""
  return _one_after_another_on_cpu(mode)


def remat(value, train=None) -> bool:
  """`model.remat`, from the config's `train` group (its seeds and `seed_compute`)."""
  if value != "auto":
    return bool(value)
  train = train or {}
  several = len(tuple(train.get("seeds", ()))) > 1
  return several and seed_compute(train.get("seed_compute", "auto")) == "vmap"


def stack_compute(value: str, with_remat: bool = False) -> str:
  """`model.stack_compute`: "loop", "grouped" or "vmap"."""
  if value != "auto":
    return value
  return "loop" if _on_cpu() and not with_remat else "vmap"


def resolve(config) -> dict:
  """What the config's four switches are on this machine: {"train.accumulate": "scan", ...}."""
  rematted = remat(config.model.remat, config.get("train"))
  return {"train.accumulate": accumulate(config.train.accumulate),
          "train.seed_compute": seed_compute(config.train.seed_compute),
          "model.remat": rematted,
          "model.stack_compute": stack_compute(config.model.stack_compute, rematted)}
