"""PyTorch-initialised linear layers and the residual MLP heads of DMD / DHMD.

Every `nn.Linear` / `nn.Conv1d` of the DMD code that does not set its own init keeps PyTorch's
default, kaiming-uniform with a = sqrt(5): kernel and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
`torch_linear` and `TORCH_CONV_INIT` reproduce that, so the port starts from the same weight
scales as the reference (this matters most for the flatten-Linears with fan_in = T' * d).

The residual MLP head is the pattern used for every output of the reference model:

  r = Linear(F -> hidden)(x); y = Linear(hidden -> F)(dropout(relu(r))) + x;
  logit = Linear(F -> O)(y)

* homogeneous per-modality heads (`proj1_m_low`, `proj2_m_low`, `out_layer_m_low`) on flatten(c_m):
  hidden = d, and the HoGD representation is relu(r) (the reference applies ReLU in place);
* heterogeneous heads (`proj1_m_high`, ...) on h_m: hidden = 2d, representation y (post-residual);
* the fused homogeneous head (`proj1_c`, `proj2_c`, `out_layer_c`) and the final head (`proj1`,
  `proj2`, `out_layer`).
"""

import math

import flax.linen as nn
import jax

# U(-1/sqrt(fan_in), 1/sqrt(fan_in)) = variance scaling with scale 1/3 (bound sqrt(3 s / fan_in)).
# Flax computes fan_in of a Conv kernel (k, C_in, C_out) as k * C_in, like PyTorch.
TORCH_KERNEL_INIT = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
TORCH_CONV_INIT = TORCH_KERNEL_INIT


def torch_bias_init(fan_in: int):
  """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default Linear / Conv1d bias init."""
  bound = 1.0 / math.sqrt(fan_in)

  def init(key, shape, dtype=jax.numpy.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear(features: int, fan_in: int, *, name: str, use_bias: bool = True) -> nn.Dense:
  """A `nn.Dense` initialised like PyTorch's default `nn.Linear(fan_in, features)`."""
  return nn.Dense(features, use_bias=use_bias, kernel_init=TORCH_KERNEL_INIT,
                  bias_init=torch_bias_init(fan_in), name=name)


class ResidualHead(nn.Module):
  """Residual MLP + output layer (see the module docstring).

  Attributes:
    hidden: width of the bottleneck Linear (F -> hidden -> F).
    num_outputs: O, width of the output layer.
    dropout_rate: dropout after the ReLU (config.model.output_dropout).
  """
  hidden: int
  num_outputs: int
  dropout_rate: float

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    """x (B, F) -> (logit (B, O), relu(r) (B, hidden), y (B, F))."""
    f = x.shape[-1]
    r = torch_linear(self.hidden, f, name="proj1")(x)  # (B, hidden)
    r = nn.relu(r)
    y = torch_linear(f, self.hidden, name="proj2")(
        nn.Dropout(self.dropout_rate)(r, deterministic=deterministic))  # (B, F)
    y = y + x
    logit = torch_linear(self.num_outputs, f, name="out_layer")(y)  # (B, O)
    return logit, r, y
