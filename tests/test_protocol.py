"""The training protocol's claims that no other test pins: early stopping inside the vmapped
chunk, the refusal to resume with a changed config, `train.num_devices` through the trainer,
and binary, unaligned data trained, evaluated and predicted end to end."""

import csv
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fake_model
from dhmd_jax import auto
from dhmd_jax import data as data_lib
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import host
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import steps
from dhmd_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ----------------------------------------------------------------------------- early stopping


def _chunk_inputs(config, tmp_path, seeds, seed_compute="auto"):
  config.train.seeds = seeds
  dataset = data_lib.load_dataset(config.dataset, workdir=str(tmp_path))
  model = fake_model.fake_build(config, dataset)
  data = data_lib.split_arrays(dataset.splits["train"], "regression")
  init_keys, order_keys, dropout_keys = train_lib.seed_keys(seeds)
  sample = jax.tree.map(lambda a: a[:8], data)
  init = jax.jit(jax.vmap(lambda k: steps.init_state(config, model, sample, k)))
  index = steps.epoch_index(order_keys, 1, num_samples=96, batch_size=8, num_steps=3,
                            micro_per_step=2)
  run_chunk = steps.make_run_chunk(steps.make_train_step(config, model),
                                   seed_compute=seed_compute)
  weights = train_lib.run_loss_weights(config, len(seeds))
  return lambda active: run_chunk(init(init_keys), jnp.asarray(active), data, index,
                                  jnp.ones(3, bool), dropout_keys, weights), init(init_keys)


def test_a_stopped_seed_keeps_its_state_and_the_others_train_as_without_it(tmp_path):
  run, initial = _chunk_inputs(fake_model.fake_config(), tmp_path, (1111, 1112, 1113))
  all_on, _ = run([True, True, True])
  one_off, _ = run([True, False, True])
  flat = lambda states, s: np.concatenate(
      [np.asarray(leaf[s]).ravel() for leaf in jax.tree.leaves(states.params)])
  # The stopped seed: parameters, optimizer moments and step count exactly as they were.
  for a, b in zip(jax.tree.leaves(one_off), jax.tree.leaves(initial)):
    np.testing.assert_array_equal(np.asarray(a[1]), np.asarray(b[1]))
  assert int(one_off.step[1]) == 0 and int(all_on.step[1]) == 3
  # The others: bit for bit what they are when every seed trains, and they did move.
  for s in (0, 2):
    for a, b in zip(jax.tree.leaves(one_off), jax.tree.leaves(all_on)):
      np.testing.assert_array_equal(np.asarray(a[s]), np.asarray(b[s]))
    assert not np.array_equal(flat(one_off, s), flat(initial, s))


def test_seeds_one_after_another_train_and_predict_as_the_vmapped_seeds(tmp_path):
  runs = {mode: _chunk_inputs(fake_model.fake_config(), tmp_path / mode, (1111, 1112, 1113),
                              seed_compute=mode)[0] for mode in ("scan", "vmap")}
  (scan_states, scan_metrics), (vmap_states, vmap_metrics) = (
      runs[mode]([True, False, True]) for mode in ("scan", "vmap"))
  for a, b in zip(jax.tree.leaves((scan_states, scan_metrics)),
                  jax.tree.leaves((vmap_states, vmap_metrics))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
  assert int(scan_states.step[1]) == 0 and int(scan_states.step[0]) == 3
  config = fake_model.fake_config()
  dataset = data_lib.load_dataset(config.dataset, workdir=str(tmp_path))
  model = fake_model.fake_build(config, dataset)
  data = data_lib.split_arrays(dataset.splits["valid"], "regression")
  preds = {mode: np.asarray(steps.make_predict(model, batch_size=8, seed_compute=mode)(
      scan_states.params, data)) for mode in ("scan", "vmap")}
  assert preds["scan"].shape[0] == 3
  np.testing.assert_allclose(preds["scan"], preds["vmap"], rtol=1e-5, atol=1e-6)
  assert not np.allclose(preds["scan"][0], preds["scan"][1])  # each seed its own parameters


def test_the_trainer_computes_seeds_as_the_config_says_and_its_report_says_so(tmp_path,
                                                                                monkeypatch):
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  used, real = [], steps.over_seeds
  monkeypatch.setattr(steps, "over_seeds",
                      lambda fn, mode, in_axes: used.append(mode) or real(fn, mode, in_axes))
  for mode in ("vmap", "scan"):
    config = _short_config()
    config.train.seed_compute = mode
    used.clear()
    results = train_lib.train_and_evaluate(config, str(tmp_path / mode))
    assert len(used) >= 2 and set(used) == {mode}, (mode, used)  # train chunk, predictions
    cpu, cpus = host.cpu_model(), host.cpus()
    assert cpu and cpu != "unknown" and cpus >= 1  # this Linux machine names its CPU
    assert results["computed_as"] == {
        "backend": "cpu", "devices": 1, "device_kind": "cpu", "jax": jax.__version__,
        "host_cpu": cpu, "host_cpus": cpus,
        "train.accumulate": "scan", "train.seed_compute": mode, "model.remat": False,
        "model.stack_compute": "vmap"}  # (set by configs/tiny.py)
    with open(tmp_path / mode / "results.json") as f:
      assert json.load(f)["computed_as"] == results["computed_as"]
    report = (tmp_path / mode / "results.md").read_text()
    assert report.endswith(f"\n\nComputed on cpu (1 device, cpu, jax {jax.__version__}; "
                           f"host {cpu}, {cpus} CPU{'s' if cpus != 1 else ''}): "
                           f"train.accumulate scan, train.seed_compute {mode}, model.remat "
                           f"False, model.stack_compute vmap.\n"), report[-300:]
  assert auto.seed_compute("auto") == "scan"  # this CPU
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert auto.seed_compute("auto") == "vmap"


# ----------------------------------------------------------------------------- resume


def test_a_run_resumed_on_another_cpu_says_which_epochs_were_computed_where(tmp_path,
                                                                              monkeypatch):
  """Each epoch record carries how it was computed; resumed in the same setting the run is one
  stretch (as an uninterrupted run), resumed on another CPU the report lists both."""
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  workdir = str(tmp_path / "run")
  for epochs in (1, 2):  # the second invocation resumes after epoch 1, here
    config = _short_config()
    config.train.num_epochs = epochs
    results = train_lib.train_and_evaluate(config, workdir)
  here = results["computed_as"]
  assert results["computed_as_by_epochs"] == [{"epochs": [1, 2], "computed_as": here}]
  assert "Computed in parts" not in (tmp_path / "run" / "results.md").read_text()
  monkeypatch.setattr(host, "cpu_model", lambda: "Another CPU")
  config = _short_config()
  config.train.num_epochs = 3
  results = train_lib.train_and_evaluate(config, workdir)
  there = {**here, "host_cpu": "Another CPU"}
  assert results["computed_as"] == there
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["computed_as_by_epochs"] == [
        {"epochs": [1, 2], "computed_as": here}, {"epochs": [3, 3], "computed_as": there}]
  report = (tmp_path / "run" / "results.md").read_text()
  assert ("\n\nComputed in parts (the run was resumed in another setting):\n- epochs 1-2: "
          f"computed on cpu (1 device, cpu, jax {jax.__version__}; host {here['host_cpu']},"
          in report)
  assert "\n- epochs 3-3: computed on cpu (1 device, cpu, jax " in report
  assert "; host Another CPU, " in report and "\n- the report: computed on cpu" in report


def _short_config():
  config = fake_model.fake_config()
  config.train.seeds = (1111,)
  config.train.num_epochs = 1
  return config


def test_resume_refuses_a_changed_config_and_takes_a_resumable_change(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(_short_config(), workdir)
  changed = _short_config()
  changed.train.learning_rate = 3e-4
  with pytest.raises(train_lib.TrainingError) as info:
    train_lib.train_and_evaluate(changed, workdir)
  assert str(info.value) == (
      f"{workdir} holds a run with train.learning_rate=0.0001, this command has 0.0003; use a "
      f"new --workdir, or the run's own config (its config.json) to resume")
  stored = json.load(open(os.path.join(workdir, "config.json")))
  assert stored["train"]["learning_rate"] == 1e-4  # the refused command wrote nothing
  more = _short_config()
  more.train.num_epochs = 2  # resumable: the run goes on from its checkpoint
  results = train_lib.train_and_evaluate(more, workdir)
  assert results["epochs_run"] == 2
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in records] == [1, 2]


# ----------------------------------------------------------------------------- devices


DEVICES_CHILD = r"""
import json, sys
import jax
jax.config.update("jax_num_cpu_devices", 2)
sys.path.insert(0, "tests")
import fake_model
fake_model.install()
from dhmd_jax import parallel, train as train_lib
sizes = []
real_make_mesh = parallel.make_mesh
parallel.make_mesh = lambda n: sizes.append(real_make_mesh(n).size) or real_make_mesh(n)
out = {}
for n in (1, 2):
  config = fake_model.fake_config()
  config.train.seeds = (1111,)
  config.train.num_epochs = 1
  config.train.num_devices = n
  results = train_lib.train_and_evaluate(config, sys.argv[1] + f"/d{n}")
  out[n] = {"test": results["test"], "mesh": sizes[-1]}
print("RESULT" + json.dumps(out))
"""


@pytest.mark.slow
def test_num_devices_reaches_the_trainer(tmp_path):
  proc = subprocess.run([sys.executable, "-c", DEVICES_CHILD, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=600,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT"):])
  assert (out["1"]["mesh"], out["2"]["mesh"]) == (1, 2)
  for name, values in out["1"]["test"].items():  # data parallel: the sums reassociated only
    np.testing.assert_allclose(out["2"]["test"][name], values, rtol=1e-4, atol=1e-5,
                               err_msg=name)


def test_more_devices_than_the_machine_has_is_one_line(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  config = _short_config()
  config.train.num_devices = len(jax.devices()) + 1
  with pytest.raises(train_lib.TrainingError, match=r"^config.train.num_devices = \d+, but "):
    train_lib.train_and_evaluate(config, str(tmp_path / "run"))


# ----------------------------------------------------------------------------- binary, unaligned


def _train_one_epoch(tmp_path, *, fake=False, **synthetic):
  from configs import tiny  # pylint: disable=g-import-not-at-top
  config = fake_model.fake_config() if fake else tiny.get_config()
  config.dataset.synthetic.update(synthetic)
  if synthetic.get("like") in ("urfunny", "mustard"):
    config.dataset.task = "binary"
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  results = train_lib.train_and_evaluate(config, workdir)
  evaluated = evaluate_lib.evaluate(config, workdir, split="test")
  for name, values in results["test"].items():
    np.testing.assert_allclose(evaluated["per_seed"][name], values, rtol=1e-6, err_msg=name)
  rows = list(csv.DictReader(open(evaluate_lib.predict(config, workdir, split="test"))))
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  return config, results, rows, dataset


@pytest.mark.slow
def test_binary_data_trained_evaluated_and_predicted(tmp_path):
  """The real tiny model on MUStARD-shaped data (MultiBench layout, two classes)."""
  config, results, rows, _ = _train_one_epoch(tmp_path, like="mustard", layout="multibench")
  assert set(results["test"]) >= {"Accuracy", "F1_score", "F1_pos"}
  labels = np.array([int(float(r["label"])) for r in rows])
  assert set(labels) == {0, 1}
  for seed, accuracy, f1 in zip(config.train.seeds, results["test"]["Accuracy"],
                                results["test"]["F1_score"]):
    classes = np.array([int(r[f"prediction_seed_{seed}"]) for r in rows])  # class ids
    assert set(classes) <= {0, 1}
    expected = metrics_lib.compute_metrics("mustard", classes, labels)
    assert expected["Accuracy"] == pytest.approx(accuracy, abs=1e-4)
    assert np.mean(classes == labels) == pytest.approx(accuracy, abs=1e-4)
    assert expected["F1_score"] == pytest.approx(f1, abs=1e-4)


def test_unaligned_data_trained_evaluated_and_predicted(tmp_path, monkeypatch):
  """MOSI-shaped unaligned data (three lengths, padded frames) through the data layer, the
  trainer, evaluate and predict. The fake model stands in for DHMD (whose unaligned forward,
  losses and gradients test_dmd_reference.py and test_stacked.py pin): the real one on 500-frame
  sequences costs minutes of a 2-core CI run."""
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  config, results, rows, dataset = _train_one_epoch(
      tmp_path, fake=True, like="mosi", aligned=False, num_train=32, num_valid=16, num_test=16)
  split = dataset.splits["test"]
  lengths = {m: split.features[m].shape[1] for m in ("text", "vision", "audio")}
  assert lengths == {"text": 50, "vision": 500, "audio": 375}
  assert not split.masks["vision"].all()  # padded frames
  labels = np.array([float(r["label"]) for r in rows])
  for seed, mae in zip(config.train.seeds, results["test"]["MAE"]):
    preds = np.array([float(r[f"prediction_seed_{seed}"]) for r in rows])
    assert np.all(np.isfinite(preds))
    np.testing.assert_allclose(np.mean(np.abs(preds - labels)), mae, rtol=0,
                               atol=5.1e-5)  # reported to 4 d.p.
