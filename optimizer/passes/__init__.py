"""Optimization passes: one module per technique, each a small class with a frozen config."""
