"""The BERT text path (`model.text_encoder="bert"`): equality with Hugging Face's `BertModel`,
the checkpoint loader and each of its one-line errors, the init hook, gradients into every BERT
parameter in a train step, and a tiny DHMD that learns the planted signal through BERT alone.

`tests/fixtures/bert_tiny/` is a random `transformers.BertModel` (2 layers, hidden 32, 4 heads,
vocabulary 128) saved with `save_pretrained`, with its inputs and outputs in `outputs.npz`,
written by `tools/make_bert_fixture.py` (torch and transformers are not needed here).
"""

import json
import os
import pathlib
import pickle
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

from configs import default
from configs import mosei
from configs import mosi
from configs import tiny
from dhmd_jax import data as data_lib
from dhmd_jax import steps
from dhmd_jax import synthetic
from dhmd_jax import train as train_lib
from dhmd_jax.data import DataError
from dhmd_jax.models import bert_weights
from dhmd_jax.models import build_model
from dhmd_jax.models.bert import BertEncoder

REPO = pathlib.Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "bert_tiny"
OUTPUTS = np.load(FIXTURE / "outputs.npz")
BERT_BASE_PARAMS = 109_482_240  # BertModel(bert-base-uncased) with its pooler, as the DMD code


def bert_config(path=FIXTURE, init="checkpoint"):
  config = default.get_config().model.bert
  config.path = str(path)
  config.init = init
  return config


def fixture_settings(pooler=True):
  return bert_weights.settings_from_config(bert_config(), pooler=pooler)


def run_bert(settings, params, rows, *, deterministic=True, rngs=None):
  return BertEncoder(settings).apply({"params": params}, rows, deterministic=deterministic,
                                     rngs=rngs)


def one_line_error(match, fn, *args, **kwargs):
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  for part in ([match] if isinstance(match, str) else match):
    assert part in message, (part, message)
  return message


def copy_fixture(tmp_path):
  folder = tmp_path / "bert"
  shutil.copytree(FIXTURE, folder)
  os.remove(folder / "outputs.npz")
  return folder


# ----------------------------------------------------------------------------- equality


@pytest.mark.parametrize("batch", ["a", "b"])
def test_last_hidden_state_matches_hugging_face(batch):
  """Batch a: padding (lengths 16, 11, 5, 2 of 16) and a sentence pair (segment ids 1);
  batch b: every one of the 64 positions. Eval mode, float32."""
  settings = fixture_settings()
  params = bert_weights.load_params(settings)
  rows = OUTPUTS[f"text_bert_{batch}"]
  assert rows.dtype == np.float32  # as MMSA stores text_bert
  hidden, pooled = jax.jit(lambda p, r: run_bert(settings, p, r))(params, rows)
  np.testing.assert_allclose(hidden, OUTPUTS[f"last_hidden_state_{batch}"], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, OUTPUTS[f"pooler_output_{batch}"], rtol=1e-5, atol=1e-5)


def test_fixture_tells_mask_and_segments_apart():
  """The comparison above could not pass with the padding mask or the segment ids ignored."""
  settings = fixture_settings()
  params = bert_weights.load_params(settings)
  rows = OUTPUTS["text_bert_a"]
  assert (rows[:, 1] == 0).any() and (rows[:, 2] == 1).any()
  expected = OUTPUTS["last_hidden_state_a"]
  real = rows[:, 1] == 1
  no_mask, no_segments = rows.copy(), rows.copy()
  no_mask[:, 1] = 1.0
  no_segments[:, 2] = 0.0
  for changed in (no_mask, no_segments):
    hidden, _ = run_bert(settings, params, changed)
    assert np.abs(np.asarray(hidden) - expected)[real].max() > 0.05


def test_parameter_count_matches_hugging_face():
  with_pooler = jax.tree.leaves(bert_weights.load_params(fixture_settings(pooler=True)))
  without = jax.tree.leaves(bert_weights.load_params(fixture_settings(pooler=False)))
  assert sum(x.size for x in with_pooler) == int(OUTPUTS["num_parameters"]) == 20_906
  assert sum(x.size for x in with_pooler) - sum(x.size for x in without) == 32 * 32 + 32


def test_bert_base_and_dmd_parameter_counts():
  """bert-base-uncased's architecture (random init, nothing read): BertModel with its pooler has
  109,482,240 parameters, and DMD with BERT has exactly that many more than DMD on features
  (MOSEI aligned, the reference's layers: test_param_count.py pins 1,797,292)."""

  def count(text_encoder):
    config = mosei.get_config("aligned")
    config.model.use_dm = False
    config.model.unused_reference_layers = True  # proj_cosine and BERT's pooler, as built there
    config.model.text_encoder = text_encoder
    config.model.bert.init = "random"
    model = build_model(config, num_outputs=1)
    batch = {m: jax.ShapeDtypeStruct((2, 50, d), jnp.float32)
             for m, d in (("text", 768), ("vision", 35), ("audio", 74))}
    batch["text_bert"] = jax.ShapeDtypeStruct((2, 3, 50), jnp.int32)
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
    params = jax.eval_shape(lambda b: model.init(keys, b, deterministic=False), batch)["params"]
    return params, sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))

  features_params, features = count("features")
  bert_params, with_bert = count("bert")
  assert features == 1_797_292
  assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(bert_params["bert"])) == \
      BERT_BASE_PARAMS
  assert with_bert == features + BERT_BASE_PARAMS == 111_279_532
  assert set(bert_params) - set(features_params) == {"bert"}


def test_bert_variants_of_the_dataset_configs():
  """`configs/mosei.py:bert` (and unaligned, MOSI): the DMD code's use_bert/use_finetune on top
  of the dataset's reference values; the features configs are unchanged."""
  for get, dropout in ((mosei.get_config, 0.3), (mosi.get_config, 0.5)):
    for variant, layout in (("bert", "aligned"), ("unaligned,bert", "unaligned")):
      config, plain = get(variant), get(layout)
      assert config.model.text_encoder == "bert" and plain.model.text_encoder == "features"
      assert config.model.bert.path == "data/bert-base-uncased"
      assert config.model.bert.init == "checkpoint"
      assert config.dataset.path == plain.dataset.path
      assert config.model.text_dropout == dropout  # on BERT's output, as the DMD config
      assert config.train.learning_rate == 1e-4 and config.train.update_epochs == 10
      assert config.train.accumulate == "scan"
      changed = {k for k, v in _flat(config).items() if _flat(plain)[k] != v}
      assert changed == {"model.text_encoder", "model.bert.path", "train.accumulate"}
  with pytest.raises(ValueError, match="aligned"):
    mosei.get_config("bert,bert")


def _flat(config, prefix=""):
  out = {}
  for key, value in config.items():
    if hasattr(value, "items"):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


# ----------------------------------------------------------------------------- loader


def test_published_key_names_load_the_same(tmp_path):
  """bert-base-uncased's file: `bert.` prefix, LayerNorm gamma/beta, pre-training heads and the
  position_ids buffer; all map onto the same parameters."""
  folder = copy_fixture(tmp_path)
  tensors = safetensors.numpy.load_file(str(folder / "model.safetensors"))
  renamed = {}
  for key, value in tensors.items():
    key = "bert." + key.replace("LayerNorm.weight", "LayerNorm.gamma").replace(
        "LayerNorm.bias", "LayerNorm.beta")
    renamed[key] = value
  renamed["cls.predictions.bias"] = np.zeros(128, np.float32)
  renamed["cls.predictions.transform.dense.weight"] = np.zeros((32, 32), np.float32)
  renamed["cls.seq_relationship.weight"] = np.zeros((2, 32), np.float32)
  renamed["bert.embeddings.position_ids"] = np.arange(64, dtype=np.int64)[None]
  safetensors.numpy.save_file(renamed, str(folder / "model.safetensors"))
  settings = bert_weights.settings_from_config(bert_config(folder), pooler=True)
  loaded = bert_weights.load_params(settings)
  expected = bert_weights.load_params(fixture_settings())
  jax.tree.map(np.testing.assert_array_equal, loaded, expected)
  assert loaded["encoder"]["layer_1"]["attention"]["self"]["query"]["kernel"].shape == (32, 32)
  np.testing.assert_array_equal(  # PyTorch (out, in) -> Flax (in, out)
      loaded["encoder"]["layer_0"]["intermediate"]["dense"]["kernel"],
      tensors["encoder.layer.0.intermediate.dense.weight"].T)


def test_random_init_needs_no_files():
  config = bert_config(path="/nonexistent", init="random")
  settings = bert_weights.settings_from_config(config, pooler=False)
  assert (settings.num_layers, settings.hidden_size, settings.vocab_size) == (12, 768, 30522)
  assert settings.checkpoint == ""


# ----------------------------------------------------------------------------- bad inputs


def test_empty_path():
  one_line_error(["config.model.bert.path is empty", "huggingface.co", "bert-base-uncased"],
                 bert_weights.settings_from_config, bert_config(path=""), pooler=False)


def test_missing_folder(tmp_path):
  one_line_error([f"{tmp_path / 'nope'}", "does not exist", "huggingface.co",
                  "--config.model.bert.path", "nothing is downloaded"],
                 bert_weights.settings_from_config, bert_config(tmp_path / "nope"), pooler=False)


def test_missing_config_json(tmp_path):
  folder = copy_fixture(tmp_path)
  os.remove(folder / "config.json")
  one_line_error(["has no config.json", "model.safetensors", "huggingface.co"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def test_missing_weights_file(tmp_path):
  folder = copy_fixture(tmp_path)
  os.remove(folder / "model.safetensors")
  one_line_error(["has no model.safetensors", "config.json", "huggingface.co"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def test_pytorch_bin_only_says_how_to_convert(tmp_path):
  folder = copy_fixture(tmp_path)
  os.remove(folder / "model.safetensors")
  (folder / "pytorch_model.bin").write_bytes(b"not read")
  message = one_line_error(["pytorch_model.bin", "convert", "torch.load(", "save_file(",
                            str(folder / "model.safetensors")],
                           bert_weights.settings_from_config, bert_config(folder), pooler=False)
  snippet = message[message.index('python -c "') + len('python -c "'):]
  snippet = snippet[:snippet.index('"')]
  compile(snippet, "<conversion snippet>", "exec")  # valid Python as printed


def test_shapes_that_do_not_match_config_json(tmp_path):
  folder = copy_fixture(tmp_path)
  hf = json.loads((folder / "config.json").read_text())
  hf["intermediate_size"] = 40  # the file has 37
  (folder / "config.json").write_text(json.dumps(hf))
  one_line_error(["'encoder.layer.0.intermediate.dense.weight' has shape (37, 32)",
                  "implies (40, 32)", "intermediate_size 40", "different models"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def test_missing_tensor(tmp_path):
  folder = copy_fixture(tmp_path)
  hf = json.loads((folder / "config.json").read_text())
  hf["num_hidden_layers"] = 3  # the file has 2
  (folder / "config.json").write_text(json.dumps(hf))
  one_line_error(["no tensor 'encoder.layer.2.attention.self.query.weight'", "3 layers"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def test_not_a_bert_config(tmp_path):
  folder = copy_fixture(tmp_path)
  hf = json.loads((folder / "config.json").read_text())
  hf["model_type"] = "roberta"
  (folder / "config.json").write_text(json.dumps(hf))
  one_line_error(["model_type is 'roberta'", "only BERT"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def test_truncated_weights_file(tmp_path):
  folder = copy_fixture(tmp_path)
  data = (folder / "model.safetensors").read_bytes()
  (folder / "model.safetensors").write_bytes(data[:len(data) // 2])
  one_line_error(["not a readable safetensors file", "download it again"],
                 bert_weights.settings_from_config, bert_config(folder), pooler=False)


def bert_tiny_config():
  """configs/tiny.py with the fixture BERT and synthetic ids of its vocabulary."""
  config = tiny.get_config()
  config.model.text_encoder = "bert"
  config.model.bert.path = str(FIXTURE)
  config.dataset.synthetic.text_vocab_size = 128
  return config


def test_pickle_without_text_bert(tmp_path):
  """A features-only pickle (MulT/MultiBench layout) with text_encoder=bert: one line from the
  dataset check (which training runs when it builds the model) and from the model itself."""
  path = synthetic.write_synthetic(str(tmp_path / "mult.pkl"), like="mosei", aligned=True,
                                   layout="multibench", num_train=16, num_valid=4, num_test=4,
                                   dims={"text": 6, "vision": 4, "audio": 3})
  config = bert_tiny_config()
  config.dataset.name, config.dataset.format, config.dataset.path = "mosei", "multibench", path
  config.train.batch_size, config.train.update_epochs = 4, 1
  dataset = data_lib.load_dataset(config.dataset)
  model = build_model(config, num_outputs=1)
  one_line_error([path, "split 'train' has no 'text_bert'", "MMSA pickle",
                  "--config.model.text_encoder=features"],
                 bert_weights.check_dataset, model.settings, dataset)
  # Training checks the dataset when it builds the model (train.build), before compiling.
  one_line_error([path, "split 'train' has no 'text_bert'", "MMSA pickle",
                  "--config.model.text_encoder=features"],
                 train_lib.train_and_evaluate, config, str(tmp_path / "run"))
  # The model's own check, for code that builds it without the trainer.
  batch = data_lib.split_arrays(dataset.splits["train"], "regression")
  one_line_error(["needs 'text_bert' token ids", "MMSA pickle",
                  "--config.model.text_encoder=features"],
                 model.init, jax.random.key(0), jax.tree.map(lambda a: a[:2], batch),
                 deterministic=True)


def test_token_ids_outside_the_vocabulary(tmp_path):
  """Ids of bert-base-uncased's tokenizer (up to 30521) for the 128-token fixture BERT."""
  config = bert_tiny_config()
  config.dataset.synthetic.text_vocab_size = 30522
  dataset = data_lib.load_dataset(config.dataset, workdir=str(tmp_path))
  model = build_model(config, num_outputs=1)
  one_line_error(["'text_bert' token id", "has 128 tokens", "another tokenizer"],
                 bert_weights.check_dataset, model.settings, dataset)
  # In the model such ids give NaN, never a silently clipped embedding row.
  rows = np.array(OUTPUTS["text_bert_a"])
  rows[0, 0, 3] = 200
  hidden, _ = run_bert(fixture_settings(), bert_weights.load_params(fixture_settings()), rows)
  assert np.isnan(np.asarray(hidden)[0]).all() and np.isfinite(np.asarray(hidden)[1:]).all()


def test_more_tokens_than_positions():
  rows = np.zeros((1, 3, 65), np.float32)
  one_line_error(["65 tokens per sample", "64 positions", "truncate"],
                 run_bert, fixture_settings(), bert_weights.load_params(fixture_settings()), rows)


def test_command_line_prints_one_line_and_exits_1(tmp_path):
  missing = tmp_path / "bert-base-uncased"
  result = subprocess.run(
      [sys.executable, "-m", "dhmd_jax.main", "--config=configs/tiny.py",
       "--config.model.text_encoder=bert", f"--config.model.bert.path={missing}",
       f"--workdir={tmp_path / 'run'}"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1, result.stderr[-2000:]
  errors = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert len(errors) == 1 and f"{missing} (config.model.bert.path) does not exist" in errors[0]
  assert "Traceback" not in result.stderr


# ----------------------------------------------------------------------------- data


def test_text_bert_is_cached_and_in_the_batch_layout(tmp_path):
  """The MMSA `text_bert` rows survive the .npy cache (first load and memory-mapped reload) as
  int32 and enter the batch layout; with text_encoder="bert" the unused `text` stays out."""
  path = synthetic.write_synthetic(str(tmp_path / "a.pkl"), like="mosi", aligned=False,
                                   num_train=6, num_valid=3, num_test=3,
                                   dims={"text": 5, "vision": 4, "audio": 3},
                                   seq_lens={"text": 9, "vision": 11, "audio": 7})
  raw = read_pickle(path)
  config = default.get_config().dataset
  config.name, config.path = "mosi", path
  for _ in range(2):  # builds the cache, then reads it
    dataset = data_lib.load_dataset(config)
    for name, split in dataset.splits.items():
      assert split.text_bert.dtype == np.int32
      np.testing.assert_array_equal(split.text_bert, raw[name]["text_bert"])
  assert isinstance(dataset.splits["train"].text_bert, np.memmap)
  features = data_lib.split_arrays(dataset.splits["test"], "regression")
  bert = data_lib.split_arrays(dataset.splits["test"], "regression", text_encoder="bert")
  assert set(features) - set(bert) == {"text"}
  np.testing.assert_array_equal(bert["text_bert"], raw["test"]["text_bert"])
  np.testing.assert_array_equal(bert["text_mask"], raw["test"]["text_bert"][:, 1] == 1)


def read_pickle(path):
  with open(path, "rb") as f:
    return pickle.load(f)


def test_synthetic_token_ids_carry_the_planted_signal(tmp_path):
  """A bag-of-words least-squares fit on the synthetic ids predicts the held-out labels (the
  words alone, no features), and they fit the vocabulary they were written for."""
  write = lambda name, **vocab: read_pickle(synthetic.write_synthetic(
      str(tmp_path / name), like="mosei", aligned=True, num_train=1000, num_valid=2,
      num_test=400, dims={"text": 2, "vision": 2, "audio": 2}, **vocab))
  raw = write("s.pkl", text_vocab_size=128)

  def bag_of_words(split):
    ids = raw[split]["text_bert"][:, 0]
    assert ids.max() < 128 and raw[split]["text_bert"][:, 0, 0].min() == 101
    return np.c_[np.stack([(ids == v).sum(1) for v in range(128)], 1), np.ones(len(ids))]

  w = np.linalg.lstsq(bag_of_words("train"), raw["train"]["regression_labels"], rcond=None)[0]
  corr = np.corrcoef(bag_of_words("test") @ w, raw["test"]["regression_labels"])[0, 1]
  assert corr > 0.7
  big = write("t.pkl")["train"]  # bert-base-uncased's vocabulary, the same features
  assert big["text_bert"][:, 0].max() >= 1000
  for key in ("text", "audio", "vision", "regression_labels"):
    np.testing.assert_array_equal(big[key], raw["train"][key])


# ----------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def training(tmp_path_factory):
  """The tiny DHMD with the fixture BERT, trained by `steps.make_train_step` (lr 2e-3, four
  epochs of 24 steps of 16) on a small MOSEI-like MMSA file (24 steps per modality) whose audio
  and vision are zeroed and whose `text` features are dropped: the planted signal can only come
  through BERT, from the `text_bert` ids."""
  config = bert_tiny_config()
  folder = tmp_path_factory.mktemp("data")
  config.dataset.name = "mosei"
  config.dataset.path = synthetic.write_synthetic(
      str(folder / "mosei_24.pkl"), like="mosei", aligned=True, num_train=384, num_valid=8,
      num_test=96, dims={"text": 4, "vision": 4, "audio": 3},
      seq_lens={"text": 24, "vision": 24, "audio": 24}, text_vocab_size=128)
  config.train.batch_size = 16
  config.train.update_epochs = 1
  config.train.learning_rate = 2e-3
  dataset = data_lib.load_dataset(config.dataset)
  model = build_model(config, num_outputs=1)

  def bert_only(split):
    arrays = data_lib.split_arrays(dataset.splits[split], "regression", text_encoder="bert")
    for m in ("vision", "audio"):
      arrays[m] = np.zeros_like(arrays[m])
    return jax.tree.map(jnp.asarray, arrays)

  train, test = bert_only("train"), bert_only("test")
  batch_size = config.train.batch_size
  num_train = train["label"].shape[0]
  sample = jax.tree.map(lambda a: a[:batch_size], train)
  state0 = jax.jit(lambda k: steps.init_state(config, model, sample, k))(jax.random.key(0))
  step = jax.jit(steps.make_train_step(config, model))
  predict = jax.jit(lambda p, b: model.apply({"params": p}, b, deterministic=True)["prediction"])
  rng = np.random.default_rng(0)
  orders = [rng.permutation(num_train) for _ in range(4)]
  state, losses = state0, []
  # Batches are cut on the host: 96 steps of eager gathers on the device would each dispatch
  # (and first compile) a small program per array.
  host = jax.tree.map(np.asarray, train)
  for epoch, order in enumerate(orders):
    for i in range(num_train // batch_size):
      rows = order[i * batch_size:(i + 1) * batch_size]
      batch = jax.tree.map(lambda a: a[rows][None], host)  # (U=1, B, ...)
      state, metrics = step(state, batch, jax.random.key(1000 * epoch + i))
      if epoch == 0 and i == 0:
        state1 = state  # after one step (the step does not donate its input)
      losses.append(float(metrics["final_task"]))
  return dict(model=model, train=train, test=test, state0=state0, state1=state1,
              first_rows=orders[0][:batch_size], state=state, losses=losses,
              before=np.asarray(predict(state0.params, test))[:, 0],
              after=np.asarray(predict(state.params, test))[:, 0],
              train_labels=np.asarray(train["label"]))


def test_init_hook_loads_the_checkpoint(training):
  """steps.init_state: the `bert` subtree is the checkpoint, not the random initialisation."""
  loaded = bert_weights.load_params(training["model"].settings.bert)
  jax.tree.map(np.testing.assert_array_equal, training["state0"].params["bert"], loaded)


def test_gradients_reach_every_bert_parameter(training):
  """One train step (forward, every loss, backward, clip, Adam at the same lr as the rest)
  moves every BERT parameter whose gradient is not zero by construction: every kernel, bias
  and LayerNorm element, and exactly the embedding rows of the ids, positions and segments in
  the batch. The key biases' gradient is zero in exact arithmetic (softmax is invariant to a
  per-query shift), as in PyTorch; rounding noise may move them, so they are not counted."""
  before = training["state0"].params["bert"]
  after = training["state1"].params["bert"]
  rows = np.asarray(training["train"]["text_bert"])[training["first_rows"]]  # (B, 3, T)
  changed = jax.tree_util.tree_flatten_with_path(
      jax.tree.map(lambda a, b: np.asarray(a) != np.asarray(b), after, before))[0]
  assert len(changed) == 5 + 2 * 16  # embeddings: 3 tables + LayerNorm; 16 arrays per layer
  for path, diff in changed:
    name = jax.tree_util.keystr(path)
    if "['key']['bias']" in name:
      continue
    if "word_embeddings" in name:  # the [PAD] row 0 never learns (PyTorch's padding_idx)
      used = np.isin(np.arange(128), rows[:, 0][rows[:, 1] == 1])
      assert rows[:, 0].min() == 0 and not used[0]  # padding is in the batch
      np.testing.assert_array_equal(diff.any(1), used)
    elif "position_embeddings" in name:
      np.testing.assert_array_equal(diff.any(1), np.arange(64) < rows.shape[2])  # T = 24
    elif "token_type_embeddings" in name:
      np.testing.assert_array_equal(diff.any(1), [True, False])  # MMSA: one segment
    else:
      assert diff.all(), name


def test_learns_the_planted_signal_through_bert_alone(training):
  """Audio and vision zeroed: the test MAE falls well below that of predicting the training
  mean, and the predictions correlate with the labels; before training they did not."""
  labels = np.asarray(training["test"]["label"])
  mean_mae = float(np.abs(labels - training["train_labels"].mean()).mean())
  mae_before = float(np.abs(training["before"] - labels).mean())
  mae = float(np.abs(training["after"] - labels).mean())
  corr = float(np.corrcoef(training["after"], labels)[0, 1])
  losses = training["losses"]
  print(f"test MAE {mae_before:.3f} -> {mae:.3f} (predicting the mean: {mean_mae:.3f}), "
        f"Corr {corr:.3f}; train L1 {np.mean(losses[:10]):.3f} -> {np.mean(losses[-10:]):.3f}")
  assert np.mean(losses[-10:]) < 0.8 * np.mean(losses[:10])
  assert mae < 0.85 * mean_mae
  assert corr > 0.5
  assert mae < 0.85 * mae_before
