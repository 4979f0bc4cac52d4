"""Writes deterministic synthetic feature pickles in the MMSA or MulT/MultiBench layout.

The real pickles cannot be downloaded on the project machines, so tests and the default run use
files written here. They have every key, dtype and shape of the real layouts
(docs/data.md) and a planted, learnable structure:

* every sample has a latent sentiment z ~ N(0, 1). Regression labels are z scaled to the label
  range, rounded to the dataset's label grid and clipped (MOSI/MOSEI: multiples of 1/3 in
  [-3, 3], with some exact zeros; SIMS: multiples of 0.2 in [-1, 1]); binary labels are z > 0,
  written as {0, 1} (UR-FUNNY) or {-1, 1} (MUStARD).
* every real frame of modality m is `base_m + a_m * dir_m + noise`, with a fixed random offset
  `base_m` and direction `dir_m` per modality (shared by all splits) and a per-sample amplitude
  `a_m = coef_m * z + nuisance`. Text carries z strongly (coef 1, small nuisance); audio and
  vision weakly and noisily (coef 0.35, large nuisance).
* in ~15% of the samples ("hard" ones) text carries only noise and one of audio/vision (chosen at
  random) carries z with coef 1, so a model gains from the weaker modalities.
* MMSA files also carry `text_bert` token rows [ids, mask, segment ids] whose words carry the
  same text amplitude: 80% of the words come from a small sentiment lexicon (8 positive,
  8 negative ids, fixed per seed), positive with probability sigmoid(2.5 a_text), the rest are
  neutral ids, so a BERT trained from random weights can learn z from them (and, like the text
  features, not for the hard samples). Ids follow bert-base-uncased: [CLS] 101 first, [SEP] 102
  last, 0 padding, words below `text_vocab_size` (`--text-vocab-size` for a smaller BERT).
* padding frames are exactly zero. MMSA files pad at the end; unaligned ones store the true
  lengths in `audio_lengths`/`vision_lengths` and the text length in the `text_bert` mask. MulT /
  MultiBench files left-pad the GloVe text (and, when aligned, the word-aligned audio/vision).

Arrays are float32 and generated chunk by chunk straight into their final buffers, so a
MOSEI-sized unaligned file (~8.5 GB of arrays) can be written with ~11 GB of RAM. The same seed
gives byte-identical files.

Usage (absl flags: `--num_train=64`, or with dashes and a space as here):
  python -m dhmd_jax.synthetic --like mosei --aligned --out /tmp/mosei_aligned.pkl
  python -m dhmd_jax.synthetic --like mosi --unaligned --layout multibench --out /tmp/x.pkl \
      --num-train 64 --num-valid 16 --num-test 16 --seed 3
"""

from __future__ import annotations

import os
import pickle
import sys

from absl import flags
import numpy as np

from dhmd_jax import cli
from dhmd_jax.names import MODALITIES
from dhmd_jax.names import SPLITS

LAYOUTS = ("mmsa", "multibench")

# (T, D) per modality of the real files, keyed by (like, aligned).
_MMSA_SHAPES = {
    ("mosi", True): {"text": (50, 768), "vision": (50, 20), "audio": (50, 5)},
    ("mosi", False): {"text": (50, 768), "vision": (500, 20), "audio": (375, 5)},
    ("mosei", True): {"text": (50, 768), "vision": (50, 35), "audio": (50, 74)},
    ("mosei", False): {"text": (50, 768), "vision": (500, 35), "audio": (500, 74)},
    ("sims", False): {"text": (39, 768), "vision": (55, 709), "audio": (400, 33)},
}
# MulT pickles carry 300-d GloVe text; MultiBench humor/sarcasm use its example encoder dims.
_MULTIBENCH_SHAPES = {
    ("mosi", True): {"text": (50, 300), "vision": (50, 20), "audio": (50, 5)},
    ("mosi", False): {"text": (50, 300), "vision": (500, 20), "audio": (375, 5)},
    ("mosei", True): {"text": (50, 300), "vision": (50, 35), "audio": (50, 74)},
    ("mosei", False): {"text": (50, 300), "vision": (500, 35), "audio": (500, 74)},
    ("urfunny", True): {"text": (50, 300), "vision": (50, 371), "audio": (50, 81)},
    ("mustard", True): {"text": (50, 300), "vision": (50, 371), "audio": (50, 81)},
}
# Real split sizes (train, valid, test). UR-FUNNY and MUStARD sizes are approximate.
REAL_SPLIT_SIZES = {
    "mosi": (1284, 229, 686),
    "mosei": (16326, 1871, 4659),
    "sims": (1368, 456, 457),
    "urfunny": (7614, 980, 994),
    "mustard": (414, 138, 138),
}

HARD_FRACTION = 0.15  # samples whose text carries only noise
BERT_VOCAB_SIZE = 30522  # bert-base-uncased
_CLS, _SEP = 101, 102  # bert-base-uncased's [CLS] and [SEP]; 0 is [PAD]
_LEXICON = 8  # sentiment word ids per polarity
_SENTIMENT_WORDS = 0.8  # fraction of the words drawn from the lexicon
# Per modality: coefficient of z, std of the per-sample nuisance amplitude, per-frame noise std.
_COEF = {"text": 1.0, "vision": 0.35, "audio": 0.35}
_NUISANCE = {"text": 0.25, "vision": 0.7, "audio": 0.7}
_FRAME_NOISE = {"text": 0.5, "vision": 1.0, "audio": 1.0}
_CHUNK_ELEMENTS = 1 << 22  # floats generated per chunk (16 MB)
_WORDS = ("the", "movie", "was", "really", "not", "very", "good", "bad", "i", "think", "it",
          "kind", "of", "just", "and", "but", "so", "story", "acting", "uh", "um", "like")
_ALPHABET = np.array(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"))


def shapes_for(like: str, aligned: bool, layout: str) -> dict[str, tuple[int, int]]:
  """(T, D) per modality of the real file that `like`/`aligned`/`layout` imitates."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  table = _MMSA_SHAPES if layout == "mmsa" else _MULTIBENCH_SHAPES
  likes = sorted({k[0] for k in table})
  if like not in likes:
    raise ValueError(f"like={like!r} is not available in the {layout} layout; use one of {likes}")
  if (like, aligned) not in table:
    kind = "aligned" if aligned else "unaligned"
    other = "unaligned" if aligned else "aligned"
    raise ValueError(f"{like} has no {kind} {layout} file (only {other}); "
                     f"set aligned={not aligned}")
  return dict(table[(like, aligned)])


def write_synthetic(path: str, *, like: str, aligned: bool, layout: str = "mmsa",
                    num_train: int, num_valid: int, num_test: int, seed: int = 0,
                    nonfinite_fraction: float = 0.0,
                    dims: dict[str, int] | None = None,
                    seq_lens: dict[str, int] | None = None,
                    text_vocab_size: int = BERT_VOCAB_SIZE) -> str:
  """Writes a synthetic pickle to `path` (atomically) and returns `path`.

  Args:
    path: file to write; its folder is created.
    like: dataset whose shapes and labels are imitated: "mosi", "mosei", "sims" (MMSA) or
      "mosi", "mosei", "urfunny", "mustard" (multibench).
    aligned: all three modalities with the text length (SIMS, MultiBench humor/sarcasm: one only).
    layout: "mmsa" or "multibench".
    num_train, num_valid, num_test: samples per split (each >= 1).
    seed: generator seed; the same arguments give byte-identical files.
    nonfinite_fraction: fraction of the real audio values set to -inf (for loader tests).
    dims: optional overrides of the feature dims, e.g. {"text": 8} (tiny files for tests).
    seq_lens: optional overrides of the sequence lengths T, e.g. {"audio": 12}; aligned files
      need equal lengths for all three.
    text_vocab_size: size of the vocabulary of the `text_bert` ids (MMSA layout): that of the
      BERT meant to read them (bert-base-uncased 30522; at least 128).
  """
  shapes = shapes_for(like, aligned, layout)
  for name, override, pos in (("dims", dims, 1), ("seq_lens", seq_lens, 0)):
    for m, value in (override or {}).items():
      if m not in shapes or int(value) < 1:
        raise ValueError(f"{name} override {m}={value!r}: keys must be in {MODALITIES}, "
                         f"values >= 1")
      t_d = list(shapes[m])
      t_d[pos] = int(value)
      shapes[m] = tuple(t_d)
  if aligned and len({shapes[m][0] for m in MODALITIES}) != 1:
    raise ValueError(f"aligned files need one sequence length for all modalities, got "
                     f"{ {m: shapes[m][0] for m in MODALITIES} }")
  sizes = (int(num_train), int(num_valid), int(num_test))
  if min(sizes) < 1:
    raise ValueError(f"split sizes must be >= 1, got {sizes}")
  if not 0.0 <= nonfinite_fraction < 1.0:
    raise ValueError(f"nonfinite_fraction must be in [0, 1), got {nonfinite_fraction}")
  if int(text_vocab_size) < 128:
    raise ValueError(f"text_vocab_size must be >= 128 (ids {_CLS}/{_SEP} are [CLS]/[SEP] and "
                     f"the words need ids above them), got {text_vocab_size}")

  directions = _directions(seed, shapes)
  data = {}
  for split_idx, (split, n) in enumerate(zip(SPLITS, sizes)):
    data[split] = _make_split(like=like, aligned=aligned, layout=layout, shapes=shapes, n=n,
                              seed=seed, split_idx=split_idx, directions=directions,
                              nonfinite_fraction=nonfinite_fraction,
                              text_vocab_size=int(text_vocab_size))

  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      pickler = pickle.Pickler(f, protocol=4)
      pickler.fast = True  # no memo: each array's bytes copy is freed once written
      pickler.dump(data)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return path


def _directions(seed, shapes):
  """Fixed per-modality offset and signal direction, shared by all splits."""
  out = {}
  for m_idx, m in enumerate(MODALITIES):
    rng = np.random.default_rng([seed, 1000 + m_idx])
    d = shapes[m][1]
    base = (0.5 * rng.standard_normal(d)).astype(np.float32)  # (D,)
    direction = rng.standard_normal(d).astype(np.float32)  # (D,)
    out[m] = (base, direction)
  return out


def _labels(like, z, rng):
  """Labels on the dataset's grid from the latent z; also the SIMS unimodal labels."""
  extra = {}
  if like in ("mosi", "mosei"):
    y = np.clip(np.round(1.4 * z * 3.0) / 3.0, -3.0, 3.0)
  elif like == "sims":
    y = np.clip(np.round(0.5 * z * 5.0) / 5.0, -1.0, 1.0)
    for suffix in ("T", "A", "V"):
      noisy = y + 0.3 * rng.standard_normal(z.shape)
      extra[suffix] = (np.clip(np.round(noisy * 5.0) / 5.0, -1.0, 1.0) + 0.0).astype(np.float32)
  else:
    y = (z > 0).astype(np.float64)
  return (y + 0.0).astype(np.float32), extra  # + 0.0 turns -0.0 into 0.0


def _lengths(rng, n, t, minimum):
  low = min(t, max(1, minimum))
  return rng.integers(low, t + 1, size=n).astype(np.int64)  # (N,)


def _token_ids(*, seed, split_idx, amplitude, text_len, t, vocab_size):
  """(N, T) bert-base-uncased-style ids whose words carry `amplitude` (N,) (module docstring).

  A separate random stream, so the features of a seed do not depend on the vocabulary.
  """
  first_word = 1000 if vocab_size > 2000 else _SEP + 1  # bert-base-uncased: words from 1000
  words = np.arange(first_word, vocab_size)
  lexicon = np.random.default_rng([seed, 2000]).choice(words, 2 * _LEXICON, replace=False)
  positive, negative = lexicon[:_LEXICON], lexicon[_LEXICON:]
  neutral = np.setdiff1d(words, lexicon)
  rng = np.random.default_rng([seed, split_idx, 2001])
  n = amplitude.shape[0]
  p_positive = 1.0 / (1.0 + np.exp(-2.5 * amplitude))  # (N,)
  sentiment = rng.random((n, t)) < _SENTIMENT_WORDS
  is_positive = rng.random((n, t)) < p_positive[:, None]
  ids = np.where(sentiment,
                 np.where(is_positive, positive[rng.integers(0, _LEXICON, (n, t))],
                          negative[rng.integers(0, _LEXICON, (n, t))]),
                 neutral[rng.integers(0, len(neutral), (n, t))]).astype(np.int64)
  ids[:, 0] = _CLS
  ids[np.arange(n), text_len - 1] = _SEP
  return ids * (np.arange(t)[None, :] < text_len[:, None])  # 0 = [PAD]


def _make_split(*, like, aligned, layout, shapes, n, seed, split_idx, directions,
                nonfinite_fraction, text_vocab_size=BERT_VOCAB_SIZE):
  rng = np.random.default_rng([seed, split_idx])
  z = rng.standard_normal(n)  # (N,) latent sentiment
  hard = rng.random(n) < HARD_FRACTION
  carrier_is_audio = rng.random(n) < 0.5
  coef = {
      "text": np.where(hard, 0.0, _COEF["text"]),
      "vision": np.where(hard, np.where(carrier_is_audio, 0.0, 1.0), _COEF["vision"]),
      "audio": np.where(hard, np.where(carrier_is_audio, 1.0, 0.0), _COEF["audio"]),
  }
  amplitude = {m: (coef[m] * z + _NUISANCE[m] * rng.standard_normal(n)).astype(np.float32)
               for m in MODALITIES}  # (N,) each
  y, unimodal = _labels(like, z, rng)

  # Real-frame masks (N, T). Text: at least [CLS] x [SEP] where the layout is BERT's.
  t_text = shapes["text"][0]
  text_len = _lengths(rng, n, t_text, max(3, t_text // 5))
  left_pad = layout == "multibench"
  lengths = {"text": text_len}
  for m in ("vision", "audio"):
    t = shapes[m][0]
    lengths[m] = text_len.copy() if aligned else _lengths(rng, n, t, t // 5)
  masks = {}
  for m in MODALITIES:
    t = shapes[m][0]
    pad_left = left_pad and (m == "text" or aligned)
    steps = np.arange(t)[None, :]
    masks[m] = (steps >= t - lengths[m][:, None]) if pad_left else (steps < lengths[m][:, None])

  features = {}
  for m_idx, m in enumerate(MODALITIES):
    t, d = shapes[m]
    base, direction = directions[m]
    x = np.empty((n, t, d), np.float32)  # (N, T, D)
    rows = max(1, _CHUNK_ELEMENTS // (t * d))
    for c_idx, start in enumerate(range(0, n, rows)):
      stop = min(n, start + rows)
      view = x[start:stop]  # (C, T, D)
      chunk_rng = np.random.default_rng([seed, split_idx, m_idx, c_idx])
      chunk_rng.standard_normal(out=view, dtype=np.float32)
      view *= _FRAME_NOISE[m]
      view += base
      view += amplitude[m][start:stop, None, None] * direction[None, None, :]
      view *= masks[m][start:stop, :, None]
      if m == "audio" and nonfinite_fraction > 0:
        bad_rng = np.random.default_rng([seed, split_idx, m_idx, c_idx, 1])
        bad = bad_rng.random(view.shape, dtype=np.float32) < nonfinite_fraction
        bad &= masks[m][start:stop, :, None]
        view[bad] = -np.inf
    features[m] = x

  words = rng.integers(0, len(_WORDS), size=(n, t_text))
  raw_text = np.array([" ".join(_WORDS[w] for w in words[i, :max(1, text_len[i] - 2)])
                       for i in range(n)])
  num_videos = n // 4 + 1
  video_names = ["".join(row) for row in _ALPHABET[rng.integers(0, len(_ALPHABET),
                                                                 size=(num_videos, 11))]]
  video = [video_names[i // 4] for i in range(n)]
  clip = [i % 4 + 1 for i in range(n)]

  if layout == "mmsa":
    token_ids = _token_ids(seed=seed, split_idx=split_idx, amplitude=amplitude["text"],
                           text_len=text_len, t=t_text, vocab_size=text_vocab_size)  # (N, L)
    text_mask = masks["text"].astype(np.int64)
    text_bert = np.stack([token_ids, text_mask, np.zeros_like(text_mask)], axis=1)
    classes = np.sign(y).astype(np.int64) + 1  # 0 = Neg, 1 = Neu, 2 = Pos
    split = {
        "raw_text": raw_text,
        "audio": features["audio"],
        "vision": features["vision"],
        "id": np.array([f"{v}$_${c}" for v, c in zip(video, clip)]),
        "text": features["text"],
        "text_bert": text_bert,  # (N, 3, L) [input_ids, attention_mask, segment_ids]
    }
    if not aligned:
      split["audio_lengths"] = lengths["audio"]
      split["vision_lengths"] = lengths["vision"]
    split["annotations"] = np.array(["Negative", "Neutral", "Positive"])[classes]
    split["classification_labels"] = classes
    split["regression_labels"] = y
    for suffix, values in unimodal.items():
      split[f"regression_labels_{suffix}"] = values
    return split

  starts = np.round(rng.uniform(0.0, 60.0, size=n), 3)
  ids = np.array([[v, f"{s:.3f}", f"{s + 2.0 + c:.3f}"] for v, s, c in zip(video, starts, clip)])
  if like == "mosi":
    ids = np.char.encode(ids, "utf-8")  # MulT's MOSI ids are bytes
  if like in ("mosi", "mosei"):
    labels = y.reshape(n, 1, 1)  # (N, 1, 1)
  elif like == "urfunny":
    labels = y.reshape(n, 1)  # (N, 1) in {0, 1}
  else:
    labels = (2 * y - 1).astype(np.int64)  # (N,) in {-1, 1}
  return {"vision": features["vision"], "audio": features["audio"], "text": features["text"],
          "labels": labels, "id": ids}


def _describe(path, *, like, aligned, layout, sizes):
  """What `main` prints: where the file went and the shapes of each split."""
  shapes = shapes_for(like, aligned, layout)
  if layout == "mmsa":
    label_key, label_tail = "regression_labels", ()
  else:
    label_key = "labels"
    label_tail = {"urfunny": (1,), "mustard": ()}.get(like, (1, 1))
  lines = [f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB, {layout} layout, "
           f"{'aligned' if aligned else 'unaligned'} like {like})"]
  for split, n in zip(SPLITS, sizes):
    parts = [f"{m} {(n, *shapes[m])}" for m in MODALITIES]
    parts.append(f"{label_key} {(n, *label_tail)}")
    lines.append(f"  {split}: " + ", ".join(parts))
  return "\n".join(lines)


COMMAND = cli.Command(
    prog="python -m dhmd_jax.synthetic",
    summary="Writes a deterministic synthetic feature pickle (MMSA or MultiBench layout). Flags "
            "take their value after = or a space (--like mosi); dashed names work too "
            "(--num-train 64).",
    required=("like", "out"), placeholders={"out": "PICKLE"})


def define_flags(values):
  """The command's flags, on `values` (each call of `main` its own)."""
  flags.DEFINE_enum("like", None, sorted(REAL_SPLIT_SIZES),
                    "Dataset whose shapes and labels are imitated.", flag_values=values)
  flags.DEFINE_boolean("aligned", None, "All modalities with the text length (default, except "
                       "for sims).", flag_values=values)
  flags.DEFINE_boolean("unaligned", False, "The unaligned lengths of the real files.",
                       flag_values=values)
  flags.DEFINE_enum("layout", "mmsa", LAYOUTS, "File layout.", flag_values=values)
  flags.DEFINE_string("out", None, "Pickle to write.", flag_values=values)
  for split in SPLITS:
    flags.DEFINE_integer(f"num_{split}", None, f"Samples in the {split} split (default: --scale "
                         f"of the real size).", flag_values=values)
  flags.DEFINE_float("scale", 0.1, "Fraction of the real split sizes for sizes not given.",
                     flag_values=values)
  flags.DEFINE_integer("seed", 0, "Generator seed.", flag_values=values)
  flags.DEFINE_float("nonfinite_fraction", 0.0, "Fraction of real audio values set to -inf "
                     "(loader tests).", flag_values=values)
  flags.DEFINE_integer("text_vocab_size", BERT_VOCAB_SIZE, "Vocabulary of the text_bert ids "
                       "(the default is bert-base-uncased's).", flag_values=values)


def main(argv=None):
  """The command line (argv: the flags, default sys.argv[1:]); returns the exit status."""
  values = flags.FlagValues()
  define_flags(values)

  def write(_):
    if values.unaligned and values.aligned:
      raise cli.UsageError("--aligned and --unaligned exclude each other: give one")
    if values.aligned is not None:
      aligned = values.aligned
    else:
      aligned = not values.unaligned and values.like != "sims"
    given = (values.num_train, values.num_valid, values.num_test)
    sizes = [g if g is not None else max(1, round(values.scale * real))
             for g, real in zip(given, REAL_SPLIT_SIZES[values.like])]
    try:
      write_synthetic(values.out, like=values.like, aligned=aligned, layout=values.layout,
                      num_train=sizes[0], num_valid=sizes[1], num_test=sizes[2],
                      seed=values.seed, nonfinite_fraction=values.nonfinite_fraction,
                      text_vocab_size=values.text_vocab_size)
    except ValueError as e:  # a combination the layouts do not have
      raise cli.UsageError(str(e)) from None
    print(_describe(values.out, like=values.like, aligned=aligned, layout=values.layout,
                    sizes=sizes))

  return cli.run(COMMAND, write, argv, flag_values=values)


if __name__ == "__main__":
  sys.exit(main())
