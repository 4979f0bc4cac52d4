"""Pure loss functions of DHMD (paper Sec. 3.1-3.4) and of the DMD reference code.

Every function is keyword-only, takes arrays and returns arrays; nothing here builds a model, so
the losses can be imported and analysed on their own. Where the DHMD paper and the public DMD
code (mdswyz/DMD, CVPR 2023) differ, both behaviours are implemented and selected by a named
argument (docs/fidelity.md lists each difference, its config field and its default).

Conventions:
  * Modality order is (text, vision, audio) = (L, V, A) = index (0, 1, 2).
  * Shapes: B batch, M = 3 modalities, O outputs (1 for regression, 2 for binary), T time,
    C channels, H hidden size of a GD-Unit representation, E = 6 edges.
  * GD-Unit edges are (student j, teacher i) pairs in the DMD-code order `EDGES`; edge (j, i)
    distils teacher i into student j.
  * Triplet mining (Eq. 4, Eq. 13 and the DMD margin loss) is vectorised with (N, N, N) masks,
    N = M * B, so it has static shapes and works under `jax.jit` and `jax.vmap`.

This module imports only `jax`, `jax.numpy` and the standard library.
"""

import jax
import jax.numpy as jnp

from dhmd_jax.names import EDGES

# (student j, teacher i) for the 6 directed edges, DMD-code order:
# V->L, A->L, L->V, A->V, L->A, V->A.
_STUDENTS = tuple(j for j, _ in EDGES)
_TEACHERS = tuple(i for _, i in EDGES)

# PyTorch `cosine_embedding_loss` adds this to each squared norm.
_COS_EMBEDDING_EPS = 1e-12
# DMD `HingeLoss.compute_cosine`: norm = max(sqrt(sum x^2 + 1e-8), 1e-8).
_HINGE_NORM_EPS = 1e-8


def _check_choice(name, value, choices):
  if value not in choices:
    raise ValueError(f"losses: {name}={value!r} is not one of {choices}.")


def _cosine_embedding(x, y, *, axis):
  """Cosine of PyTorch's `cosine_embedding_loss`: <x, y> / sqrt((|x|^2+eps)(|y|^2+eps))."""
  dot = jnp.sum(x * y, axis=axis)
  xx = jnp.sum(x * x, axis=axis) + _COS_EMBEDDING_EPS
  yy = jnp.sum(y * y, axis=axis) + _COS_EMBEDDING_EPS
  return dot / jnp.sqrt(xx * yy)


def _pairwise_hinge_cosine(x):
  """All-pairs cosine with DMD `HingeLoss` norms. x: (N, C) -> (N, N)."""
  norm = jnp.maximum(jnp.sqrt(jnp.sum(x * x, axis=-1) + _HINGE_NORM_EPS), _HINGE_NORM_EPS)  # (N,)
  return (x @ x.T) / (norm[:, None] * norm[None, :])


def _safe_div(num, den):
  """num / den, and 0 where den == 0 (the where is on the denominator: finite gradients)."""
  den_ok = den > 0
  return jnp.where(den_ok, num / jnp.where(den_ok, den, 1), 0.0)


# ---------------------------------------------------------------------------------------------
# Task loss (Eq. 14 L_task; DMD code: 8 L1 terms).
# ---------------------------------------------------------------------------------------------


def _task_term(prediction, labels, kind):
  """One head's task loss. prediction: (B, O); labels: (B,)."""
  if kind == "l1":
    return jnp.mean(jnp.abs(prediction[..., 0] - labels))
  log_probs = jax.nn.log_softmax(prediction, axis=-1)  # (B, O)
  picked = jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)  # (B, 1)
  return -jnp.mean(picked)


def task_loss(*, prediction, labels, aux_logits=None, kind="l1"):
  """Emotion task loss L_task (Eq. 14; DMD code `DMD.py`, 8 L1 terms).

  Paper (Eq. 14): the MAE of the final prediction only, i.e. `aux_logits=None`.
  DMD code: the sum of 8 equally weighted terms, final + 3 homo + 3 hetero heads + logits_c, i.e.
  `aux_logits` of shape (7, B, O).

  Args:
    prediction: (B, O) final prediction. O = 1 for regression, 2 for binary logits.
    labels: (B,) or (B, 1) labels: floats for "l1", integer class ids for "ce".
    aux_logits: (K, B, O) auxiliary heads, or None.
    kind: "l1" (regression: mean_b |prediction[b, 0] - y_b|) or "ce" (softmax cross-entropy).

  Returns:
    Scalar: loss(final) + sum_k loss(aux_k).
  """
  _check_choice("kind", kind, ("l1", "ce"))
  labels = jnp.reshape(labels, (prediction.shape[0],))  # (B,)
  total = _task_term(prediction, labels, kind)
  if aux_logits is not None:
    per_head = jax.vmap(lambda p: _task_term(p, labels, kind))(aux_logits)  # (K,)
    total = total + jnp.sum(per_head)
  return total


# ---------------------------------------------------------------------------------------------
# Decoupling losses (Eq. 2-6).
# ---------------------------------------------------------------------------------------------


def reconstruction_loss(*, predictions, targets, reduction="mean"):
  """Reconstruction loss L_rec (Eq. 2), summed over modalities.

  L_rec = sum_m || X~_m - D_m([X_m^com, X_m^prt]) ||, with the norm given by `reduction`:
    "mean": elementwise mean squared error (DMD code: `MSE(recon_m, proj_x_m)`).
    "frobenius": squared Frobenius norm over (T, C) per sample, averaged over the batch
      (paper Eq. 2 taken literally, with a batch mean).
  The target X~_m (the Conv1d projection) is NOT detached in the DMD code; pass it as is.

  Args:
    predictions: sequence of per-modality (B, T_m, C) arrays (T_m may differ per modality).
    targets: sequence of arrays with the same shapes as `predictions`.
    reduction: "mean" or "frobenius".

  Returns:
    Scalar.
  """
  _check_choice("reduction", reduction, ("mean", "frobenius"))
  if len(predictions) != len(targets):
    raise ValueError(
        f"losses.reconstruction_loss: {len(predictions)} predictions but {len(targets)} targets;"
        " pass one array per modality in both.")
  total = 0.0
  for pred, target in zip(predictions, targets):
    sq = jnp.square(pred - target)  # (B, T_m, C)
    if reduction == "mean":
      total = total + jnp.mean(sq)
    else:
      total = total + jnp.mean(jnp.sum(sq.reshape(sq.shape[0], -1), axis=-1))
  return total


def cycle_loss(*, predictions, targets, reduction="mean"):
  """Cycle (self-regression) loss L_cyc (Eq. 3), summed over modalities.

  L_cyc = sum_m || X_m^prt - E_m^prt(D_m([X_m^com, X_m^prt])) ||; DMD code:
  `MSE(s_m, s_r_m)`, with neither side detached. A thin alias of `reconstruction_loss` (same
  reductions), named for Eq. 3.

  Args:
    predictions: sequence of per-modality (B, T_m, C) re-encoded private features
      E_m^prt(D_m([X_m^com, X_m^prt])).
    targets: sequence of the private features X_m^prt, same shapes.
    reduction: "mean" (code) or "frobenius" (paper).

  Returns:
    Scalar.
  """
  return reconstruction_loss(predictions=predictions, targets=targets, reduction=reduction)


def orthogonality_loss(*, shared, private, mode="torch19_batch_axis"):
  """Soft orthogonality loss L_ort (Eq. 5), summed over modalities.

  Modes:
    "torch19_batch_axis" (DMD code under PyTorch 1.9, the numbers behind DMD): the code passes
      time-major (T, B, C) tensors to `CosineEmbeddingLoss(target=-1)`, which in torch <= 1.9
      reduces over dim 1 = the batch. So for each (t, c):
        cos[t, c] = sum_b s[b,t,c] p[b,t,c] / sqrt((sum_b s^2 + 1e-12)(sum_b p^2 + 1e-12)),
      and the loss is mean_{t,c} max(0, cos[t, c]).
    "per_vector" (paper Eq. 5, our reading): the cosine of each (b, t) C-vector, penalised by
      |cos| and averaged over (b, t). The paper writes a plain sum of cosines, but a raw cosine
      is minimised by anti-parallel features (cos = -1), not orthogonal ones; |cos| is zero
      exactly at orthogonality. The mean (not the sum) over (b, t) keeps the scale of the code.
    "per_vector_hinge" (the community fix for torch >= 1.10, mdswyz/DMD issue #6): reshape to
      (-1, C) and keep the hinge, i.e. mean_{b,t} max(0, cos).
  All modes use the `cosine_embedding_loss` eps (1e-12 added to each squared norm).

  Args:
    shared: sequence of per-modality (B, T_m, C) homogeneous features X_m^com.
    private: sequence of per-modality (B, T_m, C) heterogeneous features X_m^prt.
    mode: see above.

  Returns:
    Scalar.
  """
  _check_choice("mode", mode, ("torch19_batch_axis", "per_vector", "per_vector_hinge"))
  if len(shared) != len(private):
    raise ValueError(
        f"losses.orthogonality_loss: {len(shared)} shared but {len(private)} private arrays;"
        " pass one array per modality in both.")
  total = 0.0
  for s, p in zip(shared, private):
    if mode == "torch19_batch_axis":
      cos = _cosine_embedding(s, p, axis=0)  # (T_m, C): across the batch
      total = total + jnp.mean(jnp.maximum(cos, 0.0))
    else:
      cos = _cosine_embedding(s, p, axis=-1)  # (B, T_m): per C-vector
      penalty = jnp.abs(cos) if mode == "per_vector" else jnp.maximum(cos, 0.0)
      total = total + jnp.mean(penalty)
  return total


def adaptive_margin_loss(*, features, labels, scale=0.15, with_stats=False):
  """Adaptive-margin hinge L_mar of the DMD code (`HingeLoss`; the code's form of Eq. 4).

  The 3B vectors f (each sample's L, V and A feature) inherit their sample's continuous label y.
  With cos computed with norms max(sqrt(sum x^2 + 1e-8), 1e-8):
    P_i = {j != i : y_j == y_i}   (exact equality, any modality, other samples included),
    N_i = {k : y_k != y_i}        (any modality),
    m_ik = scale * |y_i - y_k|,
    loss_i = mean_{p in P_i, k in N_i} max(0, m_ik - cos(f_i, f_p) + cos(f_i, f_k)),
    L_mar = mean of loss_i over anchors with P_i and N_i nonempty; 0 if there is none.
  Vectorised with (3B, 3B, 3B) masks; the result does not depend on the stacking order.

  Args:
    features: (B, M, C) features (DMD: align_c_m(flatten(c_m))).
    labels: (B,) or (B, 1) continuous labels.
    scale: margin per unit of label difference (DMD code 0.15).
    with_stats: also return {"triplets": number of (anchor, positive, negative) triplets,
      "active": how many of them have a positive hinge} (floats; 0 triplets means the loss is 0
      because the batch had none, not because it was solved).

  Returns:
    Scalar, or (scalar, stats) with `with_stats`.
  """
  b, m, c = features.shape
  n = b * m
  x = features.reshape(n, c)  # (N, C), sample-major
  y = jnp.repeat(jnp.reshape(labels, (b,)), m)  # (N,)
  cos = _pairwise_hinge_cosine(x)  # (N, N)

  same = y[:, None] == y[None, :]  # (N, N)
  pos = same & ~jnp.eye(n, dtype=bool)  # (N, N) [i, p]
  neg = ~same  # (N, N) [i, k]
  margin = scale * jnp.abs(y[:, None] - y[None, :])  # (N, N) [i, k]

  # hinge[i, p, k] = max(0, m_ik - cos_ip + cos_ik)
  hinge = jnp.maximum(margin[:, None, :] - cos[:, :, None] + cos[:, None, :], 0.0)  # (N, N, N)
  mask = pos[:, :, None] & neg[:, None, :]  # (N, N, N)
  per_anchor_sum = jnp.sum(jnp.where(mask, hinge, 0.0), axis=(1, 2))  # (N,)
  per_anchor_count = jnp.sum(pos, axis=1) * jnp.sum(neg, axis=1)  # (N,)
  per_anchor = _safe_div(per_anchor_sum, per_anchor_count)  # (N,)
  valid = per_anchor_count > 0  # (N,)
  loss = _safe_div(jnp.sum(jnp.where(valid, per_anchor, 0.0)), jnp.sum(valid))
  if not with_stats:
    return loss
  return loss, _triplet_stats(mask, hinge)


def _triplet_stats(mask, hinge):
  return {"triplets": jnp.sum(mask).astype(jnp.float32),
          "active": jnp.sum(mask & (hinge > 0)).astype(jnp.float32)}


def triplet_classes(*, labels, mode="round7"):
  """Emotion classes c[i] for the paper's triplet sets (Eq. 4 S, Eq. 13 U).

  The paper does not say how continuous sentiment becomes a "class".
    "round7": round(clip(y, -3, 3)) as int32 (7 classes -3..3; round half to even, as MMSA Acc7).
    "sign": (y > 0) as int32 (MMSA Non0/Has0 convention for the positive class).
    "exact": the labels unchanged (the DMD code's exact-equality classes; also binary labels).

  Args:
    labels: (B,) labels.
    mode: "round7", "sign" or "exact".

  Returns:
    (B,) classes.
  """
  _check_choice("mode", mode, ("round7", "sign", "exact"))
  if mode == "round7":
    return jnp.round(jnp.clip(labels, -3.0, 3.0)).astype(jnp.int32)
  if mode == "sign":
    return (labels > 0).astype(jnp.int32)
  return labels


def triplet_margin_loss(*, features, classes, margin=0.1, with_stats=False):
  """Cross-modal triplet hinge: L_mar (paper Eq. 4) and L_ctr^ho / L_ctr^he (Eq. 13).

  Over the 3B vectors (sample b, modality m), with modality m[i] and class c[i]:
    S = {(i, j, k) : m[i] != m[j], m[i] == m[k], c[i] == c[j], c[i] != c[k]},
    L = (1 / |S|) sum_{(i,j,k) in S} max(0, alpha - cos(z_i, z_j) + cos(z_i, z_k)),
  and 0 when S is empty. (i != j follows from m[i] != m[j], k != i from c[i] != c[k].) The mean is
  over all triplets of the batch, as the paper's 1/|S| says. The cosine uses the DMD `HingeLoss`
  norms max(sqrt(sum x^2 + 1e-8), 1e-8), so zero vectors give cos = 0, not NaN.

  Static shapes: (3B, 3B, 3B) masks, masked sums and a safe division, so it runs under `jax.jit`
  and `jax.vmap` and has finite (zero) gradients when S is empty.

  Args:
    features: (B, M, C) per-sample, per-modality vectors (X^com for Eq. 4, z for Eq. 13).
    classes: (B,) class ids (int or float, compared with ==), e.g. from `triplet_classes`.
    margin: alpha (paper: 0.1).
    with_stats: also return {"triplets": |S|, "active": triplets with a positive hinge}.

  Returns:
    Scalar, or (scalar, stats) with `with_stats`.
  """
  b, m, c = features.shape
  n = b * m
  x = features.reshape(n, c)  # (N, C), sample-major
  cls = jnp.repeat(jnp.reshape(classes, (b,)), m)  # (N,)
  mod = jnp.tile(jnp.arange(m), b)  # (N,)
  cos = _pairwise_hinge_cosine(x)  # (N, N)

  same_cls = cls[:, None] == cls[None, :]  # (N, N)
  same_mod = mod[:, None] == mod[None, :]  # (N, N)
  pos = same_cls & ~same_mod  # (N, N) [i, j]: same class, other modality
  neg = ~same_cls & same_mod  # (N, N) [i, k]: other class, same modality

  hinge = jnp.maximum(margin - cos[:, :, None] + cos[:, None, :], 0.0)  # (N, N, N) [i, j, k]
  mask = pos[:, :, None] & neg[:, None, :]  # (N, N, N)
  total = jnp.sum(jnp.where(mask, hinge, 0.0))
  count = jnp.sum(jnp.sum(pos, axis=1) * jnp.sum(neg, axis=1))  # |S|
  loss = _safe_div(total, count)
  return (loss, _triplet_stats(mask, hinge)) if with_stats else loss


# ---------------------------------------------------------------------------------------------
# Graph distillation (Eq. 7-9; DMD code `get_distillation_kernel*.py`, `misc.py`).
# ---------------------------------------------------------------------------------------------


def edge_prior(*, kind, space):
  """Fixed prior pi over the 6 GD-Unit edges (DMD code `gd_prior`; absent from the paper).

    "code": softmax([0,0,1,0,1,0] / 0.25) for space "homo" (mass on L->V, L->A) and
      softmax([0,0,1,0,1,1] / 0.25) for "hetero" (L->V, L->A, V->A).
    "uniform": 1/6 each.
    "none": zeros (paper Eq. 7-9: no prior).

  Args:
    kind: "code", "uniform" or "none".
    space: "homo" (HoGD) or "hetero" (HeGD).

  Returns:
    (6,) float32, in `EDGES` order.
  """
  _check_choice("kind", kind, ("code", "uniform", "none"))
  _check_choice("space", space, ("homo", "hetero"))
  if kind == "uniform":
    return jnp.full((len(EDGES),), 1.0 / len(EDGES), jnp.float32)
  if kind == "none":
    return jnp.zeros((len(EDGES),), jnp.float32)
  raw = [0.0, 0.0, 1.0, 0.0, 1.0, 0.0] if space == "homo" else [0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
  return jax.nn.softmax(jnp.asarray(raw, jnp.float32) / 0.25)


def graph_distillation_loss(*, logits, reprs, edge_weights, prior, reg_weight=10.0,
                            repr_weight=10.0, repr_loss="none"):
  """GD-Unit distillation loss L_dtl^homo / L_dtl^hetero (Eq. 7-9, DMD-code form).

  For edge x = (student j, teacher i) in `EDGES`, with w (B, 6) the model's edge weights and pi
  the prior (`edge_prior`), sg = `lax.stop_gradient`:
    reg   = reg_weight * sum_x (mean_b w[b, x] - pi[x])^2,
    omega = w + pi,
    logit = sum_x mean_b omega[b, x] * sum_o |logits[j, b, o] - sg(logits[i, b, o])|,
    repr  = "cosine_push" (DMD HeGD, used there):
              repr_weight * sum_x [mean_b max(0, cos(r[j, b], sg r[i, b]))] * [mean_b omega[b, x]]
              (cos with the `cosine_embedding_loss` eps; this pushes representations apart),
            "l1" (DMD HoGD form, computed but unused there):
              repr_weight * sum_x mean_b omega[b, x] * ||r[j, b] - sg r[i, b]||_1,
            "none": 0.
  Only the teacher is detached; student and edge weights receive gradients.

  With prior = zeros, reg_weight = 0 and repr_loss = "none" this is the paper's Eq. 7-9:
  zeta_{:j} = sum_i w_{i->j} eps_{i->j} (Eq. 7) with eps the L1 logit distance, and
  L_dtl = ||W (.) E||_1 (Eq. 9), averaged over the batch.

  Args:
    logits: (M, B, O) per-modality logits.
    reprs: (M, B, H) per-modality representations.
    edge_weights: (B, 6) edge weights in `EDGES` order (rows sum to 1, from the model).
    prior: (6,) prior pi.
    reg_weight: weight of the pull towards the prior (code 10).
    repr_weight: weight of the representation term (code 10).
    repr_loss: "cosine_push", "l1" or "none".

  Returns:
    dict with scalars "logit", "repr", "reg" and "total" (their sum).
  """
  _check_choice("repr_loss", repr_loss, ("cosine_push", "l1", "none"))
  students = jnp.asarray(_STUDENTS)
  teachers = jnp.asarray(_TEACHERS)
  w = edge_weights.T  # (6, B)
  omega = w + prior[:, None]  # (6, B)

  reg = reg_weight * jnp.sum(jnp.square(jnp.mean(w, axis=1) - prior))

  # Eq. 7-9: eps_{i->j}[b] = || logit_j[b] - sg(logit_i[b]) ||_1.
  student_logits = logits[students]  # (6, B, O)
  teacher_logits = jax.lax.stop_gradient(logits[teachers])  # (6, B, O)
  eps = jnp.sum(jnp.abs(student_logits - teacher_logits), axis=-1)  # (6, B)
  logit = jnp.sum(jnp.mean(omega * eps, axis=1))

  student_reprs = reprs[students]  # (6, B, H)
  teacher_reprs = jax.lax.stop_gradient(reprs[teachers])  # (6, B, H)
  if repr_loss == "cosine_push":
    cos = _cosine_embedding(student_reprs, teacher_reprs, axis=-1)  # (6, B)
    rho = jnp.mean(jnp.maximum(cos, 0.0), axis=1)  # (6,)
    rep = repr_weight * jnp.sum(rho * jnp.mean(omega, axis=1))
  elif repr_loss == "l1":
    dist = jnp.sum(jnp.abs(student_reprs - teacher_reprs), axis=-1)  # (6, B)
    rep = repr_weight * jnp.sum(jnp.mean(omega * dist, axis=1))
  else:
    rep = jnp.zeros((), logit.dtype)

  return {"logit": logit, "repr": rep, "reg": reg, "total": logit + rep + reg}


# ---------------------------------------------------------------------------------------------
# Full objective (Eq. 6 and Eq. 14).
# ---------------------------------------------------------------------------------------------


def total_loss(*, task, rec, cyc, mar, ort, dtl_homo, dtl_hetero, ctr_homo, ctr_hetero,
               lambda_dec=0.1, lambda_dtl=0.05, lambda_dic=0.1, gamma=0.1):
  """Full objective L_total (Eq. 14) with L_dec (Eq. 6).

    L_dec = L_rec + L_cyc + gamma * (L_mar + L_ort)                       (Eq. 6)
    L_dtl = L_dtl^homo + L_dtl^hetero
    L_dic = L_ctr^ho + L_ctr^he
    L_total = L_task + lambda1 * L_dec + lambda2 * L_dtl + lambda3 * L_dic  (Eq. 14)
  With lambda_dic = 0 (or both ctr terms 0) this is the DMD code's total (section 3, item 7), if
  dtl_* are the GD-Unit "total" losses. Absent components are passed as 0.0.

  Args:
    task, rec, cyc, mar, ort, dtl_homo, dtl_hetero, ctr_homo, ctr_hetero: scalar terms.
    lambda_dec, lambda_dtl, lambda_dic: lambda1, lambda2, lambda3 (paper 0.1, 0.05, 0.1).
    gamma: weight of L_mar + L_ort inside L_dec (paper 0.1).

  Returns:
    dict with "task", "rec", "cyc", "mar", "ort", "dec", "dtl_homo", "dtl_hetero", "dtl",
    "ctr_homo", "ctr_hetero", "dic" and "total".
  """
  dec = rec + cyc + gamma * (mar + ort)
  dtl = dtl_homo + dtl_hetero
  dic = ctr_homo + ctr_hetero
  total = task + lambda_dec * dec + lambda_dtl * dtl + lambda_dic * dic
  return {
      "task": task, "rec": rec, "cyc": cyc, "mar": mar, "ort": ort, "dec": dec,
      "dtl_homo": dtl_homo, "dtl_hetero": dtl_hetero, "dtl": dtl,
      "ctr_homo": ctr_homo, "ctr_hetero": ctr_hetero, "dic": dic, "total": total,
  }
