"""Table 6 of the paper: the component ablations, every variant over the config's seeds.

  python -m dhmd_jax.experiments.table6 --config=configs/mosei.py --workdir=runs/table6
  python -m dhmd_jax.experiments.table6 --config=configs/tiny.py --workdir=/tmp/t6 \\
      --variants=full,no_dm,none --config.train.num_epochs=2

Rows `full, no_dm, no_gd, fd_ca, ca_dm, fd, none` (configs/ablations.py: FD, CA, GD, DM switched
on and off), each trained in `<workdir>/<variant>` and compared with `full` (`--reference`):
mean ± std over seeds, the paired difference with its 95% CI and p-value. Rerunning skips the
finished variants and resumes an interrupted one. See `dhmd_jax/experiments/grid.py`.
"""

import sys

from dhmd_jax.experiments import grid

VARIANTS = ("full", "no_dm", "no_gd", "fd_ca", "ca_dm", "fd", "none")
TITLE = "Table 6: ablation of the components (FD, CA, GD, DM)"


def main(argv=None):
  return grid.variant_grid("table6", argv, default_variants=VARIANTS, reference="full",
                           title=TITLE, description=__doc__.split("\n")[0])


if __name__ == "__main__":
  sys.exit(main())
