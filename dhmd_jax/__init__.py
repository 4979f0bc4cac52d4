"""dhmd-jax: DHMD (Decoupled Hierarchical Distillation for Multimodal Emotion Recognition)
in JAX/Flax."""

__version__ = "0.1.0"
