"""CPU benchmark of the backend's BlackwellGemmFusedMoeMethod (paddle provider) against the reference.

Same shape and threads as benchmarks/bench_cpu_ref.py: T=1024 tokens, K_top=8, E=16 experts,
H=2048, I=1024, one rank, 2 threads. Three parts, timed in the same run:

1. `FusedMoE.forward` on the ht path with R = 1 (`SingleRankEPRunner`, W = M = T) and on the TP
   path, next to `moe_ref.moe.moe_forward_fp8(..., use_ue8m0=True)` on pre-quantized weights, and
   a float32 matmul with the layer's FLOPs (the floor of any float32-GEMM CPU implementation).
   The outputs are compared (calc_diff) so a fast wrong answer cannot pass unnoticed.
2. `group_gemm_masked` (GEMM 1 of the layer: [E·M, H] x [E, 2I, H], M = 1024) with 1 row, 10 %,
   50 % and 100 % of the M rows valid in every expert: the masked GEMM must cost what its valid
   rows cost, not what the E·M buffer would (SPEC §6). Time = fixed cost per call (the 1-row
   time: work on the weights, independent of M) + marginal cost per valid row; both are reported.
3. Weight loading (BF16 -> UE8M0 FP8 + scales + CUTLASS bytes), once, reported on its own line.

Prints a table and writes benchmarks/results/cpu_backend.json with the machine's description.

    .venv/bin/python benchmarks/bench_cpu_backend.py [--repeats 3]
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
os.environ.setdefault("FD_MOE_OPS_PROVIDER", "paddle")
os.environ["FD_USE_BLACKWELL_GEMM"] = "1"

import numpy as np  # noqa: E402
import paddle  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # for _common, also when loaded by file path
from _common import cpu_machine_info, set_paddle_threads, timed, write_json  # noqa: E402
from backend import ops  # noqa: E402
from backend.moe.ep_runner import SingleRankEPRunner  # noqa: E402
from backend.moe.layer import FusedMoE  # noqa: E402
from backend.quantization import BlockWiseFP8Config  # noqa: E402
from moe_ref.metrics import calc_diff  # noqa: E402
from moe_ref.moe import make_moe_inputs, make_moe_weights, moe_forward_fp8, quantize_moe_weights  # noqa: E402

T, K_TOP, E, H, I = 1024, 8, 16, 2048, 1024
THREADS = 2
FILLS = (1 / T, 0.1, 0.5, 1.0)          # 1 row per expert, then 10 %, 50 %, 100 % of M
RESULTS = pathlib.Path(__file__).resolve().parent / "results" / "cpu_backend.json"


def gemm_fill_inputs(layer, provider, fill: float, rng: np.random.Generator):
    """GEMM 1 operands on the M = T masked layout with round(fill·M) valid rows per expert."""
    m = T
    valid = max(1, int(round(fill * m)))
    a = paddle.to_tensor(rng.normal(0, 1, size=(E * m, H)).astype(np.float32)).astype(paddle.float8_e4m3fn)
    words = -(-(-(-H // 128)) // 4)
    # UE8M0 bytes 120..127 (scales 2^-7..2^0) packed 4 to a word
    exp_bytes = rng.integers(120, 128, size=(E, m, words * 4)).astype(np.uint8)
    scale = paddle.to_tensor(exp_bytes.view("<i4").astype(np.int32))
    counts = paddle.full([E], valid, dtype=paddle.int32)
    sfa = provider.unpack_and_convert_scale(scale, counts)
    out = paddle.empty([E * m, 2 * I], dtype=paddle.bfloat16)
    args = (a, layer.up_gate_proj_weight, sfa, layer.up_gate_proj_weight_scale_inv, counts, out, None, m, -1)
    return args, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    set_paddle_threads(THREADS)
    provider = ops.get_provider()
    info = cpu_machine_info(THREADS, paddle=paddle.__version__, numpy=np.__version__,
                            ops_provider=provider.name)
    flops = 2 * T * K_TOP * (H * 2 * I + I * H)

    weights = make_moe_weights(E, H, I, seed=0)
    x, topk_weights, topk_ids = make_moe_inputs(T, H, E, K_TOP, seed=1)

    start = time.perf_counter()
    layer = FusedMoE(E, K_TOP, H, I, BlockWiseFP8Config(is_checkpoint_bf16=True), moe_phase="prefill",
                     max_tokens_per_rank=T)
    layer.load_weights(weights.w_up, weights.w_down)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    quantized = quantize_moe_weights(weights.w_up, weights.w_down, use_ue8m0=True)
    quantized.dequantized()
    ref_prep_s = time.perf_counter() - start

    runner = SingleRankEPRunner(E)
    ours_ht = layer(x, topk=(topk_weights, topk_ids), runner=runner)
    ours_tp = layer(x, topk=(topk_weights, topk_ids))
    ref = moe_forward_fp8(x, None, None, topk_weights, topk_ids, True, quantized_weights=quantized)
    diffs = {"ht vs reference": calc_diff(ours_ht, ref), "tp vs reference": calc_diff(ours_tp, ref)}

    a = paddle.randn([T * K_TOP, H], dtype=paddle.float32)
    b = paddle.randn([3 * I, H], dtype=paddle.float32)
    rows = [("float32 matmul [T·K_top, H] x [H, 3I] (floor)",
             timed(lambda: paddle.matmul(a, b, transpose_y=True), args.repeats))]
    rows.append(("moe_ref moe_forward_fp8 (UE8M0, masked)",
                 timed(lambda: moe_forward_fp8(x, None, None, topk_weights, topk_ids, True,
                                               quantized_weights=quantized), args.repeats)))
    rows.append((f"backend apply, ht path R=1 ({provider.name} provider)",
                 timed(lambda: layer(x, topk=(topk_weights, topk_ids), runner=runner), args.repeats)))
    rows.append((f"backend apply, tp path ({provider.name} provider)",
                 timed(lambda: layer(x, topk=(topk_weights, topk_ids)), args.repeats)))
    floor_s = statistics.median(rows[0][1])
    ref_s = statistics.median(rows[1][1])

    print(f"CPU backend MoE: T={T} K_top={K_TOP} E={E} H={H} I={I}, {THREADS} threads, "
          f"{flops / 1e9:.1f} GFLOP per layer, provider {provider.name}; {info['cpu']}")
    print(f"{'what':52s} {'median s':>9s} {'GFLOP/s':>8s} {'x floor':>8s} {'x ref':>7s}")
    layer_results = []
    for name, times in rows:
        med = statistics.median(times)
        print(f"{name:52s} {med:9.3f} {flops / med / 1e9:8.1f} {med / floor_s:8.2f} {med / ref_s:7.2f}")
        layer_results.append({"name": name, "median_s": med, "times_s": times, "gflops": flops / med / 1e9,
                              "ratio_to_matmul_floor": med / floor_s, "ratio_to_reference": med / ref_s})
    print(f"{'weights: load + UE8M0 quantize + CUTLASS bytes (backend)':52s} {load_s:9.3f}")
    print(f"{'weights: quantize + dequantize (reference)':52s} {ref_prep_s:9.3f}")
    for name, d in diffs.items():
        print(f"calc_diff {name}: {d:.2e}")

    rng = np.random.default_rng(2)
    gemm_results = []
    print(f"\ngroup_gemm_masked, GEMM 1 (N=2I={2 * I}, K=H={H}), E={E}, M={T} rows per expert")
    print(f"{'fill':>6s} {'valid rows':>10s} {'median s':>9s} {'us / valid row':>15s} {'x 100 %':>8s}")
    for fill in FILLS:
        gemm_args, valid = gemm_fill_inputs(layer, provider, fill, rng)
        times = timed(lambda: provider.group_gemm_masked(*gemm_args), args.repeats)
        gemm_results.append({"fill": fill, "valid_rows_per_expert": valid, "valid_rows": valid * E,
                             "median_s": statistics.median(times), "times_s": times,
                             "gemm_flops": 2 * valid * E * 2 * I * H})
    full = gemm_results[-1]["median_s"]
    for g in gemm_results:
        g["ratio_to_full"] = g["median_s"] / full
        g["us_per_valid_row"] = g["median_s"] / g["valid_rows"] * 1e6
        print(f"{g['fill'] * 100:5.1f}% {g['valid_rows']:10d} {g['median_s']:9.3f} {g['us_per_valid_row']:15.1f} "
              f"{g['ratio_to_full']:8.2f}")

    one, last = gemm_results[0], gemm_results[-1]
    marginal_us = (last["median_s"] - one["median_s"]) / (last["valid_rows"] - one["valid_rows"]) * 1e6
    print(f"fixed cost per call (1 row per expert): {one['median_s']:.3f} s; marginal cost: {marginal_us:.1f} us "
          f"per valid row; predicted vs measured at each fill: "
          + ", ".join(f"{(one['median_s'] + marginal_us * 1e-6 * (g['valid_rows'] - one['valid_rows'])):.2f}/"
                      f"{g['median_s']:.2f} s" for g in gemm_results))

    ht = layer_results[2]["median_s"]
    print(f"\nbackend ht / reference: {ht / ref_s:.2f}x; backend ht / float32 floor: {ht / floor_s:.2f}x")
    write_json(RESULTS, {
        "benchmark": "bench_cpu_backend", "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "shape": {"T": T, "K_top": K_TOP, "E": E, "H": H, "I": I, "M": T, "W": T}, "flops_per_layer": flops,
        "machine": info, "layer": layer_results, "calc_diff": diffs,
        "weights_load_s": {"backend": load_s, "reference": ref_prep_s},
        "group_gemm_masked_fill": gemm_results,
        "group_gemm_masked_fixed_s": one["median_s"], "group_gemm_masked_marginal_us_per_row": marginal_us,
        "ratio_backend_ht_to_reference": ht / ref_s, "ratio_backend_ht_to_matmul_floor": ht / floor_s,
    })
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
