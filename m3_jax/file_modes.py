"""Outputs with the modes the user's umask gives, whoever wrote them.

Two writers make private files: `tempfile.mkdtemp` (0700) and safetensors' `save_file` (0600).
Exports and embeddings are for others to read too (a serving container, a colleague), so their
files get the modes that `open` and `mkdir` would have given them.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    mask = os.umask(0)  # reading the umask means setting it: set it straight back
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike) -> None:
    """`path`, and everything under it when it is a directory: 0o666 files and 0o777
    directories, less the umask."""
    mask = current_umask()
    root = Path(path)
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
