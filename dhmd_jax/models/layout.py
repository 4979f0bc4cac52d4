"""Parameter layouts of the DHMD model, and the converter from the per-branch layout.

Layout v1 (up to commit 56083f1) held each of the twelve transformers as its own sub-tree,
`self_attentions_c_{l,v,a}`, `trans_{m}_with_{src}` and `trans_{m}_mem`, each with `layers_{i}`
sub-trees. Layout v2 (now) holds each kind as one `TransformerStack` with a leading branch axis G
and a layer axis L on every parameter (`transformer.TransformerStack`):

  self_attentions_c     G = 3: l, v, a
  cross_transformers    G = 6: l<-a, l<-v, v<-l, v<-a, a<-l, a<-v
  memory_transformers   G = 3: l, v, a

with the leaves `in_proj_kernel` (G, L, E, 3E), `in_proj_bias` (G, L, 3E), `out_proj_kernel`
(G, L, E, E), `out_proj_bias`, `layer_norm_0_{scale,bias}`, `layer_norm_1_{scale,bias}`,
`fc1_{kernel,bias}`, `fc2_{kernel,bias}` (G, L, ...) and the final `layer_norm_{scale,bias}`
(G, E). Every other parameter is unchanged. The values are the same numbers, moved: a v1 model
and its converted v2 model compute the same outputs (tests/test_stacked.py).

`convert_v1_params` converts a parameter tree (or a gradient or Adam-moment tree of the same
shape), `convert_v1_vector` a flat vector laid out by `ravel_pytree` of a v1 tree (the optimizer
state of this project), so a v1 checkpoint resumes in v2.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from dhmd_jax.names import MODALITY_KEYS

CROSS_PAIRS = (("l", "a"), ("l", "v"), ("v", "l"), ("v", "a"), ("a", "l"), ("a", "v"))
# v2 stack name -> the v1 sub-tree names of its branches, in branch order.
STACKS = {
    "self_attentions_c": tuple(f"self_attentions_c_{m}" for m in MODALITY_KEYS),
    "cross_transformers": tuple(f"trans_{m}_with_{src}" for m, src in CROSS_PAIRS),
    "memory_transformers": tuple(f"trans_{m}_mem" for m in MODALITY_KEYS),
}
_LAYER_LEAVES = {  # v2 leaf name -> path inside a v1 `layers_{i}` sub-tree
    "layer_norm_0_scale": ("layer_norm_0", "scale"), "layer_norm_0_bias": ("layer_norm_0", "bias"),
    "in_proj_kernel": ("self_attn", "in_proj_kernel"),
    "in_proj_bias": ("self_attn", "in_proj_bias"),
    "out_proj_kernel": ("self_attn", "out_proj", "kernel"),
    "out_proj_bias": ("self_attn", "out_proj", "bias"),
    "layer_norm_1_scale": ("layer_norm_1", "scale"), "layer_norm_1_bias": ("layer_norm_1", "bias"),
    "fc1_kernel": ("fc1", "kernel"), "fc1_bias": ("fc1", "bias"),
    "fc2_kernel": ("fc2", "kernel"), "fc2_bias": ("fc2", "bias"),
}


def is_v1(params) -> bool:
  """True when `params` (a model parameter tree) is in the per-branch layout v1."""
  v1_names = {name for names in STACKS.values() for name in names}
  return any(name in v1_names for name in params)


def _get(tree, path):
  for key in path:
    tree = tree[key]
  return tree


def _stack_encoders(encoders, axis):
  """v1 transformer trees (one `TransformerEncoder` module per branch) -> the flat v2
  `TransformerStack` tree."""
  num_layers = len([k for k in encoders[0] if k.startswith("layers_")])
  out = {}
  for leaf, path in _LAYER_LEAVES.items():
    per_branch = [jnp.stack([_get(enc[f"layers_{i}"], path) for i in range(num_layers)], axis)
                  for enc in encoders]  # G x (..., L, ...)
    out[leaf] = jnp.stack(per_branch, axis)  # (..., G, L, ...)
  for leaf in ("scale", "bias"):
    out[f"layer_norm_{leaf}"] = jnp.stack([enc["layer_norm"][leaf] for enc in encoders], axis)
  return out


def convert_v1_params(params, *, batch_dims: int = 0):
  """A v1 tree (parameters, gradients or Adam moments) -> the v2 tree of the same numbers.

  batch_dims: leading axes every leaf carries before the parameter's own shape (1 for the seed
    axis of this project's checkpoints).
  """
  if not is_v1(params):
    raise ValueError("convert_v1_params: the tree is not in the per-branch layout v1 (it has "
                     "none of " + ", ".join(sorted(STACKS["memory_transformers"])) + ")")
  params = dict(params)
  for stack, names in STACKS.items():
    present = [n for n in names if n in params]
    if not present:
      continue  # e.g. no cross-modal transformers without CA, no c_m transformers in MulT
    if len(present) != len(names):
      raise ValueError(f"convert_v1_params: {stack} needs all of {names}; found {present}")
    params[stack] = _stack_encoders([params.pop(n) for n in names], batch_dims)
  return params


def convert_v1_vector(vector, v1_template):
  """A flat vector laid out by `ravel_pytree(v1_template)` -> laid out as its v2 tree.

  The optimizer state of this project (Adam's moments over the flat parameter vector) is stored
  in that layout; `v1_template` is any v1 parameter tree of the run (shapes only matter).
  """
  _, unravel = ravel_pytree(v1_template)
  return ravel_pytree(convert_v1_params(unravel(vector)))[0]


def to_v1_params(params, *, batch_dims: int = 0):
  """The inverse of `convert_v1_params`: a v2 tree -> the per-branch v1 tree of the same numbers
  (to read a v1 checkpoint with a target of the right structure, and for tests)."""
  params = dict(params)
  for stack, names in STACKS.items():
    if stack not in params:
      continue
    tree = params.pop(stack)
    lead = (slice(None),) * batch_dims
    num_layers = tree["in_proj_kernel"].shape[batch_dims + 1]
    for g, name in enumerate(names):
      encoder = {"layer_norm": {leaf: tree[f"layer_norm_{leaf}"][lead + (g,)]
                                for leaf in ("scale", "bias")}}
      for i in range(num_layers):
        layer = {}
        for leaf, path in _LAYER_LEAVES.items():
          node = layer
          for key in path[:-1]:
            node = node.setdefault(key, {})
          node[path[-1]] = tree[leaf][lead + (g, i)]
        encoder[f"layers_{i}"] = layer
      params[name] = encoder
  return params


def convert_v1_train_state(state, *, batch_dims: int = 1):
  """A restored v1 TrainState (seeds stacked on `batch_dims` leading axes) -> v2.

  The parameters move to the stacked layout; every optimizer-state leaf that is a flat
  parameter-sized vector (Adam's moments over `ravel_pytree(params)`) is re-ordered to match.
  """
  v1_params = state.params
  # One seed's tree (shapes only matter).
  template = jax.tree.map(lambda a: np.zeros(a.shape[batch_dims:], a.dtype), v1_params)
  size = sum(a.size for a in jax.tree.leaves(template))

  permute = lambda v: convert_v1_vector(v, template)
  for _ in range(batch_dims):
    permute = jax.vmap(permute)
  permute = jax.jit(permute)  # one compiled permutation, not hundreds of op-by-op slices

  def vector(leaf):
    if leaf.ndim != batch_dims + 1 or leaf.shape[-1] != size:
      return leaf
    return permute(leaf)

  params = jax.jit(lambda p: convert_v1_params(p, batch_dims=batch_dims))(v1_params)
  return state.replace(params=params, opt_state=jax.tree.map(vector, state.opt_state))
