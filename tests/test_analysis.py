"""dhmd_jax.analysis on a tiny trained run, and the opt-in attention maps of the transformer
stacks against a NumPy recomputation (both stack computations); then `python -m
dhmd_jax.figures` on the same run: every figure file is written, the numbers in its CSV/NPZ
files are those of the analysis functions, and bad input ends with one line. One file, so the
tiny run is trained once (also when the suite runs on several workers)."""

import csv
import json
import math
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import tiny
from dhmd_jax import analysis
from dhmd_jax import figures
from dhmd_jax import data as data_lib
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import steps
from dhmd_jax import train as train_lib
from dhmd_jax.models import transformer
from dhmd_jax.names import EDGE_NAMES
from dhmd_jax.names import EDGES

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = 5

FIGURES = ("edges_mean.png", "edges_per_class.png", "edges_epochs.png", "edges_compare.png",
           "edges_compare_epochs.png", "tsne_homo.png", "tsne_hetero.png", "dictionary.png",
           f"attention_sample{SAMPLE}.png", "curves.png")
NUMBERS = ("analysis.npz", "edges_mean.csv", "edges_per_class.csv", "edges_epochs.csv",
           "edges_compare.csv", "tsne.npz", "dictionary.npz", "dictionary_sharing.csv",
           f"attention_sample{SAMPLE}.npz", "curves.csv", "missing_modality.md",
           "missing_modality.csv", "analysis.json")


def tiny_run(tmp_path_factory):
  """The tiny config (2 seeds, 2 epochs) trained once: the analysis functions' tests and the
  figures command's share the run (whichever fixture comes first trains it; a run interrupted
  before its report resumes from its checkpoint)."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_analysis_run"
  if not (workdir / "results.json").exists():
    train_lib.train_and_evaluate(tiny.get_config(), str(workdir))
  return str(workdir)


# ----------------------------------------------------------------------------- a trained run


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """The tiny config trained once (2 seeds, 2 epochs), its best parameters and test arrays."""
  workdir = tiny_run(tmp_path_factory)
  config, dataset, model, stacked = figures.load_run(workdir, "best")
  arrays = data_lib.split_arrays(dataset.splits["test"], config.dataset.task)
  params = analysis.seed_params(stacked, 0)
  outputs = analysis.split_outputs(model, params, arrays,
                                   batch_size=config.train.eval_batch_size)
  return dict(workdir=workdir, config=config, model=model, stacked=stacked, params=params,
              arrays=arrays, outputs=outputs)


def test_split_outputs_shapes_and_normalisation(run):
  config, outputs, arrays = run["config"], run["outputs"], run["arrays"]
  n, d, k = arrays["label"].shape[0], config.model.d_model, config.dm.num_elements
  for space in analysis.SPACES:
    edges = outputs[f"gd_{space}_edges"]
    assert edges.shape == (n, 6)
    assert np.all(edges > 0)
    np.testing.assert_allclose(edges.sum(axis=1), 1.0, rtol=1e-5)  # each sample's six edges
    weights = outputs[f"dm_{space}_weights"]
    assert weights.shape == (n, 3, k)
    np.testing.assert_allclose(weights.sum(axis=-1), 1.0, rtol=1e-5)  # over the K elements
    assert outputs[f"{space}_features"].shape == (n, 3, d)  # one pooled vector per modality
  assert outputs["prediction"].shape == (n, 1)
  # One batch of 32 (the 24 samples and 8 wrapped rows, dropped): the same predictions as the
  # training code's predictor for this seed.
  predict = steps.make_predict(run["model"], batch_size=config.train.eval_batch_size)
  expected = np.asarray(predict(run["stacked"], jax.device_put(arrays)))[0]
  np.testing.assert_allclose(outputs["prediction"], expected, rtol=1e-5, atol=1e-6)


def test_pool_frames_is_the_mean_over_real_frames():
  rng = np.random.default_rng(0)
  seqs = [rng.normal(size=(3, t, 4)).astype(np.float32) for t in (5, 4, 6)]
  masks = [np.arange(t)[None] < np.array([[t], [2], [0]]) for t in (5, 4, 6)]
  pooled = np.asarray(analysis.pool_frames([jnp.asarray(x) for x in seqs],
                                           [jnp.asarray(m) for m in masks]))
  assert pooled.shape == (3, 3, 4)
  for m in range(3):
    np.testing.assert_allclose(pooled[0, m], seqs[m][0].mean(0), rtol=1e-6)
    np.testing.assert_allclose(pooled[1, m], seqs[m][1, :2].mean(0), rtol=1e-6)
    np.testing.assert_array_equal(pooled[2, m], 0.0)  # no real frame


def test_edge_matrices_follow_the_shared_edge_order(run):
  edges = run["outputs"]["gd_hetero_edges"]
  w = analysis.edge_matrices(edges)  # (N, 3, 3)
  assert w.shape == (edges.shape[0], 3, 3)
  np.testing.assert_allclose(w.sum(axis=(1, 2)), 1.0, rtol=1e-5)
  np.testing.assert_array_equal(w[:, np.arange(3), np.arange(3)], 0.0)
  for e, (student, teacher) in enumerate(EDGES):
    np.testing.assert_array_equal(w[:, teacher, student], edges[:, e])  # row = from, col = to
  assert EDGE_NAMES[0] == "V->L" and w[0, 1, 0] == edges[0, 0]


def test_edge_summary_per_class(run):
  edges = run["outputs"]["gd_homo_edges"]
  classes, names = analysis.sentiment_classes(run["arrays"]["label"], task="regression",
                                              dataset="synthetic")
  summary = analysis.edge_summary(edges, classes, len(names))
  np.testing.assert_allclose(summary["mean"], edges.mean(axis=0), rtol=1e-6)
  np.testing.assert_allclose(summary["mean_matrix"].sum(), 1.0, rtol=1e-5)
  assert summary["count"].sum() == edges.shape[0]
  for c in range(len(names)):
    if summary["count"][c]:
      np.testing.assert_allclose(summary["per_class"][c], edges[classes == c].mean(axis=0),
                                 rtol=1e-6)
      np.testing.assert_allclose(summary["per_class_matrix"][c].sum(), 1.0, rtol=1e-5)
    else:
      assert np.isnan(summary["per_class"][c]).all()


def test_sentiment_classes():
  labels = np.array([-3.4, -2.5, -1.5, -0.4, 0.0, 0.5, 1.5, 2.6, 3.0])
  classes, names = analysis.sentiment_classes(labels, task="regression", dataset="mosei")
  # round half to even, as MMSA's Mult_acc_7: -2.5 -> -2, -1.5 -> -2, 0.5 -> 0, 1.5 -> 2.
  assert [names[c] for c in classes] == ["-3", "-2", "-2", "0", "0", "0", "+2", "+3", "+3"]
  classes, names = analysis.sentiment_classes(np.array([-0.8, -0.1, 0.0, 0.1, 0.2]),
                                              task="regression", dataset="sims")
  assert [names[c] for c in classes] == ["negative", "negative", "neutral", "neutral",
                                         "positive"]
  classes, names = analysis.sentiment_classes(np.array([0, 1, 1]), task="binary",
                                              dataset="mustard")
  assert classes.tolist() == [0, 1, 1] and names == ("0", "1")


def test_dictionary_activations_per_class(run):
  weights = run["outputs"]["dm_hetero_weights"]
  classes, names = analysis.sentiment_classes(run["arrays"]["label"], task="regression",
                                              dataset="synthetic")
  means, counts = analysis.class_activations(weights, classes, len(names))
  assert means.shape == (len(names), 3, weights.shape[-1])
  for c in np.nonzero(counts)[0]:
    np.testing.assert_allclose(means[c].sum(axis=-1), 1.0, rtol=1e-5)
  atoms = analysis.activated_atoms(weights)
  np.testing.assert_array_equal(atoms, weights.argmax(-1))
  act = analysis.activation_counts(atoms, classes, len(names), weights.shape[-1])
  np.testing.assert_array_equal(act.sum(axis=-1), np.repeat(counts[:, None], 3, axis=1))
  assert analysis.dictionary(run["params"], "hetero").shape == (
      weights.shape[-1], 2 * run["config"].model.d_model)


def test_modality_sharing_by_hand():
  # Two samples, K = 4. Sample 0: L and V pick element 1, A picks 3; sample 1: all pick 2.
  w = np.array([[[0.1, 0.6, 0.2, 0.1], [0.2, 0.5, 0.2, 0.1], [0.1, 0.1, 0.2, 0.6]],
                [[0.1, 0.1, 0.7, 0.1], [0.1, 0.2, 0.6, 0.1], [0.2, 0.1, 0.6, 0.1]]])
  share = analysis.modality_sharing(w, np.array([0, 1]), 2, top_k=2)
  np.testing.assert_allclose(share["same_atom"], [[1, 1, 0.5], [1, 1, 0.5], [0.5, 0.5, 1]])
  # Top-2 sets. Sample 0: L {1, 2}, V {0, 1} (stable tie-break on 0.2: element 0 first),
  # A {3, 2}. Sample 1: L {2, 0}... (0.1 ties: element 0), V {2, 1}, A {2, 0}.
  lv = (1 / 3 + 1 / 3) / 2
  la = (1 / 3 + 1.0) / 2
  va = (0.0 + 1 / 3) / 2
  np.testing.assert_allclose(share["top_k_jaccard"], [[1, lv, la], [lv, 1, va], [la, va, 1]])
  np.testing.assert_allclose(share["class_jaccard"][0], [[1, 1, 0], [1, 1, 0], [0, 0, 1]])
  np.testing.assert_allclose(share["class_jaccard"][1], np.ones((3, 3)))


def test_attention_maps_of_the_model(run):
  """Every stack's maps for one sample: shapes per modality, rows summing to one over the keys,
  the causal mask's zeros."""
  model, params = run["model"], run["params"]
  batch = analysis.sample_batch(run["arrays"], 2)
  maps = analysis.attention_maps(model, params, batch)
  s = model.settings.model
  t = [m.shape[1] for m in analysis.frame_masks(model, batch)]  # T'_m of L, V, A
  assert set(maps) == set(analysis.STACK_BRANCHES)
  assert list(maps["cross_transformers"]) == ["A->L", "V->L", "L->V", "A->V", "L->A", "V->A"]
  index = {"L": 0, "V": 1, "A": 2}
  for stack, branches in maps.items():
    layers = max(s.num_layers, 3) if stack == "memory_transformers" else s.num_layers
    for name, w in branches.items():
      q, k = (index[name[-1]], index[name[0]]) if "->" in name else (index[name],) * 2
      assert w.shape == (layers, 1, s.num_heads, t[q], t[k]), (stack, name, w.shape)
      np.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-5)
      visible = np.asarray(transformer.future_mask(t[q], t[k]))
      assert np.all(w[..., ~visible] == 0.0)
  with pytest.raises(IndexError, match="out of range: the split has 24 samples"):
    analysis.sample_batch(run["arrays"], 24)


@pytest.mark.parametrize("compute", ["vmap", "loop"])
def test_stack_attention_weights_against_numpy(compute):
  """Layer-0 weights of a causal self-attention and a cross-modal stack (branches of unequal
  lengths, key padding, query blocks) recomputed in NumPy from the parameters."""
  rng = np.random.default_rng(0)
  xs = [jnp.asarray(rng.normal(size=(2, t, 8)), jnp.float32) for t in (7, 6, 9)]
  srcs = [jnp.asarray(rng.normal(size=(2, t, 8)), jnp.float32) for t in (9, 7, 6)]
  kms = [jnp.arange(s.shape[1])[None] < jnp.array([[s.shape[1]], [s.shape[1] - 2]])
         for s in srcs]
  for cross in (False, True):
    stack = transformer.TransformerStack(num_heads=2, num_layers=2, compute=compute,
                                         query_block=3)
    args = (xs, srcs if cross else None)
    masks = kms if cross else [jnp.ones(x.shape[:2], bool) for x in xs]
    variables = jax.jit(lambda k: stack.init(k, *args, key_masks=masks, deterministic=True))(
        jax.random.key(1))
    plain, (out, state) = jax.jit(lambda v: (
        stack.apply(v, *args, key_masks=masks, deterministic=True),
        stack.apply(v, *args, key_masks=masks, deterministic=True,
                    mutable=["intermediates"])))(variables)
    for a, b in zip(plain, out):
      np.testing.assert_array_equal(a, b)
    recorded = state["intermediates"]["attention"][0]
    p = jax.tree.map(np.asarray, variables["params"])
    for g, x in enumerate(xs):
      src = np.asarray(srcs[g] if cross else x)
      x = np.asarray(x)
      assert recorded[g].shape == (2, 2, 2, x.shape[1], src.shape[1])

      def embed(y):
        return math.sqrt(8) * y + np.asarray(transformer.positional_embedding(jnp.asarray(y)))

      def norm(y):
        mean = y.mean(-1, keepdims=True)
        var = y.var(-1, keepdims=True)
        return ((y - mean) / np.sqrt(var + 1e-5) * p["layer_norm_0_scale"][g, 0]
                + p["layer_norm_0_bias"][g, 0])

      w, bias = p["in_proj_kernel"][g, 0], p["in_proj_bias"][g, 0]
      q = norm(embed(x)) @ w[:, :8] + bias[:8]
      k = norm(embed(src)) @ w[:, 8:16] + bias[8:16]
      q = q.reshape(2, x.shape[1], 2, 4) / 2.0  # head_dim 4: scale 1/2
      k = k.reshape(2, src.shape[1], 2, 4)
      scores = np.einsum("bqhc,bkhc->bhqk", q, k)
      visible = np.asarray(transformer.future_mask(x.shape[1], src.shape[1]))[None, None]
      visible = visible & np.asarray(masks[g])[:, None, None, :]
      scores = np.where(visible, scores, -np.inf)
      expected = np.exp(scores - scores.max(-1, keepdims=True))
      expected /= expected.sum(-1, keepdims=True)
      np.testing.assert_allclose(recorded[g][0], expected, rtol=1e-4, atol=1e-6)
      np.testing.assert_allclose(recorded[g].sum(-1), 1.0, rtol=1e-5)


def test_missing_modality_changes_predictions(run):
  config, model, stacked, arrays = run["config"], run["model"], run["stacked"], run["arrays"]
  removed = analysis.remove_modalities(arrays, [1])
  assert not removed["vision"].any() and not removed["vision_mask"].any()
  assert removed["text"] is arrays["text"] and removed["audio_mask"] is arrays["audio_mask"]
  result = analysis.missing_modality(config, model, stacked, arrays)
  names = [name for name, _ in result["conditions"]]
  assert names == ["L+V+A", "V+A", "L+A", "L+V", "A", "V", "L"]
  full = result["predictions"]["L+V+A"]  # (S, N)
  assert full.shape == (len(config.train.seeds), arrays["label"].shape[0])
  for name in names[1:]:
    assert np.abs(result["predictions"][name] - full).max() > 1e-4, name
  # The full condition is the run's own evaluation; each row's diff is condition - full.
  labels = arrays["label"]
  predict = steps.make_predict(model, batch_size=config.train.eval_batch_size)
  expected = metrics_lib.split_metrics(config, np.asarray(predict(stacked, jax.device_put(
      arrays))), labels)
  assert result["per_seed"]["L+V+A"] == expected
  rows = {(r["variant"], r["metric"]): r for r in result["rows"]}
  for name in names[1:]:
    drop = np.subtract(result["per_seed"][name]["MAE"], result["per_seed"]["L+V+A"]["MAE"])
    np.testing.assert_allclose(rows[(name, "MAE")]["diff"], drop.mean(), rtol=1e-12)
    drop = np.subtract(result["per_seed"][name]["Has0_acc_2"],
                       result["per_seed"]["L+V+A"]["Has0_acc_2"])  # in percent in the rows
    np.testing.assert_allclose(rows[(name, "Has0_acc_2")]["diff"], 100 * drop.mean(),
                               rtol=1e-9, atol=1e-9)
  assert rows[("L+V+A", "MAE")]["is_reference"]


def test_training_curves_and_edges_over_epochs(run):
  with open(os.path.join(run["workdir"], "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  curves = analysis.training_curves(records)
  seeds = run["config"].train.seeds
  assert curves["epoch"].tolist() == [1, 2] and curves["seeds"] == list(seeds)
  for term in ("total", "task", "rec", "dtl_homo", "ctr_hetero"):
    np.testing.assert_array_equal(curves["train"][term],
                                  [r["train"][term] for r in records])
  np.testing.assert_array_equal(curves["valid"]["MAE"], [r["valid"]["MAE"] for r in records])
  np.testing.assert_array_equal(curves["lr"], [r["lr"] for r in records])
  epochs, per_epoch = analysis.edges_over_epochs(records)
  assert epochs.tolist() == [1, 2]
  for space in analysis.SPACES:
    assert per_epoch[space].shape == (2, len(seeds), 6)
    np.testing.assert_allclose(per_epoch[space].sum(-1), 1.0, rtol=1e-5)
    for e, name in enumerate(EDGE_NAMES):
      np.testing.assert_array_equal(per_epoch[space][1, :, e],
                                    records[1]["edges"][f"{space}/{name}"])
  # A resumed run may log an epoch twice: the later record wins.
  again = dict(records[1], lr=[9.0] * len(seeds))
  assert analysis.training_curves(records + [again])["lr"][-1].tolist() == [9.0] * len(seeds)

# ----------------------------------------------------------------------------- the figures command


def other_run(tmp_path_factory):
  """A second, different run for --compare: the tiny config with other seeds, one epoch."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_analysis_other_run"
  if not (workdir / "results.json").exists():
    config = tiny.get_config()
    config.train.seeds = (7, 8)
    config.train.num_epochs = 1
    train_lib.train_and_evaluate(config, str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
  """The tiny config trained once; figures run on it, compared with another run, into out/."""
  workdir = tiny_run(tmp_path_factory)
  other = other_run(tmp_path_factory)
  out = str(tmp_path_factory.mktemp("figures_out"))
  figures.main([f"--workdir={workdir}", "--split=test", f"--compare={other}",
                f"--sample={SAMPLE}", f"--out={out}"])
  config, dataset, model, stacked = figures.load_run(workdir)
  arrays = data_lib.split_arrays(dataset.splits["test"], config.dataset.task)
  params = analysis.seed_params(stacked, 0)
  outputs = analysis.split_outputs(model, params, arrays,
                                   batch_size=config.train.eval_batch_size)
  classes, names = analysis.sentiment_classes(arrays["label"], task="regression",
                                              dataset="synthetic")
  return dict(workdir=workdir, other=other, out=out, config=config, model=model,
              stacked=stacked, params=params, arrays=arrays, outputs=outputs, classes=classes,
              names=names)


def _rows(path):
  with open(path) as f:
    return list(csv.DictReader(f))


def test_every_figure_and_number_file_is_written(analyzed):
  out = analyzed["out"]
  for name in FIGURES:
    path = os.path.join(out, name)
    assert os.path.getsize(path) > 5000, name
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", name
  for name in NUMBERS:
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  summary = json.load(open(os.path.join(out, "analysis.json")))
  assert sorted(os.path.basename(f) for f in summary["files"]) == sorted(
      set(FIGURES + NUMBERS) - {"analysis.json"})
  assert summary["seed"] == analyzed["config"].train.seeds[0]


def test_per_sample_arrays_match_the_analysis_functions(analyzed):
  saved = np.load(os.path.join(analyzed["out"], "analysis.npz"))
  for key, value in analyzed["outputs"].items():
    np.testing.assert_allclose(saved[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  np.testing.assert_array_equal(saved["classes"], analyzed["classes"])
  assert saved["edge_names"].tolist() == list(EDGE_NAMES)


def test_edge_csvs_match(analyzed):
  out, outputs, classes = analyzed["out"], analyzed["outputs"], analyzed["classes"]
  num_classes = len(analyzed["names"])
  summaries = {s: analysis.edge_summary(outputs[f"gd_{s}_edges"], classes, num_classes)
               for s in analysis.SPACES}
  rows = _rows(os.path.join(out, "edges_mean.csv"))
  assert [(r["space"], r["edge"]) for r in rows] == [(s, e) for s in analysis.SPACES
                                                     for e in EDGE_NAMES]
  for r in rows:
    np.testing.assert_allclose(float(r["weight"]),
                               summaries[r["space"]]["mean"][EDGE_NAMES.index(r["edge"])],
                               rtol=1e-5)
  for r in _rows(os.path.join(out, "edges_per_class.csv")):
    c = analyzed["names"].index(r["class"])
    s = summaries[r["space"]]
    assert int(r["count"]) == s["count"][c]
    expected = s["per_class"][c, EDGE_NAMES.index(r["edge"])]
    if np.isnan(expected):
      assert r["weight"] == "nan"
    else:
      np.testing.assert_allclose(float(r["weight"]), expected, rtol=1e-5)
  # Compared with another run: this run's means, then the other run's, computed here from its
  # own checkpoint (its first seed: this run's seed is not among its seeds).
  config, dataset, model, stacked = figures.load_run(analyzed["other"])
  arrays = data_lib.split_arrays(dataset.splits["test"], config.dataset.task)
  other = analysis.split_outputs(model, analysis.seed_params(stacked, 0), arrays,
                                 batch_size=config.train.eval_batch_size)
  other_classes, _ = analysis.sentiment_classes(arrays["label"], task="regression",
                                                dataset="synthetic")
  compare = _rows(os.path.join(out, "edges_compare.csv"))
  assert [(r["space"], r["edge"]) for r in compare] == [(s, e) for s in analysis.SPACES
                                                        for e in EDGE_NAMES]
  for r in compare:
    e = EDGE_NAMES.index(r["edge"])
    mine = summaries[r["space"]]["mean"][e]
    theirs = analysis.edge_summary(other[f"gd_{r['space']}_edges"], other_classes,
                                   num_classes)["mean"][e]
    np.testing.assert_allclose(float(r["weight_tiny_analysis_run"]), mine, rtol=1e-5)
    np.testing.assert_allclose(float(r["weight_tiny_analysis_other_run"]), theirs, rtol=1e-5)
  assert any(abs(float(r["weight_tiny_analysis_run"]) - float(r["weight_tiny_analysis_other_run"]))
             > 1e-4 for r in compare)  # two different runs
  records = [json.loads(l) for l in open(os.path.join(analyzed["workdir"], "metrics.jsonl"))]
  rows = _rows(os.path.join(out, "edges_epochs.csv"))
  assert len(rows) == 2 * 2 * 2 * 6  # epochs x seeds x spaces x edges
  seeds = records[0]["seeds"]
  for r in rows:
    record = records[int(r["epoch"]) - 1]
    expected = record["edges"][f"{r['space']}/{r['edge']}"][seeds.index(int(r["seed"]))]
    assert float(r["weight"]) == pytest.approx(expected, rel=1e-12)


def test_tsne_and_dictionary_numbers_match(analyzed):
  out, outputs, classes = analyzed["out"], analyzed["outputs"], analyzed["classes"]
  tsne = np.load(os.path.join(out, "tsne.npz"))
  chosen = tsne["samples"]
  assert len(chosen) == analyzed["arrays"]["label"].shape[0]  # 24 < the 400 default
  for space in analysis.SPACES:
    np.testing.assert_allclose(tsne[f"{space}_features"],
                               outputs[f"{space}_features"][chosen].reshape(-1, 8), rtol=1e-5,
                               atol=1e-6)
    assert tsne[f"{space}_embedding"].shape == (3 * len(chosen), 2)
    np.testing.assert_array_equal(tsne[f"{space}_class"], np.repeat(classes[chosen], 3))
  dic = np.load(os.path.join(out, "dictionary.npz"))
  num_classes = len(analyzed["names"])
  for space in analysis.SPACES:
    weights = outputs[f"dm_{space}_weights"]
    means, _ = analysis.class_activations(weights, classes, num_classes)
    np.testing.assert_allclose(dic[f"{space}_class_mean"], means, rtol=1e-5, atol=1e-7)
    share = analysis.modality_sharing(weights, classes, num_classes)
    np.testing.assert_allclose(dic[f"{space}_same_atom"], share["same_atom"])
    np.testing.assert_allclose(dic[f"{space}_top_k_jaccard"], share["top_k_jaccard"])
    np.testing.assert_array_equal(dic[f"{space}_dictionary"],
                                  analysis.dictionary(analyzed["params"], space))
  rows = _rows(os.path.join(out, "dictionary_sharing.csv"))
  lv = next(r for r in rows if r["space"] == "hetero" and r["modalities"] == "L-V"
            and r["class"] == "all")
  np.testing.assert_allclose(float(lv["same_activated_element"]),
                             dic["hetero_same_atom"][0, 1])


def test_attention_numbers_match(analyzed):
  saved = np.load(os.path.join(analyzed["out"], f"attention_sample{SAMPLE}.npz"))
  maps = analysis.attention_maps(analyzed["model"], analyzed["params"],
                                 analysis.sample_batch(analyzed["arrays"], SAMPLE))
  for stack, branches in maps.items():
    for name, w in branches.items():
      np.testing.assert_allclose(saved[f"{stack}/{name}"], w[:, 0], rtol=1e-5, atol=1e-7)
  # The synthetic pickle has raw_text: the text positions are labelled with its words.
  assert bool(saved["have_words"])
  labels = saved["labels_L"].tolist()
  assert len(labels) == maps["cross_transformers"]["A->L"].shape[-2]
  assert not all(l.startswith("t") and l[1:].isdigit() for l in labels)


def test_curves_and_missing_modality_numbers_match(analyzed):
  records = [json.loads(l) for l in open(os.path.join(analyzed["workdir"], "metrics.jsonl"))]
  curves = analysis.training_curves(records)
  rows = _rows(os.path.join(analyzed["out"], "curves.csv"))
  seeds = curves["seeds"]
  for r in rows:
    e, s = int(r["epoch"]) - 1, seeds.index(int(r["seed"]))
    table = curves[r["group"]]
    expected = table[r["name"]][e, s] if isinstance(table, dict) else table[e, s]
    assert float(r["value"]) == pytest.approx(expected, rel=1e-12, nan_ok=True)
  assert {r["name"] for r in rows if r["group"] == "train"} >= {"total", "task", "ctr_homo"}
  result = analysis.missing_modality(analyzed["config"], analyzed["model"], analyzed["stacked"],
                                     analyzed["arrays"])
  expected = {(r["variant"], r["metric"]): r for r in result["rows"]}
  rows = _rows(os.path.join(analyzed["out"], "missing_modality.csv"))
  assert len(rows) == len(expected) == 7 * len(result["per_seed"]["L+V+A"])
  for r in rows:
    e = expected[(r["condition"], r["metric"])]
    np.testing.assert_allclose(float(r["mean"]), e["mean"], rtol=1e-12)
    if not e["is_reference"]:
      np.testing.assert_allclose(float(r["diff"]), e["diff"], rtol=1e-12)
  removed = {r["condition"]: r["removed"] for r in rows}
  assert removed["L+V+A"] == "none" and removed["A"] == "L+V" and removed["V+A"] == "L"
  markdown = open(os.path.join(analyzed["out"], "missing_modality.md")).read()
  assert "| condition |" in markdown and "| V+A |" in markdown and "Δ" in markdown


# ----------------------------------------------------------------------------- bad input


def _fails(capsys, argv, status=1):
  with pytest.raises(SystemExit) as info:
    figures.main(argv)
  assert info.value.code == status
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  return err


def test_missing_workdir(tmp_path, capsys):
  err = _fails(capsys, [f"--workdir={tmp_path}/nope"])
  assert "does not exist" in err


def test_workdir_without_checkpoints(analyzed, tmp_path, capsys):
  os.makedirs(tmp_path / "run")
  shutil.copy(os.path.join(analyzed["workdir"], "config.json"), tmp_path / "run")
  err = _fails(capsys, [f"--workdir={tmp_path}/run"])
  assert "checkpoint" in err


def test_bad_sample_index(analyzed, capsys):
  err = _fails(capsys, [f"--workdir={analyzed['workdir']}", "--sample=24",
                        f"--out={analyzed['workdir']}/bad"])
  assert "--sample=24 is out of range" in err and "24 samples" in err


def test_bad_command_line(capsys):
  err = _fails(capsys, ["--workdir=x", "--split=dev"], status=2)
  assert err.startswith("error: bad value for --split: 'dev'"), err
  err = _fails(capsys, [], status=2)
  assert err == "error: --workdir is required (python -m dhmd_jax.figures --help lists the flags)"


def test_the_module_entry_point(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.figures", f"--workdir={tmp_path}/nope"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: workdir {tmp_path}/nope does not exist; pass the folder of a training run "
      f"(python -m dhmd_jax.main --config=... --workdir=DIR)"]
