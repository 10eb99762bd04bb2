"""The batch notebook runs top to bottom (nbclient), on the session's Ray cluster."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

pytestmark = pytest.mark.serve

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "batch_transcription.ipynb"


def test_batch_notebook_executes(serve_app, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_ADDRESS", ray.get_runtime_context().gcs_address)
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = "".join(o.get("text", "") for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", []))
    assert "audio hours per hour" in outputs and "median RTF" in outputs
    assert any("image/png" in o.get("data", {}) for cell in nb.cells for o in cell.get("outputs", []) if cell.cell_type == "code")
