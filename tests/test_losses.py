"""Tests of dhmd_jax.losses against brute-force NumPy loops and hand-computed values."""

import functools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhmd_jax import losses

_TOL = dict(rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------- brute-force references


def _cos_embedding(x, y):
  return float(np.dot(x, y) / math.sqrt((np.dot(x, x) + 1e-12) * (np.dot(y, y) + 1e-12)))


def _cos_hinge_norm(x, y):
  nx = max(math.sqrt(np.dot(x, x) + 1e-8), 1e-8)
  ny = max(math.sqrt(np.dot(y, y) + 1e-8), 1e-8)
  return float(np.dot(x, y) / (nx * ny))


def _stack(features, values):
  """(B, M, C), (B,) -> list of (vector, modality, value) over the 3B items."""
  b, m, _ = features.shape
  return [(features[i, k], k, values[i]) for i in range(b) for k in range(m)]


def _brute_adaptive_margin(features, labels, scale):
  items = _stack(np.asarray(features, np.float64), np.asarray(labels, np.float64))
  losses_i = []
  for i, (fi, _, yi) in enumerate(items):
    pos = [fj for j, (fj, _, yj) in enumerate(items) if j != i and yj == yi]
    neg = [(fk, yk) for fk, _, yk in items if yk != yi]
    if not pos or not neg:
      continue
    terms = [max(0.0, scale * abs(yi - yk) - _cos_hinge_norm(fi, fp) + _cos_hinge_norm(fi, fk))
             for fp in pos for fk, yk in neg]
    losses_i.append(sum(terms) / len(terms))
  return sum(losses_i) / len(losses_i) if losses_i else 0.0


def _brute_triplet(features, classes, margin):
  items = _stack(np.asarray(features, np.float64), np.asarray(classes))
  total, count = 0.0, 0
  for zi, mi, ci in items:
    for zj, mj, cj in items:
      for zk, mk, ck in items:
        if mi != mj and mi == mk and ci == cj and ci != ck:
          total += max(0.0, margin - _cos_hinge_norm(zi, zj) + _cos_hinge_norm(zi, zk))
          count += 1
  return total / count if count else 0.0


def _brute_gd(logits, reprs, w, prior, reg_weight, repr_weight, repr_loss):
  logits, reprs, w, prior = (np.asarray(a, np.float64) for a in (logits, reprs, w, prior))
  _, b, _ = logits.shape
  reg = reg_weight * sum((w[:, x].mean() - prior[x]) ** 2 for x in range(6))
  logit = rep = 0.0
  for x, (j, i) in enumerate(losses.EDGES):
    omega = [w[bb, x] + prior[x] for bb in range(b)]
    logit += sum(omega[bb] * np.abs(logits[j, bb] - logits[i, bb]).sum() for bb in range(b)) / b
    if repr_loss == "cosine_push":
      rho = sum(max(0.0, _cos_embedding(reprs[j, bb], reprs[i, bb])) for bb in range(b)) / b
      rep += repr_weight * rho * sum(omega) / b
    elif repr_loss == "l1":
      rep += repr_weight * sum(
          omega[bb] * np.abs(reprs[j, bb] - reprs[i, bb]).sum() for bb in range(b)) / b
  return {"logit": logit, "repr": rep, "reg": reg, "total": logit + rep + reg}


def _random_gd_inputs(seed, b=4, o=1, h=5):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(3, b, o)).astype(np.float32)
  reprs = rng.normal(size=(3, b, h)).astype(np.float32)
  w = np.asarray(jax.nn.softmax(rng.normal(size=(b, 6)), axis=-1), np.float32)
  return logits, reprs, w


# ------------------------------------------------------------------------------------ task loss


def test_task_loss_l1_with_aux_matches_loop():
  rng = np.random.default_rng(0)
  pred = rng.normal(size=(5, 1)).astype(np.float32)
  aux = rng.normal(size=(7, 5, 1)).astype(np.float32)
  y = rng.normal(size=(5,)).astype(np.float32)
  want = np.mean(np.abs(pred[:, 0] - y)) + sum(np.mean(np.abs(a[:, 0] - y)) for a in aux)
  got = losses.task_loss(prediction=pred, labels=y[:, None], aux_logits=aux)
  np.testing.assert_allclose(got, want, **_TOL)
  np.testing.assert_allclose(losses.task_loss(prediction=pred, labels=y),
                             np.mean(np.abs(pred[:, 0] - y)), **_TOL)


def test_task_loss_binary_cross_entropy_by_hand():
  logits = jnp.array([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
  y = jnp.array([0, 1, 1])
  want = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1)) + math.log(2)) / 3
  np.testing.assert_allclose(losses.task_loss(prediction=logits, labels=y, kind="ce"), want,
                             **_TOL)
  both = losses.task_loss(prediction=logits, labels=y, aux_logits=logits[None], kind="ce")
  np.testing.assert_allclose(both, 2 * want, **_TOL)


# ---------------------------------------------------------------------------- decoupling losses


def _sequences(rng, b=3, lengths=(4, 6, 5), c=3):
  return [rng.normal(size=(b, t, c)).astype(np.float32) for t in lengths]


def test_reconstruction_and_cycle_match_loops():
  rng = np.random.default_rng(1)
  preds, targets = _sequences(rng), _sequences(rng)
  mean_want = frob_want = 0.0
  for p, t in zip(preds, targets):
    b, tt, c = p.shape
    sq = [[[(p[i, k, ch] - t[i, k, ch]) ** 2 for ch in range(c)] for k in range(tt)]
          for i in range(b)]
    mean_want += sum(sum(sum(r) for r in s) for s in sq) / (b * tt * c)
    frob_want += sum(sum(sum(r) for r in s) for s in sq) / b
  got = losses.reconstruction_loss(predictions=preds, targets=targets)
  np.testing.assert_allclose(got, mean_want, **_TOL)
  got = losses.reconstruction_loss(predictions=preds, targets=targets, reduction="frobenius")
  np.testing.assert_allclose(got, frob_want, **_TOL)
  got = losses.cycle_loss(predictions=preds, targets=targets, reduction="frobenius")
  np.testing.assert_allclose(got, frob_want, **_TOL)


def test_orthogonality_modes_match_loops():
  rng = np.random.default_rng(2)
  shared, private = _sequences(rng), _sequences(rng)
  want = {"torch19_batch_axis": 0.0, "per_vector": 0.0, "per_vector_hinge": 0.0}
  for s, p in zip(shared, private):
    b, t, c = s.shape
    want["torch19_batch_axis"] += sum(
        max(0.0, _cos_embedding(s[:, k, ch], p[:, k, ch])) for k in range(t)
        for ch in range(c)) / (t * c)
    cosines = [_cos_embedding(s[i, k], p[i, k]) for i in range(b) for k in range(t)]
    want["per_vector"] += sum(abs(x) for x in cosines) / len(cosines)
    want["per_vector_hinge"] += sum(max(0.0, x) for x in cosines) / len(cosines)
  for mode, value in want.items():
    got = losses.orthogonality_loss(shared=shared, private=private, mode=mode)
    np.testing.assert_allclose(got, value, err_msg=mode, **_TOL)


def test_orthogonality_orthogonal_identical_and_opposite_inputs():
  rng = np.random.default_rng(3)
  a = rng.normal(size=(2, 4, 3)).astype(np.float32)
  # Across the batch axis: s = (a_0, 0), p = (0, a_1) are orthogonal for every (t, c).
  s = np.stack([a[0], np.zeros_like(a[0])])
  p = np.stack([np.zeros_like(a[1]), a[1]])
  ort = functools.partial(losses.orthogonality_loss, mode="torch19_batch_axis")
  assert float(ort(shared=[s], private=[p])) == 0.0
  np.testing.assert_allclose(ort(shared=[a, a, a], private=[a, a, a]), 3.0, rtol=1e-6)
  # Per vector: channel-disjoint features are orthogonal for every (b, t).
  s = a * np.array([1.0, 1.0, 0.0], np.float32)
  p = a * np.array([0.0, 0.0, 1.0], np.float32)
  for mode in ("per_vector", "per_vector_hinge"):
    assert float(losses.orthogonality_loss(shared=[s], private=[p], mode=mode)) == 0.0
    np.testing.assert_allclose(
        losses.orthogonality_loss(shared=[a], private=[a], mode=mode), 1.0, rtol=1e-6)
  # Anti-parallel: the hinge sees nothing, |cos| (paper reading) penalises it fully.
  assert float(losses.orthogonality_loss(shared=[a], private=[-a], mode="per_vector_hinge")) == 0
  np.testing.assert_allclose(
      losses.orthogonality_loss(shared=[a], private=[-a], mode="per_vector"), 1.0, rtol=1e-6)


# ------------------------------------------------------------------------------- triplet losses


def test_adaptive_margin_matches_loop_with_label_ties():
  rng = np.random.default_rng(4)
  for b in (1, 2, 5):
    feats = rng.normal(size=(b, 3, 4)).astype(np.float32)
    y = rng.choice(np.array([-1.0, 0.0, 0.6, 2.2], np.float32), size=b)
    y[0] = y[-1]  # an exact tie across samples (for b > 1)
    got = losses.adaptive_margin_loss(features=feats, labels=y)
    np.testing.assert_allclose(got, _brute_adaptive_margin(feats, y, 0.15), **_TOL)


def test_adaptive_margin_by_hand():
  e1, e2 = np.eye(2, dtype=np.float32)
  y = np.array([0.0, 1.0], np.float32)
  separated = np.stack([np.stack([e1] * 3), np.stack([e2] * 3)])  # (2, 3, 2)
  np.testing.assert_allclose(losses.adaptive_margin_loss(features=separated, labels=y), 0.0,
                             atol=1e-6)
  collapsed = np.ones((2, 3, 2), np.float32)  # all cosines 1 -> hinge = 0.15 * |0 - 1|
  np.testing.assert_allclose(losses.adaptive_margin_loss(features=collapsed, labels=y), 0.15,
                             **_TOL)


def test_triplet_margin_matches_loop():
  rng = np.random.default_rng(5)
  for b, n_cls in ((1, 2), (3, 2), (6, 3)):
    feats = rng.normal(size=(b, 3, 4)).astype(np.float32)
    cls = rng.integers(0, n_cls, size=b)
    got = losses.triplet_margin_loss(features=feats, classes=cls, margin=0.1)
    np.testing.assert_allclose(got, _brute_triplet(feats, cls, 0.1), **_TOL)


def test_triplet_margin_by_hand():
  e1, e2 = np.eye(2, dtype=np.float32)
  cls = np.array([0, 1])
  separated = np.stack([np.stack([e1] * 3), np.stack([e2] * 3)])
  assert float(losses.triplet_margin_loss(features=separated, classes=cls)) == 0.0
  collapsed = np.ones((2, 3, 2), np.float32)
  np.testing.assert_allclose(losses.triplet_margin_loss(features=collapsed, classes=cls), 0.1,
                             **_TOL)


@pytest.mark.parametrize("b", [1, 4])
def test_no_valid_triplet_is_zero_with_finite_gradients(b):
  feats = jnp.asarray(np.random.default_rng(6).normal(size=(b, 3, 4)), jnp.float32)
  same = jnp.full((b,), 0.5)
  fns = {
      "adaptive": lambda f: losses.adaptive_margin_loss(features=f, labels=same),
      "triplet": lambda f: losses.triplet_margin_loss(features=f, classes=same),
  }
  for name, fn in fns.items():
    value, grad = jax.value_and_grad(fn)(feats)
    assert float(value) == 0.0, name
    chex.assert_tree_all_finite(grad)
  # Zero vectors do not produce NaN either.
  grad = jax.grad(lambda f: losses.triplet_margin_loss(features=f, classes=jnp.arange(b)))(
      jnp.zeros((b, 3, 4)))
  chex.assert_tree_all_finite(grad)


def test_triplet_classes():
  y = jnp.array([-3.7, -0.5, 0.5, 1.5, 2.5, 2.6])
  np.testing.assert_array_equal(losses.triplet_classes(labels=y), [-3, 0, 0, 2, 2, 3])
  np.testing.assert_array_equal(losses.triplet_classes(labels=y, mode="sign"), [0, 0, 1, 1, 1, 1])
  np.testing.assert_array_equal(losses.triplet_classes(labels=y, mode="exact"), y)
  with pytest.raises(ValueError, match="mode='bad'"):
    losses.triplet_classes(labels=y, mode="bad")


class JitAndVmapTest(chex.TestCase):
  """The triplet losses give the same values under jit, without jit, and under vmap."""

  @chex.variants(with_jit=True, without_jit=True)
  def test_jit_agreement(self):
    rng = np.random.default_rng(7)
    feats = rng.normal(size=(4, 3, 5)).astype(np.float32)
    y = np.array([0.2, -1.0, 0.2, 1.4], np.float32)
    cls = losses.triplet_classes(labels=y)
    mar = self.variant(lambda f, l: losses.adaptive_margin_loss(features=f, labels=l))
    trip = self.variant(lambda f, c: losses.triplet_margin_loss(features=f, classes=c))
    np.testing.assert_allclose(mar(feats, y), _brute_adaptive_margin(feats, y, 0.15), **_TOL)
    np.testing.assert_allclose(trip(feats, cls), _brute_triplet(feats, np.asarray(cls), 0.1),
                               **_TOL)

  def test_vmap_equals_loop(self):
    rng = np.random.default_rng(8)
    feats = rng.normal(size=(3, 4, 3, 5)).astype(np.float32)
    cls = rng.integers(0, 2, size=(3, 4))
    cls[0] = 1  # one batch without valid triplets
    fn = lambda f, c: losses.triplet_margin_loss(features=f, classes=c)
    batched = jax.jit(jax.vmap(fn))(feats, cls)
    np.testing.assert_allclose(batched, [fn(f, c) for f, c in zip(feats, cls)], **_TOL)
    assert float(batched[0]) == 0.0


# -------------------------------------------------------------------------- graph distillation


def test_edge_prior_values():
  np.testing.assert_allclose(losses.edge_prior(kind="code", space="homo"),
                             [.0088, .0088, .4823, .0088, .4823, .0088], atol=5e-5)
  np.testing.assert_allclose(losses.edge_prior(kind="code", space="hetero"),
                             [.0060, .0060, .3273, .0060, .3273, .3273], atol=5e-5)
  np.testing.assert_allclose(losses.edge_prior(kind="uniform", space="homo"), np.full(6, 1 / 6))
  np.testing.assert_array_equal(losses.edge_prior(kind="none", space="hetero"), np.zeros(6))
  assert losses.EDGES == ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))


@pytest.mark.parametrize("repr_loss", ["none", "l1", "cosine_push"])
def test_graph_distillation_matches_loop(repr_loss):
  logits, reprs, w = _random_gd_inputs(9, o=2)
  prior = losses.edge_prior(kind="code", space="hetero")
  got = losses.graph_distillation_loss(logits=logits, reprs=reprs, edge_weights=w, prior=prior,
                                       repr_loss=repr_loss)
  want = _brute_gd(logits, reprs, w, prior, 10.0, 10.0, repr_loss)
  for key in ("logit", "repr", "reg", "total"):
    np.testing.assert_allclose(got[key], want[key], err_msg=key, **_TOL)
  if repr_loss != "none":
    assert float(got["repr"]) > 0


def test_graph_distillation_reduces_to_paper_eq9():
  logits, reprs, w = _random_gd_inputs(10)
  got = losses.graph_distillation_loss(logits=logits, reprs=reprs, edge_weights=w,
                                       prior=losses.edge_prior(kind="none", space="homo"),
                                       reg_weight=0.0)
  # ||W (.) E||_1 with W[i, j] = w_{i->j}, E[i, j] = |logit_j - logit_i|, averaged over the batch.
  b = w.shape[0]
  norms = []
  for bb in range(b):
    mat_w, mat_e = np.zeros((3, 3)), np.zeros((3, 3))
    for x, (j, i) in enumerate(losses.EDGES):
      mat_w[i, j] = w[bb, x]
      mat_e[i, j] = np.abs(logits[j, bb] - logits[i, bb]).sum()
    norms.append(np.abs(mat_w * mat_e).sum())
  np.testing.assert_allclose(got["total"], np.mean(norms), **_TOL)
  assert float(got["reg"]) == float(got["repr"]) == 0.0


def test_graph_distillation_teacher_is_stop_gradient():
  logits, reprs, _ = _random_gd_inputs(11)
  w = np.zeros((4, 6), np.float32)
  w[:, 0] = 1.0  # only edge V->L: student 0 (L), teacher 1 (V)
  prior = jnp.zeros(6)

  def term(lg, rp, key, repr_loss):
    return losses.graph_distillation_loss(logits=lg, reprs=rp, edge_weights=w, prior=prior,
                                          repr_loss=repr_loss)[key]

  g_logits = jax.grad(term)(logits, reprs, "logit", "none")
  assert np.all(np.asarray(g_logits[1:]) == 0.0)  # teacher V and uninvolved A
  assert np.any(np.asarray(g_logits[0]) != 0.0)  # student L
  reprs[0] = reprs[1] + 0.1 * reprs[0]  # make cos(L, V) > 0 so the push is active
  g_reprs = jax.grad(term, argnums=1)(logits, reprs, "repr", "cosine_push")
  assert np.all(np.asarray(g_reprs[1:]) == 0.0)
  assert np.any(np.asarray(g_reprs[0]) != 0.0)
  # The edge weights are learned: they receive a gradient.
  g_w = jax.grad(lambda ww: losses.graph_distillation_loss(
      logits=logits, reprs=reprs, edge_weights=ww, prior=prior)["total"])(jnp.asarray(w))
  assert np.any(np.asarray(g_w) != 0.0)


# ---------------------------------------------------------------------------------- total loss


def test_total_loss_arithmetic():
  terms = dict(task=1.0, rec=2.0, cyc=3.0, mar=4.0, ort=5.0, dtl_homo=6.0, dtl_hetero=7.0,
               ctr_homo=8.0, ctr_hetero=9.0)
  out = losses.total_loss(**terms)
  assert out["dec"] == pytest.approx(2 + 3 + 0.1 * 9)
  assert out["dtl"] == 13.0 and out["dic"] == 17.0
  assert out["total"] == pytest.approx(1 + 0.1 * 5.9 + 0.05 * 13 + 0.1 * 17)
  assert set(out) == {"task", "rec", "cyc", "mar", "ort", "dec", "dtl_homo", "dtl_hetero", "dtl",
                      "ctr_homo", "ctr_hetero", "dic", "total"}
  custom = losses.total_loss(**terms, lambda_dec=1.0, lambda_dtl=2.0, lambda_dic=0.0, gamma=0.5)
  assert custom["total"] == pytest.approx(1 + (2 + 3 + 0.5 * 9) + 2 * 13)


def _brute_counts(features, values, *, adaptive, margin_or_scale):
  """(triplets, active) by loops: every (anchor, positive, negative) the loss averages over."""
  items = _stack(np.asarray(features, np.float64), np.asarray(values, np.float64))
  triplets = active = 0
  for i, (fi, mi, vi) in enumerate(items):
    for j, (fj, mj, vj) in enumerate(items):
      for fk, mk, vk in items:
        if adaptive:
          ok = j != i and vj == vi and vk != vi
          margin = margin_or_scale * abs(vi - vk)
        else:
          ok = mi != mj and mi == mk and vi == vj and vi != vk
          margin = margin_or_scale
        if ok:
          triplets += 1
          active += margin - _cos_hinge_norm(fi, fj) + _cos_hinge_norm(fi, fk) > 0
  return triplets, active


def test_triplet_counts_match_loops():
  """`with_stats` returns the same loss and counts the triplets a loop finds (and how many of
  them still have a positive hinge); an empty set is reported as 0 triplets."""
  rng = np.random.default_rng(8)
  for b in (1, 3, 5):
    feats = rng.normal(size=(b, 3, 4)).astype(np.float32)
    y = rng.choice(np.array([-1.0, 0.0, 2.2], np.float32), size=b)
    loss, stats = losses.adaptive_margin_loss(features=feats, labels=y, with_stats=True)
    np.testing.assert_allclose(loss, losses.adaptive_margin_loss(features=feats, labels=y))
    expected = _brute_counts(feats, y, adaptive=True, margin_or_scale=0.15)
    assert (float(stats["triplets"]), float(stats["active"])) == expected, (b, expected)
    cls = rng.integers(0, 2, size=b)
    loss, stats = losses.triplet_margin_loss(features=feats, classes=cls, with_stats=True)
    np.testing.assert_allclose(loss, losses.triplet_margin_loss(features=feats, classes=cls))
    expected = _brute_counts(feats, cls, adaptive=False, margin_or_scale=0.1)
    assert (float(stats["triplets"]), float(stats["active"])) == expected, (b, expected)
  _, stats = losses.triplet_margin_loss(features=feats, classes=np.zeros(5), with_stats=True)
  assert float(stats["triplets"]) == 0.0
