"""The `m3-jax` command line: encode, score, convert, evaluate, train (one module per command)."""

import os

# transformers advises at import that PyTorch is missing; the commands use it for tokenizers only
# (the ones that need torch say so themselves), so in our own processes that advice is noise.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
