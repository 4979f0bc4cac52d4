"""Configs: `default.py` is the schema; the others import it and change a few fields."""
