"""The DMD configuration (`model.use_dm=False`) against the official PyTorch DMD code itself.

`fixtures/dmd_reference_{aligned,unaligned}.npz` were written by `tools/make_dmd_fixture.py`,
which runs the DMD code (github.com/mdswyz/DMD, CVPR 2023) on a tiny model (d 6, 3 heads, 2
layers, batch 6, zero-padded frames; "aligned": equal input lengths, T' = 8/9/10 after the
Conv1d kernels 3/2/1; "unaligned": T' = 8/10/17) in eval mode and saves its parameters, the
batch, every output of its forward pass, the output sequence of each of its twelve transformers,
the GD-Unit edge scores and weights, every loss term of its training loop and the gradient of
the combined loss. Here the same parameters are loaded into our model (`reference_params`; the
twelve per-branch transformers go through `layout.convert_v1_params` into our stacks), built
from the default config with the `no_dm` ablation and only the sizes changed, and everything is
compared in float32, with both ways of computing the transformer stacks. Neither torch nor the
DMD code is needed here; regenerate the files with
`python tools/make_dmd_fixture.py --dmd=PATH/TO/DMD-checkout --out=tests/fixtures/`.
"""

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ablations
from configs import default
from dhmd_jax import losses
from dhmd_jax import objective
from dhmd_jax.models import build_model
from dhmd_jax.models import layout

FIXTURES = pathlib.Path(__file__).with_name("fixtures")
CONFIGS = ("aligned", "unaligned")
COMPUTES = ("vmap", "loop")
LVA = "lva"  # model order; `layout.CROSS_PAIRS` is the order of our cross-modal stack
# float32 on both sides: |ours - reference| <= ATOL + RTOL * |reference| + SCALE_TOL * S, with S
# the largest |reference| of the array. The SCALE_TOL term is the one looser than an elementwise
# rtol/atol, and it is needed: the transformer outputs (LayerNorm outputs of magnitude ~3) hold
# entries near 0 whose float32 error is that of the array's scale, not their own. Measured on
# these fixtures: the reference's float32 outputs differ from the same reference run in float64 by
# up to 1.3e-6 S (3.5e-6 absolute, trans_v_mem), ours from the reference's by up to 2.7e-6 S
# (7.8e-6 absolute, trans_v_with_l; XLA's CPU rounding varies a little from run to run). Every
# defect planted while writing this test moved some output by 1e-3 S or more.
RTOL, ATOL, SCALE_TOL = 1e-5, 1e-6, 1e-5


def load_fixture(name):
  with np.load(FIXTURES / f"dmd_reference_{name}.npz") as z:
    meta = json.loads(str(z["meta"]))
    index = json.loads(str(z["index"]))
    floats = z["floats"]
  arrays = {key: floats[offset:offset + int(np.prod(shape))].reshape(shape)
            for key, (shape, offset) in index.items()}
  return meta, arrays


@pytest.fixture(scope="module", params=CONFIGS)
def fixture(request):
  return load_fixture(request.param)


def dmd_config(meta, compute="vmap"):
  """The DMD configuration as shipped (defaults + the `no_dm` ablation) at the fixture's sizes.

  Only sizes change; every behavioural field keeps its default, so a default that drifts away
  from the DMD code fails here. `unused_reference_layers` builds the reference's proj_cosine_m,
  so every reference parameter has its place.
  """
  config = ablations.apply_variant(default.get_config(), "no_dm")
  m = config.model
  m.d_model, m.num_heads, m.num_layers = meta["d_model"], meta["num_heads"], meta["nlevels"]
  for key, k in meta["conv_kernel"].items():
    setattr(m.conv_kernel, key, k)
  for key, rate in meta["dropouts"].items():
    setattr(m, key, rate)
  m.unused_reference_layers = True
  m.stack_compute = compute
  config.gd.homo_hidden = meta["gd_size"]["homo"]
  config.gd.hetero_hidden = meta["gd_size"]["hetero"]
  return config


# ---------------------------------------------------------------- reference names -> our tree


def _linear(get, name):
  return {"kernel": get(f"{name}.weight").T, "bias": get(f"{name}.bias")}


def _conv(get, name):
  return {"kernel": get(f"{name}.weight").transpose(2, 1, 0)}  # (out, in, k) -> (k, in, out)


def _norm(get, name):
  return {"scale": get(f"{name}.weight"), "bias": get(f"{name}.bias")}


def _encoder(get, name, num_layers):
  """A reference `TransformerEncoder` -> our per-branch (layout v1) tree."""
  tree = {"layer_norm": _norm(get, f"{name}.layer_norm")}
  for i in range(num_layers):
    p = f"{name}.layers.{i}"
    tree[f"layers_{i}"] = {
        "layer_norm_0": _norm(get, f"{p}.layer_norms.0"),  # on q, k and v
        "self_attn": {"in_proj_kernel": get(f"{p}.self_attn.in_proj_weight").T,
                      "in_proj_bias": get(f"{p}.self_attn.in_proj_bias"),
                      "out_proj": _linear(get, f"{p}.self_attn.out_proj")},
        "layer_norm_1": _norm(get, f"{p}.layer_norms.1"),
        "fc1": _linear(get, f"{p}.fc1"), "fc2": _linear(get, f"{p}.fc2")}
  return tree


def reference_params(arrays, meta, kind="param"):
  """The reference's parameters (kind "param") or gradients ("grad") as our parameter tree.

  Returns the tree and the set of reference names it did not use (must be empty).
  """
  used = set()

  def get(name):
    key = f"{kind}/{name}" if name.startswith(("homo/", "hetero/")) else f"{kind}/dmd/{name}"
    used.add(key)
    return jnp.asarray(arrays[key])

  mem_layers = max(meta["nlevels"], 3)  # the reference's max(nlevels, layers=3)
  tree = {}
  for m in LVA:
    tree[f"proj_{m}"] = {"conv": _conv(get, f"proj_{m}")}
    for ours, theirs in (("align_c", "align_c"), ("proj_cosine", "proj_cosine"),
                         ("weight", "weight")):
      tree[f"{ours}_{m}"] = _linear(get, f"{theirs}_{m}")
    for ours, theirs in (("homo_head", "low"), ("hetero_head", "high")):
      tree[f"{ours}_{m}"] = {part: _linear(get, f"{part}_{m}_{theirs}")
                             for part in ("proj1", "proj2", "out_layer")}
    tree[f"self_attentions_c_{m}"] = _encoder(get, f"self_attentions_c_{m}", meta["nlevels"])
    tree[f"trans_{m}_mem"] = _encoder(get, f"trans_{m}_mem", mem_layers)
  for m, src in layout.CROSS_PAIRS:
    tree[f"trans_{m}_with_{src}"] = _encoder(get, f"trans_{m}_with_{src}", meta["nlevels"])
  tree["decoupling"] = {
      name: _conv(get, name) for name in ["encoder_c"] + [
          f"{part}_{m}" for part in ("encoder_s", "decoder") for m in LVA]}
  tree["head_c"] = {part: _linear(get, f"{part}_c") for part in ("proj1", "proj2", "out_layer")}
  tree["fusion_head"] = {part: _linear(get, part) for part in ("proj1", "proj2", "out_layer")}
  tree["weight_c"] = _linear(get, "weight_c")
  for space in ("homo", "hetero"):
    tree[f"gd_{space}"] = {w: _linear(get, f"{space}/{w}") for w in ("W_logit", "W_repr",
                                                                     "W_edge")}
  unused = {k for k in arrays if k.startswith(f"{kind}/")} - used
  return layout.convert_v1_params(tree), unused


def _paths(tree):
  return {"/".join(str(p.key) for p in path): leaf.shape
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


# ---------------------------------------------------------------- running both sides


def run_model(config, params, arrays, *, with_grads=False):
  """Our forward (deterministic, jitted: compiling is faster than running op by op) with every
  module's output captured (the transformer stacks' sequences, proj_cosine's output) and, with
  `with_grads`, d(combined loss)/d(every parameter) from the same program (one compilation
  serves the outputs and the gradient tests: compiling is most of this file's time).

  Returns (outputs, intermediates, gradients or None)."""
  model = build_model(config, num_outputs=1)
  batch = {m: jnp.asarray(arrays[f"batch/{m}"]) for m in ("text", "vision", "audio")}
  labels = jnp.asarray(arrays["batch/label"])

  def forward(p):
    out, state = model.apply({"params": p}, batch, deterministic=True,
                             capture_intermediates=True, mutable=["intermediates"])
    return objective.compute_objective(config, out, labels)[0], (out, state["intermediates"])

  if with_grads:
    grads, (out, inter) = jax.jit(jax.grad(forward, has_aux=True))(params)
    return out, inter, grads
  _, (out, inter) = jax.jit(forward)(params)
  return out, inter, None


_RUNS = {}


def model_run(meta, arrays, compute):
  """`run_model` once per fixture and compute mode for the whole file (the gradient with the
  "vmap" run): (config, outputs, intermediates, gradients or None)."""
  key = (meta["config"], compute)
  if key not in _RUNS:
    config = dmd_config(meta, compute)
    params, _ = reference_params(arrays, meta)
    _RUNS[key] = (config, *run_model(config, params, arrays, with_grads=compute == "vmap"))
  return _RUNS[key]


class Reads(dict):
  """The fixture's arrays, remembering which were read (every reference number is compared)."""

  def __init__(self, arrays):
    super().__init__(arrays)
    self.read = set()

  def __getitem__(self, key):
    self.read.add(key)
    return super().__getitem__(key)


class Comparison:
  """Collects every mismatch, so a failure lists all outputs that differ (and by how much)."""

  def __init__(self):
    self.failures, self.count = [], 0

  def __call__(self, name, ours, reference):
    ours = np.asarray(ours, np.float32)
    reference = np.asarray(reference, np.float32)
    self.count += 1
    if ours.shape != reference.shape:
      self.failures.append(f"{name}: shape {ours.shape} vs reference {reference.shape}")
      return
    scale = np.max(np.abs(reference), initial=0.0)
    excess = np.abs(ours - reference) - (ATOL + RTOL * np.abs(reference) + SCALE_TOL * scale)
    if not np.all(excess <= 0):  # NaN fails too
      worst = np.unravel_index(np.nanargmax(np.where(np.isnan(excess), np.inf, excess)),
                               excess.shape)
      self.failures.append(
          f"{name}: {int(np.sum(~(excess <= 0)))}/{excess.size} differ, max |diff| "
          f"{np.nanmax(np.abs(ours - reference)):.3g} (at {tuple(int(i) for i in worst)}: "
          f"{ours[worst]:.6g} vs {reference[worst]:.6g})")

  def check(self):
    assert not self.failures, f"{len(self.failures)} of {self.count} differ from the DMD " \
        "code:\n" + "\n".join(self.failures)


def compare_outputs(compare, out, inter, arrays):
  ref = lambda key: arrays[f"out/{key}"]
  time_major = lambda x: np.transpose(x, (1, 0, 2))  # reference (T', B, d) -> (B, T', d)
  channel_major = lambda x: np.transpose(x, (0, 2, 1))  # reference (B, d, T') -> (B, T', d)
  for i, m in enumerate(LVA):
    compare(f"origin_{m} (Conv1d projection)", out["proj"][i], channel_major(ref(f"origin_{m}")))
    compare(f"c_{m} (shared)", out["shared"][i], time_major(ref(f"c_{m}")))
    compare(f"s_{m} (private)", out["private"][i], time_major(ref(f"s_{m}")))
    compare(f"recon_{m}", out["recon"][i], channel_major(ref(f"recon_{m}")))
    compare(f"s_{m}_r (self-regression)", out["private_regressed"][i],
            channel_major(ref(f"s_{m}_r")))
    compare(f"c_{m}_sim (margin features)", out["margin_features"][:, i], ref(f"c_{m}_sim"))
    compare(f"proj_s_{m} (proj_cosine)", inter[f"proj_cosine_{m}"]["__call__"][0],
            ref(f"proj_s_{m}"))
    for space in ("homo", "hetero"):
      compare(f"logits_{m}_{space}", out[f"logits_{space}"][i], ref(f"logits_{m}_{space}"))
      compare(f"repr_{m}_{space}", out[f"repr_{space}"][i], ref(f"repr_{m}_{space}"))
  compare("logits_c", out["logits_c"], ref("logits_c"))
  compare("output_logit (prediction)", out["prediction"], ref("output_logit"))

  seqs = lambda stack: inter[stack]["__call__"][0]
  for i, m in enumerate(LVA):
    compare(f"self_attentions_c_{m} sequence", seqs("self_attentions_c")[i],
            time_major(arrays[f"seq/self_attentions_c_{m}"]))
    compare(f"trans_{m}_mem sequence", seqs("memory_transformers")[i],
            time_major(arrays[f"seq/trans_{m}_mem"]))
    compare(f"last_h_{m}", seqs("memory_transformers")[i][:, -1], ref(f"last_h_{m}"))
  for g, (m, src) in enumerate(layout.CROSS_PAIRS):
    compare(f"trans_{m}_with_{src} sequence", seqs("cross_transformers")[g],
            time_major(arrays[f"seq/trans_{m}_with_{src}"]))

  for space in ("homo", "hetero"):
    compare(f"{space} GD edge weights", out[f"gd_{space}_edges"], arrays[f"gd/{space}_edges"].T)
    compare(f"{space} GD edge scores", out[f"gd_{space}_edge_logits"],
            arrays[f"gd/{space}_edge_scores"])
    compare(f"{space} GD edges_origin (batch sum of the scores)",
            jnp.sum(out[f"gd_{space}_edge_logits"], axis=0)[:, None],
            arrays[f"gd/{space}_edges_origin"])


def compare_losses(compare, config, out, arrays):
  loss = lambda key: arrays[f"loss/{key}"]
  labels = jnp.asarray(arrays["batch/label"])
  _, terms = objective.compute_objective(config, out, labels)
  lam_dtl, lam_dec, gamma = (config.loss.lambda_dtl, config.loss.lambda_dec, config.loss.gamma)

  compare("task_all (final L1)", terms["final_task"], loss("task_all"))
  heads = {f"{m}_{space}": out[f"logits_{space}"][i]
           for space in ("homo", "hetero") for i, m in enumerate(LVA)}
  heads["c"] = out["logits_c"]
  for name, logits in heads.items():
    compare(f"task_{name}", losses.task_loss(prediction=logits, labels=labels),
            loss(f"task_{name}"))
  compare("task (8 L1 terms)", terms["task"], loss("task"))
  for i, m in enumerate(LVA):
    compare(f"recon_{m}", losses.reconstruction_loss(
        predictions=[out["recon"][i]], targets=[out["proj"][i]],
        reduction=config.loss.recon_reduction), loss(f"recon_{m}"))
    compare(f"s_sr_{m} (cycle)", losses.cycle_loss(
        predictions=[out["private_regressed"][i]], targets=[out["private"][i]],
        reduction=config.loss.recon_reduction), loss(f"s_sr_{m}"))
    compare(f"ort_{m}", losses.orthogonality_loss(
        shared=[out["shared"][i]], private=[out["private"][i]], mode=config.loss.ort_mode),
        loss(f"ort_{m}"))
  compare("recon", terms["rec"], loss("recon"))
  compare("s_sr (cycle)", terms["cyc"], loss("s_sr"))
  compare("ort", terms["ort"], loss("ort"))
  compare("sim (margin)", terms["mar"], loss("sim"))
  for space in ("homo", "hetero"):
    compare(f"reg_{space}", terms[f"gd_{space}_reg"], loss(f"reg_{space}"))
    compare(f"logit_{space}", terms[f"gd_{space}_logit"], loss(f"logit_{space}"))
  compare("repr_hetero (cosine push-apart)", terms["gd_hetero_repr"], loss("repr_hetero"))
  # The reference computes the homo repr term (L1) but does not add it; neither do we.
  compare("repr_homo: not in the objective", terms["gd_homo_repr"], 0.0)
  compare("repr_homo (computed, unused)", losses.graph_distillation_loss(
      logits=out["logits_homo"], reprs=out["repr_homo"], edge_weights=out["gd_homo_edges"],
      prior=losses.edge_prior(kind=config.gd.prior, space="homo"),
      reg_weight=config.gd.reg_weight, repr_weight=config.gd.repr_weight,
      repr_loss="l1")["repr"], loss("repr_homo"))
  compare("gd_homo (0.05 x (logit + reg))", lam_dtl * terms["dtl_homo"], loss("gd_homo"))
  compare("gd_hetero (0.05 x (logit + repr + reg))", lam_dtl * terms["dtl_hetero"],
          loss("gd_hetero"))
  compare("decoupling (0.1 x (s_sr + recon + 0.1 x (sim + ort)))", lam_dec * terms["dec"],
          0.1 * (loss("s_sr") + loss("recon") + 0.1 * (loss("sim") + loss("ort"))))
  assert gamma == 0.1
  compare("dic (no dictionaries)", terms["dic"], 0.0)
  compare("combined loss", terms["total"], loss("combined"))


# ---------------------------------------------------------------- tests


def test_every_reference_parameter_has_its_place(fixture):
  meta, arrays = fixture
  params, unused = reference_params(arrays, meta)
  assert not unused, sorted(unused)
  model = build_model(dmd_config(meta), num_outputs=1)
  batch = {m: jnp.asarray(arrays[f"batch/{m}"]) for m in ("text", "vision", "audio")}
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), batch, deterministic=True))["params"]
  assert _paths(params) == _paths(shapes)


@pytest.mark.parametrize("compute", COMPUTES)
def test_outputs_and_losses_match_the_dmd_code(fixture, compute):
  meta, arrays = fixture
  config, out, inter, _ = model_run(meta, arrays, compute)
  compare, reads = Comparison(), Reads(arrays)
  compare_outputs(compare, out, inter, reads)
  compare_losses(compare, config, out, reads)
  compare.check()
  unread = {k for k in arrays if k.split("/")[0] in ("out", "seq", "gd", "loss")} - reads.read
  assert not unread, f"reference numbers compared with nothing: {sorted(unread)}"


def test_gradients_match_the_dmd_code(fixture):
  """d(combined loss)/d(every parameter): the stop-gradients (GD teachers) and what each term
  reaches. Where the reference's true gradient is 0 (the GD-Unit biases and the attention key
  biases, which the softmaxes cancel; proj_cosine, which no loss uses) it has rounding noise
  (below 1e-8 here) and ours is exactly 0."""
  meta, arrays = fixture
  _, _, _, grads = model_run(meta, arrays, "vmap")
  expected, unused = reference_params(arrays, meta, kind="grad")
  assert not unused
  compare = Comparison()
  ours, theirs = _paths_values(grads), _paths_values(expected)
  for path in sorted(theirs):
    compare(f"grad {path}", ours[path], theirs[path])
  compare.check()


def _paths_values(tree):
  return {"/".join(str(p.key) for p in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_fixture_exercises_what_it_must(fixture):
  """The comparisons above could not pass with the positional-embedding padding rule, the
  unequal lengths, the margin loss's triplets or the biases left out of play."""
  meta, arrays = fixture
  c = [arrays[f"out/c_{m}"] for m in LVA]  # (T', B, d)
  lengths = [x.shape[0] for x in c]
  assert lengths == [8, 9, 10] if meta["config"] == "aligned" else lengths == [8, 10, 17]
  # zero frames (first channel exactly 0: zero positional embedding) beside real ones
  zero = sum(int(np.sum(x[..., 0] == 0)) for x in c)
  assert 0 < zero < sum(x.shape[0] * x.shape[1] for x in c)
  assert 0 < meta["margin_triplets_active"] < meta["margin_triplets"]
  labels = arrays["batch/label"]
  assert len(set(labels.tolist())) < len(labels)  # equal labels across samples
  biases = [v for k, v in arrays.items() if k.startswith("param/") and k.endswith(".bias")]
  assert all(np.all(b != 0) for b in biases)
  for space in ("homo", "hetero"):  # distinct edges: an edge-order error shows
    scores = arrays[f"gd/{space}_edge_scores"]
    assert np.min(np.abs(scores[:, :, None] - scores[:, None, :]) + np.eye(6) * 1e9) > 1e-4
