"""Tests of dhmd_jax.objective.compute_objective: every fidelity switch against brute-force loops.

`test_losses.py` checks the pure losses; this file checks that the objective hands each config
switch to the right loss with the right inputs and weights. `compute_objective` gets a hand-made
model-output dict (tiny random arrays with the model's keys and shapes), labels and the tiny
config with one switch set; every term it reports and the total (Eq. 14) are compared with
float64 NumPy loops written from the definitions (the paper's equations and the DMD code's
losses, as the comments in `configs/default.py` and the docstrings in `losses.py` state them).
Each switch test also asserts that the switch's values give different numbers on these inputs,
so a switch the objective ignored, or wired to another value, could not pass. One test runs the
same check on the outputs of the real tiny model.
"""

import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import test_model
from configs import tiny
from dhmd_jax import objective
from dhmd_jax.models import build_model

# float32 on the objective's side, float64 in the loops.
_TOL = dict(rtol=1e-5, atol=1e-6)

B = 6  # batch
LENGTHS = (4, 5, 3)  # T'_m of (L, V, A): unequal, as for unaligned data
D = 4  # d_model: the width of the decoupled features, the homo reprs and the homo dictionary
H = 6  # 2d: the width of the hetero reprs and the hetero dictionary
# Continuous labels whose classes differ in every mode (paper Eq. 4 "c[i]"):
#   round7 (round half to even, clip to +-3): -2, 0, 0, 0, 2, 3
#   sign (y > 0):                               0, 0, 1, 1, 1, 1
#   exact:                                      -2.5, -0.4, 0.3, 0.3, 1.6, 3.4 (one tie)
# -0.4 joins 0.3 in round7 only, -2.5 joins -0.4 in sign only, and 1.6 and 3.4 join 0.3 in sign
# only; the 0.3 tie gives the DMD-code margin loss positives from another sample.
LABELS = np.array([-2.5, -0.4, 0.3, 0.3, 1.6, 3.4], np.float32)
BINARY_LABELS = np.array([0, 1, 1, 0, 1, 0], np.int32)

# GD-Unit edges as (student j, teacher i), DMD-code order: V->L, A->L, L->V, A->V, L->A, V->A.
EDGES = ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))
# DMD code `gd_prior` logits (divided by 0.25 before the softmax).
CODE_PRIOR_LOGITS = {"homo": (0, 0, 1, 0, 1, 0), "hetero": (0, 0, 1, 0, 1, 1)}

# Every term compute_objective reports.
TERMS = (
    "task", "rec", "cyc", "mar", "ort", "dec", "dtl_homo", "dtl_hetero", "dtl", "ctr_homo",
    "ctr_hetero", "dic", "total", "final_task",
    *(f"gd_{s}_{k}" for s in ("homo", "hetero") for k in ("logit", "repr", "reg")),
    *(f"{kind}/{name}" for kind in ("triplets", "triplets_active")
      for name in ("mar", "ctr_homo", "ctr_hetero")))


# ------------------------------------------------------------------------- inputs


def make_config(**switches):
  """The tiny config, with distinct values for every number the objective reads (so a swapped
  margin, weight or lambda shows), then `switches` ({"loss.task": "final", ...})."""
  config = tiny.get_config()
  config.loss.margin = 0.3  # alpha of Eq. 4 (paper-mode L_mar)
  config.dm.margin = 0.2  # alpha of Eq. 13 (L_ctr)
  config.loss.adaptive_margin_scale = 0.15
  config.gd.reg_weight = 3.0
  config.gd.repr_weight = 7.0
  # Large enough that each term moves the total far beyond the tolerance.
  config.loss.lambda_dec, config.loss.lambda_dtl = 0.7, 0.3
  config.loss.lambda_dic, config.loss.gamma = 0.5, 0.9
  for path, value in switches.items():
    group, name = path.split(".")
    setattr(getattr(config, group), name, value)
  return config


def make_outputs(seed=0, num_outputs=1):
  """A model-output dict of random float32 arrays with the keys and shapes the model returns
  for the full DHMD (decoupling, both GD-Units, both dictionaries, logits_c)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: rng.normal(size=shape).astype(np.float32)
  seqs = lambda: tuple(normal(B, t, D) for t in LENGTHS)  # 3 x (B, T'_m, d)

  def edges():  # (B, 6): a softmax over the six edges per sample, as the GD-Unit gives
    e = rng.normal(size=(B, 6))
    return (np.exp(e) / np.exp(e).sum(-1, keepdims=True)).astype(np.float32)

  o = num_outputs
  # Regression heads scattered around the labels: a task loss of the size of the other terms, so
  # that each of them moves the total well beyond the tolerance.
  near = LABELS[:, None] if o == 1 else 0.0
  head = lambda *lead: normal(*lead, B, o) + near  # (..., B, O)
  return {
      "prediction": head(),  # (B, O)
      "logits_homo": head(3), "logits_hetero": head(3),  # (3, B, O)
      "logits_c": head(),  # (B, O)
      "repr_homo": normal(3, B, D),  # (3, B, d)
      # (3, B, 2d), shifted so that most cosines are positive: the push-apart hinge is active.
      "repr_hetero": normal(3, B, H) + 0.5,
      "proj": seqs(), "recon": seqs(), "shared": seqs(), "private": seqs(),
      "private_regressed": seqs(),
      "margin_features": normal(B, 3, D),  # (B, 3, d)
      "gd_homo_edges": edges(), "gd_hetero_edges": edges(),  # (B, 6)
      "dm_homo_recon": normal(B, 3, D), "dm_hetero_recon": normal(B, 3, H),  # (B, 3, C)
  }


def run(config, outputs, labels, weights=None):
  total, terms = objective.compute_objective(
      config, jax.tree.map(jnp.asarray, outputs), jnp.asarray(labels), weights)
  assert float(total) == float(terms["total"])
  return {k: float(v) for k, v in terms.items()}


# ------------------------------------------------------------------------- brute-force reference


def _cos_embedding(x, y):
  """PyTorch `cosine_embedding_loss` cosine (1e-12 added to each squared norm)."""
  return float(np.dot(x, y) / math.sqrt((np.dot(x, x) + 1e-12) * (np.dot(y, y) + 1e-12)))


def _cos_hinge(x, y):
  """DMD `HingeLoss` cosine: norms max(sqrt(sum x^2 + 1e-8), 1e-8)."""
  nx = max(math.sqrt(np.dot(x, x) + 1e-8), 1e-8)
  ny = max(math.sqrt(np.dot(y, y) + 1e-8), 1e-8)
  return float(np.dot(x, y) / (nx * ny))


def _head_loss(logits, labels, kind):
  """mean_b |logits[b, 0] - y_b| (MAE), or mean_b -log softmax(logits[b])[y_b]."""
  values = []
  for b, y in enumerate(labels):
    if kind == "l1":
      values.append(abs(logits[b, 0] - y))
    else:
      z = logits[b]
      values.append(math.log(sum(math.exp(v) for v in z)) - z[int(y)])
  return sum(values) / len(values)


def _squared_error(predictions, targets, reduction):
  """Eq. 2-3 summed over modalities: elementwise mean (code) or per-sample squared Frobenius
  norm averaged over the batch (paper)."""
  total = 0.0
  for pred, target in zip(predictions, targets):
    b, t, c = pred.shape
    sq = [[[(pred[i, k, ch] - target[i, k, ch]) ** 2 for ch in range(c)] for k in range(t)]
          for i in range(b)]
    per_sample = [sum(sum(row) for row in sample) for sample in sq]
    total += sum(per_sample) / (b if reduction == "frobenius" else b * t * c)
  return total


def _orthogonality(shared, private, mode):
  """Eq. 5 summed over modalities, in the three readings of `loss.ort_mode`."""
  total = 0.0
  for s, p in zip(shared, private):
    b, t, c = s.shape
    if mode == "torch19_batch_axis":  # cosine across the batch for each (t, channel)
      values = [max(0.0, _cos_embedding(s[:, k, ch], p[:, k, ch]))
                for k in range(t) for ch in range(c)]
    else:  # cosine of each (sample, t) feature vector
      cosines = [_cos_embedding(s[i, k], p[i, k]) for i in range(b) for k in range(t)]
      values = [abs(x) if mode == "per_vector" else max(0.0, x) for x in cosines]
    total += sum(values) / len(values)
  return total


def _items(features, values):
  """(B, M, C), (B,) -> [(vector, modality, value)] over the 3B vectors."""
  return [(features[b, m], m, values[b]) for b in range(features.shape[0]) for m in range(3)]


def _paper_triplets(features, classes, margin):
  """Eq. 4 / Eq. 13: (loss, |S|, active) over S = {m_i != m_j, m_i == m_k, c_i == c_j,
  c_i != c_k}, mean over S, 0 when S is empty."""
  items = _items(features, classes)
  total, count, active = 0.0, 0, 0
  for zi, mi, ci in items:
    for zj, mj, cj in items:
      for zk, mk, ck in items:
        if mi != mj and mi == mk and ci == cj and ci != ck:
          hinge = max(0.0, margin - _cos_hinge(zi, zj) + _cos_hinge(zi, zk))
          total, count, active = total + hinge, count + 1, active + (hinge > 0)
  return (total / count if count else 0.0), count, active


def _adaptive_margin(features, labels, scale):
  """DMD-code L_mar: positives any other vector with the same label, negatives any with another
  label, margin scale * |y_i - y_k|, mean per anchor then over anchors."""
  items = _items(features, labels)
  per_anchor, count, active = [], 0, 0
  for i, (fi, _, yi) in enumerate(items):
    pos = [fp for p, (fp, _, yp) in enumerate(items) if p != i and yp == yi]
    neg = [(fk, yk) for fk, _, yk in items if yk != yi]
    hinges = [max(0.0, scale * abs(yi - yk) - _cos_hinge(fi, fp) + _cos_hinge(fi, fk))
              for fp in pos for fk, yk in neg]
    count += len(hinges)
    active += sum(h > 0 for h in hinges)
    if hinges:
      per_anchor.append(sum(hinges) / len(hinges))
  return (sum(per_anchor) / len(per_anchor) if per_anchor else 0.0), count, active


def _classes(config, labels):
  """c[i] of Eq. 4 / Eq. 13: the binary label itself, else `loss.triplet_classes`."""
  if config.dataset.task == "binary":
    return [int(y) for y in labels]
  mode = config.loss.triplet_classes
  if mode == "round7":
    return [int(np.round(min(max(float(y), -3.0), 3.0))) for y in labels]  # half to even
  if mode == "sign":
    return [int(float(y) > 0) for y in labels]
  return [float(y) for y in labels]


def _prior(kind, space):
  if kind == "code":
    e = [math.exp(v / 0.25) for v in CODE_PRIOR_LOGITS[space]]
    return [v / sum(e) for v in e]
  return [1.0 / 6] * 6 if kind == "uniform" else [0.0] * 6


def _distillation(config, outputs, space):
  """One GD-Unit's (logit, repr, reg) terms (Eq. 7-9 with the DMD code's prior, regulariser and
  representation terms; the paper form when the prior is "none")."""
  logits, reprs = outputs[f"logits_{space}"], outputs[f"repr_{space}"]
  w = outputs[f"gd_{space}_edges"]  # (B, 6)
  prior = _prior(config.gd.prior, space)
  reg_weight = 0.0 if config.gd.prior == "none" else config.gd.reg_weight
  on = config.gd.homo_repr_loss if space == "homo" else config.gd.hetero_repr_loss
  samples = range(w.shape[0])
  logit = rep = reg = 0.0
  for x, (j, i) in enumerate(EDGES):
    omega = [w[b, x] + prior[x] for b in samples]
    reg += reg_weight * (np.mean([w[b, x] for b in samples]) - prior[x]) ** 2
    logit += np.mean([omega[b] * np.abs(logits[j, b] - logits[i, b]).sum() for b in samples])
    if on and space == "hetero":  # cosine push-apart, times the mean edge weight
      rho = np.mean([max(0.0, _cos_embedding(reprs[j, b], reprs[i, b])) for b in samples])
      rep += config.gd.repr_weight * rho * np.mean(omega)
    elif on:  # L1 between representations, per sample
      rep += config.gd.repr_weight * np.mean(
          [omega[b] * np.abs(reprs[j, b] - reprs[i, b]).sum() for b in samples])
  return {"logit": logit, "repr": rep, "reg": reg}


def expected_terms(config, outputs, labels, weights=None):
  """Every term of `compute_objective`, from the definitions, in float64 loops."""
  out = jax.tree.map(lambda a: np.asarray(a, np.float64), outputs)
  labels = np.asarray(labels)
  kind = "ce" if config.dataset.task == "binary" else "l1"
  lam = {n: getattr(config.loss, n) for n in ("lambda_dec", "lambda_dtl", "lambda_dic", "gamma")}
  lam.update(weights or {})
  t = {"final_task": _head_loss(out["prediction"], labels, kind)}
  t["task"] = t["final_task"]
  if config.loss.task == "sum8":  # + 3 homo + 3 hetero heads + logits_c
    heads = [*out["logits_homo"], *out["logits_hetero"], out["logits_c"]]
    t["task"] += sum(_head_loss(h, labels, kind) for h in heads)
  reduction = config.loss.recon_reduction
  t["rec"] = _squared_error(out["recon"], out["proj"], reduction)
  t["cyc"] = _squared_error(out["private_regressed"], out["private"], reduction)
  t["ort"] = _orthogonality(out["shared"], out["private"], config.loss.ort_mode)
  classes = _classes(config, labels)
  if config.loss.margin_mode == "code":
    mar = _adaptive_margin(out["margin_features"], labels.astype(np.float64),
                           config.loss.adaptive_margin_scale)
  else:
    mar = _paper_triplets(out["margin_features"], classes, config.loss.margin)
  for space in ("homo", "hetero"):
    parts = _distillation(config, out, space)
    t.update({f"gd_{space}_{k}": v for k, v in parts.items()})
    t[f"dtl_{space}"] = sum(parts.values())
    ctr = _paper_triplets(out[f"dm_{space}_recon"], classes, config.dm.margin)
    t[f"ctr_{space}"], t[f"triplets/ctr_{space}"], t[f"triplets_active/ctr_{space}"] = ctr
  t["mar"], t["triplets/mar"], t["triplets_active/mar"] = mar
  t["dec"] = t["rec"] + t["cyc"] + lam["gamma"] * (t["mar"] + t["ort"])  # Eq. 6
  t["dtl"] = t["dtl_homo"] + t["dtl_hetero"]
  t["dic"] = t["ctr_homo"] + t["ctr_hetero"]
  t["total"] = (t["task"] + lam["lambda_dec"] * t["dec"] + lam["lambda_dtl"] * t["dtl"]
                + lam["lambda_dic"] * t["dic"])  # Eq. 14
  return t


def assert_terms_match(got, want, where):
  assert set(got) == set(TERMS) == set(want), where
  for name in TERMS:
    np.testing.assert_allclose(got[name], want[name], err_msg=f"{where}: {name}", **_TOL)


def assert_all_differ(values_by_setting, names, where):
  """The terms `names` take pairwise different values across settings, each gap at least 20
  times the comparison tolerance (so `assert_terms_match` tells the settings apart)."""
  for (a, ta), (b, tb) in itertools.combinations(values_by_setting.items(), 2):
    for name in names:
      gap = abs(ta[name] - tb[name])
      assert gap > 20 * (_TOL["atol"] + _TOL["rtol"] * max(abs(ta[name]), abs(tb[name]))), (
          f"{where}: {name} is {ta[name]} with {a} and {tb[name]} with {b}; the inputs must "
          f"tell the settings apart")


# ------------------------------------------------------------------------- tests


def test_labels_give_different_classes_in_every_mode():
  """The labels put different samples together in every triplet-class mode."""
  classes = {mode: _classes(make_config(**{"loss.triplet_classes": mode}), LABELS)
             for mode in ("round7", "sign", "exact")}
  assert classes["round7"] == [-2, 0, 0, 0, 2, 3]
  assert classes["sign"] == [0, 0, 1, 1, 1, 1]
  partition = lambda c: {frozenset(i for i in range(B) if c[i] == v) for v in c}
  assert len({frozenset(partition(c)) for c in classes.values()}) == 3


def test_tiny_config_defaults_match_brute_force():
  """The tiny config as it is (all switches at their DMD-code defaults)."""
  config = tiny.get_config()
  outputs = make_outputs()
  assert_terms_match(run(config, outputs, LABELS), expected_terms(config, outputs, LABELS),
                     "tiny defaults")


# switch -> (its values, default first; the terms it must change; other switches it needs).
# Every value's total is compared with the loops; "total" is in the list where the switch moves
# one term, so its total must move too (terms moved in opposite directions may cancel).
SWITCHES = {
    "loss.task": (("sum8", "final"), ("task", "total"), {}),
    "loss.margin_mode": (("code", "paper"), ("mar", "triplets/mar", "total"), {}),
    # Classes reach L_mar only in the paper mode; L_ctr (Eq. 13) uses them always.
    "loss.triplet_classes": (
        ("round7", "sign", "exact"),
        ("mar", "ctr_homo", "ctr_hetero", "triplets/mar", "triplets/ctr_homo"),
        {"loss.margin_mode": "paper"}),
    "loss.ort_mode": (("torch19_batch_axis", "per_vector", "per_vector_hinge"), ("ort", "total"),
                      {}),
    "loss.recon_reduction": (("mean", "frobenius"), ("rec", "cyc", "total"), {}),
    # Not gd_hetero_logit / gd_hetero_repr: the hetero code prior gives each unordered modality
    # pair the mass 1/3 that "uniform" gives it, and those two terms are symmetric in the pair
    # (|l_j - l_i| with one logit, cosine), so there code and uniform give the same value.
    "gd.prior": (("code", "uniform", "none"),
                 ("gd_homo_logit", "gd_homo_reg", "gd_hetero_reg", "dtl_homo", "dtl_hetero",
                  "total"), {}),
    "gd.homo_repr_loss": ((False, True), ("gd_homo_repr", "dtl_homo", "total"), {}),
    "gd.hetero_repr_loss": ((True, False), ("gd_hetero_repr", "dtl_hetero", "total"), {}),
}


@pytest.mark.parametrize("switch", list(SWITCHES))
def test_every_switch_value_matches_brute_force_and_matters(switch):
  values, changed, needs = SWITCHES[switch]
  outputs = make_outputs(seed=1)
  got = {}
  for value in values:
    config = make_config(**needs, **{switch: value})
    got[value] = run(config, outputs, LABELS)
    assert_terms_match(got[value], expected_terms(config, outputs, LABELS), f"{switch}={value}")
  assert_all_differ(got, changed, switch)


def test_paper_switches_together_match_brute_force():
  """Every switch at its paper value at once (no term masks another's wiring)."""
  config = make_config(**{
      "loss.task": "final", "loss.margin_mode": "paper", "loss.triplet_classes": "round7",
      "loss.ort_mode": "per_vector", "loss.recon_reduction": "frobenius", "gd.prior": "none",
      "gd.homo_repr_loss": False, "gd.hetero_repr_loss": False})
  outputs = make_outputs(seed=2)
  got = run(config, outputs, LABELS)
  assert_terms_match(got, expected_terms(config, outputs, LABELS), "paper switches")
  # Paper Eq. 7-9: no prior, no regulariser, no representation term.
  for space in ("homo", "hetero"):
    assert got[f"gd_{space}_reg"] == got[f"gd_{space}_repr"] == 0.0
  assert got["task"] == got["final_task"]


@pytest.mark.parametrize("task", ["sum8", "final"])
@pytest.mark.parametrize("margin_mode", ["code", "paper"])
def test_binary_cross_entropy_path(task, margin_mode):
  """dataset.task=binary: 2 logits per head, softmax cross-entropy in the task terms, the labels
  themselves as triplet classes (and as the code-mode margin's labels)."""
  config = make_config(**{"dataset.task": "binary", "loss.task": task,
                          "loss.margin_mode": margin_mode})
  outputs = make_outputs(seed=3, num_outputs=2)
  got = run(config, outputs, BINARY_LABELS)
  assert_terms_match(got, expected_terms(config, outputs, BINARY_LABELS),
                     f"binary, task={task}, margin_mode={margin_mode}")
  # A regression wiring (L1 of logit 0 against the class id) would give another number.
  regression = make_config(**{"loss.task": task, "loss.margin_mode": margin_mode})
  l1 = expected_terms(regression, outputs, BINARY_LABELS.astype(np.float32))
  assert abs(got["final_task"] - l1["final_task"]) > 1e-3
  # The classes are the labels whatever loss.triplet_classes says (on labels in {0, 1} every
  # mode happens to agree with them, so this pins the invariance, not the branch that keeps it).
  for mode in ("sign", "exact"):
    config.loss.triplet_classes = mode
    assert run(config, outputs, BINARY_LABELS) == got, mode


def test_eq14_weights_enter_the_total():
  """lambda_dec, lambda_dtl, lambda_dic and gamma (Eq. 6, Eq. 14), from the config and from the
  `weights` argument (which replaces the config's values, traced values included)."""
  outputs = make_outputs(seed=4)
  config = make_config()
  base = run(config, outputs, LABELS)
  assert_terms_match(base, expected_terms(config, outputs, LABELS), "distinct weights")
  new = {"lambda_dec": 0.2, "lambda_dtl": 0.15, "lambda_dic": 0.35, "gamma": 0.45}
  for name, value in new.items():
    changed = make_config(**{f"loss.{name}": value})
    want = expected_terms(changed, outputs, LABELS)
    from_config = run(changed, outputs, LABELS)
    assert_terms_match(from_config, want, f"loss.{name}={value}")
    assert_terms_match(run(config, outputs, LABELS, {name: value}), want, f"weights {name}")
    assert_all_differ({"base": base, name: from_config}, ("total",), name)
  # All four at once, as traced values under jit (one run of a loss-weight sweep).
  jitted = jax.jit(lambda w: objective.compute_objective(
      config, jax.tree.map(jnp.asarray, outputs), jnp.asarray(LABELS), w)[1])
  got = {k: float(v) for k, v in jitted({k: jnp.float32(v) for k, v in new.items()}).items()}
  assert_terms_match(got, expected_terms(config, outputs, LABELS, new), "traced weights")
  with pytest.raises(ValueError, match=r"\['lambda_4'\] are not Eq. 14 weights"):
    run(config, outputs, LABELS, {"lambda_4": 1.0})


def test_real_tiny_model_outputs_match_brute_force():
  """The objective on the real tiny model's outputs (every key the model returns), with the
  non-default switches that reach the most terms."""
  config = make_config(**{
      "loss.task": "final", "loss.margin_mode": "paper", "loss.triplet_classes": "sign",
      "loss.ort_mode": "per_vector_hinge", "loss.recon_reduction": "frobenius",
      "gd.prior": "uniform", "gd.homo_repr_loss": True, "gd.hetero_repr_loss": True})
  model = build_model(config, num_outputs=1)
  batch = test_model.make_batch((7, 6, 5), (6, 5, 3), batch_size=B, seed=5)
  shapes, _ = test_model.abstract_init(model, batch)
  # Jitted: one compilation costs less than the un-jitted model's op-by-op dispatch.
  apply = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True))
  outputs = apply(test_model.random_params(shapes, seed=5), batch)
  assert {"shared", "gd_homo_edges", "dm_hetero_recon", "logits_c"} <= set(outputs)
  assert_terms_match(run(config, outputs, LABELS), expected_terms(config, outputs, LABELS),
                     "real tiny model")
