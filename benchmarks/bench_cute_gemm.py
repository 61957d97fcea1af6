#!/usr/bin/env python3
"""The CuTe DSL masked grouped FP8 GEMM (backend/ops/cute/masked_gemm.py) beside the Gluon kernel and DeepGEMM
(issue 11: does B multicast over 2-CTA clusters close the gap to DeepGEMM?).

For each shape (N=4096/K=7168, N=7168/K=2048; 32 experts) and fill (valid rows per expert, or an uneven fill),
on one set of inputs (bench_gemm_peers.make_inputs, FP32 recipe): every CuTe config (bn 128 | 192 x cluster_m
1 | 2, the most stages that fit), `gluon` = launch.group_gemm_masked_fp32 as the triton provider calls it
(the Gluon kernel on SM90) and DeepGEMM's m_grouped_fp8_gemm_nt_masked when `deep_gemm` imports. Outputs are
poisoned with NaN first; each CuTe config is checked against the Gluon output (calc_diff, share of bitwise-
equal values) and for rows past masked_m untouched. Times: do_bench medians (bench_gpu.bench_ms).

    export PYTHONPATH=$(benchmarks/install_cute_dsl.sh)$(benchmarks/build_deepgemm.sh build .deepgemm):$PWD
    python3 benchmarks/bench_cute_gemm.py --out benchmarks/results/cute_gemm_h200.json

--configs picks CuTe configs by name, bn{128|192}_cl{1|2}[_s{stages}][_v1]: _v1 = the first path (per-thread
global A scale loads, every sub-tile through a padded shared tile and 16-byte stores), else A scales by TMA and
TMA stores of full sub-tiles; stages default to the most that fit. One line per (shape, fill): TFLOP/s of
each kernel, with its ratio to DeepGEMM and to `gluon`.
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import re
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_gemm_peers as P  # noqa: E402  (bench_gpu on the path, the repository on sys.path)
from _common import optional_import, write_json  # noqa: E402
from backend.ops.triton import launch as L  # noqa: E402
import torch  # noqa: E402

BG = P.BG
FILLS = (256, 512, 1024, 2048, "uneven_0_2048")
DEFAULT_CONFIGS = "bn128_cl2,bn192_cl2,bn128_cl2_v1,bn192_cl2_v1"
CONFIG_RE = re.compile(r"bn(128|192)_cl([12])(?:_s(\d))?(_v1|_pr)?")


def parse_configs(names: str) -> dict:
    """'bn192_cl2_s4,bn128_cl1_v1' -> {'cute_bn192_cl2_s4': config dict, ...}; ValueError naming a bad one.
    _v1: the first version (global A scales, no TMA store); _pr: partial sub-tiles stored from registers."""
    out = {}
    for name in filter(None, names.split(",")):
        m = CONFIG_RE.fullmatch(name)
        if m is None:
            raise ValueError(f"--configs: {name!r} is not bn{{128|192}}_cl{{1|2}}[_s<stages>][_v1|_pr]")
        v1 = m[4] == "_v1"
        cfg = dict(bn=int(m[1]), cluster_m=int(m[2]), sa_tma=not v1, tma_store=not v1)
        if m[4] == "_pr":
            cfg["partial_smem"] = False
        if m[3]:
            cfg["stages"] = int(m[3])
        out[f"cute_{name}"] = cfg
    return out


def kernels(cute_gemm, dg, x, out, e_num, m_cap, expected_m, configs):
    """name -> fn(counts) writing `out`: the CuTe configs, the Gluon kernel (forced: the launcher's rule runs the
    CuTe kernel itself from launch.CUTE_FROM_ROWS rows), DeepGEMM."""
    a, b, sa, sb = x["a"], x["b"], x["fa_mn"], x["fb"]
    ks = {"gluon": lambda c: L.group_gemm_masked_fp32(a, b, sa, sb, c, out, None, m_cap, expected_m=expected_m,
                                                      kernel="gluon")}
    if cute_gemm is not None:
        for name, cfg in configs.items():
            ks[name] = lambda c, cfg=cfg: cute_gemm.group_gemm_masked_fp32(a, b, sa, sb, c, out, m_cap, config=cfg)
    if dg is not None:
        ks["deepgemm"] = P.deepgemm_call(dg, x, out, e_num, m_cap, "fp32", expected_m)
    return ks


def run_fill(cute_gemm, dg, x, out, n, k, e_num, m_cap, fill, gen, configs):
    counts = BG.counts_for(fill, e_num, gen)
    valid = int(counts.sum())
    expected_m = max(1, valid // e_num) if isinstance(fill, str) else fill
    rec = dict(n=n, k=k, experts=e_num, rows_per_expert=fill, valid_rows=valid)
    flops = 2.0 * valid * n * k
    got = {}
    fns = kernels(cute_gemm, dg, x, out, e_num, m_cap, expected_m, configs)
    for name, fn in fns.items():
        try:
            out.fill_(float("nan"))
            fn(counts)                                       # also the first call's compile, untimed
            rows = P.valid_rows(out, counts, e_num, m_cap).float()
            r = dict(nan=bool(torch.isnan(rows).any()))
            if name != "deepgemm":                           # DeepGEMM stores whole tiles
                r["tail_untouched"] = P.untouched_tail(out, counts, e_num, m_cap)
            if "gluon" in got:
                r["calc_diff_vs_gluon"] = BG.calc_diff(rows, got["gluon"])
                r["bitwise_equal_share_vs_gluon"] = float((rows == got["gluon"]).float().mean())
            got[name] = rows
            r["ms"] = BG.bench_ms(lambda: fn(counts))
            r["tflops"] = flops / r["ms"] / 1e9
            r["correct"] = (not r["nan"] and r.get("tail_untouched", True)
                            and r.get("calc_diff_vs_gluon", 0.0) < P.SAME_INPUT_TOL)
        except Exception as exc:
            traceback.print_exc()
            r = dict(error=repr(exc)[:500])
        rec[name] = r
    pair_with_deepgemm(rec, fns, counts)
    for name, r in rec.items():
        if isinstance(r, dict) and "tflops" in r:
            for peer in ("gluon", "deepgemm"):
                if isinstance(rec.get(peer), dict) and "tflops" in rec[peer]:
                    r[f"vs_{peer}"] = r["tflops"] / rec[peer]["tflops"]
    return rec


def pair_with_deepgemm(rec: dict, fns: dict, counts) -> None:
    """`vs_deepgemm_paired` of every correct kernel but DeepGEMM: bench_gemm_peers.paired_ratio, each round timing
    the kernel and DeepGEMM back to back (one-shot ratios taken seconds apart drift by up to 10 % on this card)."""
    if "deepgemm" not in fns:
        return
    for name, fn in fns.items():
        r = rec.get(name)
        if name != "deepgemm" and isinstance(r, dict) and r.get("correct"):
            r["vs_deepgemm_paired"] = P.paired_ratio(lambda fn=fn: fn(counts), lambda: fns["deepgemm"](counts))


def summary_line(rec: dict) -> str:
    cells = [f"N={rec['n']} K={rec['k']} fill={rec['rows_per_expert']!s:>13}"]
    for name, r in rec.items():
        if not isinstance(r, dict):
            continue
        if "error" in r:
            cells.append(f"{name} ERR")
            continue
        nan = float("nan")
        paired = f" paired {r['vs_deepgemm_paired']:.2f}x" if "vs_deepgemm_paired" in r else ""
        cells.append(f"{name} {r['tflops']:5.0f} ({r.get('vs_deepgemm', nan):.2f}x DG{paired} {r.get('vs_gluon', nan):.2f}x gl"
                     f"{'' if r['correct'] else ' WRONG'} d={r.get('calc_diff_vs_gluon', 0.0):.1e})")
    return " | ".join(cells)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--fills", default=",".join(map(str, FILLS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in P.SHAPES))
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--configs", default=DEFAULT_CONFIGS, help="CuTe configs, comma-separated (module docstring)")
    args = ap.parse_args()
    configs = parse_configs(args.configs)
    fills = [int(f) if f.isdigit() else f for f in args.fills.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    dg, dg_err = optional_import("deep_gemm")
    cute_gemm, cute_err = optional_import("backend.ops.cute.masked_gemm")
    if cute_gemm is not None and not cute_gemm.available():
        cute_gemm, cute_err = None, cute_gemm.unavailable_reason()
    env = BG.environment() or {}
    res = dict(card=env.get("card"), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               environment=env, deepgemm=dict(version=getattr(dg, "__version__", None), error=dg_err),
               cute_error=cute_err, command=" ".join(sys.argv), configs=configs, cute_gemm=[])
    e_num = args.experts
    m_cap = max(f if isinstance(f, int) else int(f.split("_")[-1]) for f in fills)
    gen = torch.Generator(device="cuda").manual_seed(11)
    t0 = time.time()
    for n, k in shapes:
        x = P.make_inputs(n, k, e_num, m_cap, gen)
        out = torch.empty((e_num * m_cap, n), dtype=torch.bfloat16, device="cuda")
        for fill in fills:
            try:
                rec = run_fill(cute_gemm, dg, x, out, n, k, e_num, m_cap, fill, gen, configs)
            except Exception as exc:
                traceback.print_exc()
                rec = dict(n=n, k=k, experts=e_num, rows_per_expert=fill, error=repr(exc)[:500])
            res["cute_gemm"].append(rec)
            print(f"[{time.time() - t0:6.1f}s] {summary_line(rec) if 'error' not in rec else rec}", flush=True)
            write_json(pathlib.Path(args.out), res, indent=1, newline=False, default=str)
        del x, out
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
