"""Fig. 13 of the paper: sensitivity to the loss weights lambda1-3 and the dictionary size K.

  python -m dhmd_jax.experiments.sweep --config=configs/mosi.py --workdir=runs/fig13
  python -m dhmd_jax.experiments.sweep --config=configs/tiny.py --workdir=/tmp/sweep \\
      --params=lambda_dec --lambda_dec=0.01,0.1,1

Parameters (`--params`, default all four) and their values (each a comma list; the config's own
value is always added, as the reference row of its table):

| paper   | config field         | flag               | default values               |
|---------|----------------------|--------------------|------------------------------|
| lambda1 | loss.lambda_dec      | `--lambda_dec=...` | 0.01, 0.05, 0.1, 0.5, 1.0    |
| lambda2 | loss.lambda_dtl      | `--lambda_dtl=...` | 0.01, 0.05, 0.1, 0.5, 1.0    |
| lambda3 | loss.lambda_dic      | `--lambda_dic=...` | 0.01, 0.05, 0.1, 0.5, 1.0    |
| gamma   | loss.gamma           | `--gamma=...`      | 0.01, 0.05, 0.1, 0.5, 1.0    |
| K       | dm.num_elements      | `--num_elements=...` | 128, 256, 512, 1024, 2048  |

Loss weights change no shape: all values of one weight train side by side in ONE compiled program
(`<workdir>/<param>/`), vmapped like the seeds: the trainer's vmapped axis holds value x seed runs
and each run's weights enter the compiled chunk as an input (`train.sweep_runs`). All four weights
are inputs (the unswept ones at the config's values), so the sweeps of lambda1, lambda2, lambda3
and gamma with as many values compile one program between them (the persistent compilation cache
serves the later ones). Each run starts,
orders its data and draws its dropout as its seed alone would, so a value's row pairs seed by seed
with the reference value's row. `--separate` trains each value as its own program instead
(`<workdir>/<param>=<value>/`, the plain trainer with the value in the config). K changes the
dictionaries' shapes: each K is its own program (`<workdir>/num_elements=<K>/`).
"""

import os
import sys
import time

from absl import flags
import ml_collections

from dhmd_jax import validation
from dhmd_jax.experiments import grid

LOSS_PARAMS = ("lambda_dec", "lambda_dtl", "lambda_dic", "gamma")  # objective.LOSS_WEIGHTS
PARAMS = LOSS_PARAMS + ("num_elements",)
FIELDS = {"lambda_dec": "loss.lambda_dec", "lambda_dtl": "loss.lambda_dtl",
          "lambda_dic": "loss.lambda_dic", "gamma": "loss.gamma",
          "num_elements": "dm.num_elements"}
PAPER_NAMES = {"lambda_dec": "λ1 (L_dec)", "lambda_dtl": "λ2 (L_dtl)", "lambda_dic": "λ3 (L_dic)",
               "gamma": "γ (L_mar + L_ort inside L_dec)", "num_elements": "K (dictionary size)"}
DEFAULT_PARAMS = ("lambda_dec", "lambda_dtl", "lambda_dic", "num_elements")
DEFAULT_VALUES = {**{p: "0.01,0.05,0.1,0.5,1.0" for p in LOSS_PARAMS},
                  "num_elements": "128,256,512,1024,2048"}


def parse_values(param, text):
  """The values of `--<param>=text`: non-negative numbers, or positive integers for K."""
  values = []
  for item in text.split(","):
    item = item.strip()
    if not item:
      continue
    if param == "num_elements":
      try:
        value = int(item)
      except ValueError:
        value = None
      if value is None or value < 1:
        raise grid.UsageError(f"--{param}: {item!r} is not a positive integer (the dictionary "
                              f"size K, e.g. --{param}=128,512,2048)")
    else:
      try:
        value = float(item)
      except ValueError:
        value = None
      if value is None or not value >= 0 or value == float("inf"):
        raise grid.UsageError(f"--{param}: {item!r} is not a non-negative number (a loss "
                              f"weight, e.g. --{param}=0.01,0.1,1)")
    values.append(value)
  if not values:
    raise grid.UsageError(f"--{param} needs at least one value, e.g. --{param}="
                          f"{DEFAULT_VALUES[param]}")
  return values


def row_name(param, value):
  return f"{param}={value:g}" if isinstance(value, float) else f"{param}={value}"


def inert_params(config, params):
  """The params that would change nothing in this config, with the reason."""
  m = config.model
  dhmd = m.arch == "dhmd"
  reasons = {
      "lambda_dec": None if dhmd and m.use_fd else "there is no decoupling (FD off or MulT)",
      "gamma": None if dhmd and m.use_fd else "there is no decoupling (FD off or MulT)",
      "lambda_dtl": None if m.use_gd else "graph distillation is off (model.use_gd=False)",
      "lambda_dic": None if m.use_dm else "dictionary matching is off (model.use_dm=False)",
      "num_elements": None if m.use_dm else "dictionary matching is off (model.use_dm=False)",
  }
  return [(p, reasons[p]) for p in params if reasons[p]]


def plan(base, values, *, separate=False, metrics=()):
  """(runs, tables) of a sweep over {param: values} (the config's value added to each)."""
  runs, tables = [], []
  for param, given in values.items():
    field = FIELDS[param]
    reference = validation.get_field(base, field)
    cast = int if param == "num_elements" else float
    vals = sorted(set(cast(v) for v in given) | {cast(reference)})
    rows = [row_name(param, v) for v in vals]
    if param == "num_elements" or separate:
      for v, row in zip(vals, rows):
        config = ml_collections.ConfigDict(base.to_dict())
        validation.set_field(config, field, v)
        runs.append(grid.Run(name=row, config=config, rows=(row,), overrides={field: v}))
    else:
      # Every Eq. 14 weight enters the program as an input (the others at the config's value),
      # so the lambda1, lambda2 and lambda3 sweeps are one and the same compiled program.
      weights = {q: [float(validation.get_field(base, FIELDS[q]))] * len(vals) for q in LOSS_PARAMS}
      weights[param] = vals
      runs.append(grid.Run(name=param, config=ml_collections.ConfigDict(base.to_dict()),
                           rows=tuple(rows), overrides={}, loss_weights=weights))
    how = ("each value its own program" if param == "num_elements" or separate else
           f"all {len(vals)} values in one program")
    tables.append(grid.Table(
        title=f"{PAPER_NAMES[param]}: {field}", rows=rows,
        reference=row_name(param, cast(reference)), metrics=list(metrics),
        note=f"Reference: the config's value {field}={reference!r}; {how}.", label="value"))
  return runs, tables


def main(argv=None):
  values = grid.flag_values()
  flags.DEFINE_string("params", ",".join(DEFAULT_PARAMS),
                      f"Comma list of what to sweep, of {', '.join(PARAMS)}.", flag_values=values)
  for param in PARAMS:
    flags.DEFINE_string(param, None, f"Values of {FIELDS[param]} (default "
                        f"{DEFAULT_VALUES[param]}).", flag_values=values)
  flags.DEFINE_boolean("separate", False, "Train each loss-weight value as its own program "
                       "(default: all values of a weight in one vmapped program).",
                       flag_values=values)
  return grid.run_command("sweep", __doc__.split("\n")[0], values, lambda: _report(values), argv)


def _report(args):
  base = args.config
  params = [q.strip() for q in args.params.split(",") if q.strip()]
  unknown = [q for q in params if q not in PARAMS]
  if unknown or not params:
    raise grid.UsageError(f"unknown sweep parameter {unknown[0]!r} in --params; choose from "
                          f"{', '.join(PARAMS)}" if unknown else "--params names no parameter")
  if len(set(params)) != len(params):
    raise grid.UsageError(f"--params names a parameter twice: {args.params}")
  stray = [q for q in PARAMS if getattr(args, q) is not None and q not in params]
  if stray:
    raise grid.UsageError(f"--{stray[0]} is given but {stray[0]} is not in --params "
                          f"({','.join(params)}); add it there or drop --{stray[0]}")
  values = {q: parse_values(q, getattr(args, q) if getattr(args, q) is not None
                            else DEFAULT_VALUES[q]) for q in params}
  inert = inert_params(base, params)
  if inert:
    q, why = inert[0]
    raise grid.UsageError(f"sweeping {q} would change nothing: {why} in this config; drop it "
                          f"from --params")
  family = grid.metric_family(base)
  metrics = grid.pick_metrics(args.metrics, family)
  runs, tables = plan(base, values, separate=args.separate, metrics=metrics)
  for run in runs:
    grid.validate(run.config, f"sweep run {run.name}")
  workdir = args.workdir or os.path.join("runs", "sweep")
  options = grid.placement_options(args)
  start = time.time()
  return grid.run_grid("sweep", base, workdir, runs, reuse=grid.reuse_dirs(args), **options,
                       report=lambda outcome: grid.write_report(
                           workdir, kind="sweep", base_config=base, runs=runs, tables=tables,
                           outcome=outcome, per_seed=grid.collect(runs, outcome, args.split),
                           split=args.split, start_time=start,
                           extra={"values": values, "separate": args.separate}))


if __name__ == "__main__":
  sys.exit(main())
