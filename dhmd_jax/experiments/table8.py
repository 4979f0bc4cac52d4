"""Table 8 of the paper: MulT, MulT with GD, MulT with GD and DM, and DHMD beside them.

  python -m dhmd_jax.experiments.table8 --config=configs/mosi.py --workdir=runs/table8

Rows `mult, mult_gd, mult_gd_dm` (configs/ablations.py: the MulT baseline on the Conv1d features,
plus a HeGD unit, plus HeDM) and `full` (DHMD, the reference row), each trained in
`<workdir>/<variant>` over the config's seeds: mean ± std, and each MulT row's paired difference
from DHMD with its 95% CI and p-value. See `dhmd_jax/experiments/grid.py`.
"""

import sys

from dhmd_jax.experiments import grid

VARIANTS = ("mult", "mult_gd", "mult_gd_dm", "full")
TITLE = "Table 8: graph distillation and dictionary matching on MulT, beside DHMD (full)"


def main(argv=None):
  return grid.variant_grid("table8", argv, default_variants=VARIANTS, reference="full",
                           title=TITLE, description=__doc__.split("\n")[0])


if __name__ == "__main__":
  sys.exit(main())
