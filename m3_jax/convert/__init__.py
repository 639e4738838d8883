"""Checkpoint conversion between the PyTorch BGE-M3 layout and m3_jax."""
