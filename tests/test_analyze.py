"""python -m dhmd_jax.analyze on a tiny trained run: every figure file is written, the numbers in
its CSV/NPZ files are those of the analysis functions, and bad input ends with one line."""

import csv
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from configs import tiny
from dhmd_jax import analysis
from dhmd_jax import analyze
from dhmd_jax import data as data_lib
from dhmd_jax import train as train_lib
from dhmd_jax.names import EDGE_NAMES

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
  """The tiny config (2 seeds, 2 epochs) trained once per test session: test_analysis.py and
  test_analyze.py share the run (whichever runs first trains it; a run interrupted before its
  report resumes from its checkpoint)."""
  workdir = tmp_path_factory.getbasetemp() / "tiny_analysis_run"
  if not (workdir / "results.json").exists():
    train_lib.train_and_evaluate(tiny.get_config(), str(workdir))
  return str(workdir)


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory):
  """The tiny config trained once; analyze run on it (compared with itself) into out/."""
  workdir = tiny_run(tmp_path_factory)
  out = str(tmp_path_factory.mktemp("analyze_out"))
  analyze.main([f"--workdir={workdir}", "--split=test", f"--compare={workdir}",
                f"--sample={SAMPLE}", f"--out={out}"])
  config, dataset, model, stacked = analyze.load_run(workdir)
  arrays = data_lib.split_arrays(dataset.splits["test"], config.dataset.task)
  params = analysis.seed_params(stacked, 0)
  outputs = analysis.split_outputs(model, params, arrays,
                                   batch_size=config.train.eval_batch_size)
  classes, names = analysis.sentiment_classes(arrays["label"], task="regression",
                                              dataset="synthetic")
  return dict(workdir=workdir, out=out, config=config, model=model, stacked=stacked,
              params=params, arrays=arrays, outputs=outputs, classes=classes, names=names)


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
  # Compared with itself: both columns equal this run's means.
  for r in _rows(os.path.join(out, "edges_compare.csv")):
    assert float(r["weight_run"]) == float(r["weight_compare"])
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
    analyze.main(argv)
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
  _fails(capsys, ["--workdir=x", "--split=dev"], status=2)
  _fails(capsys, [], status=2)


def test_the_module_entry_point(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.analyze", f"--workdir={tmp_path}/nope"],
                        cwd=REPO, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      f"error: workdir {tmp_path}/nope does not exist; pass the folder of a training run "
      f"(python -m dhmd_jax.main --config=... --workdir=DIR)"]
