"""The Flax model has exactly the parameter count of the reference DMD PyTorch model.

`reference_dmd_shapes` lists, from the layer definitions of `mdswyz/DMD`
(`trains/singleTask/model/dmd.py`, `transformers_encoder/*.py`,
`distillnets/get_distillation_kernel{,_homo}.py`), every parameter tensor of the PyTorch model
(text from precomputed features, i.e. without BERT) plus the two GD-Units, with its PyTorch
shape. The Flax side is counted with `jax.eval_shape` on `model.init`, so nothing is initialised.
"""

import functools
import importlib.util
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dhmd_jax.models import build_model


def _load_config_module(name):
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(f"_test_configs_{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


default = _load_config_module("default")


def _linear(fan_in, fan_out, bias=True):
  return [(fan_out, fan_in)] + ([(fan_out,)] if bias else [])


def _transformer(embed_dim, layers):
  per_layer = ([(3 * embed_dim, embed_dim), (3 * embed_dim,)]  # in_proj_weight / in_proj_bias
               + _linear(embed_dim, embed_dim)  # out_proj
               + _linear(embed_dim, 4 * embed_dim) + _linear(4 * embed_dim, embed_dim)  # fc1, fc2
               + [(embed_dim,), (embed_dim,)] * 2)  # layer_norms[0], layer_norms[1]
  return per_layer * layers + [(embed_dim,), (embed_dim,)]  # final layer_norm


def reference_dmd_shapes(*, dims, lens, d, layers, kernels, homo_gd, hetero_gd, n_classes=1,
                         proj_cosine=True):
  """name -> list of PyTorch parameter shapes of DMD + its two GD-Units.

  Args:
    dims, lens, kernels: dicts over 'l', 'v', 'a' (feature dims, input lengths, Conv1d kernels).
    d: dst_feature_dim; layers: nlevels; homo_gd/hetero_gd: gd_size of the two GD-Units.
    proj_cosine: include the three unused proj_cosine_m layers.
  """
  t = {m: lens[m] - kernels[m] + 1 for m in "lva"}
  shapes = {}
  for m in "lva":
    shapes[f"proj_{m}"] = [(d, dims[m], kernels[m])]  # Conv1d, bias=False
    shapes[f"encoder_s_{m}"] = [(d, d, 1)]
    shapes[f"decoder_{m}"] = [(d, 2 * d, 1)]
    if proj_cosine:
      shapes[f"proj_cosine_{m}"] = _linear(d * t[m], d)
    shapes[f"align_c_{m}"] = _linear(d * t[m], d)
    shapes[f"self_attentions_c_{m}"] = _transformer(d, layers)
    shapes[f"trans_{m}_mem"] = _transformer(2 * d, max(layers, 3))
    shapes[f"proj1_{m}_low"] = _linear(d * t[m], d)
    shapes[f"proj2_{m}_low"] = _linear(d, d * t[m])
    shapes[f"out_layer_{m}_low"] = _linear(d * t[m], n_classes)
    shapes[f"proj1_{m}_high"] = _linear(2 * d, 2 * d)
    shapes[f"proj2_{m}_high"] = _linear(2 * d, 2 * d)
    shapes[f"out_layer_{m}_high"] = _linear(2 * d, n_classes)
    shapes[f"weight_{m}"] = _linear(2 * d, 2 * d)
  shapes["encoder_c"] = [(d, d, 1)]
  for target, source in ["la", "lv", "al", "av", "vl", "va"]:
    shapes[f"trans_{target}_with_{source}"] = _transformer(d, layers)
  shapes["proj1_c"] = _linear(3 * d, 3 * d)
  shapes["proj2_c"] = _linear(3 * d, 3 * d)
  shapes["out_layer_c"] = _linear(3 * d, n_classes)
  shapes["weight_c"] = _linear(3 * d, 3 * d)
  combined = 2 * (d + d + d) + 3 * d
  shapes["proj1"] = _linear(combined, combined)
  shapes["proj2"] = _linear(combined, combined)
  shapes["out_layer"] = _linear(combined, n_classes)
  for name, hidden, g in [("gd_homo", d, homo_gd), ("gd_hetero", 2 * d, hetero_gd)]:
    shapes[name] = _linear(n_classes, g) + _linear(hidden, g) + _linear(4 * g, 1)
  return shapes


def _count(shapes):
  return sum(math.prod(s) for group in shapes.values() for s in group)


MOSEI = dict(dims=dict(l=768, v=35, a=74), d=30, heads=6, layers=4,
             kernels=dict(l=5, v=3, a=1), homo_gd=64, hetero_gd=32)
SETTINGS = {
    "mosei_aligned": dict(MOSEI, lens=dict(l=50, v=50, a=50)),
    "mosei_unaligned": dict(MOSEI, lens=dict(l=50, v=500, a=500)),
}


def _reference_count(setting, **kwargs):
  s = SETTINGS[setting]
  return _count(reference_dmd_shapes(
      dims=s["dims"], lens=s["lens"], d=s["d"], layers=s["layers"], kernels=s["kernels"],
      homo_gd=s["homo_gd"], hetero_gd=s["hetero_gd"], **kwargs))


@functools.lru_cache(maxsize=None)
def _flax_count(setting, *, use_dm=False, unused_reference_layers=True):
  s = SETTINGS[setting]
  config = default.get_config()
  m = config.model
  m.arch, m.use_fd, m.use_ca, m.use_gd, m.use_dm = "dhmd", True, True, True, use_dm
  m.d_model, m.num_heads, m.num_layers = s["d"], s["heads"], s["layers"]
  m.conv_kernel.text, m.conv_kernel.vision, m.conv_kernel.audio = (
      s["kernels"]["l"], s["kernels"]["v"], s["kernels"]["a"])
  m.homo_self_attention, m.fusion = True, "code"
  m.unused_reference_layers = unused_reference_layers
  config.gd.homo_hidden, config.gd.hetero_hidden = s["homo_gd"], s["hetero_gd"]
  config.gd.edge_input = "embedded"
  model = build_model(config, num_outputs=1)
  batch = {key: jax.ShapeDtypeStruct((2, s["lens"][m_], s["dims"][m_]), jnp.float32)
           for key, m_ in [("text", "l"), ("vision", "v"), ("audio", "a")]}
  keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  variables = jax.eval_shape(lambda b: model.init(keys, b, deterministic=False), batch)
  leaves = jax.tree.leaves(variables["params"])
  return sum(int(np.prod(x.shape)) for x in leaves), config


@pytest.mark.parametrize(
    "setting", [pytest.param(k, id=f"{k}-reference_{_reference_count(k)}") for k in SETTINGS])
def test_matches_reference_dmd(setting):
  ours, _ = _flax_count(setting)
  reference = _reference_count(setting)
  print(f"{setting}: reference DMD {reference:,} parameters, Flax {ours:,}")
  assert ours == reference, f"{setting}: Flax {ours:,} != reference {reference:,}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_without_unused_reference_layers(setting):
  ours, _ = _flax_count(setting, unused_reference_layers=False)
  reference = _reference_count(setting, proj_cosine=False)
  s = SETTINGS[setting]
  proj_cosine = sum(
      (s["lens"][m] - s["kernels"][m] + 1) * s["d"] * s["d"] + s["d"] for m in "lva")
  assert reference == _reference_count(setting) - proj_cosine
  assert ours == reference, f"{setting}: Flax {ours:,} != reference - proj_cosine {reference:,}"


@pytest.mark.parametrize("setting", list(SETTINGS))
def test_dictionary_matching_parameters(setting):
  without, _ = _flax_count(setting, use_dm=False, unused_reference_layers=False)
  with_dm, config = _flax_count(setting, use_dm=True, unused_reference_layers=False)
  d, k = SETTINGS[setting]["d"], config.dm.num_elements
  dictionaries = k * d + k * 2 * d  # HoDM (K x d) + HeDM (K x 2d)

  def fusion(width):  # proj1 + proj2 + out_layer of the final head
    return 2 * (width * width + width) + width + 1

  extra_fusion = fusion(9 * d + 3 * 2 * d + 3 * d) - fusion(9 * d)
  print(f"{setting}: DM adds {with_dm - without:,} = {dictionaries:,} (dictionaries) + "
        f"{extra_fusion:,} (wider fusion head)")
  assert with_dm - without == dictionaries + extra_fusion
