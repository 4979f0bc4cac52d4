"""Table 7 and Figs. 4-6 of the paper: how well each modality's own heads predict, next to the
fused output, with and without FD, GD and DM.

  python -m dhmd_jax.experiments.table7 --config=configs/mosei.py --workdir=runs/table7

Every variant is trained as in table6 (`<workdir>/<variant>`, all seeds in one program); then the
model each seed selected on validation predicts the split (`--split`, default test) with every
head: the homogeneous heads on c_m and the heterogeneous heads on the memory-transformer outputs
of L, V and A (the logits HoGD and HeGD distil between, `logits_homo` / `logits_hetero`), the
homogeneous fusion head (`logits_c`) and the fused prediction. Their Acc-2 and F1 (Non0 for
MOSI/MOSEI, as the paper reports; Mult_acc_2/F1 for SIMS; Accuracy/F1 for binary tasks) are
tabulated per space, with the mean and the spread (std over L, V, A: Table 7's "STD", lower is
better) of the three modalities, each against the reference row with paired statistics.

Rows (`--variants`): `ca` (CA only: Table 7's "w/o FD"), `fd_ca` ("w/ FD", Fig. 4's "w/ FD"),
`no_gd` (FD + DM), `no_dm` (FD + GD: "w/ FD, GD") and `full` ("w/ FD, GD, DM", the reference).
The head metrics of a run are kept in `<workdir>/<variant>/heads_<split>.json`.
"""

import contextlib
import dataclasses
import os
import sys
import time

import numpy as np

from dhmd_jax.experiments import grid
from dhmd_jax.names import MODALITY_LETTERS

VARIANTS = ("ca", "fd_ca", "no_gd", "no_dm", "full")
# The paper's Acc-2 and F1 of each metric family.
HEAD_METRICS = {"regression": ("Non0_acc_2", "Non0_F1_score"),
                "sims": ("Mult_acc_2", "F1_score"),
                "binary": ("Accuracy", "F1_score")}
SPACES = ("homo", "hetero")
# Columns of the head metrics: per space and modality, the homogeneous fusion head, the output.
HEADS = tuple(f"{space} {m}" for space in SPACES for m in MODALITY_LETTERS) + ("c", "fused")


def head_predictions(model, params, arrays, *, batch_size):
  """Every seed's raw outputs of every head over a split.

  Args:
    model: the DHMD module; params: stacked (S, ...) parameters; arrays: the split in the
      model's batch layout (`data.split_arrays`); batch_size: samples per call (the last batch is
      padded with real rows whose outputs are dropped).

  Returns:
    {"homo L": (S, N, O), ..., "hetero A": ..., "c": ..., "fused": ...}; a head the model does
    not have (MulT has no homogeneous branch) is absent.
  """
  import jax  # pylint: disable=g-import-not-at-top

  @jax.jit
  def batch_outputs(params, batch):
    def one(p):
      out = model.apply({"params": p}, batch, deterministic=True)
      heads = {"fused": out["prediction"]}  # (B, O)
      if "logits_c" in out:
        heads["c"] = out["logits_c"]
      for space in SPACES:
        if f"logits_{space}" in out:
          for i, m in enumerate(MODALITY_LETTERS):
            heads[f"{space} {m}"] = out[f"logits_{space}"][i]  # (B, O)
      return heads
    return jax.vmap(one)(params)  # each (S, B, O)

  inputs = {k: v for k, v in arrays.items() if k != "label"}
  num = arrays["label"].shape[0]
  chunks = []
  for start in range(0, num, batch_size):
    rows = np.arange(start, start + batch_size) % num
    chunks.append(jax.device_get(batch_outputs(params, {k: np.asarray(v)[rows]
                                                        for k, v in inputs.items()})))
  return {k: np.concatenate([c[k] for c in chunks], axis=1)[:, :num] for k in chunks[0]}


def head_metrics(config, workdir, split):
  """{head: {metric: [per seed]}} of the run in `workdir` (its models selected on validation)."""
  # pylint: disable=g-import-not-at-top
  from dhmd_jax import data as data_lib
  from dhmd_jax import evaluate
  from dhmd_jax import metrics as metrics_lib
  dataset, model, params, _ = evaluate.restore_params(config, workdir, "best")
  arrays = data_lib.split_arrays(dataset.splits[split], config.dataset.task,
                                 text_encoder=config.model.text_encoder)
  preds = head_predictions(model, params, arrays, batch_size=config.train.eval_batch_size)
  return {head: metrics_lib.split_metrics(config, p, arrays["label"])
          for head, p in preds.items()}


def _signature(results):
  """What identifies the training behind a run's results.json (a rerun changes it)."""
  return {k: results.get(k) for k in ("seeds", "best_epoch", "epochs_run", "wall_time_s")}


def heads_file(workdir, split):
  return os.path.join(workdir, f"heads_{split}.json")


@dataclasses.dataclass(frozen=True)
class HeadMetrics:
  """The grid's after-run work: head metrics of a run, computed once per training of it (a
  module-level class, so a grid's worker process can be handed it)."""
  split: str

  def pending(self, run, workdir, results):
    del run
    stored = grid.read_json(heads_file(workdir, self.split))
    return stored is None or stored.get("signature") != _signature(results)

  def __call__(self, run, workdir, results):
    if not self.pending(run, workdir, results):
      return ""
    with open(os.path.join(workdir, grid.LOG_FILE), "a") as log:
      with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        heads = head_metrics(run.config, workdir, self.split)
    grid.write_json(heads_file(workdir, self.split),
                    {"signature": _signature(results), "split": self.split, "heads": heads})
    return "head metrics"


def make_after_run(split):
  """The grid's hook: head metrics of a run, computed once per training of it."""
  return HeadMetrics(split)


def per_seed_heads(runs, workdir, split, metrics, num_seeds):
  """{variant: {"<head> <metric>": [per seed]}} including the mean and std over L, V, A."""
  table = {}
  for run in runs:
    heads = grid.read_json(heads_file(os.path.join(workdir, run.name), split))["heads"]
    row = {}
    for metric in metrics:
      for head in HEADS:
        values = heads.get(head, {}).get(metric)
        row[f"{head} {metric}"] = ([np.nan] * num_seeds if values is None else
                                   [np.nan if v is None else v for v in values])
      for space in SPACES:
        per_modality = np.asarray([row[f"{space} {m} {metric}"] for m in MODALITY_LETTERS],
                                  np.float64)  # (3, S)
        row[f"{space} mean {metric}"] = list(per_modality.mean(axis=0))
        row[f"{space} std {metric}"] = list(per_modality.std(axis=0))  # the paper's STD
    table[run.name] = row
  return table


def tables_for(variants, reference, metrics):
  tables = []
  for metric in metrics:
    for space, name in (("homo", "homogeneous"), ("hetero", "heterogeneous")):
      keys = [f"{space} {m} {metric}" for m in MODALITY_LETTERS]
      keys += [f"{space} mean {metric}", f"{space} std {metric}"]
      columns = {k: k.split(" ")[1] for k in keys}
      columns[f"{space} std {metric}"] = "std over L, V, A"
      tables.append(grid.Table(
          title=f"{metric}: the {name} heads of each modality", rows=list(variants),
          reference=reference, metrics=keys, columns=columns))
    tables.append(grid.Table(
        title=f"{metric}: the fused outputs", rows=list(variants), reference=reference,
        metrics=[f"c {metric}", f"fused {metric}"],
        columns={f"c {metric}": "homogeneous fusion head (logits_c)",
                 f"fused {metric}": "final prediction"}))
  return tables


def main(argv=None):
  values = grid.flag_values()
  grid.add_variant_flags(values, VARIANTS, "full")
  return grid.run_command("table7", __doc__.split("\n")[0], values, lambda: _report(values),
                          argv)


def _report(args):
  base = args.config
  variants = grid.pick_variants(args.variants, VARIANTS, args.reference)
  family = grid.metric_family(base)
  metrics = grid.pick_metrics(args.metrics, family, default=HEAD_METRICS[family])
  runs = grid.variant_runs(base, variants)
  for run in runs:
    grid.validate(run.config, f"variant {run.name}")
  workdir = args.workdir or os.path.join("runs", "table7")
  options = grid.placement_options(args)
  start = time.time()
  tables = tables_for(variants, args.reference, metrics)
  note = ("Table 7's \"w/o FD\" column is the `ca` row, \"w/ FD\" the `fd_ca` row; Figs. 4-6 "
          "compare `fd_ca` (w/ FD), `no_dm` (w/ FD, GD) and `full` (w/ FD, GD, DM). mean and "
          "std are over the three modalities of each seed (std: the gap between modalities, "
          "lower is better), then mean ± std over seeds.")
  lower = [k for t in tables for k in t.metrics if " std " in k]

  def report(outcome):
    per_seed = per_seed_heads(runs, workdir, args.split, metrics, len(base.train.seeds))
    return grid.write_report(workdir, kind="table7", base_config=base, runs=runs, tables=tables,
                             outcome=outcome, per_seed=per_seed, split=args.split,
                             legend=grid.legend(variants) + "\n\n" + note,
                             lower_is_better=lower, start_time=start)

  return grid.run_grid("table7", base, workdir, runs, after_run=make_after_run(args.split),
                       reuse=grid.reuse_dirs(args), report=report, **options)


if __name__ == "__main__":
  sys.exit(main())
