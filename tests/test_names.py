"""The shared names (modality order, GD edges) have one home, and every user agrees with it."""

from dhmd_jax import data
from dhmd_jax import losses
from dhmd_jax import names
from dhmd_jax import objective
from dhmd_jax import synthetic
from dhmd_jax.models import decoupling
from dhmd_jax.models import gd_unit
from dhmd_jax.models import layout


def test_edge_labels_name_their_indices():
  letters = dict(zip("LVA", range(3)))
  assert len(set(names.EDGES)) == 6 and all(j != i for j, i in names.EDGES)
  for (student, teacher), label in zip(names.EDGES, names.EDGE_NAMES):
    src, dst = label.split("->")
    assert (letters[dst], letters[src]) == (student, teacher), label
  # The DMD code's order, as the edge logs and plots print it.
  assert names.EDGE_NAMES == ("V->L", "A->L", "L->V", "A->V", "L->A", "V->A")


def test_every_module_uses_the_one_definition():
  assert losses.EDGES is names.EDGES and gd_unit.EDGES is names.EDGES
  assert objective.EDGE_NAMES is names.EDGE_NAMES
  assert data.MODALITIES is names.MODALITIES and synthetic.MODALITIES is names.MODALITIES
  assert decoupling.MODALITY_KEYS is names.MODALITY_KEYS
  assert layout.MODALITY_KEYS is names.MODALITY_KEYS
  assert [m[0] for m in names.MODALITIES] == ["t", "v", "a"]
  assert names.MODALITY_KEYS == ("l", "v", "a")
