"""notebooks/explain_a_question.ipynb runs top to bottom against a trained tiny world (pointed
at it through VQA_EXPLAIN_* environment variables), draws the overlays and prints an answer."""
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from pipeline.attribution import available_methods

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "explain_a_question.ipynb"


@pytest.mark.parametrize("model", ["mlb", "lstm_cnn"])
def test_notebook_explains_a_question_with_every_method(explained_world, monkeypatch, model):
    monkeypatch.setenv("VQA_EXPLAIN_ROOT", str(explained_world))
    monkeypatch.setenv("VQA_EXPLAIN_MODEL", model)
    monkeypatch.setenv("VQA_EXPLAIN_DATA", "synthetic_tiny")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # Runs in notebooks/ as Jupyter would; raises CellExecutionError on any failing cell.
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    answer = re.search(r"^A: (\S.*?)  \(p = (0\.\d+|1\.000)\)$", text, re.M)
    assert answer, text
    assert "Q: what color is the circle?" in text
    # Every method was run and reported; attention is skipped (with its reason) only for LSTM-CNN.
    for method in available_methods():
        assert re.search(rf"^{method}\s+(ok|skipped: .+)$", text, re.M), method
    assert bool(re.search(r"^attention\s+skipped", text, re.M)) == (model == "lstm_cnn")
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 1
    tokens = [o for o in outputs if "text/html" in o.get("data", {})]
    assert tokens and 'class="tok"' in tokens[0]["data"]["text/html"]
    assert str(explained_world) in text  # it really used the run it was pointed at
