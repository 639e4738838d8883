"""Run the notebooks top to bottom and save their outputs (plots included) in place.

    python tools/run_notebooks.py                       # both, tiny setting: CPU, a few minutes
    python tools/run_notebooks.py notebooks/tpu_vm_walkthrough.ipynb --full   # real weights

The tiny setting (`M3_NOTEBOOK_TINY=1`) swaps BGE-M3 for a tiny random model in the same layout
and 8 CPU devices for the chips; tests/test_notebooks.py executes the same way without saving.
Needs the test extras (`pip install -e ".[test]"`: nbclient, ipykernel, matplotlib).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).resolve().parents[1] / "notebooks").glob("*.ipynb"))


def execute(path: Path, *, tiny: bool, workdir: Path, timeout: int = 1800) -> nbformat.NotebookNode:
    """The notebook at `path`, executed in a fresh kernel started in its directory; a failing cell
    raises nbclient's CellExecutionError naming the cell and the traceback."""
    notebook = nbformat.read(path, as_version=4)
    env = dict(os.environ)
    # The notebooks pick their devices; other XLA flags pass through.
    flags = env.pop("XLA_FLAGS", "").split()
    flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
    if flags:
        env["XLA_FLAGS"] = " ".join(flags)
    env.update(
        M3_NOTEBOOK_WORKDIR=str(workdir), MPLBACKEND="module://matplotlib_inline.backend_inline"
    )
    if tiny:
        env["M3_NOTEBOOK_TINY"] = "1"
    else:
        env.pop("M3_NOTEBOOK_TINY", None)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # keeps saved notebooks free of per-run timestamps
        resources={"metadata": {"path": str(path.parent)}},
    )
    client.execute(env=env)
    return notebook


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("notebooks", nargs="*", type=Path, default=NOTEBOOKS)
    parser.add_argument("--full", action="store_true", help="the real setting, not the tiny one")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args()
    for path in args.notebooks:
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            notebook = execute(path, tiny=not args.full, workdir=args.workdir or Path(tmp))
        nbformat.write(notebook, path)
        print(f"{path}: executed in {time.perf_counter() - start:.0f}s, outputs saved")


if __name__ == "__main__":
    main()
