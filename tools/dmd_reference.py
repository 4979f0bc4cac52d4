"""The official DMD code (github.com/mdswyz/DMD, CVPR 2023) run from a checkout, for two tools.

`tools/make_dmd_fixture.py` runs it on a tiny model to write the parity fixtures, and
`tools/compare_with_dmd.py` runs it to check parity with fresh weights and to time its training
step beside ours. Both need what this module holds: the checkout's files, its modules imported
with the run-time stand-ins below, its configuration object, its model and GD-Units built as its
`run.py` builds them, and the body of its training loop (`trains/singleTask/DMD.py`,
`DMD.do_train`) statement for statement. Run as a script, it times that training step at MOSEI
sizes on batches from a `.npz` file (what `compare_with_dmd.py --mode=speed` starts it for):

  python tools/dmd_reference.py --dmd=PATH/TO/DMD-checkout --data=POOL.npz --layout=aligned \
      --batch=16 --update_epochs=1 --warmup=2 --steps=10 --threads=2 --json=OUT.json

Importing this module needs NumPy only; torch (with scikit-learn and tqdm, which the
reference's package imports) is imported where the reference runs.

What is changed in the reference to run it here, at run time only (nothing on disk):
  * `torch.Tensor.cuda` returns the tensor itself (the reference hard-codes `.cuda()` in the
    GD-Units' priors and in its loss targets; this runs on the CPU).
  * `transformers` is replaced by an empty stand-in (the reference's package imports it for its
    BERT text encoder, which `use_bert=False` never builds) and `pynvml` by one when absent (used
    only to pick a GPU).
  * The orthogonality loss passes (T', B, d) tensors to `CosineEmbeddingLoss`, which PyTorch
    >= 1.10 rejects; it is computed with the kernel of PyTorch 1.9, the version DMD declares
    (`torch19_cosine_embedding_loss`).
"""

import argparse
import hashlib
import json
import pathlib
import platform
import statistics
import sys
import time
import types
import warnings

import numpy as np

# The files the reference runs (their sha256 names the version that made a fixture).
REF_FILES = ("trains/singleTask/DMD.py", "trains/singleTask/model/dmd.py",
             "trains/singleTask/HingeLoss.py", "trains/singleTask/misc.py",
             "trains/singleTask/distillnets/get_distillation_kernel.py",
             "trains/singleTask/distillnets/get_distillation_kernel_homo.py",
             "trains/singleTask/utils/misc.py",
             "trains/subNets/transformers_encoder/transformer.py",
             "trains/subNets/transformers_encoder/multihead_attention.py",
             "trains/subNets/transformers_encoder/position_embedding.py", "run.py")
CONFIG_FILE = "config/config.json"  # the MOSEI hyper-parameters (timing only)
# run.py `_run`, is_distill branch: the GD-Units' hidden sizes, homo ("low") and hetero ("high").
GD_SIZES = {"homo": 64, "hetero": 32}


def checkout_problem(ref_dir, *, need_config=False):
  """None for a DMD checkout, else one line saying what is missing."""
  ref_dir = pathlib.Path(ref_dir)
  if not ref_dir.is_dir():
    return f"{ref_dir} does not exist; pass --dmd=<a checkout of github.com/mdswyz/DMD>"
  names = REF_FILES + ((CONFIG_FILE,) if need_config else ())
  missing = [n for n in names if not (ref_dir / n).is_file()]
  if missing:
    return (f"{ref_dir} is not a DMD checkout (no {missing[0]}); pass --dmd=<a checkout of "
            f"github.com/mdswyz/DMD, the folder with trains/ and run.py>")
  return None


def fingerprint(ref_dir):
  """sha256 over the reference files this module runs (which version ran)."""
  h = hashlib.sha256()
  for name in REF_FILES:
    h.update(name.encode() + b"\0" + (pathlib.Path(ref_dir) / name).read_bytes())
  return h.hexdigest()


def import_reference(ref_dir, prog="dmd_reference.py"):
  """The reference's modules, with the run-time stand-ins of the module docstring."""
  import torch  # pylint: disable=import-outside-toplevel

  problem = checkout_problem(ref_dir)
  if problem:
    sys.exit(f"{prog}: {problem}")
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


def mosei_args(ref_dir, aligned):
  """What `config.get_config_regression("dmd", "mosei")` + `run.py` give the model, read from
  the checkout's config.json, with precomputed 768-d text features (`use_bert` off)."""
  with open(pathlib.Path(ref_dir) / CONFIG_FILE, encoding="utf-8") as f:
    config = json.load(f)
  args = Args(model_name="dmd", dataset_name="mosei")
  args.update(config["datasetCommonParams"]["mosei"]["aligned" if aligned else "unaligned"])
  args.update(config["dmd"]["commonParams"])
  args.update(config["dmd"]["datasetParams"]["mosei"])
  args.update(need_data_aligned=aligned, use_bert=False, use_finetune=False,
              train_mode="regression", device="cpu", is_distill=True, mode="train")
  return args


def build_models(ref, args, *, model_class=None, gd_sizes=None):
  """run.py `_run`: [the DMD model, the homo GD-Unit, the hetero GD-Unit].

  `model_class` replaces `ref.dmd.DMD` (a subclass with other sequence lengths), `gd_sizes`
  the GD-Units' hidden sizes {"homo": g, "hetero": g}.
  """
  gd_sizes = gd_sizes or GD_SIZES
  d_model = args.dst_feature_dim_nheads[0]
  softmax = ref.misc.softmax
  common = dict(n_classes=1, to_idx=[0, 1, 2], from_idx=[0, 1, 2], gd_reg=10,
                w_losses=[1, 10], metric="l1", alpha=1 / 8, hyp_params=args)
  homo = ref.gd_homo.DistillationKernel(
      hidden_size=d_model, gd_size=gd_sizes["homo"],
      gd_prior=softmax([0, 0, 1, 0, 1, 0], 0.25), **common)
  hetero = ref.gd_hetero.DistillationKernel(
      hidden_size=2 * d_model, gd_size=gd_sizes["hetero"],
      gd_prior=softmax([0, 0, 1, 0, 1, 1], 0.25), **common)
  return [(model_class or ref.dmd.DMD)(args), homo, hetero]


def run_training_step(models, trainer, batch):
  """The body of `DMD.do_train`'s batch loop on one batch, up to `backward()`.

  `batch` holds text/vision/audio/label as NumPy arrays or tensors. Returns (output dict,
  {loss name: scalar tensor}, GD tensors); the statements and their order are the reference's.
  """
  import torch  # pylint: disable=import-outside-toplevel
  model = models
  vision = torch.as_tensor(batch["vision"])
  audio = torch.as_tensor(batch["audio"])
  text = torch.as_tensor(batch["text"])
  labels = torch.as_tensor(batch["label"]).view(-1, 1)

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


# ---------------------------------------------------------------- timing the training step


def parse_args(argv=None):
  p = argparse.ArgumentParser(description="Times the DMD code's training step at MOSEI sizes.")
  p.add_argument("--dmd", required=True, help="a checkout of the DMD code")
  p.add_argument("--data", required=True,
                 help=".npz with text/vision/audio/label arrays (the pool batches come from)")
  p.add_argument("--layout", choices=["aligned", "unaligned"], required=True)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--update_epochs", type=int, default=1,
                 help="micro-batches per Adam step (the DMD protocol: 10)")
  p.add_argument("--warmup", type=int, default=1, help="untimed steps first")
  p.add_argument("--steps", type=int, default=2, help="timed steps")
  p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
  p.add_argument("--seed", type=int, default=1111, help="weights and batch order")
  p.add_argument("--json", default="", help="write the result here")
  return p.parse_args(argv)


def time_training_step(opts):
  """Times `opts.steps` optimizer updates (after `opts.warmup`) of the reference's training
  loop: per micro-batch `run_training_step`, `backward`, `clip_grad_value_`, `.item()`; Adam
  after every `update_epochs` micro-batches, gradients zeroed before the first (as do_train)."""
  import torch  # pylint: disable=import-outside-toplevel
  if opts.threads > 0:
    torch.set_num_threads(opts.threads)
  ref_dir = pathlib.Path(opts.dmd).resolve()
  ref = import_reference(ref_dir)
  torch.manual_seed(opts.seed)
  np.random.seed(opts.seed)
  args = mosei_args(ref_dir, aligned=opts.layout == "aligned")
  models = build_models(ref, args)
  trainer = ref.trainer.DMD(args)  # L1 criterion, MSE, the HingeLoss margin loss as shipped
  trainer.cosine = torch19_cosine_embedding_loss
  params = [p for model in models for p in model.parameters()]
  optimizer = torch.optim.Adam(params, lr=args.learning_rate)  # do_train: no weight decay
  for model in models:
    model.train()
  with np.load(opts.data) as z:
    pool = {k: torch.from_numpy(np.ascontiguousarray(z[k]))
            for k in ("text", "vision", "audio", "label")}
  num = len(pool["label"])
  rng = np.random.default_rng(opts.seed)
  order, pos = None, num

  def next_batch():  # a fresh permutation per pass over the pool, as a shuffling loader
    nonlocal order, pos
    if pos + opts.batch > num:
      order, pos = torch.from_numpy(rng.permutation(num)), 0
    idx = order[pos:pos + opts.batch]
    pos += opts.batch
    return {k: v.index_select(0, idx) for k, v in pool.items()}

  times, losses = [], []
  for _ in range(opts.warmup + opts.steps):
    start = time.perf_counter()
    optimizer.zero_grad()
    for _ in range(opts.update_epochs):
      _, loss, _ = run_training_step(models, trainer, next_batch())
      loss["combined"].backward()
      if args.grad_clip != -1.0:
        torch.nn.utils.clip_grad_value_(params, args.grad_clip)
      losses.append(loss["combined"].item())
    optimizer.step()
    times.append(time.perf_counter() - start)
  if not np.all(np.isfinite(losses)):
    sys.exit(f"dmd_reference.py: non-finite loss {losses}")
  timed = times[opts.warmup:]
  return {
      "ms_per_step": 1e3 * statistics.fmean(timed), "step_ms": [1e3 * t for t in timed],
      "layout": opts.layout, "batch": opts.batch, "micro_batches": opts.update_epochs,
      "threads": torch.get_num_threads(), "params": sum(p.numel() for p in params),
      "first_loss": losses[0], "last_loss": losses[-1],
      "reference_sha256": fingerprint(ref_dir),
      "versions": {"torch": torch.__version__, "numpy": np.__version__,
                   "python": platform.python_version()},
  }


def main(argv=None):
  opts = parse_args(argv)
  result = time_training_step(opts)
  print(f"DMD code, MOSEI {opts.layout}, batch {opts.batch} x {opts.update_epochs}: "
        f"{result['ms_per_step']:.1f} ms/step over {opts.steps} steps")
  if opts.json:
    with open(opts.json, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
