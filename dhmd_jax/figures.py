"""Draws the paper's analysis figures for a trained workdir, each with the numbers behind it.

  python -m dhmd_jax.figures --workdir=runs/mosei [--split=test] [--compare=runs/mosei-no-dm]
      [--sample=INDEX] [--out=DIR] [--checkpoint=best|latest] [--seed=SEED]

Writes into --out (default <workdir>/analysis), as PNG (matplotlib, Agg) plus CSV/NPZ:

  edges_mean.png/.csv          Figs. 9-10: HoGD and HeGD edge weights averaged over the split's
                               samples, as directed graphs and 3x3 heatmaps
  edges_per_class.png/.csv     the same per sentiment class
  edges_epochs.png/.csv        the mean training edge weights per epoch (metrics.jsonl), per seed
  edges_compare.png/.csv       with --compare: both runs side by side (samples and epochs)
  tsne_homo.png, tsne_hetero.png, tsne.npz
                               Figs. 7-8: t-SNE of the decoupled features c_m and s_m, coloured
                               by modality and by class
  dictionary.png/.npz, dictionary_sharing.csv
                               Fig. 11: activated dictionary elements per class, space and
                               modality, and how much the modalities share
  attention_sample<I>.png/.npz Fig. 12: the cross-modal attention maps of sample I
  curves.png/.csv              every loss term, validation metric and learning rate per seed
  missing_modality.md/.csv     metrics with each modality and pair removed at test time
  analysis.npz                 the per-sample arrays all of the above come from

The arrays come from `dhmd_jax.analysis` (pure functions); this module only loads the run, draws
and writes. Bad input (no workdir, no checkpoint, a sample index out of range) ends with one line
`error: ...` and exit status 1 (2 for a malformed command line).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import pickle
import sys
import time

from absl import flags
import numpy as np

from dhmd_jax import analysis
from dhmd_jax import cli
from dhmd_jax import data as data_lib
from dhmd_jax import evaluate as evaluate_lib
from dhmd_jax import metrics as metrics_lib
from dhmd_jax import reporting
from dhmd_jax import stats
from dhmd_jax import train as train_lib
from dhmd_jax import workdir as workdir_lib
from dhmd_jax.names import EDGE_NAMES
from dhmd_jax.names import MODALITY_LETTERS
from dhmd_jax.names import SPLITS

SPACE_TITLES = {"homo": "HoGD", "hetero": "HeGD"}
DM_TITLES = {"homo": "HoDM", "hetero": "HeDM"}
MODALITY_COLORS = ("tab:blue", "tab:orange", "tab:green")


class AnalyzeError(Exception):
  """Bad input to the command; the message is one line."""


# ----------------------------------------------------------------------------- loading


def load_run(workdir, which="best"):
  """(config, dataset, model, stacked params (S, ...)) of a trained workdir, from its own
  config.json and checkpoint. The one place that uses evaluate.py's restore API."""
  if not os.path.isdir(workdir):
    raise AnalyzeError(f"workdir {workdir} does not exist; pass the folder of a training run "
                       f"(python -m dhmd_jax.main --config=... --workdir=DIR)")
  config = evaluate_lib.run_config(workdir)
  dataset, model, params, _ = evaluate_lib.restore_params(config, workdir, which)
  return config, dataset, model, params


def read_records(workdir):
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


MAX_PICKLE_FOR_WORDS = 4 << 30  # bytes; larger pickles are not unpickled for one sample's words


def sample_tokens(dataset, split, index, length):
  """Labels of the `length` text positions of one sample: its words from the pickle's
  `raw_text` where present ([CLS] first and [SEP] after the last word for 768-d BERT features;
  approximate for real data, whose BERT word pieces can split a word), else "t<position>".
  The words are read from the pickle itself (the feature cache does not keep raw_text), so a
  pickle over `MAX_PICKLE_FOR_WORDS` is labelled with positions."""
  labels = [f"t{i}" for i in range(length)]
  try:
    if os.path.getsize(dataset.source) > MAX_PICKLE_FOR_WORDS:
      return labels, False  # the feature cache has no raw_text; unpickling this is too costly
    with open(dataset.source, "rb") as f:
      raw = pickle.load(f)
    text = raw[split].get("raw_text") if isinstance(raw.get(split), dict) else None
  except (OSError, pickle.UnpicklingError, EOFError, AttributeError, KeyError):
    return labels, False
  if text is None:
    return labels, False
  words = str(np.asarray(text)[index]).split()
  if dataset.feature_dims.get("text") == 768:
    words = ["[CLS]"] + words + ["[SEP]"]
  for i, w in enumerate(words[:length]):
    labels[i] = w
  return labels, True


# ----------------------------------------------------------------------------- writing


def _write_csv(path, header, rows):
  with open(path, "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(header)
    for row in rows:
      writer.writerow([repr(float(v)) if isinstance(v, (float, np.floating)) else v
                       for v in row])


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def _save(fig, path, written):
  fig.savefig(path, dpi=90, bbox_inches="tight")
  _pyplot().close(fig)
  written.append(path)


def _off_diagonal_range(*matrices):
  """(min, max) of the off-diagonal entries: the colour scale of edge heatmaps (the diagonal is
  no edge and is drawn grey)."""
  values = np.concatenate([np.asarray(m)[..., ~np.eye(3, dtype=bool)].reshape(-1)
                           for m in matrices])
  values = values[np.isfinite(values)]
  if not values.size:
    return 0.0, 1.0
  lo, hi = float(values.min()), float(values.max())
  return (lo, hi) if hi > lo else (lo - 1e-3, hi + 1e-3)


def _heatmap(ax, matrix, title, limits=None):
  """A 3x3 edge matrix: rows = teacher (from), columns = student (to); diagonal grey."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  cmap = matplotlib.colormaps["viridis"].with_extremes(bad="lightgrey")
  lo, hi = limits or _off_diagonal_range(matrix)
  shown = np.where(np.eye(3, dtype=bool), np.nan, matrix)
  im = ax.imshow(shown, cmap=cmap, vmin=lo, vmax=hi)
  ax.set_xticks(range(3), MODALITY_LETTERS)
  ax.set_yticks(range(3), MODALITY_LETTERS)
  ax.set_xlabel("to (student)")
  ax.set_ylabel("from (teacher)")
  for i in range(3):
    for j in range(3):
      if i != j and np.isfinite(matrix[i, j]):
        ax.text(j, i, f"{matrix[i, j]:.3f}", ha="center", va="center", fontsize=8,
                color="w" if matrix[i, j] < (lo + hi) / 2 else "k")
  ax.set_title(title, fontsize=9)
  return im


def _graph(ax, matrix, title):
  """A directed graph over L, V, A; arrow width and label = edge weight w_{i->j}."""
  pos = {0: (0.5, 0.93), 1: (0.08, 0.12), 2: (0.92, 0.12)}
  top = max(float(np.nanmax(matrix)), 1e-9)
  for i in range(3):
    for j in range(3):
      if i == j:
        continue
      (x0, y0), (x1, y1) = pos[i], pos[j]
      # Offset the two directions of a pair sideways so both arrows show.
      dx, dy = x1 - x0, y1 - y0
      norm = np.hypot(dx, dy)
      ox, oy = -dy / norm * 0.035, dx / norm * 0.035
      ax.annotate("", xy=(x1 - dx * 0.12 + ox, y1 - dy * 0.12 + oy),
                  xytext=(x0 + dx * 0.12 + ox, y0 + dy * 0.12 + oy),
                  arrowprops=dict(arrowstyle="-|>", lw=0.5 + 5.0 * matrix[i, j] / top,
                                  color="tab:red", alpha=0.35 + 0.65 * matrix[i, j] / top))
      ax.text((x0 + x1) / 2 + 2.6 * ox, (y0 + y1) / 2 + 2.6 * oy, f"{matrix[i, j]:.2f}",
              fontsize=7, ha="center", va="center")
  for m, (x, y) in pos.items():
    ax.text(x, y, MODALITY_LETTERS[m], ha="center", va="center", fontsize=12,
            bbox=dict(boxstyle="circle", fc="white", ec="black"))
  ax.set_xlim(-0.05, 1.05)
  ax.set_ylim(-0.05, 1.05)
  ax.axis("off")
  ax.set_title(title, fontsize=9)


# ----------------------------------------------------------------------------- figures


def edge_figures(outputs, classes, class_names, records, out_dir, written, *,
                 run_name="run"):
  """Figs. 9-10: averaged, per class and over epochs."""
  plt = _pyplot()
  spaces = [s for s in analysis.SPACES if f"gd_{s}_edges" in outputs]
  if not spaces:
    return {}
  summaries = {s: analysis.edge_summary(outputs[f"gd_{s}_edges"], classes, len(class_names))
               for s in spaces}
  fig, axes = plt.subplots(2, len(spaces), figsize=(4.4 * len(spaces), 7.8), squeeze=False)
  for c, s in enumerate(spaces):
    _graph(axes[0, c], summaries[s]["mean_matrix"], f"{SPACE_TITLES[s]} ({run_name})")
    im = _heatmap(axes[1, c], summaries[s]["mean_matrix"], f"{SPACE_TITLES[s]}: mean w(i->j)")
    fig.colorbar(im, ax=axes[1, c], shrink=0.8)
  fig.suptitle("GD edge weights averaged over samples", fontsize=10)
  _save(fig, os.path.join(out_dir, "edges_mean.png"), written)
  _write_csv(os.path.join(out_dir, "edges_mean.csv"), ["space", "edge", "weight"],
             [(s, name, summaries[s]["mean"][e]) for s in spaces
              for e, name in enumerate(EDGE_NAMES)])
  written.append(os.path.join(out_dir, "edges_mean.csv"))

  num_classes = len(class_names)
  fig, axes = plt.subplots(len(spaces), num_classes, figsize=(2.4 * num_classes,
                                                              2.9 * len(spaces)), squeeze=False)
  for r, s in enumerate(spaces):
    limits = _off_diagonal_range(summaries[s]["per_class_matrix"])
    for c in range(num_classes):
      ax = axes[r, c]
      im = _heatmap(ax, summaries[s]["per_class_matrix"][c],
                    f"{SPACE_TITLES[s]} class {class_names[c]} (n={summaries[s]['count'][c]})",
                    limits=limits)
      if c:
        ax.set_ylabel("")
      if r < len(spaces) - 1:
        ax.set_xlabel("")
    fig.colorbar(im, ax=list(axes[r]), shrink=0.8)
  fig.suptitle("GD edge weights per sentiment class (rows: from, columns: to)", fontsize=10)
  _save(fig, os.path.join(out_dir, "edges_per_class.png"), written)
  _write_csv(os.path.join(out_dir, "edges_per_class.csv"),
             ["space", "class", "count", "edge", "weight"],
             [(s, class_names[c], summaries[s]["count"][c], name,
               summaries[s]["per_class"][c, e]) for s in spaces for c in range(num_classes)
              for e, name in enumerate(EDGE_NAMES)])
  written.append(os.path.join(out_dir, "edges_per_class.csv"))

  epochs, per_epoch = analysis.edges_over_epochs(records)
  if per_epoch:
    _epoch_lines(plt, epochs, per_epoch, os.path.join(out_dir, "edges_epochs.png"), written,
                 title=f"mean training edge weights per epoch ({run_name}; thin: each seed)")
    seeds = records[0]["seeds"]
    _write_csv(os.path.join(out_dir, "edges_epochs.csv"), ["epoch", "seed", "space", "edge",
                                                           "weight"],
               [(int(ep), seeds[si], s, name, per_epoch[s][ei, si, e])
                for s in per_epoch for ei, ep in enumerate(epochs)
                for si in range(per_epoch[s].shape[1]) for e, name in enumerate(EDGE_NAMES)])
    written.append(os.path.join(out_dir, "edges_epochs.csv"))
  return summaries


def _epoch_lines(plt, epochs, per_epoch, path, written, *, title, axes=None):
  own = axes is None
  if own:
    fig, axes = plt.subplots(1, len(per_epoch), figsize=(5 * len(per_epoch), 3.4),
                             squeeze=False)
    axes = axes[0]
  colors = plt.get_cmap("tab10")
  for ax, (space, w) in zip(axes, per_epoch.items()):
    for e, name in enumerate(EDGE_NAMES):
      for s in range(w.shape[1]):
        ax.plot(epochs, w[:, s, e], color=colors(e), lw=0.6, alpha=0.4)
      ax.plot(epochs, w[:, :, e].mean(axis=1), color=colors(e), lw=2, label=name, marker="o",
              ms=3)
    ax.set_title(SPACE_TITLES[space], fontsize=9)
    ax.set_xlabel("epoch")
    ax.set_ylabel("edge weight")
    ax.legend(fontsize=7, ncol=2)
  if own:
    fig.suptitle(title, fontsize=10)
    _save(fig, path, written)


def compare_figures(summaries, other, out_dir, written, names):
  """Side by side: this run's and the other run's averaged edges and edges over epochs."""
  plt = _pyplot()
  spaces = [s for s in analysis.SPACES if s in summaries and s in other["summaries"]]
  if not spaces:
    return
  fig, axes = plt.subplots(len(spaces), 3, figsize=(13, 3.9 * len(spaces)), squeeze=False,
                           layout="constrained")
  rows = []
  for r, s in enumerate(spaces):
    a, b = summaries[s]["mean_matrix"], other["summaries"][s]["mean_matrix"]
    limits = _off_diagonal_range(a, b)
    _heatmap(axes[r, 0], a, f"{SPACE_TITLES[s]}: {names[0]}", limits=limits)
    im = _heatmap(axes[r, 1], b, f"{SPACE_TITLES[s]}: {names[1]}", limits=limits)
    fig.colorbar(im, ax=list(axes[r, :2]), shrink=0.8)
    diff = np.where(np.eye(3, dtype=bool), np.nan, b - a)
    lim = max(float(np.nanmax(np.abs(diff))), 1e-9)
    im = axes[r, 2].imshow(diff, cmap="coolwarm", vmin=-lim, vmax=lim)
    fig.colorbar(im, ax=axes[r, 2], shrink=0.8)
    axes[r, 2].set_xticks(range(3), MODALITY_LETTERS)
    axes[r, 2].set_yticks(range(3), MODALITY_LETTERS)
    axes[r, 2].set_xlabel("to (student)")
    for i in range(3):
      for j in range(3):
        if i != j:
          axes[r, 2].text(j, i, f"{diff[i, j]:+.3f}", ha="center", va="center", fontsize=8)
    axes[r, 2].set_title(f"{SPACE_TITLES[s]}: {names[1]} − {names[0]}", fontsize=9)
    for e, name in enumerate(EDGE_NAMES):
      rows.append((s, name, summaries[s]["mean"][e], other["summaries"][s]["mean"][e]))
  fig.suptitle("GD edge weights averaged over samples, two runs", fontsize=10)
  _save(fig, os.path.join(out_dir, "edges_compare.png"), written)
  _write_csv(os.path.join(out_dir, "edges_compare.csv"),
             ["space", "edge", f"weight_{names[0]}", f"weight_{names[1]}"], rows)
  written.append(os.path.join(out_dir, "edges_compare.csv"))
  epochs_a, per_a = other["self_epochs"]
  epochs_b, per_b = other["other_epochs"]
  if per_a and per_b:
    fig, axes = plt.subplots(2, len(per_a), figsize=(5 * len(per_a), 6.8), squeeze=False)
    _epoch_lines(plt, epochs_a, per_a, None, written, title="", axes=axes[0])
    _epoch_lines(plt, epochs_b, per_b, None, written, title="", axes=axes[1])
    for ax in axes[0]:
      ax.set_title(f"{ax.get_title()} — {names[0]}", fontsize=9)
    for ax in axes[1]:
      ax.set_title(f"{ax.get_title()} — {names[1]}", fontsize=9)
    fig.suptitle("mean training edge weights per epoch, two runs", fontsize=10)
    _save(fig, os.path.join(out_dir, "edges_compare_epochs.png"), written)


def tsne_embed(points, seed=0):
  """2-D t-SNE (scikit-learn) with a perplexity suited to small splits (< points/3, <= 30).

  Exact gradients up to 250 points, Barnes-Hut above; on one thread: on the 2-core machine
  OpenMP threads next to JAX's made a 72-point Barnes-Hut run take 5 s instead of 0.15 s.
  """
  from sklearn.manifold import TSNE  # pylint: disable=g-import-not-at-top
  from threadpoolctl import threadpool_limits  # pylint: disable=g-import-not-at-top
  n = points.shape[0]
  perplexity = float(max(2.0, min(30.0, (n - 1) / 3.0)))
  with threadpool_limits(limits=1):
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed,
               max_iter=500, method="exact" if n <= 250 else "barnes_hut").fit_transform(
                   points.astype(np.float64))
  return emb, perplexity


def tsne_figures(outputs, classes, class_names, out_dir, written, *, max_samples, seed=0):
  """Figs. 7-8: t-SNE of the pooled c_m (homogeneous) and s_m (heterogeneous) features of up to
  `max_samples` samples (seeded choice), each sample contributing one point per modality."""
  plt = _pyplot()
  n = outputs["homo_features"].shape[0]
  chosen = np.sort(np.random.default_rng(seed).choice(n, size=min(n, max_samples),
                                                      replace=False))
  saved = {"samples": chosen, "classes": classes[chosen], "class_names": np.array(class_names)}
  for space, title in (("homo", "decoupled homogeneous features c_m (Fig. 7)"),
                       ("hetero", "decoupled heterogeneous features s_m (Fig. 8)")):
    feats = outputs[f"{space}_features"][chosen]  # (n, 3, d)
    points = feats.reshape(-1, feats.shape[-1])  # sample-major: (n * 3, d)
    modality = np.tile(np.arange(3), len(chosen))
    cls = np.repeat(classes[chosen], 3)
    emb, perplexity = tsne_embed(points, seed)
    saved.update({f"{space}_features": points, f"{space}_embedding": emb,
                  f"{space}_modality": modality, f"{space}_class": cls,
                  f"{space}_perplexity": perplexity})
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.4))
    for m, letter in enumerate(MODALITY_LETTERS):
      sel = modality == m
      axes[0].scatter(emb[sel, 0], emb[sel, 1], s=12, color=MODALITY_COLORS[m], label=letter)
    axes[0].legend(fontsize=8)
    axes[0].set_title("by modality", fontsize=9)
    cmap = plt.get_cmap("coolwarm", len(class_names))
    markers = ("o", "s", "^")
    for m in range(3):
      sel = modality == m
      sc = axes[1].scatter(emb[sel, 0], emb[sel, 1], s=14, c=cls[sel], cmap=cmap,
                           vmin=-0.5, vmax=len(class_names) - 0.5, marker=markers[m],
                           label=MODALITY_LETTERS[m])
    bar = fig.colorbar(sc, ax=axes[1], ticks=range(len(class_names)))
    bar.ax.set_yticklabels(class_names)
    axes[1].legend(fontsize=8)
    axes[1].set_title("by sentiment class (marker: modality)", fontsize=9)
    fig.suptitle(f"t-SNE of the {title}, {len(chosen)} samples, perplexity {perplexity:.0f}",
                 fontsize=10)
    _save(fig, os.path.join(out_dir, f"tsne_{space}.png"), written)
  np.savez(os.path.join(out_dir, "tsne.npz"), **saved)
  written.append(os.path.join(out_dir, "tsne.npz"))


def dictionary_figures(outputs, params, classes, class_names, out_dir, written, *, seed=0,
                       max_atoms=40):
  """Fig. 11: which dictionary elements each class activates, per space and modality, how much
  the modalities share, and a t-SNE of the elements coloured by the class using them most."""
  plt = _pyplot()
  spaces = [s for s in analysis.SPACES if f"dm_{s}_weights" in outputs]
  if not spaces:
    return
  num_classes = len(class_names)
  saved, sharing_rows = {}, []
  fig, axes = plt.subplots(len(spaces), 4, figsize=(19, 4.2 * len(spaces)), squeeze=False,
                           gridspec_kw={"width_ratios": [3.2, 1.2, 1.2, 1.6]})
  for r, space in enumerate(spaces):
    weights = outputs[f"dm_{space}_weights"]  # (N, 3, K)
    k = weights.shape[-1]
    means, counts = analysis.class_activations(weights, classes, num_classes)  # (C, 3, K)
    atoms = analysis.activated_atoms(weights)  # (N, 3)
    act = analysis.activation_counts(atoms, classes, num_classes, k)  # (C, 3, K)
    share = analysis.modality_sharing(weights, classes, num_classes)
    used = np.argsort(-act.sum(axis=(0, 1)), kind="stable")
    used = used[act.sum(axis=(0, 1))[used] > 0][:max_atoms]
    # Rows: class x modality; columns: the most used elements; value: share of the class's
    # samples whose modality activates that element.
    table = (act[:, :, used] / np.maximum(counts, 1)[:, None, None]).reshape(-1, len(used))
    ax = axes[r, 0]
    ax.imshow(table, aspect="auto", cmap="magma", vmin=0, vmax=1)
    ax.set_yticks(range(num_classes * 3),
                  [f"{class_names[c]} {MODALITY_LETTERS[m]}" for c in range(num_classes)
                   for m in range(3)], fontsize=6)
    ax.set_xticks(range(len(used)), used, fontsize=6, rotation=90)
    ax.set_xlabel("dictionary element (most activated first)")
    ax.set_title(f"{DM_TITLES[space]}: share of a class's samples activating each element",
                 fontsize=9)
    for col, (key, title) in enumerate((("same_atom", "same activated element"),
                                        ("top_k_jaccard", "top-5 overlap (Jaccard)")), start=1):
      ax = axes[r, col]
      ax.imshow(share[key], cmap="Greens", vmin=0, vmax=1)
      ax.set_xticks(range(3), MODALITY_LETTERS)
      ax.set_yticks(range(3), MODALITY_LETTERS)
      for i in range(3):
        for j in range(3):
          ax.text(j, i, f"{share[key][i, j]:.2f}", ha="center", va="center", fontsize=8)
      ax.set_title(f"{DM_TITLES[space]}: {title}", fontsize=9)
    # t-SNE of the K elements, coloured by the class that activates each most (grey: none).
    dic = analysis.dictionary(params, space)
    emb, _ = tsne_embed(dic, seed)
    top_class = np.where(act.sum(axis=1).sum(axis=0) > 0, np.argmax(act.sum(axis=1), axis=0),
                         -1)
    ax = axes[r, 3]
    ax.scatter(emb[top_class < 0, 0], emb[top_class < 0, 1], s=6, color="lightgrey")
    sc = ax.scatter(emb[top_class >= 0, 0], emb[top_class >= 0, 1], s=24,
                    c=top_class[top_class >= 0], cmap=plt.get_cmap("coolwarm", num_classes),
                    vmin=-0.5, vmax=num_classes - 0.5, edgecolors="k", linewidths=0.3)
    bar = fig.colorbar(sc, ax=ax, ticks=range(num_classes))
    bar.ax.set_yticklabels(class_names, fontsize=7)
    ax.set_title(f"{DM_TITLES[space]}: t-SNE of the {k} elements\n(colour: class activating "
                 f"it most; grey: never activated)", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    saved.update({f"{space}_weights": weights, f"{space}_class_mean": means,
                  f"{space}_activated": atoms, f"{space}_activation_counts": act,
                  f"{space}_same_atom": share["same_atom"],
                  f"{space}_top_k_jaccard": share["top_k_jaccard"],
                  f"{space}_class_jaccard": share["class_jaccard"],
                  f"{space}_dictionary": dic, f"{space}_dictionary_tsne": emb,
                  f"{space}_top_class": top_class})
    for i in range(3):
      for j in range(i + 1, 3):
        pair = f"{MODALITY_LETTERS[i]}-{MODALITY_LETTERS[j]}"
        sharing_rows.append((space, pair, "all", share["same_atom"][i, j],
                             share["top_k_jaccard"][i, j], ""))
        for c in range(num_classes):
          sharing_rows.append((space, pair, class_names[c], "", "",
                               share["class_jaccard"][c, i, j]))
  saved["classes"] = classes
  saved["class_names"] = np.array(class_names)
  fig.suptitle("Dictionary matching: activated elements per class, space and modality "
               "(Fig. 11)", fontsize=10)
  _save(fig, os.path.join(out_dir, "dictionary.png"), written)
  np.savez(os.path.join(out_dir, "dictionary.npz"), **saved)
  written.append(os.path.join(out_dir, "dictionary.npz"))
  _write_csv(os.path.join(out_dir, "dictionary_sharing.csv"),
             ["space", "modalities", "class", "same_activated_element", "top5_jaccard",
              "class_element_set_jaccard"], sharing_rows)
  written.append(os.path.join(out_dir, "dictionary_sharing.csv"))


def attention_figure(model, params, arrays, dataset, split, index, out_dir, written):
  """Fig. 12: the six cross-modal attention maps of one sample (last layer, mean over heads),
  text positions labelled with its words where the pickle has raw_text."""
  plt = _pyplot()
  batch = analysis.sample_batch(arrays, index)
  maps = analysis.attention_maps(model, params, batch)
  masks = [np.asarray(m[0]) for m in analysis.frame_masks(model, batch)]
  kernels = model.settings.conv_kernels
  lengths = [m.shape[0] for m in masks]
  # A conv position t covers input steps t .. t+k-1: label it with the step at the window centre.
  text_steps = arrays["text"].shape[1]
  words, have_words = sample_tokens(dataset, split, index, text_steps)
  axis_labels = [[(words[t + kernels[0] // 2] if m == 0 else f"{t + kernels[m] // 2}")
                  for t in range(lengths[m])] for m in range(3)]
  saved = {"sample": index, "label": float(np.asarray(arrays["label"][index])),
           "have_words": have_words}
  for m in range(3):
    saved[f"labels_{MODALITY_LETTERS[m]}"] = np.array(axis_labels[m])
    saved[f"frame_mask_{MODALITY_LETTERS[m]}"] = masks[m]
  for stack, branches in maps.items():
    for name, w in branches.items():
      saved[f"{stack}/{name}"] = w[:, 0]  # (L, h, T_q, T_k)
  cross = maps.get("cross_transformers")
  if cross is None:
    raise AnalyzeError("this run has no cross-modal transformers (model.use_ca=False): "
                       "there are no cross-modal attention maps to draw")
  fig, axes = plt.subplots(2, 3, figsize=(16, 10.5))
  cmap = plt.get_cmap("viridis").with_extremes(bad="lightgrey")
  index_of = {letter: i for i, letter in enumerate(MODALITY_LETTERS)}
  # Only the sample's real positions are drawn (padding cropped).
  real = [np.nonzero(m)[0] if m.any() else np.arange(len(m)) for m in masks]

  def ticks(m):
    n = len(real[m])
    step = 1 if (m == 0 and n <= 60) else max(1, -(-n // 16))
    return range(0, n, step), [axis_labels[m][t] for t in real[m][::step]]

  for ax, (name, w) in zip(axes.T.reshape(-1), cross.items()):
    src, dst = name.split("->")
    q, k = index_of[dst], index_of[src]
    avg = w[-1, 0].mean(axis=0)[np.ix_(real[q], real[k])]  # last layer, heads averaged
    # A key a query may not see (causal mask, key padding) has weight exactly 0: drawn grey.
    ax.imshow(np.where(avg > 0, avg, np.nan), aspect="auto", cmap=cmap)
    ax.set_yticks(*ticks(q), fontsize=6)
    ax.set_xticks(*ticks(k), fontsize=6, rotation=90)
    ax.set_ylabel(f"query: {MODALITY_LETTERS[q]} " + ("(word)" if q == 0 else "(frame)"),
                  fontsize=8)
    ax.set_xlabel(f"key: {MODALITY_LETTERS[k]} " + ("(word)" if k == 0 else "(frame)"),
                  fontsize=8)
    ax.set_title(f"{name}: {MODALITY_LETTERS[q]} attends to {MODALITY_LETTERS[k]}", fontsize=9)
  fig.suptitle(f"Cross-modal attention of {split} sample {index} (label "
               f"{saved['label']:+.2f}), last layer, mean over heads (Fig. 12)", fontsize=10)
  path = os.path.join(out_dir, f"attention_sample{index}.png")
  _save(fig, path, written)
  np.savez(os.path.join(out_dir, f"attention_sample{index}.npz"), **saved)
  written.append(os.path.join(out_dir, f"attention_sample{index}.npz"))


def curve_figure(records, out_dir, written):
  """Every loss term, validation metric, the selection loss and the lr per seed over epochs."""
  plt = _pyplot()
  if not records:
    return
  curves = analysis.training_curves(records)
  panels = ([("train", k) for k in curves["train"]] + [("valid", k) for k in curves["valid"]]
            + [("valid_loss", None), ("lr", None)])
  cols = 6
  rows = -(-len(panels) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(3.0 * cols, 2.3 * rows), squeeze=False)
  csv_rows = []
  for ax, (group, name) in zip(axes.reshape(-1), panels):
    values = curves[group][name] if name else curves[group]
    for s, seed in enumerate(curves["seeds"]):
      ax.plot(curves["epoch"], values[:, s], marker="o", ms=2, lw=1, label=str(seed))
      csv_rows.extend((int(e), seed, group, name or group, values[i, s])
                      for i, e in enumerate(curves["epoch"]))
    ax.set_title(f"{group}/{name}" if name else group, fontsize=8)
    ax.tick_params(labelsize=6)
    if group == "lr":
      ax.set_yscale("log")
  for ax in axes.reshape(-1)[len(panels):]:
    ax.axis("off")
  axes[0, 0].legend(fontsize=6, title="seed", title_fontsize=6)
  fig.suptitle("training curves per seed (metrics.jsonl)", fontsize=10)
  fig.tight_layout()
  _save(fig, os.path.join(out_dir, "curves.png"), written)
  _write_csv(os.path.join(out_dir, "curves.csv"), ["epoch", "seed", "group", "name", "value"],
             csv_rows)
  written.append(os.path.join(out_dir, "curves.csv"))


def missing_modality_table(config, model, params, arrays, out_dir, written, *, split):
  """Metrics per condition (modalities removed at test time) against the full input."""
  result = analysis.missing_modality(config, model, params, arrays)
  family = metrics_lib.metric_family(metrics_lib.metrics_dataset(config), config.dataset.task)
  headline = [m for m in metrics_lib.REPORTED[family] if m in result["per_seed"]["L+V+A"]]
  names = dict(result["conditions"])
  order = list(names)
  rows = sorted((r for r in result["rows"] if r["metric"] in headline),
                key=lambda r: (order.index(r["variant"]), headline.index(r["metric"])))
  with open(os.path.join(out_dir, "missing_modality.md"), "w") as f:
    f.write(f"# Missing modalities at test time ({split} split, {len(config.train.seeds)} "
            f"seeds)\n\nEach condition keeps the listed modalities; the removed ones have "
            f"zeroed features and masks. Δ is the change against the full input L+V+A.\n\n")
    f.write(stats.markdown_table(rows, layout="wide", label="condition"))
  written.append(os.path.join(out_dir, "missing_modality.md"))
  with open(os.path.join(out_dir, "missing_modality.csv"), "w", newline="") as f:
    writer = csv.writer(f)
    writer.writerow(["condition", "removed"] + list(stats.CSV_COLUMNS[1:]))
    for r in result["rows"]:
      removed = "+".join(MODALITY_LETTERS[m] for m in names[r["variant"]]) or "none"
      writer.writerow([r["variant"], removed] + [
          "" if isinstance(r[c], float) and np.isnan(r[c]) else
          (repr(r[c]) if isinstance(r[c], float) else r[c]) for c in stats.CSV_COLUMNS[1:]])
  written.append(os.path.join(out_dir, "missing_modality.csv"))
  return result


# ----------------------------------------------------------------------------- the command


def analyze(workdir, *, split="test", compare="", sample=0, out="", which="best", seed=None,
            tsne_samples=400):
  """Writes every figure and its numbers for `workdir`; returns {"files": [...], "seconds":
  {...}}."""
  timings = {}
  start = time.time()
  for module in ("matplotlib", "sklearn"):
    if importlib.util.find_spec(module) is None:
      raise AnalyzeError(f"python -m dhmd_jax.figures needs matplotlib and scikit-learn "
                         f"({module} is missing): pip install -e '.[analysis]'")
  if split not in SPLITS:
    raise AnalyzeError(f"--split must be one of {SPLITS}, got {split!r}")
  config, dataset, model, stacked = load_run(workdir, which)
  # The run's persistent compilation cache: a second analysis of a run compiles nothing.
  train_lib.enable_compilation_cache(config.train.compilation_cache_dir)
  arrays = data_lib.split_arrays(dataset.splits[split], config.dataset.task)
  num = arrays["label"].shape[0]
  if not 0 <= sample < num:
    raise AnalyzeError(f"--sample={sample} is out of range: the {split} split of {workdir} has "
                       f"{num} samples (0 .. {num - 1})")
  seeds = [int(s) for s in config.train.seeds]
  if seed is None:
    seed = seeds[0]
  if seed not in seeds:
    raise AnalyzeError(f"--seed={seed} is not a seed of this run (seeds: {seeds})")
  params = analysis.seed_params(stacked, seeds.index(seed))
  out_dir = out or os.path.join(workdir, "analysis")
  os.makedirs(out_dir, exist_ok=True)
  timings["load"] = time.time() - start

  t = time.time()
  outputs = analysis.split_outputs(model, params, arrays, batch_size=config.train.eval_batch_size)
  classes, class_names = analysis.sentiment_classes(
      arrays["label"], task=config.dataset.task, dataset=metrics_lib.metrics_dataset(config))
  np.savez(os.path.join(out_dir, "analysis.npz"), classes=classes,
           class_names=np.array(class_names), labels=np.asarray(arrays["label"]),
           edge_names=np.array(EDGE_NAMES), **outputs)
  written = [os.path.join(out_dir, "analysis.npz")]
  timings["forward"] = time.time() - t

  t = time.time()
  records = read_records(workdir)
  summaries = edge_figures(outputs, classes, class_names, records, out_dir, written,
                           run_name=os.path.basename(os.path.normpath(workdir)))
  if compare:
    o_config, o_dataset, o_model, o_stacked = load_run(compare, which)
    o_arrays = data_lib.split_arrays(o_dataset.splits[split], o_config.dataset.task)
    o_seeds = [int(s) for s in o_config.train.seeds]
    o_params = analysis.seed_params(o_stacked, o_seeds.index(seed) if seed in o_seeds else 0)
    o_outputs = analysis.split_outputs(o_model, o_params, o_arrays,
                                       batch_size=o_config.train.eval_batch_size)
    o_classes, _ = analysis.sentiment_classes(
        o_arrays["label"], task=o_config.dataset.task,
        dataset=metrics_lib.metrics_dataset(o_config))
    o_summaries = {s: analysis.edge_summary(o_outputs[f"gd_{s}_edges"], o_classes,
                                            len(class_names))
                   for s in analysis.SPACES if f"gd_{s}_edges" in o_outputs}
    names = (os.path.basename(os.path.normpath(workdir)),
             os.path.basename(os.path.normpath(compare)))
    if names[0] == names[1]:
      names = ("run", "compare")
    compare_figures(summaries, {"summaries": o_summaries,
                                "self_epochs": analysis.edges_over_epochs(records),
                                "other_epochs": analysis.edges_over_epochs(
                                    read_records(compare))}, out_dir, written, names)
  timings["edges"] = time.time() - t

  t = time.time()
  tsne_figures(outputs, classes, class_names, out_dir, written, max_samples=tsne_samples)
  timings["tsne"] = time.time() - t
  t = time.time()
  dictionary_figures(outputs, params, classes, class_names, out_dir, written)
  timings["dictionary"] = time.time() - t
  t = time.time()
  attention_figure(model, params, arrays, dataset, split, sample, out_dir, written)
  timings["attention"] = time.time() - t
  t = time.time()
  curve_figure(records, out_dir, written)
  timings["curves"] = time.time() - t
  t = time.time()
  missing_modality_table(config, model, stacked, arrays, out_dir, written, split=split)
  timings["missing_modality"] = time.time() - t
  timings["total"] = time.time() - start
  summary = {"workdir": workdir, "split": split, "checkpoint": which, "seed": seed,
             "sample": sample, "compare": compare, "files": sorted(written),
             "seconds": timings}
  reporting.write_json(os.path.join(out_dir, "analysis.json"), summary)
  return summary


COMMAND = cli.Command(
    prog="python -m dhmd_jax.figures", summary="Draws the analysis figures of a trained workdir.",
    required=("workdir",), placeholders={"workdir": "DIR", "compare": "DIR", "out": "DIR"},
    failures=(AnalyzeError,))


def define_flags(values):
  """The command's flags, on `values` (each call of `main` its own)."""
  flags.DEFINE_string("workdir", None, "A training run's folder.", flag_values=values)
  flags.DEFINE_enum("split", "test", SPLITS, "Split to analyse.", flag_values=values)
  flags.DEFINE_string("compare", "", "A second run's folder (side-by-side edges).",
                      flag_values=values)
  flags.DEFINE_integer("sample", 0, "Sample index for the attention maps.", flag_values=values)
  flags.DEFINE_string("out", "", "Output folder (default <workdir>/analysis).",
                      flag_values=values)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint of the run.",
                    flag_values=values)
  flags.DEFINE_integer("seed", None, "Which seed's model (default: the run's first seed).",
                       flag_values=values)
  flags.DEFINE_integer("tsne_samples", 400, "Samples in the t-SNE plots (the paper uses 400).",
                       flag_values=values)


def main(argv=None):
  """The command line (argv: the flags, default sys.argv[1:]); exits with the status when it
  fails (1: bad input, 2: a malformed command line)."""
  values = flags.FlagValues()
  define_flags(values)

  def write(_):
    # Holds the workdir (no training starts under it), or reads beside its training.
    with workdir_lib.reading(values.workdir, "analysis"):
      summary = analyze(values.workdir, split=values.split, compare=values.compare,
                        sample=values.sample, out=values.out, which=values.checkpoint,
                        seed=values.seed, tsne_samples=values.tsne_samples)
    print(f"wrote {len(summary['files'])} files to {os.path.dirname(summary['files'][0])} in "
          f"{summary['seconds']['total']:.1f} s")

  status = cli.run(COMMAND, write, argv, flag_values=values)
  if status:
    sys.exit(status)


if __name__ == "__main__":
  main()
