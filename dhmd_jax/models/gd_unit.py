"""GD-Unit edge weights (paper Sec. 3.2, Eq. 8) and the edge-list -> matrix layout.

A GD-Unit is a directed graph over the modalities (0 = L, 1 = V, 2 = A). Its six edges, in the
order of the DMD code's double loop `for j in to_idx: for i in from_idx: if i != j`, are the
pairs (student j, teacher i):

  index  0      1      2      3      4      5
  (j,i)  (0,1)  (0,2)  (1,0)  (1,2)  (2,0)  (2,1)
  edge   V->L   A->L   L->V   A->V   L->A   V->A

Each edge gets a score e from the two nodes' logits and representations, and the weights are a
softmax over all six edges jointly, per sample: w = softmax(e / temperature) (the code's
`softmax(e * alpha)` with alpha = 1/8). Two score functions (`config.gd.edge_input`):

* "embedded" (DMD code, `get_distillation_kernel*.py`): z_m = [W_logit logit_m, W_repr repr_m]
  with two Linears shared across modalities (O -> g, H -> g), then e_{j<-i} = W_edge([z_j, z_i])
  with W_edge: Linear(4g -> 1). Student first, as coded.
* "raw" (paper Eq. 8): w_{i->j} = g([[f(X_i), X_i], [f(X_j), X_j]]) with g one Linear over the raw
  concatenation (2(O + H) -> 1). Teacher first, in the order Eq. 8 writes it.

The teacher/student stop-gradient, the prior and the regulariser belong to the loss, not here.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from dhmd_jax.names import EDGES

from dhmd_jax.models.heads import TORCH_KERNEL_INIT
from dhmd_jax.models.heads import torch_bias_init

# (student j, teacher i) for the six directed edges i -> j, in the DMD code's order.


def edges_to_matrix(w: jax.Array) -> jax.Array:
  """(..., 6) edge weights -> (..., 3, 3) matrix W with W[i, j] = w_{i->j}; zero diagonal.

  Rows are teachers (sources), columns students (targets), as in the paper's W_ij = w_{i->j}.
  """
  teachers = jnp.array([i for _, i in EDGES])
  students = jnp.array([j for j, _ in EDGES])
  flat_index = teachers * 3 + students  # (6,)
  out = jnp.zeros(w.shape[:-1] + (9,), w.dtype).at[..., flat_index].set(w)
  return out.reshape(w.shape[:-1] + (3, 3))


class _Linear(nn.Module):
  """PyTorch-initialised Linear whose bias can be left out of one call (same parameters)."""
  features: int

  @nn.compact
  def __call__(self, x, *, with_bias: bool = True):
    fan_in = x.shape[-1]
    kernel = self.param("kernel", TORCH_KERNEL_INIT, (fan_in, self.features))
    bias = self.param("bias", torch_bias_init(fan_in), (self.features,))
    y = x @ kernel
    return y + bias if with_bias else y


class GDUnit(nn.Module):
  """Edge scores and weights of one GD-Unit (HoGD or HeGD).

  The biases of W_logit, W_repr and W_edge add the same constant to all six scores, so they
  cannot change w (the softmax cancels them) and their true gradient through w is 0. The weights
  are therefore computed from the bias-free scores (the same values of w): the biases then get
  exactly 0 from w instead of rounding noise, which Adam would turn into +-lr updates. The
  returned raw scores e include the biases, as in the code.

  Attributes:
    hidden: g, width of the logit/repr embeddings ("embedded" mode; unused in "raw" mode).
    edge_input: "embedded" (code) or "raw" (paper Eq. 8).
    temperature: w = softmax(e / temperature) over the six edges.
  """
  hidden: int
  edge_input: str = "embedded"
  temperature: float = 8.0

  @nn.compact
  def __call__(self, logits: jax.Array, reprs: jax.Array):
    """Edge weights of one batch.

    Args:
      logits: (3, B, O) per-modality logits (L, V, A).
      reprs: (3, B, H) per-modality representations.

    Returns:
      weights (B, 6), rows summing to 1, and the raw scores e (B, 6), edges in `EDGES` order.
    """
    if self.edge_input == "embedded":
      w_logit = _Linear(self.hidden, name="W_logit")
      w_repr = _Linear(self.hidden, name="W_repr")

      def pairs(with_bias):
        z = jnp.concatenate([w_logit(logits, with_bias=with_bias),
                             w_repr(reprs, with_bias=with_bias)], axis=-1)  # (3, B, 2g)
        return jnp.stack([jnp.concatenate([z[j], z[i]], axis=-1)  # [z_j, z_i], as coded
                          for j, i in EDGES], axis=1)  # (B, 6, 4g)
    else:  # "raw" (the config is validated once, against configs/default.py RULES)
      x = jnp.concatenate([logits, reprs], axis=-1)  # (3, B, O + H): [f(X_m), X_m]
      stacked = jnp.stack([jnp.concatenate([x[i], x[j]], axis=-1)  # Eq. 8: [i, j]
                           for j, i in EDGES], axis=1)  # (B, 6, 2(O + H))

      def pairs(with_bias):
        del with_bias
        return stacked
    w_edge = _Linear(1, name="W_edge")
    scores = w_edge(pairs(True))[..., 0]  # (B, 6)  e_{j<-i}
    shift_free = w_edge(pairs(False), with_bias=False)[..., 0]  # (B, 6) e minus a constant
    weights = jax.nn.softmax(shift_free / self.temperature, axis=-1)  # (B, 6) joint softmax
    return weights, scores
