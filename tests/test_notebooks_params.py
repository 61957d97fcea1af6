"""Every notebook runs with parameters other than its defaults (issue 14: "parameters that work"),
and every committed pair opens in JupyterLab's jupytext pairing (`make lab`).

nbval (in `make test`) re-runs each committed notebook with its default parameters; this test
executes each one with papermill and a different parameter set, chosen to reach the code paths
the defaults do not (M given explicitly, S a multiple of 4, a weight of fewer than 128 rows,
EP over three ranks, tiny sweeps), and checks that the run finishes without an error or stderr
output and that the outputs follow the parameters (a line computed from them appears).
"""
from pathlib import Path

import jupytext
import nbformat
import papermill
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"

# (notebook, parameters, text that must appear in some output of the run)
CASES = [
    ("00_fp8_primer", {"SCALE_DEMO_GROUPS": 7, "SEED": 5}, "7 groups"),
    ("01_permute_semantics", {"NUM_TOKENS": 9, "NUM_EXPERTS": 5, "TOP_K": 3, "HIDDEN": 384, "MAX_TOKEN_NUM": 8,
                              "EP_RANKS": 3, "SEED": 3}, "T=9  E=5  K_top=3  H=384  S=3  M=8"),
    ("02_scale_conversion", {"NUM_TOKENS": 5, "HIDDEN": 512, "WEIGHT_ROWS": 100, "NUM_EXPERTS": 3, "TOP_K": 1,
                             "SEED": 1}, "T=5  H=512  S=4 groups  C=1 packed words per row"),
    ("03_correctness", {"CONFIGS": [{"T": 16, "H": 256, "I": 128, "E": 4, "K": 2, "R": 1},
                                    {"T": 8, "H": 128, "I": 128, "E": 6, "K": 1, "R": 3}],
                        "CHECKPOINTS": ["bf16", "fp8"], "PROVIDERS": ["paddle"], "SEED": 2,
                        "MX_CONFIG": {"T": 16, "H": 256, "I": 128, "E": 4, "K": 2}, "MX_OUTLIER_FRACTION": 0.05,
                        "MX_OUTLIER_SCALES": [50], "MX_E2E_CONFIG": {"T": 8, "H": 128, "I": 128, "E": 2, "K": 1}},
     "T=16 H=256 I=128 E= 4 K=2 R=1"),
    ("04_performance", {"HIDDEN": 256, "INTER": 128, "NUM_EXPERTS": 4, "TOP_K": 2, "TOKENS": [16, 48],
                        "EXPERTS": [2, 6], "TOKENS_FOR_EXPERT_SWEEP": 40, "FILL_M": 64, "FILLS": [0.05, 0.5, 1.0],
                        "REPEATS": 1, "MEMORY_SHAPE": {"E": 8, "H": 1024, "I": 256, "K": 4, "R": 2,
                                                       "max_tokens_per_rank": 512}},
     "GEMM 1: E=4, M=64, N=2I=256, K=H=256"),
]


def _outputs_text(nb):
    """All text of all outputs (streams, text/plain, text/markdown), one string."""
    parts = []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            if out.get("output_type") == "stream":
                parts.append(out.get("text", ""))
            for key in ("text/plain", "text/markdown"):
                parts.append(out.get("data", {}).get(key, ""))
    return "\n".join(parts)


def test_every_notebook_has_a_case():
    sources = sorted(p.stem for p in NOTEBOOKS.glob("[0-9][0-9]_*.py"))
    assert sorted(name for name, _, _ in CASES) == sources


@pytest.mark.parametrize("name, params, expected", CASES, ids=[c[0] for c in CASES])
def test_notebook_runs_with_other_parameters(name, params, expected, tmp_path):
    out_path = tmp_path / f"{name}.ipynb"
    papermill.execute_notebook(str(NOTEBOOKS / f"{name}.ipynb"), str(out_path), parameters=params,
                               kernel_name="python3", cwd=str(NOTEBOOKS), progress_bar=False)
    nb = nbformat.read(out_path, as_version=4)
    injected = [c for c in nb.cells if "injected-parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(injected) == 1, f"{name}: papermill did not inject the parameters (no cell tagged 'parameters'?)"
    stderr = [c.source.splitlines()[0] for c in nb.cells if c.cell_type == "code"
              for o in c.get("outputs", []) if o.get("output_type") == "stream" and o.get("name") == "stderr"]
    assert not stderr, f"{name}: stderr output (warnings) with parameters {params} in cells starting {stderr}"
    text = _outputs_text(nb)
    assert expected in text, f"{name}: expected {expected!r} in the outputs of a run with {params}"


def _body(text):
    """py:percent text without its YAML header (jupytext rewrites the header; the cells are what pair)."""
    lines = text.splitlines()
    if lines and lines[0] == "# ---":
        lines = lines[lines.index("# ---", 1) + 1:]
    return "\n".join(lines).strip()


@pytest.mark.parametrize("py", sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py")), ids=lambda p: p.name)
def test_ipynb_renders_back_to_its_py(py):
    """jupytext's contents manager (make lab) refuses to open a pair whose .ipynb is newer than its .py
    and renders to different text, e.g. with the empty `tags` lists papermill adds to every cell
    (`jupytext --to ipynb --update NN.py` after papermill removes them and keeps the outputs)."""
    rendered = jupytext.writes(jupytext.read(py.with_suffix(".ipynb")), fmt="py:percent")
    assert _body(rendered) == _body(py.read_text()), (
        f"{py.with_suffix('.ipynb').name} renders to different py:percent text than {py.name}: "
        f"run `jupytext --to ipynb --update {py.name}` in notebooks/")
