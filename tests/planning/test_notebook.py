"""examples/planning.ipynb runs top to bottom in a Jupyter kernel (nbclient), on tiny runs."""

from __future__ import annotations

import os
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[2] / "examples" / "planning.ipynb"


def test_planning_notebook_executes(planning_runs, tmp_path, monkeypatch):
    root, _, _ = planning_runs
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # The kernel inherits the environment: the runs to load, the repository on the path, and
    # the session's compilation cache (tests/conftest.py).
    monkeypatch.setenv("FLIPJAX_RUNS", str(root))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(
        [str(NOTEBOOK.parents[1]), os.environ.get("PYTHONPATH", "")]))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})
              or "image/gif" in o.get("data", {})]
    assert len(images) >= 3  # the problems, the flows, the value curves (and the GIF)
    assert (tmp_path / "planning_example.gif").stat().st_size > 0
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "best beam" in text and text.count("success=") == 4
