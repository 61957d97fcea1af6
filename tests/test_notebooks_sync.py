"""Each notebook is a jupytext pair: `notebooks/NN_name.py` (py:percent, the source that is
edited and reviewed) and `notebooks/NN_name.ipynb` (the same cells plus the outputs of the
default parameters, checked by nbval). A pair out of sync means the committed outputs do not
belong to the reviewed code, so it fails here.
"""
from pathlib import Path

import jupytext
import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
PAIRED = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def _cells(nb):
    """(cell_type, source without trailing whitespace) of every cell: what jupytext pairs."""
    return [(c.cell_type, c.source.rstrip()) for c in nb.cells]


def _tags(cell):
    return list(cell.get("metadata", {}).get("tags", []))


def test_there_are_notebooks():
    assert SOURCES, f"no notebooks/NN_name.py found in {NOTEBOOKS}"


@pytest.mark.parametrize("ipynb", PAIRED, ids=lambda p: p.name)
def test_every_ipynb_has_its_py(ipynb):
    assert ipynb.with_suffix(".py").exists(), f"{ipynb.name} has no py:percent source beside it"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.name)
def test_pair_in_sync(py):
    ipynb = py.with_suffix(".ipynb")
    assert ipynb.exists(), f"{py.name}: paired {ipynb.name} missing (run `jupytext --sync {py}` and execute it)"
    text = jupytext.read(py, fmt="py:percent")
    stored = nbformat.read(ipynb, as_version=4)
    a, b = _cells(text), _cells(stored)
    assert len(a) == len(b), f"{py.name}: {len(a)} cells in .py, {len(b)} in .ipynb"
    for i, (ca, cb) in enumerate(zip(a, b)):
        assert ca == cb, f"{py.name}: cell {i} differs between .py and .ipynb:\n--- py\n{ca[1]}\n--- ipynb\n{cb[1]}"
    for i, (ca, cb) in enumerate(zip(text.cells, stored.cells)):
        assert set(_tags(ca)) == set(_tags(cb)), f"{py.name}: cell {i} tags {_tags(ca)} vs {_tags(cb)}"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.name)
def test_exactly_one_parameters_cell(py):
    nb = jupytext.read(py, fmt="py:percent")
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in _tags(c)]
    assert len(tagged) == 1, f"{py.name}: expected exactly one cell tagged 'parameters', found cells {tagged}"
    assert nb.cells[tagged[0]].cell_type == "code"


@pytest.mark.parametrize("py", SOURCES, ids=lambda p: p.name)
def test_ipynb_is_executed(py):
    """The committed .ipynb holds the outputs of a full run (nbval compares against them)."""
    ipynb = py.with_suffix(".ipynb")
    if not ipynb.exists():
        pytest.skip("pair missing: reported by test_pair_in_sync")
    nb = nbformat.read(ipynb, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    unexecuted = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and c.get("execution_count") is None]
    assert not unexecuted, f"{ipynb.name}: code cells {unexecuted} have no execution_count"
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{ipynb.name}: not executed top to bottom in one run: {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{ipynb.name}: stored outputs contain an error"
    stderr = [c.source.splitlines()[0] for c in code for o in c.get("outputs", [])
              if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{ipynb.name}: stderr output (warnings) in cells starting {stderr}"
    pngs = sum("image/png" in o.get("data", {}) for c in code for o in c.get("outputs", []))
    assert pngs >= 1, f"{ipynb.name}: no PNG figure in the stored outputs"
