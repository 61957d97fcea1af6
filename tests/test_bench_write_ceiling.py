"""benchmarks/bench_write_ceiling.py's permute-pattern kernels under the interpreter: each writes exactly the rows the
permute would (out[map[t, k]] = x[t]) and nothing else, so the times the benchmark reports are for the right bytes.
The expectation is built by plain indexing, not by any of the kernels."""
from __future__ import annotations

import importlib.util
import pathlib

import pytest


@pytest.fixture(scope="module")
def wc(triton_launch):
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_write_ceiling.py"
    spec = importlib.util.spec_from_file_location("bench_write_ceiling", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def case():
    """x [7, 64] int32, map [7, 3] with -1 entries and slots out of token order, 24 output rows (some never written)."""
    import torch
    gen = torch.Generator().manual_seed(5)
    x = torch.randint(1, 1000, (7, 64), dtype=torch.int32, generator=gen)
    slots = torch.randperm(24, generator=gen)[:21].to(torch.int32).view(7, 3)
    slots[1, 2] = slots[4, 0] = -1
    want = torch.zeros(24, 64, dtype=torch.int32)
    for t in range(7):
        for k in range(3):
            if slots[t, k] >= 0:
                want[slots[t, k]] = x[t]
    return x, slots, want


def _run(wc, case, name):
    import torch
    x, imap, want = case
    w, row = x.shape
    out = torch.zeros_like(want)
    if name == "rows":
        flat = imap.flatten()
        tok = (torch.arange(flat.numel()) // imap.shape[1])[flat >= 0].to(torch.int32)
        dst = flat[flat >= 0].contiguous()
        wc.rows_kernel[(3,)](x, tok, dst, out, dst.numel(), row, FROM_X=True, ROWS=8, BLOCK=32)
    elif name.startswith("scatter_s"):
        split = int(name[-1])
        wc.scatter_kernel[(w * split,)](x, imap, out, w, row, K_TOP=3, KP=4, FROM_X=1, SPLIT=split, BLOCK=32 // split)
    elif name == "multi":
        wc.scatter_multi_kernel[(2,)](x, imap, out, w, row, K_TOP=3, KP=4, TOKENS=4, BLOCK=64)
    elif name == "batch":
        wc.scatter_batch_kernel[(3,)](x, imap, out, w, row, 3, K_TOP=3, KP=4, TB=2, BLOCK=64)
    return out, want


@pytest.mark.parametrize("name", ["rows", "scatter_s1", "scatter_s2", "multi", "batch"])
def test_pattern_kernel_writes_the_permutes_rows_only(wc, case, name):
    import torch
    out, want = _run(wc, case, name)
    assert torch.equal(out, want)


def test_phased_kernel_writes_the_permutes_rows_only(wc, case):
    """The grid-stepped variant (bounded waits between its read and write phases) writes the same rows."""
    import torch
    x, imap, want = case
    out = torch.zeros_like(want)
    sync = torch.zeros(16, dtype=torch.int32)
    wc.scatter_phased_kernel[(3,)](x, imap, out, sync, x.shape[0], x.shape[1], 3, K_TOP=3, KP=4, TB=2, BLOCK=64,
                                   SPIN=4, AFTER_WRITES=True)
    assert torch.equal(out, want)
