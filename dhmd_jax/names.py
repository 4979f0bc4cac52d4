"""The names every part of dhmd-jax shares, defined once: splits, modality order and the GD-Unit
edges.

The model, the losses, the logs and the analysis plots all import these; the edge labels are
derived from the edge indices, so a label can never name another edge than the one it labels.
"""

# The splits of every dataset file, in this order.
SPLITS = ("train", "valid", "test")

# Model order (l, v, a), as in the DMD code: dataset keys and the short keys of parameter names.
MODALITIES = ("text", "vision", "audio")
MODALITY_KEYS = ("l", "v", "a")
MODALITY_LETTERS = ("L", "V", "A")

# The six directed edges of a GD-Unit as (student j, teacher i) index pairs, in the DMD code's
# order; edge (j, i) carries knowledge from modality i to modality j.
EDGES = ((0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1))


def edge_name(student, teacher):
  """"V->L" for knowledge flowing from vision (teacher) to language (student)."""
  return f"{MODALITY_LETTERS[teacher]}->{MODALITY_LETTERS[student]}"


EDGE_NAMES = tuple(edge_name(j, i) for j, i in EDGES)
