"""Every tutorial in tutorials/ executes top to bottom; a failing cell fails its test.

Each notebook runs on a temporary copy (the committed notebooks and their outputs are never
rewritten) in a kernel of the running interpreter: a private ``python3`` kernelspec pointing at
``sys.executable`` is put first on JUPYTER_PATH, so a user-level kernelspec cannot hijack the run.
Figures use the non-interactive Agg backend.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

TUTORIALS = Path(__file__).resolve().parent.parent / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 300


def test_tutorials_are_present():
    """The numbered tutorials exist (guards against a glob that silently matches nothing)."""
    names = [path.stem for path in NOTEBOOKS]
    assert names == [
        "01_matching_as_linear_programming",
        "02_topk_feature_choice_mutual_choice",
        "03_prices_and_thresholds",
        "04_verify_your_own_rule",
        "05_training_with_aux_zipf_loss",
    ], names


@pytest.fixture(scope="module")
def kernel_environment(tmp_path_factory):
    """JUPYTER_PATH with a ``python3`` kernelspec for this interpreter; MPLBACKEND=Agg."""
    jupyter_dir = tmp_path_factory.mktemp("jupyter")
    spec_dir = jupyter_dir / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (test interpreter)",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("JUPYTER_PATH", str(jupyter_dir))
        patch.setenv("MPLBACKEND", "Agg")
        yield


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes(notebook: Path, tmp_path: Path, kernel_environment):
    copy = tmp_path / notebook.name
    shutil.copy(notebook, copy)
    nb = nbformat.read(copy, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    start = time.perf_counter()
    client.execute()  # raises CellExecutionError on the first failing cell
    seconds = time.perf_counter() - start
    errors = [out for cell in nb.cells if cell.cell_type == "code"
              for out in cell.get("outputs", []) if out.get("output_type") == "error"]
    assert not errors, errors
    print(f"{notebook.name}: {seconds:.1f} s")
