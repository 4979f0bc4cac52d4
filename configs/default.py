"""The configuration schema: every field dhmd-jax reads is declared here, once, with a comment.

Dataset configs (`mosei.py`, `mosi.py`, ...) import `get_config()` and change a few fields; library
code reads `config.x` and never `config.get("x", default)`, so a typo in an override fails loudly.

Defaults follow the public DMD code for everything DHMD inherits from DMD and the DHMD paper for
dictionary matching, which has no public code. Every place where the paper and the DMD code
differ is one named field; docs/fidelity.md lists them, with both behaviours and the default.
"""

import ml_collections

from dhmd_jax.validation import Bool
from dhmd_jax.validation import Int
from dhmd_jax.validation import OneOf
from dhmd_jax.validation import Real
from dhmd_jax.validation import Seeds
from dhmd_jax.validation import Text


def get_config():
  config = ml_collections.ConfigDict()

  # ---------------------------------------------------------------- data
  config.dataset = ml_collections.ConfigDict()
  # One of mosi, mosei, sims, urfunny, mustard, synthetic. Selects the metrics and label range.
  config.dataset.name = "synthetic"
  # File layout: "mmsa" (aligned_50.pkl / unaligned_50.pkl / unaligned_39.pkl) or
  # "multibench" (MulT / MultiBench pickles with `labels`). Synthetic data is written in this
  # layout too (as with synthetic.layout: either one set to "multibench" selects it).
  config.dataset.format = "mmsa"
  # Path of the feature pickle. Empty for the synthetic dataset (written into the workdir).
  config.dataset.path = ""
  # Folder for the .npy cache made on first load. Empty: `<path>.cache` beside the pickle, or,
  # when that folder is not writable, ~/.cache/dhmd_jax/features/<name>-<path hash>-<file hash>.
  config.dataset.cache_dir = ""
  # What to do with -inf/NaN features: "zero" replaces them by 0 (as MMSA does) and counts them;
  # "error" refuses the file.
  config.dataset.nonfinite = "zero"
  # Rebuild the .npy cache when it no longer matches its pickle (otherwise such a cache stops
  # the run with a message).
  config.dataset.rebuild_cache = False
  # "regression" (sentiment in [-3, 3] or [-1, 1]) or "binary" (UR-FUNNY, MUStARD: labels 0/1).
  config.dataset.task = "regression"
  # Synthetic data (used when name == "synthetic"): the dataset whose shapes it imitates
  # ("mosi", "mosei", "sims"; "urfunny", "mustard" with task "binary"), aligned or not, the
  # layout ("mmsa" or "multibench", see format), split sizes and the generator seed.
  config.dataset.synthetic = ml_collections.ConfigDict()
  config.dataset.synthetic.like = "mosei"
  config.dataset.synthetic.aligned = True
  config.dataset.synthetic.layout = "mmsa"
  config.dataset.synthetic.num_train = 1024
  config.dataset.synthetic.num_valid = 256
  config.dataset.synthetic.num_test = 256
  config.dataset.synthetic.seed = 0
  # Vocabulary of the synthetic `text_bert` ids: that of the BERT meant to read them
  # (bert-base-uncased: 30522; the tests' tiny BERT: 128).
  config.dataset.synthetic.text_vocab_size = 30522

  # ---------------------------------------------------------------- model
  config.model = ml_collections.ConfigDict()
  # Text input. "features": the pickle's precomputed `text` (B, T, D) (frozen BERT or GloVe
  # features). "bert": the DMD code's setting: BERT run on the MMSA `text_bert` token ids
  # (B, 3, T) and fine-tuned end to end with everything else (same Adam learning rate, no frozen
  # layers); its last_hidden_state takes the place of `text` (then text_dropout and Conv1d).
  config.model.text_encoder = "features"
  config.model.bert = ml_collections.ConfigDict()
  # Local Hugging Face folder of the BERT (config.json + model.safetensors), e.g. bert-base-uncased
  # as the DMD code uses; read with the safetensors NumPy API, never downloaded.
  config.model.bert.path = ""
  # "checkpoint": architecture from <path>/config.json, every seed starts from
  # <path>/model.safetensors (the reference). "random": no files, the architecture below randomly
  # initialised (benchmarks only: not the paper's setting).
  config.model.bert.init = "checkpoint"
  # Architecture for init="random" (bert-base-uncased's); with "checkpoint", config.json decides.
  config.model.bert.random_arch = ml_collections.ConfigDict(dict(
      vocab_size=30522, hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072,
      max_positions=512, type_vocab_size=2, hidden_dropout=0.1, attention_dropout=0.1))
  # "dhmd" (decoupling + both branches) or "mult" (the MulT baseline of Table 8: cross-modal
  # transformers on the projected features, no decoupling, no homogeneous branch).
  config.model.arch = "dhmd"
  # Component switches of Table 6: feature decoupling, cross-modal attention, graph
  # distillation (both GD-Units), dictionary matching (HoDM and HeDM).
  config.model.use_fd = True
  config.model.use_ca = True
  config.model.use_gd = True
  config.model.use_dm = True
  # Common feature width d and attention heads (paper Table 1 "hidden dimension for a CA unit").
  config.model.d_model = 30
  config.model.num_heads = 6
  # Layers of every transformer (nlevels); memory transformers use max(num_layers, 3).
  config.model.num_layers = 4
  # Temporal Conv1d kernel per modality (valid padding). MOSEI: DMD code a=1, paper Table 1 a=3.
  config.model.conv_kernel = ml_collections.ConfigDict(dict(text=5, vision=3, audio=1))
  # Dropout rates, as in the DMD config (MOSEI values here).
  config.model.text_dropout = 0.3  # on the text input features
  config.model.embed_dropout = 0.0  # transformer input
  config.model.attn_dropout = 0.4  # blocks whose source is text, self-attention on c, memory
  config.model.attn_dropout_a = 0.0  # blocks whose source is audio
  config.model.attn_dropout_v = 0.0  # blocks whose source is vision
  config.model.relu_dropout = 0.0
  config.model.res_dropout = 0.0
  config.model.output_dropout = 0.5  # every residual MLP head
  # Causal ("future") mask with the |Tk - Tq| offset in all transformers (DMD code: on).
  config.model.causal_mask = True
  # Speed only: with the causal mask, attention over long sequences is computed in blocks of
  # this many query rows, each over just the keys it can see (sequences up to this length are
  # one block; for unaligned MOSEI on a 2-core CPU each of 32, 64 and 128 steps more than twice
  # as fast as one block; 128 compiles 15-17 s faster than 64 and steps 7-9% slower, 32 compiles
  # longest: docs/performance.md). 0 = one block always. The outputs are the same, and with
  # threefry keys the dropout masks too (each element's draw depends on its coordinates only).
  config.model.attention_query_block = 64
  # Recompute each transformer layer's activations in the backward pass instead of keeping them
  # (jax.checkpoint): the same numbers, less memory for long (unaligned) sequences, more compute.
  # "auto": on when two or more seeds are vmapped (train.seed_compute: their activations sit in
  # memory side by side), off when they run one after another. The unaligned dataset configs
  # set it. (A reference of type object: the field takes a bool or "auto".)
  config.model.remat = ml_collections.FieldReference(False, field_type=object)
  # Speed only: how the stacked transformers (one parameter stack per kind) are computed. "vmap":
  # each kind as one vmapped computation, layers under lax.scan (few, large operations: compiles
  # in seconds; what a GPU wants); "grouped": the same vmapped groups, layers unrolled (compiles
  # in about half the time of "loop", each CPU step slower: docs/performance.md, "Stack
  # computations"); "loop": branch by branch, layers
  # unrolled (the same numbers; the CPU runtime overlaps the independent small operations on its
  # cores); "auto": "loop" on a CPU, "vmap" on GPU/TPU and whenever remat is on (only then does
  # remat bound the memory).
  config.model.stack_compute = "auto"
  # Mask zero-padded frames of unaligned data as attention keys (not in the DMD code; opt-in).
  config.model.key_padding_mask = False
  # DMD code: an extra self-attention transformer over the shared features c_m whose last step
  # feeds the fused head logits_c and the fusion. The paper does not describe it.
  config.model.homo_self_attention = True
  # Fusion: "code" = [sigmoid(W h_l), sigmoid(W h_v), sigmoid(W h_a), sigmoid(W c)] (+ the DM
  # reconstructions when DM is on) -> residual MLP; "paper" = plain concatenation of the
  # GD-reinforced and DM-reconstructed features -> residual MLP.
  config.model.fusion = "code"
  # The DMD code builds proj_cosine_{l,v,a} (flatten-Linear T'd -> d on the private features)
  # and, with BERT, BertModel's pooler, whose outputs no loss uses. Off: not built (identical
  # training, fewer parameters); on: built (the pooler loaded from the checkpoint) so the
  # parameter count equals the reference's exactly.
  config.model.unused_reference_layers = False

  # ---------------------------------------------------------------- graph distillation (GD-Unit)
  config.gd = ml_collections.ConfigDict()
  # Hidden size g of the edge encoder. DMD code: homo 64, hetero 32; paper: 32 for both.
  config.gd.homo_hidden = 64
  config.gd.hetero_hidden = 32
  # Edge encoder input. "embedded" (code): z = [W_logit logit, W_repr repr], e = Linear(4g->1);
  # "raw" (paper Eq. 8): e = FC([logit_i, X_i, logit_j, X_j]).
  config.gd.edge_input = "embedded"
  # Edge weights w = softmax(e / temperature) jointly over the six directed edges, per sample.
  config.gd.temperature = 8.0
  # Prior over edges: "code" (softmax([0,0,1,0,1,0]/.25) homo, softmax([0,0,1,0,1,1]/.25)
  # hetero), "uniform", or "none" (paper). Added to w in the distillation loss when not "none";
  # "none" also turns off the pull towards the prior (reg_weight).
  config.gd.prior = "code"
  # Weight of the pull of the batch-mean edge weights towards the prior (code 10; paper 0).
  config.gd.reg_weight = 10.0
  # Weight of the representation term (code 10). The hetero term is the code's cosine push-apart
  # max(0, cos(r_j, sg r_i)); the homo L1 term is computed by the code but not added.
  config.gd.repr_weight = 10.0
  config.gd.hetero_repr_loss = True
  config.gd.homo_repr_loss = False

  # ---------------------------------------------------------------- dictionary matching (DHMD)
  config.dm = ml_collections.ConfigDict()
  # Dictionary elements K per feature space (paper Table 1).
  config.dm.num_elements = 512
  # Scale of A = Z D^T before max-pooling: "none" (paper) or "sqrt_dim" (FDT's 1/sqrt(C)).
  config.dm.score_scale = "none"
  # Stop gradients from the DM branch into its input features (the svliy/mmsa experiment does).
  config.dm.detach_input = False
  # Margin of L_ctr (Eq. 13).
  config.dm.margin = 0.1

  # ---------------------------------------------------------------- losses
  config.loss = ml_collections.ConfigDict()
  # Task loss: "sum8" (code: L1 of the final output + 3 homo + 3 hetero + logits_c) or "final"
  # (paper: MAE of the final prediction). Binary tasks use cross-entropy in the same places.
  config.loss.task = "sum8"
  # L_rec / L_cyc reduction: "mean" (code: elementwise MSE) or "frobenius" (paper Eq. 2-3:
  # squared Frobenius norm per sample, averaged over the batch).
  config.loss.recon_reduction = "mean"
  # L_ort: "torch19_batch_axis" (code under PyTorch 1.9: max(0, cos) taken across the batch for
  # each (t, channel)), "per_vector" (paper Eq. 5: mean |cos| of each (sample, t) feature
  # vector pair) or "per_vector_hinge" (max(0, cos) per vector: the workaround of mdswyz/DMD's
  # issue 6 for PyTorch >= 1.10).
  config.loss.ort_mode = "torch19_batch_axis"
  # L_mar: "code" (adaptive margin scale*|y_i - y_k|, positives = identical label of any
  # modality, negatives = different label) or "paper" (Eq. 4: fixed margin, positives = same
  # class and other modality, negatives = same modality and other class).
  config.loss.margin_mode = "code"
  config.loss.margin = 0.1  # alpha in Eq. 4 (paper mode)
  config.loss.adaptive_margin_scale = 0.15  # code mode
  # Classes for the paper-mode triplets and L_ctr: "round7" (round(clip(y,-3,3))), "sign"
  # (y > 0), or "exact" (identical float labels). Binary tasks use the label itself.
  config.loss.triplet_classes = "round7"
  # Eq. 14 weights: lambda1 (L_dec), lambda2 (L_dtl), lambda3 (L_dic), gamma inside L_dec.
  config.loss.lambda_dec = 0.1
  config.loss.lambda_dtl = 0.05
  config.loss.lambda_dic = 0.1
  config.loss.gamma = 0.1

  # ---------------------------------------------------------------- training
  config.train = ml_collections.ConfigDict()
  # Seeds trained together in one program with jax.vmap (MMSA convention 1111-1115).
  config.train.seeds = (1111, 1112, 1113, 1114, 1115)
  config.train.batch_size = 16  # samples per micro-batch (per seed)
  config.train.learning_rate = 1e-4  # Adam
  # Gradient accumulation: micro-batches summed per Adam step (code 10), with the running sum
  # clipped to +-grad_clip_value after every micro-batch (code 0.6; <= 0 disables clipping).
  config.train.update_epochs = 10
  config.train.grad_clip_value = 0.6
  # How the micro-batch gradients of one step are computed: "vmap" (all at once, one batched
  # program) or "scan" (one after another, less memory; on a 2-core CPU also 1.31x faster:
  # docs/performance.md); "auto": "scan" on a CPU, "vmap" on a GPU or TPU. Both give the same
  # update up to float rounding.
  config.train.accumulate = "auto"
  # How the seeds (and a sweep's runs) share one program: "vmap" (batched: one large operation
  # per layer for all seeds) or "scan" (one seed after another; on a 2-core CPU faster in
  # training and evaluation, and one seed's activations in memory at a time:
  # docs/performance.md); "auto": "scan" on a CPU, "vmap" on a GPU or TPU. The same numbers up to
  # float rounding.
  config.train.seed_compute = "auto"
  # PRNG of the dropout masks: "threefry" (identical on any number of devices) or "rbg" (XLA's
  # RngBitGenerator: far cheaper per number, which matters for unaligned data's (B, h, T, T)
  # attention-dropout masks; masks then depend on the sharding).
  config.train.dropout_rng = "threefry"
  # ReduceLROnPlateau on the validation MAE (PyTorch semantics, mode min, rel threshold 1e-4).
  config.train.plateau_factor = 0.5
  config.train.plateau_patience = 5
  # Stop a seed after this many epochs without a better validation MAE.
  config.train.early_stop = 10
  # Cap on epochs (paper: 30; the DMD code has no cap).
  config.train.num_epochs = 30
  # At most this many optimizer steps per compiled chunk (one jitted lax.scan, no host sync
  # inside); the progress bar and the non-finite check run between chunks. 0 = whole epoch.
  # Chunks are the longest that divide the epoch (7 steps: 7 chunks of 1), so no step is
  # computed only to be dropped.
  config.train.steps_per_chunk = 4
  # Evaluation batch size per seed (padded; padding never reaches the metrics). All seeds are
  # evaluated at once, so a call holds seeds x this many samples: on a 2-core CPU five seeds
  # evaluate aligned MOSEI faster with 64 than with 256 (docs/performance.md). A GPU may
  # prefer larger batches.
  config.train.eval_batch_size = 64
  # Evaluate the test split every epoch too (as the reference does; never used for selection).
  config.train.eval_test_every_epoch = True
  # Devices of the data-parallel mesh (0 = all local/global devices). Batch sizes must divide.
  config.train.num_devices = 0
  # JAX's persistent compilation cache: a resumed or repeated run skips XLA compilation (minutes
  # on a small CPU). Empty disables it; an already configured jax_compilation_cache_dir wins.
  config.train.compilation_cache_dir = "~/.cache/dhmd_jax/xla"
  # Keep the training arrays on the accelerator when they fit in this many bytes.
  config.train.device_data_limit_bytes = 8 * 2**30

  # ---------------------------------------------------------------- logging
  config.log = ml_collections.ConfigDict()
  # TensorBoard event files in <workdir>/tensorboard (one run per seed).
  config.log.tensorboard = True
  # A progress line on stderr while an epoch trains.
  config.log.progress_bar = True
  # Minimum seconds between progress-bar redraws.
  config.log.progress_interval_s = 2.0

  return config


_DATASETS = ("mosi", "mosei", "sims", "urfunny", "mustard")
_RATE = Real(0.0, 1.0)  # a dropout rate: [0, 1)
_WEIGHT = Real(0.0)  # a loss weight or margin: >= 0

# What each field above may be: the one place a field's type and range are declared. Everything
# else is derived from it (validation, --help, the model's settings); tests/test_validation.py
# fails on a field without a rule or a rule without a field.
RULES = {
    # data
    "dataset.name": OneOf(*_DATASETS, "synthetic"),
    "dataset.format": OneOf("mmsa", "multibench"),
    "dataset.path": Text(),
    "dataset.cache_dir": Text(),
    "dataset.nonfinite": OneOf("zero", "error"),
    "dataset.rebuild_cache": Bool(),
    "dataset.task": OneOf("regression", "binary"),
    "dataset.synthetic.like": OneOf(*_DATASETS),
    "dataset.synthetic.aligned": Bool(),
    "dataset.synthetic.layout": OneOf("mmsa", "multibench"),
    "dataset.synthetic.num_train": Int(1),
    "dataset.synthetic.num_valid": Int(1),
    "dataset.synthetic.num_test": Int(1),
    "dataset.synthetic.seed": Int(0),
    "dataset.synthetic.text_vocab_size": Int(128),
    # model
    "model.text_encoder": OneOf("features", "bert"),
    "model.bert.path": Text(),
    "model.bert.init": OneOf("checkpoint", "random"),
    **{f"model.bert.random_arch.{n}": Int(1) for n in (
        "vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
        "max_positions", "type_vocab_size")},
    "model.bert.random_arch.hidden_dropout": _RATE,
    "model.bert.random_arch.attention_dropout": _RATE,
    "model.arch": OneOf("dhmd", "mult"),
    "model.use_fd": Bool(),
    "model.use_ca": Bool(),
    "model.use_gd": Bool(),
    "model.use_dm": Bool(),
    # >= 4: the sinusoid's frequencies divide by d // 2 - 1.
    "model.d_model": Int(4),
    "model.num_heads": Int(1),
    "model.num_layers": Int(1),
    "model.conv_kernel.text": Int(1),
    "model.conv_kernel.vision": Int(1),
    "model.conv_kernel.audio": Int(1),
    **{f"model.{r}": _RATE for r in (
        "text_dropout", "embed_dropout", "attn_dropout", "attn_dropout_a", "attn_dropout_v",
        "relu_dropout", "res_dropout", "output_dropout")},
    "model.causal_mask": Bool(),
    "model.attention_query_block": Int(0),
    "model.remat": Bool("auto"),
    "model.stack_compute": OneOf("auto", "vmap", "grouped", "loop"),
    "model.key_padding_mask": Bool(),
    "model.homo_self_attention": Bool(),
    "model.fusion": OneOf("code", "paper"),
    "model.unused_reference_layers": Bool(),
    # graph distillation
    "gd.homo_hidden": Int(1),
    "gd.hetero_hidden": Int(1),
    "gd.edge_input": OneOf("embedded", "raw"),
    "gd.temperature": Real(0.0, low_open=True),
    "gd.prior": OneOf("code", "uniform", "none"),
    "gd.reg_weight": _WEIGHT,
    "gd.repr_weight": _WEIGHT,
    "gd.hetero_repr_loss": Bool(),
    "gd.homo_repr_loss": Bool(),
    # dictionary matching
    "dm.num_elements": Int(1),
    "dm.score_scale": OneOf("none", "sqrt_dim"),
    "dm.detach_input": Bool(),
    "dm.margin": _WEIGHT,
    # losses
    "loss.task": OneOf("sum8", "final"),
    "loss.recon_reduction": OneOf("mean", "frobenius"),
    "loss.ort_mode": OneOf("torch19_batch_axis", "per_vector", "per_vector_hinge"),
    "loss.margin_mode": OneOf("code", "paper"),
    "loss.margin": _WEIGHT,
    "loss.adaptive_margin_scale": _WEIGHT,
    "loss.triplet_classes": OneOf("round7", "sign", "exact"),
    "loss.lambda_dec": _WEIGHT,
    "loss.lambda_dtl": _WEIGHT,
    "loss.lambda_dic": _WEIGHT,
    "loss.gamma": _WEIGHT,
    # training
    "train.seeds": Seeds(),
    "train.batch_size": Int(1),
    "train.learning_rate": Real(0.0, low_open=True),
    "train.update_epochs": Int(1),
    "train.grad_clip_value": Real(),
    "train.accumulate": OneOf("auto", "vmap", "scan"),
    "train.seed_compute": OneOf("auto", "vmap", "scan"),
    "train.dropout_rng": OneOf("threefry", "rbg"),
    "train.plateau_factor": Real(0.0, 1.0, low_open=True, high_closed=True),
    "train.plateau_patience": Int(0),
    "train.early_stop": Int(1),
    "train.num_epochs": Int(1),
    "train.steps_per_chunk": Int(0),
    "train.eval_batch_size": Int(1),
    "train.eval_test_every_epoch": Bool(),
    "train.num_devices": Int(0),
    "train.compilation_cache_dir": Text(),
    "train.device_data_limit_bytes": Int(0),
    # logging
    "log.tensorboard": Bool(),
    "log.progress_bar": Bool(),
    "log.progress_interval_s": Real(0.0),
}


# Where the BERT variants of the dataset configs expect the checkpoint folder (docs/bert.md).
BERT_PATH = "data/bert-base-uncased"


def parse_variant(variant, where):
  """`aligned`, `unaligned`, `bert` (= aligned with BERT) or `<aligned|unaligned>,bert` ->
  (layout, use_bert). `where` names the config file in the error."""
  parts = [p.strip() for p in str(variant).split(",")]
  use_bert = "bert" in parts
  layouts = [p for p in parts if p != "bert"] or ["aligned"]
  if len(layouts) != 1 or layouts[0] not in ("aligned", "unaligned") or parts.count("bert") > 1:
    raise ValueError(f"{where}: variant must be 'aligned', 'unaligned', 'bert' or "
                     f"'unaligned,bert', got {variant!r}")
  return layouts[0], use_bert


def long_sequences(config):
  """Unaligned data (375-500 frames): recompute the transformer layers in the backward pass when
  the seeds are vmapped (GPU/TPU), so that five seeds' activations fit in memory; with the seeds
  one after another (a CPU) one seed's fit without, and remat would only cost time
  (docs/performance.md, "Memory of long sequences"). Speed only: the same numbers."""
  config.model.remat = "auto"
  return config


def use_bert(config):
  """The DMD code's text path (use_bert, use_finetune, pretrained bert-base-uncased): BERT on
  the `text_bert` ids, fine-tuned at the same learning rate, its output through text_dropout
  and the Conv1d. Memory only: micro-batch gradients one at a time (a vmapped accumulation would
  hold update_epochs = 10 copies of BERT's 110M-parameter gradient); the same update."""
  config.model.text_encoder = "bert"
  config.model.bert.path = BERT_PATH
  config.model.bert.init = "checkpoint"
  config.train.accumulate = "scan"
  return config
