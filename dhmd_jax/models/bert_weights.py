"""BERT weights from a local Hugging Face checkpoint folder, and the init hook that uses them.

A folder as Hugging Face publishes `bert-base-uncased` (or as `save_pretrained` writes one):
`config.json` (the architecture) and `model.safetensors` (the tensors), read with the
`safetensors` package's NumPy API: no torch, nothing downloaded. Key names are accepted as
published, with or without the `bert.` prefix of the pre-training checkpoints, with LayerNorm
`weight`/`bias` or the original `gamma`/`beta`. The pooler is loaded when the model builds it
(`model.unused_reference_layers`, as the reference's `BertModel` has one); the pre-training heads
(`cls.*`), the `position_ids` buffer and any other task head are ignored.

Everything is checked when the model is built, from config.json and the safetensors header (no
tensor is read): the folder, both files, every tensor's presence and shape against config.json,
and that the architecture is one `bert.py` implements. Each problem raises `DataError`, one line
saying what is wrong and what to do (`python -m dhmd_jax.main` prints it as `error: ...`).

`load_pretrained(settings, params)` is the hook `steps.init_state` calls after `model.init`: it
replaces the randomly initialised `bert` subtree by the checkpoint, the same weights for every
seed (the reference loads bert-base-uncased for each run).
"""

import json
import os
import re
from typing import Any

import jax
import numpy as np

from dhmd_jax.data import DataError
from dhmd_jax.models.bert import BertSettings

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
RANDOM_INIT = "random"
CHECKPOINT_INIT = "checkpoint"
_WHERE = ("download config.json and model.safetensors of bert-base-uncased (the DMD code's "
          "BERT) from https://huggingface.co/google-bert/bert-base-uncased/tree/main into one "
          "folder (e.g. data/bert-base-uncased) and pass it as --config.model.bert.path; "
          "nothing is downloaded automatically")
_IGNORED = re.compile(r"^(cls\.|embeddings\.position_ids$|embeddings\.token_type_ids$)")


# ----------------------------------------------------------------------------- settings


def settings_from_config(bert_config, *, pooler: bool) -> BertSettings:
  """BertSettings for `config.model.bert`: from the checkpoint folder (checked) or, with
  init="random", from `random_arch` (no files)."""
  if bert_config.init == RANDOM_INIT:
    a = bert_config.random_arch
    settings = BertSettings(
        vocab_size=int(a.vocab_size), hidden_size=int(a.hidden_size),
        num_layers=int(a.num_layers), num_heads=int(a.num_heads),
        intermediate_size=int(a.intermediate_size), max_positions=int(a.max_positions),
        type_vocab_size=int(a.type_vocab_size), hidden_dropout=float(a.hidden_dropout),
        attention_dropout=float(a.attention_dropout), pooler=pooler)
    settings.validate()
    return settings
  if bert_config.init != CHECKPOINT_INIT:
    raise ValueError(f"config.model.bert.init = {bert_config.init!r} is invalid: expected "
                     f"'{CHECKPOINT_INIT}' or '{RANDOM_INIT}'.")
  settings = read_architecture(bert_config.path, pooler=pooler)
  check_checkpoint(settings)
  return settings


def read_architecture(path: str, *, pooler: bool = False) -> BertSettings:
  """The architecture in `<path>/config.json` (raises DataError when it is not usable)."""
  if not path:
    raise DataError(f"config.model.bert.path is empty but config.model.text_encoder='bert' "
                    f"needs a BERT checkpoint folder: {_WHERE}")
  if not os.path.isdir(path):
    what = "is a file, not a folder" if os.path.exists(path) else "does not exist"
    raise DataError(f"BERT checkpoint folder {path} (config.model.bert.path) {what}: {_WHERE}")
  config_path = os.path.join(path, CONFIG_FILE)
  if not os.path.isfile(config_path):
    raise DataError(f"BERT checkpoint folder {path} has no {CONFIG_FILE} (files: "
                    f"{_listing(path)}): {_WHERE}")
  try:
    with open(config_path) as f:
      hf = json.load(f)
  except (OSError, ValueError) as e:
    raise DataError(f"{config_path} is not readable JSON ({type(e).__name__}: {e}): download it "
                    f"again; {_WHERE}") from None
  if not isinstance(hf, dict):
    raise DataError(f"{config_path} holds a {type(hf).__name__}, expected a JSON object")
  model_type = hf.get("model_type", "bert")
  if model_type != "bert":
    raise DataError(f"{config_path}: model_type is {model_type!r}, but only BERT ('bert') is "
                    f"implemented; use a BERT checkpoint such as bert-base-uncased")
  missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                         "intermediate_size", "max_position_embeddings") if k not in hf]
  if missing:
    raise DataError(f"{config_path} lacks {missing}: not a BERT config.json; {_WHERE}")
  for key, supported in (("hidden_act", "gelu"), ("position_embedding_type", "absolute")):
    if hf.get(key, supported) != supported:
      raise DataError(f"{config_path}: {key} is {hf[key]!r}; only {supported!r} is implemented "
                      f"(bert-base-uncased uses it)")
  settings = BertSettings(
      vocab_size=int(hf["vocab_size"]), hidden_size=int(hf["hidden_size"]),
      num_layers=int(hf["num_hidden_layers"]), num_heads=int(hf["num_attention_heads"]),
      intermediate_size=int(hf["intermediate_size"]),
      max_positions=int(hf["max_position_embeddings"]),
      type_vocab_size=int(hf.get("type_vocab_size", 2)),
      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
      hidden_dropout=float(hf.get("hidden_dropout_prob", 0.1)),
      attention_dropout=float(hf.get("attention_probs_dropout_prob", 0.1)),
      pad_token_id=int(hf.get("pad_token_id") or 0), pooler=pooler, checkpoint=path)
  try:
    settings.validate()
  except ValueError as e:
    raise DataError(f"{config_path}: {e}") from None
  return settings


def _listing(path):
  names = sorted(os.listdir(path))
  return ", ".join(names[:12]) + (", ..." if len(names) > 12 else "") if names else "none"


# ----------------------------------------------------------------------------- key names


def expected_shapes(settings: BertSettings) -> dict[str, tuple]:
  """Hugging Face key (no `bert.` prefix) -> PyTorch shape, for every tensor the model uses."""
  h, i = settings.hidden_size, settings.intermediate_size
  shapes = {
      "embeddings.word_embeddings.weight": (settings.vocab_size, h),
      "embeddings.position_embeddings.weight": (settings.max_positions, h),
      "embeddings.token_type_embeddings.weight": (settings.type_vocab_size, h),
      "embeddings.LayerNorm.weight": (h,), "embeddings.LayerNorm.bias": (h,),
  }
  for n in range(settings.num_layers):
    p = f"encoder.layer.{n}."
    for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                 "attention.output.dense"):
      shapes[p + name + ".weight"], shapes[p + name + ".bias"] = (h, h), (h,)
    shapes[p + "intermediate.dense.weight"], shapes[p + "intermediate.dense.bias"] = (i, h), (i,)
    shapes[p + "output.dense.weight"], shapes[p + "output.dense.bias"] = (h, i), (h,)
    for ln in ("attention.output.LayerNorm", "output.LayerNorm"):
      shapes[p + ln + ".weight"], shapes[p + ln + ".bias"] = (h,), (h,)
  if settings.pooler:
    shapes["pooler.dense.weight"], shapes["pooler.dense.bias"] = (h, h), (h,)
  return shapes


def canonical_key(key: str) -> str:
  """A checkpoint key as `BertModel` names it today: no `bert.` prefix, LayerNorm `weight`/
  `bias` for the `gamma`/`beta` of the original TensorFlow-converted checkpoints."""
  if key.startswith("bert."):
    key = key[len("bert."):]
  if ".LayerNorm." in key or key.startswith("LayerNorm."):
    key = re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", key))
  return key


def flax_path(key: str) -> tuple[tuple[str, ...], bool]:
  """Canonical Hugging Face key -> (path in the `bert` parameter tree, transpose?)."""
  parts = key.split(".")
  path = []
  for part in parts[:-1]:
    if part.isdigit() and path and path[-1] == "layer":
      path[-1] = f"layer_{part}"
    else:
      path.append(part)
  leaf, parent = parts[-1], path[-1]
  if leaf == "bias":
    return tuple(path) + ("bias",), False
  if parent == "LayerNorm":
    return tuple(path) + ("scale",), False
  if parent.endswith("_embeddings"):
    return tuple(path) + ("embedding",), False
  return tuple(path) + ("kernel",), True  # Linear: PyTorch (out, in) -> Flax (in, out)


def flax_shapes(settings: BertSettings) -> dict:
  """The nested `bert` parameter tree's shapes the checkpoint fills."""
  tree = {}
  for key, shape in expected_shapes(settings).items():
    path, transpose = flax_path(key)
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = tuple(reversed(shape)) if transpose else tuple(shape)
  return tree


# ----------------------------------------------------------------------------- checkpoint


def _weights_file(settings: BertSettings) -> str:
  path = settings.checkpoint
  weights = os.path.join(path, WEIGHTS_FILE)
  if os.path.isfile(weights):
    return weights
  if os.path.isfile(os.path.join(path, "model.safetensors.index.json")):
    raise DataError(f"{path} holds a sharded checkpoint (model.safetensors.index.json); merge it "
                    f"into one {WEIGHTS_FILE} (bert-base-uncased is published as one file)")
  bin_path = os.path.join(path, "pytorch_model.bin")
  if os.path.isfile(bin_path):
    raise DataError(
        f"{path} has pytorch_model.bin but no {WEIGHTS_FILE}, and torch pickles are not read "
        f"here; convert it once where torch is installed: python -c \"import torch; from "
        f"safetensors.torch import save_file; sd = torch.load('{bin_path}', map_location='cpu'); "
        f"save_file({{k: v.detach().clone().contiguous() for k, v in sd.items()}}, "
        f"'{weights}')\" (or download {WEIGHTS_FILE} itself: bert-base-uncased publishes one)")
  raise DataError(f"BERT checkpoint folder {path} has no {WEIGHTS_FILE} (files: "
                  f"{_listing(path)}): {_WHERE}")


def _resolve(keys, weights, settings):
  """Canonical key -> key in the file, for every expected tensor; raises on missing/ambiguous."""
  by_canonical = {}
  for key in keys:
    name = canonical_key(key)
    if _IGNORED.match(name) or not name.startswith(("embeddings.", "encoder.", "pooler.")):
      continue  # pre-training / task heads and buffers
    if name in by_canonical:
      raise DataError(f"{weights} holds both '{by_canonical[name]}' and '{key}' for the tensor "
                      f"'{name}': keep one checkpoint per file")
    by_canonical[name] = key
  expected = expected_shapes(settings)
  for name in expected:
    if name not in by_canonical and name.startswith("pooler."):
      raise DataError(f"{weights} has no pooler ('{name}'), which is built because "
                      f"config.model.unused_reference_layers=True (the reference's BertModel "
                      f"has one; nothing uses its output): set it to False or use a checkpoint "
                      f"with its pooler, such as bert-base-uncased")
    if name not in by_canonical:
      raise DataError(
          f"{weights} has no tensor '{name}' (nor 'bert.{name}'), which config.json's "
          f"architecture needs ({settings.num_layers} layers, hidden {settings.hidden_size}): "
          f"config.json and {WEIGHTS_FILE} must come from the same BERT model; {_WHERE}")
  extra = sorted(n for n in by_canonical if n not in expected and not n.startswith("pooler."))
  if extra:
    raise DataError(f"{weights} has tensors config.json's architecture does not have "
                    f"({', '.join(extra[:4])}{', ...' if len(extra) > 4 else ''}): config.json "
                    f"and {WEIGHTS_FILE} must come from the same BERT model")
  return {name: by_canonical[name] for name in expected}


def check_checkpoint(settings: BertSettings):
  """Checks names and shapes of `model.safetensors` against config.json from its header."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  weights = _weights_file(settings)
  try:
    with safe_open(weights, framework="numpy") as f:
      keys = list(f.keys())
      file_keys = _resolve(keys, weights, settings)
      shapes = {name: tuple(f.get_slice(key).get_shape()) for name, key in file_keys.items()}
  except DataError:
    raise
  except Exception as e:  # pylint: disable=broad-except  (any failure: not a usable file)
    raise DataError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e}); "
                    f"download it again") from None
  for name, shape in expected_shapes(settings).items():
    if shapes[name] != shape:
      raise DataError(
          f"{weights}: tensor '{file_keys[name]}' has shape {shapes[name]}, but config.json "
          f"(vocab_size {settings.vocab_size}, hidden_size {settings.hidden_size}, "
          f"intermediate_size {settings.intermediate_size}, max_position_embeddings "
          f"{settings.max_positions}, type_vocab_size {settings.type_vocab_size}) implies "
          f"{shape}: config.json and {WEIGHTS_FILE} come from different models; download both "
          f"from the same one")


def load_params(settings: BertSettings) -> dict:
  """The checkpoint as the `bert` parameter tree (float32 NumPy arrays, Flax layout)."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  weights = _weights_file(settings)
  tensors = safetensors.numpy.load_file(weights)
  file_keys = _resolve(tensors.keys(), weights, settings)
  tree = {}
  for name, key in file_keys.items():
    path, transpose = flax_path(name)
    value = np.asarray(tensors[key], np.float32)
    node = tree
    for part in path[:-1]:
      node = node.setdefault(part, {})
    node[path[-1]] = np.ascontiguousarray(value.T if transpose else value)
  return tree


# ----------------------------------------------------------------------------- init hook


def load_pretrained(settings, params: dict[str, Any]) -> dict[str, Any]:
  """`params` with the `bert` subtree replaced by the checkpoint (identity without one).

  `settings` is the model's `ModelSettings`. Called inside the jitted, seed-vmapped
  `steps.init_state`: the weights enter as a host callback, not as closed-over constants, which
  XLA would embed in the program (bert-base: 440 MB of HLO, hashed by the compilation cache).
  The callback has no batched operand, so vmap broadcasts one read to every seed.
  """
  bert = settings.bert  # None unless model.text_encoder="bert"
  if bert is None or not bert.checkpoint:
    return params
  target = params["bert"]
  got = jax.tree.map(lambda x: tuple(x.shape), target)
  if got != flax_shapes(bert):  # a mapping bug, not a user error: config.json was checked
    raise AssertionError(f"BERT parameter tree {got} and checkpoint layout "
                         f"{flax_shapes(bert)} differ")
  result = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), target)

  def read():
    return jax.tree.map(lambda like, x: np.asarray(x, like.dtype), result, load_params(bert))

  return {**params, "bert": jax.pure_callback(read, result)}


# ----------------------------------------------------------------------------- data


def check_dataset(settings, dataset):
  """Raises DataError when `dataset` cannot feed the model's BERT: a split without `text_bert`
  or token ids outside the checkpoint's vocabulary. No-op for `text_encoder="features"`."""
  if settings.bert is None:
    return
  vocab = settings.bert.vocab_size
  for name, split in dataset.splits.items():
    if split.text_bert is None:
      raise DataError(
          f"{dataset.source}: split '{name}' has no 'text_bert' token ids, which "
          f"config.model.text_encoder='bert' needs: use an MMSA pickle (aligned_50.pkl / "
          f"unaligned_50.pkl carry them; MulT/MultiBench GloVe pickles do not) or "
          f"--config.model.text_encoder=features")
    ids = np.asarray(split.text_bert[:, 0])
    if ids.size and int(ids.max()) >= vocab:
      raise DataError(
          f"{dataset.source}: split '{name}' has 'text_bert' token id {int(ids.max())}, but the "
          f"BERT at {settings.bert.checkpoint or 'config.model.bert.random_arch'} has "
          f"{vocab} tokens (vocab_size): the ids come from another tokenizer; use the BERT the "
          f"pickle was tokenized for (MOSI/MOSEI: bert-base-uncased)")
