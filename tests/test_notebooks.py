"""Every notebook executes (small settings) and produces its figures and tables, so they cannot rot."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def _outputs(cell, mime):
    return [o["data"][mime] for o in cell.outputs if mime in o.get("data", {})]


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_executes_and_draws(path, monkeypatch):
    monkeypatch.setenv("MOEJAX_NOTEBOOK_SMALL", "1")
    # figures come back as image/png outputs only from the inline backend (Agg would draw nothing)
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        cell.outputs = []  # only what this run produces counts
    # raises CellExecutionError at the first cell that fails
    NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    plots = [c for c in code if "plt.subplots(" in c.source]
    assert plots, "each notebook draws figures"
    for cell in plots:
        assert len(_outputs(cell, "image/png")) == 1, f"no figure from:\n{cell.source[:200]}"
    for cell in (c for c in code if "metrics_table(" in c.source):  # the side-by-side metrics table
        html = "".join(_outputs(cell, "text/html"))
        assert "ttft_mean_s" in html and "expert_bytes_total" in html, f"no table from:\n{cell.source[:200]}"
