"""Flax modules of DHMD: decoupling, MulT transformers, GD-Units, dictionary matching."""
