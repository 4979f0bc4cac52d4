"""The paper's result tables as grids of runs, one command each (docs/experiments.md).

  python -m dhmd_jax.experiments.table6 --config=configs/mosei.py --workdir=runs/table6
  python -m dhmd_jax.experiments.table7 --config=configs/mosei.py --workdir=runs/table7
  python -m dhmd_jax.experiments.table8 --config=configs/mosi.py --workdir=runs/table8
  python -m dhmd_jax.experiments.sweep --config=configs/mosi.py --workdir=runs/fig13

`table6` (component ablations), `table8` (MulT, MulT + GD, MulT + GD + DM beside DHMD), `table7`
(accuracy of each modality's own homogeneous and heterogeneous heads next to the fused output,
with and without FD, GD and DM; the numbers of Table 7 and Figs. 4-6) and `sweep` (Fig. 13:
lambda1-3 and the dictionary size K). Every run trains all seeds of the config in one program;
the values of a loss-weight sweep train side by side in one program too. `grid.py` holds what they
share: planning, skipping finished runs, progress, and the tables with their statistics.
`--devices_per_run=K` trains a grid's runs side by side on groups of K devices (a worker process
each, `worker.py`); `--shard_index=I --num_shards=N` (or a SLURM job array) shares a grid's runs
out between processes on several hosts.
"""
