"""End-to-end training on the tiny synthetic config: report, logs, checkpoints, non-finite losses,
evaluate/predict, compile-once, and the accumulation semantics (kills, Ctrl-C and corrupted
checkpoints: test_faults.py)."""

import csv
import json
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree
import numpy as np
import pytest

import fake_model
from configs import tiny
from dhmd_jax import auto
from dhmd_jax import checkpoint
from dhmd_jax import data as data_lib
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import steps
from dhmd_jax import train as train_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def learning_config():
  """The tiny model on 480 synthetic samples, trained long enough to learn the planted signal."""
  config = tiny.get_config()
  config.dataset.synthetic.num_train = 480
  config.dataset.synthetic.num_valid = 96
  config.dataset.synthetic.num_test = 96
  config.train.learning_rate = 1e-3
  config.train.update_epochs = 1
  config.train.steps_per_chunk = 30  # two chunks per epoch
  config.log.tensorboard = True
  return config


@pytest.fixture(scope="module")
def trained(tmp_path_factory):  # the real model: its loss terms, GD edges and learning
  """One training run shared by several tests; it also records how often the step compiled."""
  workdir = str(tmp_path_factory.mktemp("run"))
  config = learning_config()
  chunks = []
  real_make_train_step, real_make_run_chunk = steps.make_train_step, steps.make_run_chunk

  def counted_train_step(*args, **kwargs):
    return chex.assert_max_traces(real_make_train_step(*args, **kwargs), n=1)

  def recorded_run_chunk(*args, **kwargs):
    chunks.append(real_make_run_chunk(*args, **kwargs))
    return chunks[-1]

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(steps, "make_train_step", counted_train_step)
    patch.setattr(steps, "make_run_chunk", recorded_run_chunk)
    results = train_lib.train_and_evaluate(config, workdir)
  return config, workdir, results, chunks


@pytest.mark.slow
def test_report_and_logs(trained):
  config, workdir, results, _ = trained
  seeds = list(config.train.seeds)
  assert results["seeds"] == seeds
  for name in ("Has0_acc_2", "Has0_F1_score", "Non0_acc_2", "Non0_F1_score", "Mult_acc_7",
               "Mult_acc_5", "MAE", "Corr"):
    assert len(results["test"][name]) == len(seeds)
    assert set(results["test_summary"][name]) == {"mean", "std"}
  with open(os.path.join(workdir, "results.json")) as f:
    assert json.load(f)["seeds"] == seeds
  markdown = open(os.path.join(workdir, "results.md")).read()
  assert "mean ± std" in markdown and "Has0_acc_2" in markdown and "Non0_acc_2" in markdown
  assert json.load(open(os.path.join(workdir, "config.json")))["train"]["learning_rate"] == 1e-3
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["epoch"] for r in records] == [1, 2]
  for key in ("task", "rec", "cyc", "mar", "ort", "dtl_homo", "dtl_hetero", "ctr_homo",
              "ctr_hetero", "total", "l2_grads", "l2_updates", "l2_params", "clipped_fraction",
              "triplets/mar", "triplets_active/ctr_homo"):
    assert len(records[0]["train"][key]) == len(seeds), key
  # Mean GD edge weight of every directed edge of both units, each seed's six summing to 1.
  for space in ("homo", "hetero"):
    weights = np.array([records[0]["edges"][f"{space}/{e}"] for e in
                        ("V->L", "A->L", "L->V", "A->V", "L->A", "V->A")])
    np.testing.assert_allclose(weights.sum(0), 1.0, rtol=1e-5)
  assert set(records[0]["valid"]) >= {"MAE", "Non0_acc_2"} and records[0]["test"]
  assert len(records[0]["lr"]) == len(seeds)
  tb_files = os.listdir(os.path.join(workdir, "tensorboard", f"seed_{seeds[0]}"))
  assert any(f.startswith("events.out.tfevents") for f in tb_files)
  rows = list(csv.reader(open(os.path.join(workdir, "predictions_test.csv"))))
  assert rows[0] == ["id", "label"] + [f"prediction_seed_{s}" for s in seeds]
  assert len(rows) - 1 == config.dataset.synthetic.num_test


@pytest.mark.slow
def test_timing_says_where_the_run_spent_its_time(trained):
  _, workdir, results, _ = trained
  timing = results["timing_s"]
  assert set(timing) == {"setup", "train", "evaluate", "checkpoint", "report"}
  assert all(timing[k] > 0 for k in timing), timing
  # The phases cover the run but for log and TensorBoard writes.
  assert 0.8 * results["wall_time_s"] <= sum(timing.values()) <= results["wall_time_s"]
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  for record in records:
    assert record["timing_s"]["train"] + record["timing_s"]["evaluate"] == pytest.approx(
        record["time_s"], abs=1e-6)
  assert sum(r["timing_s"]["train"] for r in records) == pytest.approx(timing["train"])
  assert sum(r["timing_s"]["evaluate"] for r in records) == pytest.approx(timing["evaluate"])
  assert "(set-up " in open(os.path.join(workdir, "results.md")).read()


@pytest.mark.slow
def test_evaluate_and_predict_match_training_report(trained):
  config, workdir, results, _ = trained
  evaluated = evaluate_lib.evaluate(config, workdir, split="test", which="best")
  for name, values in results["test"].items():
    np.testing.assert_allclose(evaluated["per_seed"][name], values, rtol=1e-6, equal_nan=True)
  path = evaluate_lib.predict(config, workdir, split="valid",
                              output=os.path.join(workdir, "p.csv"))
  rows = list(csv.DictReader(open(path)))
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  assert [r["id"] for r in rows] == list(dataset.splits["valid"].ids)
  # The predictions themselves: the MAE recomputed from the CSV is the report's, seed by seed.
  rows = list(csv.DictReader(open(evaluate_lib.predict(config, workdir, split="test"))))
  np.testing.assert_allclose([float(r["label"]) for r in rows], dataset.splits["test"].labels,
                             rtol=1e-6)
  for seed, mae in zip(config.train.seeds, results["test"]["MAE"]):
    errors = [abs(float(r[f"prediction_seed_{seed}"]) - float(r["label"])) for r in rows]
    np.testing.assert_allclose(np.mean(errors), mae, rtol=0, atol=5.1e-5)  # reported to 4 d.p.
  # --checkpoint=latest: the last epoch's parameters, whose test metrics the last epoch logged.
  latest = evaluate_lib.evaluate(config, workdir, split="test", which="latest")
  last_epoch = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))][-1]
  for name in ("MAE", "Corr", "Non0_acc_2"):
    np.testing.assert_allclose(latest["per_seed"][name], last_epoch["test"][name], rtol=1e-5)


@pytest.mark.slow
def test_step_compiles_once(trained):
  """Two epochs of two 30-step chunks: the step was traced once and the chunk compiled once
  (a chunk's output state feeds the next chunk without a change of layout)."""
  _, _, results, chunks = trained
  assert results["epochs_run"] == 2
  assert len(chunks) == 1
  assert chunks[0]._cache_size() == 1  # pylint: disable=protected-access


@pytest.mark.slow
def test_model_learns_the_planted_signal(trained):
  """Test MAE far below that of predicting the training mean, and a strong correlation."""
  config, workdir, results, _ = trained
  dataset = data_lib.load_dataset(config.dataset, workdir=workdir)
  labels = dataset.splits["test"].labels
  mean_mae = float(np.abs(labels - dataset.splits["train"].labels.mean()).mean())
  for mae, corr in zip(results["test"]["MAE"], results["test"]["Corr"]):
    assert mae < 0.6 * mean_mae, (mae, mean_mae)
    assert corr > 0.7


@pytest.mark.slow
def test_accumulation_clips_running_sum_after_every_micro_batch(tmp_path):
  """G <- clip(G + g_k) for k = 1..U, then one Adam step; 'vmap' and 'scan' agree."""
  config = tiny.get_config()
  config.train.grad_clip_value = 0.01
  config.train.update_epochs = 3
  dataset = data_lib.load_dataset(config.dataset, workdir=str(tmp_path))
  model = train_lib.build(config, dataset)
  arrays = data_lib.split_arrays(dataset.splits["train"], "regression")
  batch = jax.tree.map(lambda a: jnp.asarray(a[:24]).reshape((3, 8) + a.shape[1:]), arrays)
  state = jax.jit(lambda k: steps.init_state(config, model, jax.tree.map(lambda a: a[0], batch),
                                             k))(jax.random.key(0))
  key = jax.random.key(1)

  from dhmd_jax import objective  # pylint: disable=g-import-not-at-top
  def loss(params, micro, k):
    out = model.apply({"params": params}, micro, deterministic=False, rngs={"dropout": k})
    return objective.compute_objective(config, out, micro["label"])[0]

  keys = jax.random.split(key, 3)
  flat_params, unravel = ravel_pytree(state.params)
  total = jnp.zeros_like(flat_params)
  grad = jax.jit(jax.grad(loss))
  for u in range(3):
    g = grad(state.params, jax.tree.map(lambda a: a[u], batch), keys[u])
    total = jnp.clip(total + ravel_pytree(g)[0], -0.01, 0.01)
  updates, _ = steps.make_optimizer(config).update(total, state.opt_state, flat_params)
  expected = jax.tree.map(jnp.add, state.params, unravel(updates))

  raw = sum(ravel_pytree(grad(state.params, jax.tree.map(lambda a: a[u], batch), keys[u]))[0]
            for u in range(3))
  partial, ever = jnp.zeros_like(flat_params), jnp.zeros(flat_params.shape, bool)
  for u in range(3):
    partial = partial + ravel_pytree(grad(state.params, jax.tree.map(lambda a: a[u], batch),
                                          keys[u]))[0]
    ever = ever | (jnp.abs(partial) > 0.01)
    partial = jnp.clip(partial, -0.01, 0.01)
  for mode in ("vmap", "scan"):
    config.train.accumulate = mode
    new_state, metrics = jax.jit(steps.make_train_step(config, model))(state, batch, key)
    # atol 1e-5: an Adam step of a near-zero accumulated gradient is +-lr times a ratio that
    # rounding (vmapped vs looped micro-batches) moves by ~1e-6; a missed clip moves far more.
    chex.assert_trees_all_close(new_state.params, expected, atol=1e-5, rtol=1e-5)
    # The step's statistics: norms of the raw gradient sum, the update and the new parameters,
    # and the fraction of parameters whose running sum hit the bound.
    np.testing.assert_allclose(metrics["l2_grads"], jnp.linalg.norm(raw), rtol=1e-4)
    np.testing.assert_allclose(metrics["l2_updates"], jnp.linalg.norm(updates), rtol=1e-4)
    np.testing.assert_allclose(metrics["l2_params"],
                               jnp.linalg.norm(ravel_pytree(expected)[0]), rtol=1e-5)
    np.testing.assert_allclose(metrics["clipped_fraction"], jnp.mean(ever), atol=2e-3)
    assert 0.0 < float(metrics["clipped_fraction"]) < 1.0
    for name in ("mar", "ctr_homo", "ctr_hetero"):
      assert float(metrics[f"triplets/{name}"]) > 0
      assert 0 <= float(metrics[f"triplets_active/{name}"]) <= float(metrics[f"triplets/{name}"])
  # Clipping once at the end would give another update: the bound really acts per micro-batch.
  once = jnp.clip(sum(ravel_pytree(grad(state.params, jax.tree.map(lambda a: a[u], batch),
                                        keys[u]))[0] for u in range(3)), -0.01, 0.01)
  assert float(jnp.max(jnp.abs(once - total))) > 1e-4


def test_non_finite_loss_stops_with_one_line_and_keeps_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)  # any model overflows here
  config = fake_model.fake_config()
  config.train.seeds = (1111,)
  config.train.num_epochs = 1
  workdir = str(tmp_path)
  train_lib.train_and_evaluate(config, workdir)

  real_load = data_lib.load_dataset

  def poisoned(*args, **kwargs):
    dataset = real_load(*args, **kwargs)
    audio = np.array(dataset.splits["train"].features["audio"])
    audio[:] = 3e38  # overflows to inf inside the model
    dataset.splits["train"].features["audio"] = audio
    return dataset

  monkeypatch.setattr(data_lib, "load_dataset", poisoned)
  config.train.num_epochs = 2
  with pytest.raises(train_lib.TrainingError, match=r"non-finite loss at epoch 2, step 1 "
                     r"\(seed 1111\): term '\w+'") as info:
    train_lib.train_and_evaluate(config, workdir)
  assert "\n" not in str(info.value)
  ckpt = checkpoint.Checkpointer(workdir, read_only=True)
  assert ckpt.epochs() == [1]
  ckpt.close()


def test_missing_real_data_never_falls_back_to_synthetic(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "dhmd_jax.main",
                         f"--config={REPO}/configs/mosei.py", f"--workdir={tmp_path}/w"],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  message = proc.stderr.strip().splitlines()[-1]
  assert "aligned_50.pkl" in message and "MMSA" in message
  assert not (tmp_path / "w" / "data").exists()


def test_chunks_divide_the_epoch_so_no_padding_step_is_computed():
  """Each chunk is the longest of at most `steps_per_chunk` steps that divides the epoch."""
  assert train_lib._chunking(7, 4) == (7, 1)  # pylint: disable=protected-access
  assert train_lib._chunking(102, 4) == (34, 3)  # pylint: disable=protected-access
  for steps_per_epoch in range(1, 41):
    for max_chunk in range(0, 9):
      num, chunk = train_lib._chunking(steps_per_epoch, max_chunk)  # pylint: disable=protected-access
      assert num * chunk == steps_per_epoch, (steps_per_epoch, max_chunk)
      if 0 < max_chunk < steps_per_epoch:
        assert chunk <= max_chunk
        assert not any(steps_per_epoch % k == 0 for k in range(chunk + 1, max_chunk + 1))
      else:
        assert num == 1


def test_selected_predictions_follow_the_selection_of_each_seed():
  """The report's predictions of the selected models are kept from the epoch that selected each
  seed's parameters, and are not used until every seed has been selected once."""
  best = train_lib._BestPredictions.empty(3)  # pylint: disable=protected-access
  epoch = lambda e: {"valid": np.full((3, 5, 1), e, np.float32),
                     "test": np.full((3, 4, 1), 10 * e, np.float32)}
  best.update(np.array([True, True, False]), epoch(1))
  assert best.get("valid") is None  # seed 3 has no selected parameters yet
  best.update(np.array([False, True, True]), epoch(2))
  best.update(np.array([False, False, False]), epoch(3))
  np.testing.assert_array_equal(best.get("valid")[:, 0, 0], [1, 2, 2])
  np.testing.assert_array_equal(best.get("test")[:, 0, 0], [10, 20, 20])
  assert best.get("valid").shape == (3, 5, 1) and best.get("test").shape == (3, 4, 1)


def test_resume_reads_the_checkpoint_without_initialising(tmp_path, monkeypatch):
  """A resumed run restores into abstract targets: it never compiles or runs the
  initialisation it would throw away (a cold compilation cache pays for it otherwise)."""
  monkeypatch.setattr(train_lib, "build", fake_model.fake_build)
  config = fake_model.fake_config()
  config.train.seeds = (1111, 1112)
  config.train.num_epochs = 1
  workdir = str(tmp_path / "run")
  train_lib.train_and_evaluate(config, workdir)

  def no_init(*args, **kwargs):
    raise AssertionError("a resumed run initialised its states")

  monkeypatch.setattr(train_lib, "_fresh_progress", no_init)
  config.train.num_epochs = 2
  results = train_lib.train_and_evaluate(config, workdir)
  assert results["epochs_run"] == 2


def test_accumulate_auto_is_scan_on_a_cpu_and_vmap_on_an_accelerator(monkeypatch):
  assert auto.accumulate("vmap") == "vmap"
  assert auto.accumulate("scan") == "scan"
  assert jax.default_backend() == "cpu"
  assert auto.accumulate("auto") == "scan"
  for backend in ("gpu", "tpu"):
    monkeypatch.setattr(jax, "default_backend", lambda b=backend: b)
    assert auto.accumulate("auto") == "vmap"
