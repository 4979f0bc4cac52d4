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
lengths T' = 8/10/17 per modality); both have zero-padded frames. Only this script needs torch
(and scikit-learn and tqdm, which the reference's package imports); `tests/test_dmd_reference.py`
reads the files with NumPy and compares the JAX model to them. Regenerate with

  python tools/make_dmd_fixture.py --dmd=PATH/TO/DMD-checkout --out=tests/fixtures/

What is changed in the reference to run it here, at run time only (nothing on disk):
  * `torch.Tensor.cuda` returns the tensor itself (the reference hard-codes `.cuda()` in the
    GD-Units' priors and in its loss targets; this runs on the CPU).
  * `transformers` is replaced by an empty stand-in (the reference's package imports it for its
    BERT text encoder, which `use_bert=False` never builds) and `pynvml` by one when absent (used
    only to pick a GPU).
  * The orthogonality loss passes (T', B, d) tensors to `CosineEmbeddingLoss`, which PyTorch
    >= 1.10 rejects; it is computed with the kernel of PyTorch 1.9, the version DMD declares
    (`torch19_cosine_embedding_loss`).
  * The flatten-Linears' sequence lengths, which the reference hard-codes per dataset name
    (50/50/50, 50/500/375, ...), are the tiny ones here (`_TinyDMD`).
  * Every bias and LayerNorm parameter is redrawn at random (the reference initialises them to
    0 and 1, under which a misplaced bias or LayerNorm would not show); weights keep the
    reference's initialisation.
"""

import argparse
import hashlib
import json
import pathlib
import platform
import sys
import types
import warnings

import numpy as np

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
REF_FILES = ("trains/singleTask/DMD.py", "trains/singleTask/model/dmd.py",
             "trains/singleTask/HingeLoss.py", "trains/singleTask/misc.py",
             "trains/singleTask/distillnets/get_distillation_kernel.py",
             "trains/singleTask/distillnets/get_distillation_kernel_homo.py",
             "trains/singleTask/utils/misc.py",
             "trains/subNets/transformers_encoder/transformer.py",
             "trains/subNets/transformers_encoder/multihead_attention.py",
             "trains/subNets/transformers_encoder/position_embedding.py", "run.py")


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--dmd", required=True, help="a checkout of the DMD code (has trains/, run.py)")
  p.add_argument("--out", default=str(REPO / "tests" / "fixtures"),
                 help="folder for dmd_reference_<config>.npz (default: tests/fixtures/)")
  p.add_argument("--configs", default=",".join(CONFIGS),
                 help=f"comma-separated subset of {', '.join(CONFIGS)}")
  return p.parse_args(argv)


def fingerprint(ref_dir):
  """sha256 over the reference files this script runs (which version made the fixture)."""
  h = hashlib.sha256()
  for name in REF_FILES:
    h.update(name.encode() + b"\0" + (ref_dir / name).read_bytes())
  return h.hexdigest()


def import_reference(ref_dir):
  """The reference's modules, with the run-time stand-ins of the module docstring."""
  import torch  # pylint: disable=import-outside-toplevel

  missing = [n for n in REF_FILES if not (ref_dir / n).is_file()]
  if missing:
    sys.exit(f"make_dmd_fixture.py: {ref_dir} is not a DMD checkout (no {missing[0]}); pass "
             f"--dmd=<folder with trains/ and run.py>")
  torch.Tensor.cuda = lambda self, *args, **kwargs: self
  # position_embedding.make_positions grows its cached arange with `out=`; newer torch warns.
  warnings.filterwarnings("ignore", message="The number of elements in the out tensor")
  stand_in = types.ModuleType("transformers")
  for name in ("BertModel", "BertTokenizer", "RobertaModel", "RobertaTokenizer"):
    setattr(stand_in, name, None)
  sys.modules["transformers"] = stand_in
  try:
    import pynvml  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    sys.modules["pynvml"] = types.ModuleType("pynvml")
  sys.path.insert(0, str(ref_dir))
  import importlib  # pylint: disable=import-outside-toplevel
  names = {"dmd": "trains.singleTask.model.dmd", "trainer": "trains.singleTask.DMD",
           "misc": "trains.singleTask.misc",
           "gd_homo": "trains.singleTask.distillnets.get_distillation_kernel_homo",
           "gd_hetero": "trains.singleTask.distillnets.get_distillation_kernel"}
  return types.SimpleNamespace(**{k: importlib.import_module(v) for k, v in names.items()})


def torch19_cosine_embedding_loss(input1, input2, target, margin=0.0):
  """`cosine_embedding_loss` of PyTorch 1.9 (reduction "mean"), op for op as its ATen kernel:
  it reduces over dim `target.dim()`, which for the reference's 1-element target and (T', B, d)
  tensors is the batch axis, and averages over what is left."""
  import torch  # pylint: disable=import-outside-toplevel
  eps = 1e-12
  dim = target.dim()
  prod_sum = (input1 * input2).sum(dim)
  mag_square1 = (input1 * input1).sum(dim) + eps
  mag_square2 = (input2 * input2).sum(dim) + eps
  cos = prod_sum / (mag_square1 * mag_square2).sqrt()
  zeros = torch.zeros_like(cos)
  pos = 1 - cos
  neg = (cos - margin).clamp_min(0)
  output_pos = torch.where(target == 1, pos, zeros)
  output_neg = torch.where(target == -1, neg, zeros)
  return (output_pos + output_neg).mean()


class Args(dict):
  """EasyDict stand-in: the reference reads its config as attributes."""

  def __getattr__(self, key):
    try:
      return self[key]
    except KeyError as e:
      raise AttributeError(key) from e

  def __setattr__(self, key, value):
    self[key] = value


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

  softmax = ref.misc.softmax
  common = dict(n_classes=1, to_idx=[0, 1, 2], from_idx=[0, 1, 2], gd_reg=10,
                w_losses=[1, 10], metric="l1", alpha=1 / 8, hyp_params=args)
  homo = ref.gd_homo.DistillationKernel(
      hidden_size=D_MODEL, gd_size=GD_SIZE_HOMO, gd_prior=softmax([0, 0, 1, 0, 1, 0], 0.25),
      **common)
  hetero = ref.gd_hetero.DistillationKernel(
      hidden_size=2 * D_MODEL, gd_size=GD_SIZE_HETERO,
      gd_prior=softmax([0, 0, 1, 0, 1, 1], 0.25), **common)
  return [_TinyDMD(args), homo, hetero]


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


def run_training_step(models, trainer, batch):
  """The body of `DMD.do_train`'s batch loop on one batch (eval mode), up to `backward()`.

  Returns (output dict, {loss name: scalar tensor}, GD tensors); the statements and their order
  are the reference's.
  """
  import torch  # pylint: disable=import-outside-toplevel
  model = models
  vision = torch.from_numpy(batch["vision"])
  audio = torch.from_numpy(batch["audio"])
  text = torch.from_numpy(batch["text"])
  labels = torch.from_numpy(batch["label"]).view(-1, 1)

  output = model[0](text, audio, vision, is_distill=True)
  logits_homo = torch.stack([output[f"logits_{m}_homo"] for m in "lva"])
  reprs_homo = torch.stack([output[f"repr_{m}_homo"] for m in "lva"])
  logits_hetero = torch.stack([output[f"logits_{m}_hetero"] for m in "lva"])
  reprs_hetero = torch.stack([output[f"repr_{m}_hetero"] for m in "lva"])
  edges_homo, edges_origin_homo = model[1](logits_homo, reprs_homo)
  edges_hetero, edges_origin_hetero = model[2](logits_hetero, reprs_hetero)

  loss = {}
  for name, key in (("task_all", "output_logit"), ("task_l_homo", "logits_l_homo"),
                    ("task_v_homo", "logits_v_homo"), ("task_a_homo", "logits_a_homo"),
                    ("task_l_hetero", "logits_l_hetero"), ("task_v_hetero", "logits_v_hetero"),
                    ("task_a_hetero", "logits_a_hetero"), ("task_c", "logits_c")):
    loss[name] = trainer.criterion(output[key], labels)
  loss["task"] = (loss["task_all"] + loss["task_l_homo"] + loss["task_v_homo"]
                  + loss["task_a_homo"] + loss["task_l_hetero"] + loss["task_v_hetero"]
                  + loss["task_a_hetero"] + loss["task_c"])
  for m in "lva":
    loss[f"recon_{m}"] = trainer.MSE(output[f"recon_{m}"], output[f"origin_{m}"])
  loss["recon"] = loss["recon_l"] + loss["recon_v"] + loss["recon_a"]
  for m in "lva":
    loss[f"s_sr_{m}"] = trainer.MSE(output[f"s_{m}"].permute(1, 2, 0), output[f"s_{m}_r"])
  loss["s_sr"] = loss["s_sr_l"] + loss["s_sr_v"] + loss["s_sr_a"]
  for m in "lva":
    loss[f"ort_{m}"] = trainer.cosine(output[f"s_{m}"], output[f"c_{m}"],
                                      torch.tensor([-1]).cuda()).mean(0)
  loss["ort"] = loss["ort_l"] + loss["ort_v"] + loss["ort_a"]

  c_l, c_v, c_a = output["c_l_sim"], output["c_v_sim"], output["c_a_sim"]
  ids, feats = [], []
  for i in range(labels.size(0)):
    feats.append(c_l[i].view(1, -1))
    feats.append(c_v[i].view(1, -1))
    feats.append(c_a[i].view(1, -1))
    ids.append(labels[i].view(1, -1))
    ids.append(labels[i].view(1, -1))
    ids.append(labels[i].view(1, -1))
  loss["sim"] = trainer.sim_loss(torch.cat(ids, dim=0), torch.cat(feats, dim=0))

  loss["reg_homo"], loss["logit_homo"], loss["repr_homo"] = \
      model[1].distillation_loss(logits_homo, reprs_homo, edges_homo)
  loss["gd_homo"] = 0.05 * (loss["logit_homo"] + loss["reg_homo"])  # repr_homo: not added
  loss["reg_hetero"], loss["logit_hetero"], loss["repr_hetero"] = \
      model[2].distillation_loss(logits_hetero, reprs_hetero, edges_hetero)
  loss["gd_hetero"] = 0.05 * (loss["logit_hetero"] + loss["repr_hetero"] + loss["reg_hetero"])
  loss["combined"] = loss["task"] + loss["gd_homo"] + loss["gd_hetero"] + \
      (loss["s_sr"] + loss["recon"] + (loss["sim"] + loss["ort"]) * 0.1) * 0.1
  gd = {"homo_edges": edges_homo, "homo_edges_origin": edges_origin_homo,
        "hetero_edges": edges_hetero, "hetero_edges_origin": edges_origin_hetero}
  return output, loss, gd


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


def make_fixture(ref, ref_dir, name, spec):
  import torch  # pylint: disable=import-outside-toplevel
  torch.manual_seed(0)
  generator = torch.Generator().manual_seed(1)
  args = make_args(aligned=name == "aligned")
  models = build_models(ref, args, spec["lengths"])
  randomise_biases_and_norms(models, generator)
  for model in models:
    model.eval()  # no dropout
  trainer = ref.trainer.DMD(Args(args, dataset_name="mosei"))  # metrics are picked by name
  trainer.cosine = torch19_cosine_embedding_loss

  sequences, edge_scores = {}, {"homo": [], "hetero": []}
  for t in TRANSFORMERS:
    getattr(models[0], t).register_forward_hook(
        lambda mod, inp, out, t=t: sequences.__setitem__(t, out))
  for space, unit in (("homo", models[1]), ("hetero", models[2])):
    unit.W_edge.register_forward_hook(lambda mod, inp, out, s=space: edge_scores[s].append(out))

  batch = make_batch(spec, np.random.default_rng(2))
  output, loss, gd = run_training_step(models, trainer, batch)
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
      "reference": "github.com/mdswyz/DMD", "reference_sha256": fingerprint(ref_dir),
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


def main(argv=None):
  opts = parse_args(argv)
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(1)
  ref_dir = pathlib.Path(opts.dmd).resolve()
  ref = import_reference(ref_dir)
  out_dir = pathlib.Path(opts.out)
  out_dir.mkdir(parents=True, exist_ok=True)
  for name in opts.configs.split(","):
    if name not in CONFIGS:
      sys.exit(f"make_dmd_fixture.py: unknown config {name!r}; choose from {', '.join(CONFIGS)}")
    arrays, meta = make_fixture(ref, ref_dir, name, CONFIGS[name])
    path = out_dir / f"dmd_reference_{name}.npz"
    save(path, arrays)
    print(f"{path}: {path.stat().st_size:,} bytes, {len(arrays)} arrays; combined loss "
          f"{float(arrays['loss/combined']):.6f}; margin triplets {meta['margin_triplets']} "
          f"({meta['margin_triplets_active']} active); frames with a zero first channel "
          f"(zero PE) {meta['zero_first_channel_frames']}")


if __name__ == "__main__":
  main()
