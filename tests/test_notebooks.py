"""The notebooks in notebooks/ run top to bottom in their tiny setting and draw their plots.

Each executes in a fresh kernel through tools/run_notebooks.py (CPU, tiny random model, slices of
the demo data), as `python tools/run_notebooks.py` does before saving outputs; here nothing is saved.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each notebook trains in a kernel of its own

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
assert len(NOTEBOOKS) >= 2, f"the notebooks are missing from {ROOT / 'notebooks'}"

for module in ("nbclient", "nbformat", "ipykernel", "matplotlib"):
    pytest.importorskip(module, reason="the notebook tests need the test extras")


def run_notebooks():
    """tools/run_notebooks.py, loaded from its file (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location("run_notebooks", ROOT / "tools/run_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path, tmp_path, monkeypatch):
    # The kernels train and evaluate for many steps: XLA's optimisations pay for themselves.
    monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "0")
    notebook = run_notebooks().execute(path, tiny=True, workdir=tmp_path)
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    errors = [o for o in outputs if o.output_type == "error"]
    assert not errors, [f"{o.ename}: {o.evalue}" for o in errors]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert images, f"{path.name} drew no plots"
