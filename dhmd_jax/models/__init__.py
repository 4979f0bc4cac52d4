"""Flax modules of DHMD: decoupling, MulT transformers, GD-Units, dictionary matching, BERT."""

from dhmd_jax.models.bert import BertEncoder
from dhmd_jax.models.bert import BertSettings
from dhmd_jax.models.dhmd import DHMD
from dhmd_jax.models.dhmd import ModelSettings
from dhmd_jax.models.dhmd import build_model
from dhmd_jax.names import EDGE_NAMES
from dhmd_jax.names import EDGES
from dhmd_jax.models.gd_unit import edges_to_matrix

__all__ = ["BertEncoder", "BertSettings", "DHMD", "ModelSettings", "build_model", "EDGE_NAMES",
           "EDGES", "edges_to_matrix"]
