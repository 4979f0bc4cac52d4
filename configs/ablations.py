"""Ablation configs of the DHMD paper: Table 6 (components) and Table 8 (MulT + GD / DM).

Usage: `--config=configs/ablations.py:<dataset>,<variant>[,<dataset argument>]`, e.g.
`configs/ablations.py:mosei,no_gd` or `configs/ablations.py:mosei,no_gd,unaligned` (the third
part is passed to the dataset config's `get_config`). `<dataset>` names a config in this folder
(`mosei`, `mosi`, `sims`, `urfunny`, `mustard`, `synthetic`, `tiny`, `default`); it is found next
to this file, so this works from any working directory. The variant then sets
`config.model.arch` and the four component switches:

| variant      | table | arch | FD | CA | GD | DM | row                                            |
|--------------|-------|------|----|----|----|----|------------------------------------------------|
| `full`       | 6     | dhmd | x  | x  | x  | x  | DHMD                                           |
| `no_dm`      | 6     | dhmd | x  | x  | x  |    | FD+CA+GD (the DMD model when fusion="code")    |
| `no_gd`      | 6     | dhmd | x  | x  |    | x  | FD+CA+DM                                       |
| `fd_ca`      | 6     | dhmd | x  | x  |    |    | FD+CA                                          |
| `ca_dm`      | 6     | dhmd |    | x  |    | x  | CA+DM: no decoupling, both branches on X~_m    |
| `fd`         | 6     | dhmd | x  |    |    |    | FD only: Linear(d->2d) replaces each CA pair   |
| `none`       | 6     | dhmd |    |    |    |    | none of the four                               |
| `mult`       | 8     | mult |    | x  |    |    | MuLT baseline on the Conv1d features           |
| `mult_gd`    | 8     | mult |    | x  | x  |    | MuLT (w/ GD): HeGD on the memory-transf. heads |
| `mult_gd_dm` | 8     | mult |    | x  | x  | x  | MuLT (w/ GD & DM): plus HeDM                   |

FD = feature decoupling, CA = cross-modal attention units, GD = both GD-Units (graph
distillation), DM = both dictionaries (dictionary matching). Every other field keeps the
dataset config's value. A component that is switched off is not built (see `dhmd_jax/models/dhmd.py`
for what replaces it).
"""

import importlib
import pathlib
import sys

# variant -> (arch, use_fd, use_ca, use_gd, use_dm)
VARIANTS = {
    "full": ("dhmd", True, True, True, True),
    "no_dm": ("dhmd", True, True, True, False),
    "no_gd": ("dhmd", True, True, False, True),
    "fd_ca": ("dhmd", True, True, False, False),
    "ca_dm": ("dhmd", False, True, False, True),
    "fd": ("dhmd", True, False, False, False),
    "none": ("dhmd", False, False, False, False),
    "mult": ("mult", False, True, False, False),
    "mult_gd": ("mult", False, True, True, False),
    "mult_gd_dm": ("mult", False, True, True, True),
}

_CONFIG_DIR = pathlib.Path(__file__).resolve().parent


def _check_variant(variant: str):
  if variant not in VARIANTS:
    raise ValueError(f"unknown ablation variant {variant!r}; choose one of "
                     f"{', '.join(VARIANTS)} (configs/ablations.py).")


def apply_variant(config, variant: str):
  """Sets `config.model.arch/use_fd/use_ca/use_gd/use_dm` for `variant`; returns the config."""
  _check_variant(variant)
  arch, use_fd, use_ca, use_gd, use_dm = VARIANTS[variant]
  config.model.arch = arch
  config.model.use_fd = use_fd
  config.model.use_ca = use_ca
  config.model.use_gd = use_gd
  config.model.use_dm = use_dm
  return config


def _load_dataset_config(dataset: str, dataset_arg):
  path = _CONFIG_DIR / f"{dataset}.py"
  if dataset in ("ablations", "__init__") or not path.is_file():
    available = sorted(p.stem for p in _CONFIG_DIR.glob("*.py")
                       if p.stem not in ("ablations", "__init__"))
    raise ValueError(f"no dataset config {path} for {dataset!r}; available: "
                     f"{', '.join(available)}.")
  # The dataset configs import `configs.default`: make the folder above `configs/` importable,
  # so this works from any working directory.
  root = str(_CONFIG_DIR.parent)
  if root not in sys.path:
    sys.path.insert(0, root)
  module = importlib.import_module(f"{_CONFIG_DIR.name}.{dataset}")
  return module.get_config() if dataset_arg is None else module.get_config(dataset_arg)


def get_config(arg: str = "synthetic,full"):
  """`arg` = "<dataset>,<variant>[,<dataset argument>]", e.g. "mosei,no_dm,unaligned"."""
  parts = [p.strip() for p in str(arg).split(",")]
  if len(parts) not in (2, 3) or not all(parts):
    raise ValueError(f"configs/ablations.py expects '<dataset>,<variant>[,<dataset argument>]' "
                     f"(e.g. '--config=configs/ablations.py:mosei,no_gd' or "
                     f"'configs/ablations.py:mosei,no_gd,unaligned'), got {arg!r}.")
  dataset, variant = parts[:2]
  _check_variant(variant)  # before loading, so a typo fails fast
  dataset_arg = parts[2] if len(parts) == 3 else None
  return apply_variant(_load_dataset_config(dataset, dataset_arg), variant)
