"""The training objective: maps the model's outputs and the config onto the pure losses (Eq. 14).

`losses.py` holds the math as pure keyword-only functions of arrays; this module only decides,
from the config, which of them apply to which outputs. It returns the scalar to minimise and a
flat dict of every named term (for logs), plus the mean GD edge weights for inspection.
"""

import jax.numpy as jnp

from dhmd_jax import losses
from dhmd_jax.names import EDGE_NAMES


def task_kind(config):
  return "ce" if config.dataset.task == "binary" else "l1"


def triplet_classes(config, labels):
  """Class of each sample for the paper-form triplets (Eq. 4, Eq. 13)."""
  if config.dataset.task == "binary":
    return labels.astype(jnp.int32)
  return losses.triplet_classes(labels=labels, mode=config.loss.triplet_classes)


_NO_TRIPLETS = {"triplets": jnp.zeros(()), "active": jnp.zeros(())}


def _decoupling_terms(config, outputs, labels):
  """L_rec, L_cyc, L_mar, L_ort (Eq. 2-5) and L_mar's triplet counts, or zeros when there is
  no decoupling."""
  if "shared" not in outputs:
    zero = jnp.zeros(())
    return zero, zero, zero, zero, _NO_TRIPLETS
  rec = losses.reconstruction_loss(
      predictions=outputs["recon"], targets=outputs["proj"],
      reduction=config.loss.recon_reduction)
  cyc = losses.cycle_loss(
      predictions=outputs["private_regressed"], targets=outputs["private"],
      reduction=config.loss.recon_reduction)
  ort = losses.orthogonality_loss(
      shared=outputs["shared"], private=outputs["private"], mode=config.loss.ort_mode)
  if config.loss.margin_mode == "code":
    mar, stats = losses.adaptive_margin_loss(
        features=outputs["margin_features"], labels=labels.astype(jnp.float32),
        scale=config.loss.adaptive_margin_scale, with_stats=True)
  else:  # "paper" (validation.py checks config values once, before any work)
    mar, stats = losses.triplet_margin_loss(
        features=outputs["margin_features"], classes=triplet_classes(config, labels),
        margin=config.loss.margin, with_stats=True)
  return rec, cyc, mar, ort, stats


def _gd_term(config, outputs, space):
  """One GD-Unit's distillation loss (Eq. 7-9, or the DMD-code form), or zeros."""
  edges_key = f"gd_{space}_edges"
  if edges_key not in outputs:
    return jnp.zeros(()), {}
  if space == "homo":
    repr_loss = "l1" if config.gd.homo_repr_loss else "none"
  else:
    repr_loss = "cosine_push" if config.gd.hetero_repr_loss else "none"
  prior = losses.edge_prior(kind=config.gd.prior, space=space)
  reg_weight = 0.0 if config.gd.prior == "none" else config.gd.reg_weight
  terms = losses.graph_distillation_loss(
      logits=outputs[f"logits_{space}"], reprs=outputs[f"repr_{space}"],
      edge_weights=outputs[edges_key], prior=prior, reg_weight=reg_weight,
      repr_weight=config.gd.repr_weight, repr_loss=repr_loss)
  return terms["total"], {f"gd_{space}_{k}": v for k, v in terms.items() if k != "total"}


def _ctr_term(config, outputs, labels, space):
  """L_ctr of one dictionary space (Eq. 13) and its triplet counts, or zeros."""
  key = f"dm_{space}_recon"
  if key not in outputs:
    return jnp.zeros(()), _NO_TRIPLETS
  return losses.triplet_margin_loss(
      features=outputs[key], classes=triplet_classes(config, labels), margin=config.dm.margin,
      with_stats=True)


# The Eq. 14 weights (fields of config.loss): they change no shape, so runs that differ only in
# them can train side by side in one program, each run passing its own values (`weights`).
LOSS_WEIGHTS = ("lambda_dec", "lambda_dtl", "lambda_dic", "gamma")


def compute_objective(config, outputs, labels, weights=None):
  """Returns (total, terms): Eq. 14 and every named term, all scalars.

  Args:
    config: the full config.
    outputs: the model's output dict.
    labels: (B,) float32 regression labels or int32 classes.
    weights: None (the config's loss weights), or {name: scalar} for some of `LOSS_WEIGHTS`
      (traced values allowed: a sweep's per-run weights), replacing config.loss.<name>.
  """
  lam = {name: getattr(config.loss, name) for name in LOSS_WEIGHTS}
  if weights is not None:
    unknown = sorted(set(weights) - set(LOSS_WEIGHTS))
    if unknown:
      raise ValueError(f"loss weights {unknown} are not Eq. 14 weights; choose from "
                       f"{', '.join(LOSS_WEIGHTS)}")
    lam.update(weights)
  kind = task_kind(config)
  aux = None
  if config.loss.task == "sum8":
    heads = [outputs[k] for k in ("logits_homo", "logits_hetero") if k in outputs]
    if "logits_c" in outputs:
      heads.append(outputs["logits_c"][None])
    aux = jnp.concatenate(heads, axis=0) if heads else None  # (K, B, O)
  task = losses.task_loss(prediction=outputs["prediction"], labels=labels, aux_logits=aux,
                          kind=kind)
  rec, cyc, mar, ort, mar_stats = _decoupling_terms(config, outputs, labels)
  dtl_homo, gd_homo_parts = _gd_term(config, outputs, "homo")
  dtl_hetero, gd_hetero_parts = _gd_term(config, outputs, "hetero")
  ctr_homo, ctr_homo_stats = _ctr_term(config, outputs, labels, "homo")
  ctr_hetero, ctr_hetero_stats = _ctr_term(config, outputs, labels, "hetero")
  terms = losses.total_loss(
      task=task, rec=rec, cyc=cyc, mar=mar, ort=ort, dtl_homo=dtl_homo, dtl_hetero=dtl_hetero,
      ctr_homo=ctr_homo, ctr_hetero=ctr_hetero,
      lambda_dec=lam["lambda_dec"], lambda_dtl=lam["lambda_dtl"],
      lambda_dic=lam["lambda_dic"], gamma=lam["gamma"])
  terms = dict(terms, **gd_homo_parts, **gd_hetero_parts)
  # How many triplets each triplet loss found in the batch, and how many still have a positive
  # hinge: a loss of 0 from an empty triplet set is not a solved one.
  for name, stats in (("mar", mar_stats), ("ctr_homo", ctr_homo_stats),
                      ("ctr_hetero", ctr_hetero_stats)):
    terms[f"triplets/{name}"] = stats["triplets"]
    terms[f"triplets_active/{name}"] = stats["active"]
  terms["final_task"] = losses.task_loss(prediction=outputs["prediction"], labels=labels,
                                         aux_logits=None, kind=kind)
  return terms["total"], terms


def edge_summary(outputs):
  """Batch-mean GD edge weight of each directed edge: {"homo/V->L": scalar, ...}."""
  summary = {}
  for space in ("homo", "hetero"):
    key = f"gd_{space}_edges"
    if key in outputs:
      mean = jnp.mean(outputs[key], axis=0)  # (6,)
      for e, name in enumerate(EDGE_NAMES):
        summary[f"{space}/{name}"] = mean[e]
  return summary
