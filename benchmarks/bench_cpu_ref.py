"""CPU benchmark of the reference FP8 MoE layer (moe_ref.moe.moe_forward_fp8).

Shape: T=1024 tokens, K_top=8, E=16 experts, H=2048, I=1024 (one rank, no EP).
Beside it, in the same run, one float32 matmul with the same FLOPs is timed: the floor any
CPU implementation built on float32 GEMMs can reach. FLOPs of the layer (GEMMs only):

    2 · T · K_top · (H · 2I + I · H)      (GEMM 1: N = 2I, K = H; GEMM 2: N = H, K = I)

which is exactly one [T·K_top, H] x [H, 3I] matmul. Target: the reference within 3x of it.

Weights are quantized (and dequantized to float32) once before timing, as a server does at
load time; that preparation is reported on its own line. The candidates are timed round-robin
(the machine is shared: each round sees the same background load) and the ratio is reported
both from the best times and as the median of per-round ratios. Prints a table and writes
benchmarks/results/cpu_ref.json.

    .venv/bin/python benchmarks/bench_cpu_ref.py [--repeats 5]
"""
from __future__ import annotations

import argparse
import datetime
import os
import pathlib
import statistics
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np  # noqa: E402
import paddle  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # for _common, also when loaded by file path
from _common import cpu_machine_info, set_paddle_threads, timed_interleaved, write_json  # noqa: E402
from moe_ref.moe import make_moe_inputs, make_moe_weights, moe_forward_fp8, quantize_moe_weights  # noqa: E402

T, K_TOP, E, H, I = 1024, 8, 16, 2048, 1024
THREADS = 2
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cpu_ref.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    set_paddle_threads(THREADS)
    info = cpu_machine_info(THREADS, paddle=paddle.__version__, numpy=np.__version__)

    weights = make_moe_weights(E, H, I, seed=0)
    x, topk_weights, topk_ids = make_moe_inputs(T, H, E, K_TOP, seed=1)
    flops = 2 * T * K_TOP * (H * 2 * I + I * H)

    start = time.perf_counter()
    quantized = {False: quantize_moe_weights(weights.w_up, weights.w_down, use_ue8m0=False),
                 True: quantize_moe_weights(weights.w_up, weights.w_down, use_ue8m0=True)}
    for qw in quantized.values():
        qw.dequantized()
    prep_s = (time.perf_counter() - start) / 2

    a = paddle.randn([T * K_TOP, H], dtype=paddle.float32)
    b = paddle.randn([3 * I, H], dtype=paddle.float32)
    floor_name = "float32 matmul [T·K_top, H] x [H, 3I] (floor)"
    fns = {floor_name: lambda: paddle.matmul(a, b, transpose_y=True)}
    for use_ue8m0 in (False, True):
        name = f"moe_forward_fp8 ({'UE8M0' if use_ue8m0 else 'FP32'} scales, masked)"
        fns[name] = (lambda u=use_ue8m0: moe_forward_fp8(x, None, None, topk_weights, topk_ids, u,
                                                         quantized_weights=quantized[u]))
    times = timed_interleaved(fns, args.repeats)
    floor = times[floor_name]

    print(f"CPU reference MoE: T={T} K_top={K_TOP} E={E} H={H} I={I}, {THREADS} threads, "
          f"{flops / 1e9:.1f} GFLOP per layer; {info['cpu']}")
    print(f"{'what':52s} {'min s':>7s} {'median s':>9s} {'GFLOP/s':>8s} {'x floor':>8s} {'per-round':>10s}")
    results = []
    for name, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        # ratio of the best times (least disturbed by other jobs), and the median of per-round ratios
        ratio = best / min(floor)
        round_ratio = statistics.median(t / f for t, f in zip(ts, floor))
        print(f"{name:52s} {best:7.3f} {med:9.3f} {flops / best / 1e9:8.1f} {ratio:8.2f} {round_ratio:10.2f}")
        results.append({"name": name, "min_s": best, "median_s": med, "times_s": ts,
                        "gflops_at_min": flops / best / 1e9, "ratio_to_matmul_floor": ratio,
                        "median_round_ratio": round_ratio})
    print(f"{'weights: quantize + dequantize once (not timed above)':52s} {prep_s:7.3f}")
    worst = max(max(r["ratio_to_matmul_floor"], r["median_round_ratio"]) for r in results[1:])
    print(f"worst ratio to the matmul floor: {worst:.2f} (target <= 3); "
          f"load average at start {info['load_average_at_start']}")

    write_json(RESULTS, {
        "benchmark": "bench_cpu_ref", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "shape": {"T": T, "K_top": K_TOP, "E": E, "H": H, "I": I}, "flops_per_layer": flops,
        "machine": info, "results": results, "weights_prep_s": prep_s,
        "worst_ratio_to_matmul_floor": worst, "target_ratio": 3.0,
        "method": f"{args.repeats} interleaved rounds after one warm-up; ratio_to_matmul_floor = min / min, "
                  "median_round_ratio = median over rounds of time / floor time of the same round",
    })
    print(f"wrote {RESULTS.relative_to(pathlib.Path.cwd()) if RESULTS.is_relative_to(pathlib.Path.cwd()) else RESULTS}")


if __name__ == "__main__":
    main()
