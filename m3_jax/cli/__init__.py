"""The `m3-jax` command line: encode, score, convert, evaluate, train (one module per command)."""
