"""benchmarks/bench_gemm_peers.py's log line (CPU: no kernel runs)."""
from __future__ import annotations


def _record(**variant):
    kernel = dict(tflops=1000.0, vs_deepgemm=0.9, correct=True, calc_diff_vs_deepgemm=0.0)
    return dict(n=4096, k=7168, rows_per_expert=256, cublas_tflops=1100.0, deepgemm_tflops=1111.0,
                ours_vs_deepgemm_paired=0.87, launch_fp32=dict(kernel), gluon_fp32_order=dict(kernel, **variant))


def test_summary_line_shows_a_variants_paired_ratio(peers):
    """A variant timed back to back with DeepGEMM (vs_deepgemm_paired) shows that ratio beside its one-shot one; a
    kernel without it shows none, and a wrong output is flagged."""
    line = peers.summary_line(_record(vs_deepgemm_paired=0.7712))
    cells = {c.split()[0]: c for c in line.split(" | ")}
    assert "paired 0.77x" in cells["gluon_fp32_order"]
    assert "paired" not in cells["launch_fp32"]
    assert "launch_fp32/DG paired 0.87x" in line
    assert "WRONG" in peers.summary_line(_record(correct=False)).split(" | ")[-1]
