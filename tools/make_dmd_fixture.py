"""Writes tests/fixtures/dmd_reference_{aligned,unaligned}.npz: the official DMD code's own numbers.

The DMD model of the DHMD port (`model.use_dm=False`) is meant to compute what the official
PyTorch DMD code (github.com/mdswyz/DMD, CVPR 2023) computes, output for output and loss for
loss. This script runs THAT code, a developer's checkout of it, on a tiny model: it builds the
reference's `DMD` model and its two GD-Units as its `run.py` does, puts them in eval mode, runs
the body of its training loop (`trains/singleTask/DMD.py`, `do_train`) statement for statement on
one batch with the reference's own loss objects, and saves per configuration one `.npz` with the
parameters, the batch, every forward output (in the reference's own layouts), the full output
sequence of each of the twelve transformers, the GD edge scores and weights, every loss term and
the gradient of the combined loss with respect to every parameter. Two configurations: "aligned"
(equal input lengths; the Conv1d kernels 3/2/1 still give T' = 8/9/10) and "unaligned" (unequal
lengths T' = 8/10/17 per modality); both have zero-padded frames. It needs torch (and
scikit-learn and tqdm, which the reference's package imports); `tests/test_dmd_reference.py`
reads the files with NumPy and compares the JAX model to them. Regenerate with

  python tools/make_dmd_fixture.py --dmd=PATH/TO/DMD-checkout --out=tests/fixtures/

What is changed in the reference to run it here, at run time only (nothing on disk): the
stand-ins that `tools/dmd_reference.py` lists (shared with `tools/compare_with_dmd.py`), and
  * The flatten-Linears' sequence lengths, which the reference hard-codes per dataset name
    (50/50/50, 50/500/375, ...), are the tiny ones here (`_TinyDMD`).
  * Every bias and LayerNorm parameter is redrawn at random (the reference initialises them to
    0 and 1, under which a misplaced bias or LayerNorm would not show); weights keep the
    reference's initialisation.
"""

import argparse
import json
import pathlib
import platform
import sys

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import dmd_reference  # noqa: E402  pylint: disable=wrong-import-position
from dmd_reference import Args  # noqa: E402  pylint: disable=wrong-import-position

REPO = pathlib.Path(__file__).resolve().parents[1]

# The tiny model (both configurations): d = 6 with 3 heads (head width 2; 4 in the 2d memory
# transformers), 2 layers (so the memory transformers have max(2, 3) = 3), Conv1d kernels
# l/v/a = 3/2/1, input widths text/vision/audio = 12/7/5, GD-Unit widths 6 (homo) / 5 (hetero).
D_MODEL, NUM_HEADS, NUM_LAYERS = 6, 3, 2
KERNELS = {"l": 3, "v": 2, "a": 1}
FEATURE_DIMS = {"text": 12, "vision": 7, "audio": 5}
GD_SIZE_HOMO, GD_SIZE_HETERO = 6, 5
# The MOSEI entry of the reference's config.json (dropouts play no part in eval mode).
DROPOUTS = dict(attn_dropout=0.4, attn_dropout_a=0.0, attn_dropout_v=0.0, relu_dropout=0.0,
                embed_dropout=0.0, res_dropout=0.0, output_dropout=0.5, text_dropout=0.3)
# Batch of 6. Equal labels (exact float equality: the margin loss's positives include other
# samples with the same label) and differences from 0.4 to 3.8 (its adaptive margins).
LABELS = (-1.6, 0.4, 0.4, 2.2, -1.6, 0.8)
# name -> input lengths T per modality and each sample's real length (zero frames after it).
CONFIGS = {
    "aligned": {"lengths": {"text": 10, "vision": 10, "audio": 10},
                "real": {m: (10, 6, 10, 8, 10, 7) for m in ("text", "vision", "audio")}},
    "unaligned": {"lengths": {"text": 10, "vision": 11, "audio": 17},
                  "real": {"text": (10, 7, 10, 5, 10, 8), "vision": (11, 6, 9, 11, 4, 8),
                           "audio": (17, 10, 5, 13, 17, 9)}},
}
TRANSFORMERS = ("self_attentions_c_l", "self_attentions_c_v", "self_attentions_c_a",
                "trans_l_with_a", "trans_l_with_v", "trans_a_with_l", "trans_a_with_v",
                "trans_v_with_l", "trans_v_with_a", "trans_l_mem", "trans_a_mem", "trans_v_mem")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dmd", required=True, help="a checkout of the DMD code (has trains/, run.py)")
  p.add_argument("--out", default=str(REPO / "tests" / "fixtures"),
                 help="folder for dmd_reference_<config>.npz (default: tests/fixtures/)")
  p.add_argument("--configs", default=",".join(CONFIGS),
                 help=f"comma-separated subset of {', '.join(CONFIGS)}")
  p.add_argument("--seed", type=int, default=0,
                 help="weights and batch (0, the default, makes the committed fixtures)")
  return p.parse_args(argv)


def make_args(aligned):
  """What `config.get_config_regression` + `run.py` give the model, at the tiny sizes."""
  return Args(
      model_name="dmd", dataset_name="tiny", train_mode="regression", use_bert=False,
      use_finetune=False, need_data_aligned=aligned, attn_mask=True,
      feature_dims=[FEATURE_DIMS["text"], FEATURE_DIMS["audio"], FEATURE_DIMS["vision"]],
      dst_feature_dim_nheads=[D_MODEL, NUM_HEADS], nlevels=NUM_LAYERS,
      conv1d_kernel_size_l=KERNELS["l"], conv1d_kernel_size_a=KERNELS["a"],
      conv1d_kernel_size_v=KERNELS["v"], grad_clip=0.6, is_distill=True, **DROPOUTS)


def build_models(ref, args, lengths):
  """run.py `_run`: the DMD model and the homo / hetero GD-Units (gd sizes shrunk)."""

  class _TinyDMD(ref.dmd.DMD):
    # `DMD.__init__` sets len_l/len_v/len_a only for dataset names mosi/mosei (their 50/500/375
    # lengths); for any other name these class attributes are what it reads.
    len_l, len_v, len_a = lengths["text"], lengths["vision"], lengths["audio"]

  return dmd_reference.build_models(ref, args, model_class=_TinyDMD,
                                    gd_sizes={"homo": GD_SIZE_HOMO, "hetero": GD_SIZE_HETERO})


def randomise_biases_and_norms(models, generator):
  import torch  # pylint: disable=import-outside-toplevel
  with torch.no_grad():
    for model in models:
      for name, p in model.named_parameters():
        if "layer_norm" in name and name.endswith("weight"):
          p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))
        elif name.endswith("bias"):
          p.copy_(0.2 * torch.randn(p.shape, generator=generator))


def make_batch(spec, rng):
  batch = {}
  for m in ("text", "vision", "audio"):
    x = rng.standard_normal((len(LABELS), spec["lengths"][m], FEATURE_DIMS[m]))
    for b, n in enumerate(spec["real"][m]):
      x[b, n:] = 0.0  # zero padding, as in the MMSA pickles
    batch[m] = x.astype(np.float32)
  batch["label"] = np.asarray(LABELS, np.float32)
  return batch


def margin_stats(labels, feats):
  """(triplets, active) of the margin loss, to show the fixture's margin loss is non-trivial."""
  y = np.repeat(labels, 3)
  norm = np.maximum(np.sqrt((feats ** 2).sum(1) + 1e-8), 1e-8)
  cos = feats @ feats.T / np.outer(norm, norm)
  same = y[:, None] == y[None, :]
  pos, neg = same & ~np.eye(len(y), dtype=bool), ~same
  hinge = 0.15 * np.abs(y[:, None, None] - y[None, None, :]) - cos[:, :, None] + cos[:, None, :]
  mask = pos[:, :, None] & neg[:, None, :]
  return int(mask.sum()), int((mask & (hinge > 0)).sum())


def make_fixture(ref, ref_dir, name, spec, seed=0):
  """(arrays, meta) of one configuration. Seed 0 makes the committed fixtures; another seed
  other weights and another batch (`compare_with_dmd.py` checks parity with those)."""
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(seed)
  generator = torch.Generator().manual_seed(seed + 1)
  args = make_args(aligned=name == "aligned")
  models = build_models(ref, args, spec["lengths"])
  randomise_biases_and_norms(models, generator)
  for model in models:
    model.eval()  # no dropout
  trainer = ref.trainer.DMD(Args(args, dataset_name="mosei"))  # metrics are picked by name
  trainer.cosine = dmd_reference.torch19_cosine_embedding_loss

  sequences, edge_scores = {}, {"homo": [], "hetero": []}
  for t in TRANSFORMERS:
    getattr(models[0], t).register_forward_hook(
        lambda mod, inp, out, t=t: sequences.__setitem__(t, out))
  for space, unit in (("homo", models[1]), ("hetero", models[2])):
    unit.W_edge.register_forward_hook(lambda mod, inp, out, s=space: edge_scores[s].append(out))

  batch = make_batch(spec, np.random.default_rng(seed + 2))
  output, loss, gd = dmd_reference.run_training_step(models, trainer, batch)
  loss["combined"].backward()

  arrays = {f"batch/{k}": v for k, v in batch.items()}
  named = {"dmd": models[0], "homo": models[1], "hetero": models[2]}
  for prefix, model in named.items():
    for pname, p in model.named_parameters():  # buffers (`version`, `_float_tensor`) hold no state
      arrays[f"param/{prefix}/{pname}"] = p.detach().numpy().copy()
      # proj_cosine_* feeds no loss: no gradient there (zero).
      grad = torch.zeros_like(p) if p.grad is None else p.grad
      arrays[f"grad/{prefix}/{pname}"] = grad.numpy().copy()
  arrays.update({f"out/{k}": v.detach().numpy() for k, v in output.items()})
  arrays.update({f"seq/{k}": v.detach().numpy() for k, v in sequences.items()})
  arrays.update({f"gd/{k}": v.detach().numpy() for k, v in gd.items()})
  for space, scores in edge_scores.items():  # the six W_edge calls, (B, 1) each, in edge order
    arrays[f"gd/{space}_edge_scores"] = torch.cat(scores, dim=1).detach().numpy()
  arrays.update({f"loss/{k}": np.float32(v.item()) for k, v in loss.items()})

  feats = np.stack([output[f"c_{m}_sim"].detach().numpy() for m in "lva"], 1).reshape(-1, D_MODEL)
  triplets, active = margin_stats(batch["label"], feats)
  pe_padding = sum(int((output[f"{k}_{m}"][..., 0] == 0).sum()) for k in "sc" for m in "lva")
  meta = {
      "config": name, "d_model": D_MODEL, "num_heads": NUM_HEADS, "nlevels": NUM_LAYERS,
      "conv_kernel": {"text": KERNELS["l"], "vision": KERNELS["v"], "audio": KERNELS["a"]},
      "feature_dims": FEATURE_DIMS, "seq_lens": spec["lengths"], "real_lengths": spec["real"],
      "gd_size": {"homo": GD_SIZE_HOMO, "hetero": GD_SIZE_HETERO}, "dropouts": DROPOUTS,
      "margin_triplets": triplets, "margin_triplets_active": active,
      "zero_first_channel_frames": pe_padding,
      "reference": "github.com/mdswyz/DMD",
      "reference_sha256": dmd_reference.fingerprint(ref_dir),
      "versions": {"torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
  }
  arrays["meta"] = np.array(json.dumps(meta, sort_keys=True))
  return arrays, meta


def save(path, arrays):
  """One float32 vector, the metadata and a JSON index {key: [shape, offset]}: hundreds of small
  npz members would cost more than the numbers themselves."""
  index, floats, offset = {}, [], 0
  for key, value in arrays.items():
    if key == "meta":
      continue
    value = np.asarray(value, np.float32)
    index[key] = [list(value.shape), offset]
    floats.append(value.ravel())
    offset += value.size
  np.savez_compressed(path, meta=arrays["meta"], index=np.array(json.dumps(index)),
                      floats=np.concatenate(floats))


def load(path):
  """(meta, {key: array}) of a file `save` wrote."""
  with np.load(path) as z:
    meta = json.loads(str(z["meta"]))
    index = json.loads(str(z["index"]))
    floats = z["floats"]
  arrays = {key: floats[offset:offset + int(np.prod(shape))].reshape(shape)
            for key, (shape, offset) in index.items()}
  return meta, arrays


def main(argv=None):
  opts = parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  ref_dir = pathlib.Path(opts.dmd).resolve()
  ref = dmd_reference.import_reference(ref_dir, prog="make_dmd_fixture.py")
  out_dir = pathlib.Path(opts.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in opts.configs.split(","):
    if name not in CONFIGS:
      sys.exit(f"make_dmd_fixture.py: unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    arrays, meta = make_fixture(ref, ref_dir, name, CONFIGS[name], opts.seed)
    path = out_dir / f"dmd_reference_{name}.npz"
    save(path, arrays)
    print(f"{path}: {path.stat().st_size:,} bytes, {len(arrays)} arrays; combined loss "
          f"{float(arrays['loss/combined']):.6f}; margin triplets {meta['margin_triplets']} "
          f"({meta['margin_triplets_active']} active); frames with a zero first channel "
          f"(zero PE) {meta['zero_first_channel_frames']}")


if __name__ == "__main__":
  main()
