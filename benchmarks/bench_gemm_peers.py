#!/usr/bin/env python3
"""Our masked grouped FP8 GEMM beside DeepGEMM's and cuBLASLt's, same inputs, same run, same card (issue 11).

For each shape (N=4096/K=7168 and N=7168/K=2048, E=32 experts) and fill (valid rows per expert, or an
uneven fill), on one set of inputs:

- DeepGEMM `m_grouped_fp8_gemm_nt_masked` (SM90: FP32 1x128 activation scales, MN-major TMA-aligned,
  and 128x128 weight scales), given the fill as its `expected_m`;
- ours: the `tl` kernels of backend/ops/triton/launch.py (FP32 recipe and CUTLASS UE8M0 bytes, forced with
  kernel="tl") and, where it imports and runs (SM90), the Gluon kernel of backend/ops/triton/gluon_gemm.py with
  both recipes, and the CuTe DSL kernel of backend/ops/cute (`cute_fp32`) where the DSL imports; and the
  launchers as the `triton` provider calls them (`launch_fp32`, `launch_ue8m0`: the
  kernel launch.masked_gemm_kernel picks for the fill, named in the record's `kernel` / `kernel_ue8m0`);
  `launch_ue8m0` with its per-call byte check (host sync), `launch_ue8m0_stated` as the method calls it now
  (sfa_per_group + sfb_per_block stated: no check, no sync; the fill as expected_m);
- DeepGEMM as the `deep_gemm` provider runs it (backend/ops/deep_gemm_launch.py: CUTLASS bytes converted per
  call, valid rows copied out of a scratch): `deep_gemm_provider` with expected_m = M (the provider without the
  hint), `deep_gemm_provider_hint` with the fill as expected_m (as the method calls it now);
- cuBLASLt blockwise dense (`torch._scaled_mm`) on one GEMM of the same rows (the yardstick of bench_gpu.py).

Every output is poisoned with NaN first; each of ours is compared with DeepGEMM's output on the same inputs
(all valid rows, calc_diff; the UE8M0 recipe against DeepGEMM fed the decoded power-of-two scales) and
must leave rows past masked_m untouched. TFLOP/s = 2 x valid rows x N x K / median time (do_bench).

    PYTHONPATH=$(benchmarks/build_deepgemm.sh build .deepgemm) python3 benchmarks/bench_gemm_peers.py --out X.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_gpu as BG  # noqa: E402  (puts the repository on sys.path; torch-only)
from _common import optional_import, write_json  # noqa: E402
from backend.ops import deep_gemm_launch as DGL  # noqa: E402
from backend.ops.triton import launch as L  # noqa: E402
import torch  # noqa: E402

SHAPES = ((4096, 7168), (7168, 2048))
FILLS = (512, 64, 128, 256, 1024, 2048, "uneven_0_1024", "uneven_0_2048")
SAME_INPUT_TOL = 1e-6      # issue 11: same FP32 accumulation up to order


def valid_rows(out: torch.Tensor, counts: torch.Tensor, e_num: int, m_cap: int) -> torch.Tensor:
    """out [E·M, N] -> the valid rows only [Σ counts, N], in expert order."""
    keep = torch.arange(m_cap, device=out.device)[None, :] < counts[:, None]
    return out.view(e_num, m_cap, -1)[keep]


def untouched_tail(out: torch.Tensor, counts: torch.Tensor, e_num: int, m_cap: int) -> bool:
    dead = torch.arange(m_cap, device=out.device)[None, :] >= counts[:, None]
    return bool(torch.isnan(out.view(e_num, m_cap, -1)[dead].float()).all())


def make_inputs(n: int, k: int, e_num: int, m_cap: int, gen):
    """Operands and both scale recipes; DeepGEMM gets exactly the FP32 values our kernels decode."""
    s = k // 128
    x = dict(a=BG.rand_fp8((e_num * m_cap, k), gen), b=BG.rand_fp8((e_num, n, k), gen, scale=0.5))
    fa = (torch.rand(e_num, m_cap, s, device="cuda", generator=gen) + 0.5) * 2.0 ** -4
    x["fb"] = (torch.rand(e_num, n // 128, s, device="cuda", generator=gen) + 0.5) * 2.0 ** -6
    x["fa_mn"] = BG.mn_major(fa)
    ea = torch.randint(120, 130, (e_num, m_cap, s), dtype=torch.int32, device="cuda", generator=gen)
    eb = torch.randint(118, 126, (e_num, n // 128, s), dtype=torch.int32, device="cuda", generator=gen)
    x["sfa"] = L.unpack_and_convert_scale(BG.mn_major(BG.pack_words(ea)), None)
    x["sfb"] = L.unpack_and_convert_scale(BG.pack_words(eb.repeat_interleave(128, 1)), None)
    x["pa_mn"] = BG.mn_major(torch.exp2(ea.float() - 127))
    x["pb"] = torch.exp2(eb.float() - 127).contiguous()
    return x


CANDIDATES = ("tl_fp32", "tl_ue8m0", "gluon_fp32", "gluon_ue8m0", "cute_fp32")    # what a provider call would run


def our_kernels(x, out, m_cap, gluon, expected_m, variants=None):
    """name -> (recipe, fn(counts)) for every kernel of ours that this machine can run."""
    a, b = x["a"], x["b"]
    ks = {
        "tl_fp32": ("fp32", lambda c: L.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out, None, m_cap,
                                                               kernel="tl")),
        "tl_ue8m0": ("ue8m0", lambda c: L.group_gemm_masked(a, b, x["sfa"], x["sfb"], c, out, None, m_cap,
                                                             sfb_per_block=True, kernel="tl")),
        "launch_fp32": ("fp32", lambda c: L.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out, None, m_cap,
                                                                   expected_m=expected_m)),
        "launch_ue8m0": ("ue8m0", lambda c: L.group_gemm_masked(a, b, x["sfa"], x["sfb"], c, out, None, m_cap,
                                                                impl="auto", sfb_per_block=True,
                                                                expected_m=expected_m)),
        # what the method's calls run now: the bytes stated (sfa_per_group, sfb_per_block), no check, no sync
        "launch_ue8m0_stated": ("ue8m0", lambda c: L.group_gemm_masked(a, b, x["sfa"], x["sfb"], c, out, None, m_cap,
                                                                       impl="auto", sfb_per_block=True,
                                                                       sfa_per_group=True, expected_m=expected_m)),
    }
    if L.cute_gemm.available():        # the CuTe DSL kernel (optional install), forced, with the fill as its hint
        ks["cute_fp32"] = ("fp32", lambda c: L.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out, None,
                                                                      m_cap, expected_m=expected_m, kernel="cute"))
    if gluon is not None:
        ks["gluon_fp32"] = ("fp32", lambda c: gluon.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out,
                                                                           None, m_cap, expected_m=expected_m))
        ks["gluon_ue8m0"] = ("ue8m0", lambda c: gluon.group_gemm_masked(a, b, x["sfa"], x["sfb"], c, out,
                                                                        None, m_cap, expected_m=expected_m))
        # the other tile shape too (128 x BN vs 64 x 2BN), to see where the pick_config boundary belongs
        other = 4096 if expected_m <= 64 else 64
        ks["gluon_fp32_alt"] = ("fp32", lambda c: gluon.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out,
                                                                               None, m_cap, expected_m=other))
        # the 128 x 192 tile (gluon_gemm.wide_config): DeepGEMM's SM90 tile, 1.5x the MMA work per promotion
        wide = gluon.wide_config()
        ks["gluon_fp32_wide"] = ("fp32", lambda c: gluon.group_gemm_masked_fp32(a, b, x["fa_mn"], x["fb"], c, out,
                                                                                None, m_cap, config=wide))
        ks["gluon_ue8m0_wide"] = ("ue8m0", lambda c: gluon.group_gemm_masked(a, b, x["sfa"], x["sfb"], c, out,
                                                                             None, m_cap, config=wide))
        for vname, over in (variants or {}).items():     # explicit configs (DIAG ones give wrong results)
            cfg = dict(gluon.pick_config(expected_m, b.shape[1], kg=over.get("KG", 1)), **over)
            ks[f"gluon_fp32_{vname}"] = ("fp32", lambda c, cfg=cfg: gluon.group_gemm_masked_fp32(
                a, b, x["fa_mn"], x["fb"], c, out, None, m_cap, config=cfg))
    return ks


def deepgemm_call(dg, x, out, e_num, m_cap, recipe, expected_m):
    a3 = x["a"].view(e_num, m_cap, -1)
    sa, sb = (x["fa_mn"], x["fb"]) if recipe == "fp32" else (x["pa_mn"], x["pb"])
    d3 = out.view(e_num, m_cap, -1)
    return lambda c: DGL.call_masked(dg, a3, sa, x["b"], sb, d3, c, expected_m, 9)   # SM90: disable_ue8m0_cast


def deep_gemm_provider_call(dg, x, out, e_num, m_cap, arch=9, expected_m=None):
    """DeepGEMM as the deep_gemm provider runs it on the contract's CUTLASS bytes: activation scales converted in
    the call, weight scales prepared once beforehand (as the method does at weight load: prepare_weight_scales /
    sfb_prepared), scratch output, valid rows copied. expected_m None: M (the provider without the hint). The
    provider's sfa byte check (one sync, skipped with sfa_per_group as the method now calls it) is not timed
    here, with or without the hint, as in the runs before."""
    a, b = x["a"], x["b"]
    n, k = b.shape[1], b.shape[2]
    sb = DGL.weight_scales(x["sfb"], n, k, arch)
    return lambda c: DGL.run_masked(dg, a, b, DGL.activation_scales(x["sfa"], m_cap, k, arch), sb, c, out, m_cap,
                                    arch, expected_m=expected_m)


def run_fill(dg, x, outs, n, k, e_num, m_cap, fill, gen, gluon, variants=None):
    counts = BG.counts_for(fill, e_num, gen)
    valid = int(counts.sum())
    flops = 2.0 * valid * n * k
    expected_m = max(1, valid // e_num) if isinstance(fill, str) else fill
    rec = dict(n=n, k=k, experts=e_num, rows_per_expert=fill, valid_rows=valid, expected_m=expected_m)
    cub_rows = -(-max(valid, 128) // 128) * 128
    cub, rec["cublas_check_calc_diff"] = BG.cublas_blockwise(cub_rows, n, k, gen)
    rec["cublas_tflops"] = 2.0 * cub_rows * n * k / BG.bench_ms(cub) / 1e9
    ref = {}
    if dg is not None:
        for recipe in ("fp32", "ue8m0"):
            outs["dg"].fill_(float("nan"))
            fn = deepgemm_call(dg, x, outs["dg"], e_num, m_cap, recipe, expected_m)
            fn(counts)
            ref[recipe] = valid_rows(outs["dg"], counts, e_num, m_cap).float()
            rec[f"deepgemm_{recipe}_tail_untouched"] = untouched_tail(outs["dg"], counts, e_num, m_cap)
        rec["deepgemm_ms"] = BG.bench_ms(lambda: fn(counts))
        rec["deepgemm_tflops"] = flops / rec["deepgemm_ms"] / 1e9
    tl_out = {}
    kernels = our_kernels(x, outs["ours"], m_cap, gluon, expected_m, variants)
    if dg is not None:
        kernels["deep_gemm_provider"] = ("ue8m0", deep_gemm_provider_call(dg, x, outs["ours"], e_num, m_cap))
        kernels["deep_gemm_provider_hint"] = ("ue8m0", deep_gemm_provider_call(dg, x, outs["ours"], e_num, m_cap,
                                                                               expected_m=expected_m))
    for name, (recipe, fn) in kernels.items():
        try:
            outs["ours"].fill_(float("nan"))
            fn(counts)
            got = valid_rows(outs["ours"], counts, e_num, m_cap).float()
            r = dict(tail_untouched=untouched_tail(outs["ours"], counts, e_num, m_cap),
                     nan=bool(torch.isnan(got).any()))
            if recipe in ref:
                r["calc_diff_vs_deepgemm"] = BG.calc_diff(got, ref[recipe])
            r["ms"] = BG.bench_ms(lambda: fn(counts))
            r["tflops"] = flops / r["ms"] / 1e9
            if "deepgemm_tflops" in rec:
                r["vs_deepgemm"] = r["tflops"] / rec["deepgemm_tflops"]
            r["vs_cublas"] = r["tflops"] / rec["cublas_tflops"]
            r["correct"] = (r["tail_untouched"] and not r["nan"]
                            and r.get("calc_diff_vs_deepgemm", 0.0) < SAME_INPUT_TOL)
            if name.startswith("tl_"):
                tl_out[recipe] = got
            elif recipe in tl_out:
                r["calc_diff_vs_tl"] = BG.calc_diff(got, tl_out[recipe])
                r["correct"] = r["correct"] and r["calc_diff_vs_tl"] < SAME_INPUT_TOL
        except Exception as exc:
            traceback.print_exc()
            r = dict(error=repr(exc)[:500])
        rec[name] = r
    if dg is not None and isinstance(rec.get("launch_fp32"), dict) and "ms" in rec["launch_fp32"]:
        dg_fp32 = deepgemm_call(dg, x, outs["dg"], e_num, m_cap, "fp32", expected_m)
        rec["ours_vs_deepgemm_paired"] = paired_ratio(lambda: kernels["launch_fp32"][1](counts),
                                                      lambda: dg_fp32(counts))
        # both SM90 FP32 kernels and each variant paired with DeepGEMM too: one-shot ratios spread ~10 %
        for name in ("gluon_fp32", "cute_fp32", *(f"gluon_fp32_{v}" for v in variants or {})):
            fn = kernels[name][1] if name in kernels else None
            if fn is not None and "ms" in rec.get(name, {}):
                rec[name]["vs_deepgemm_paired"] = paired_ratio(lambda fn=fn: fn(counts), lambda: dg_fp32(counts))
    return rec


def paired_ratio(ours, peer, rounds: int = 7, rep: int = 20) -> float:
    """Median over `rounds` of peer_ms / ours_ms, each round timing ours then the peer back to back (do_bench, median
    of `rep` ms each): a ratio that a slow drift of the card's speed during the run (seen here: the same kernel 10 %
    apart within one run) moves much less than two timings taken seconds apart."""
    ratios = []
    for _ in range(rounds):
        t_ours = BG.bench_ms(ours, rep=rep)
        ratios.append(BG.bench_ms(peer, rep=rep) / t_ours)
    return statistics.median(ratios)


def pick_ours(rec: dict) -> dict:
    """The issue's flat record keys: ours = what the FP32 launcher runs for this fill (`launch_fp32`, the kernel
    launch.masked_gemm_kernel picks, named in `kernel`), ours_ue8m0 = what the triton provider's
    group_gemm_masked ran with its byte check (`launch_ue8m0`, `kernel_ue8m0`), ours_ue8m0_stated = what it runs
    for the method now (`launch_ue8m0_stated`: sfa_per_group, sfb_per_block, expected_m); `fastest_kernel`: the
    fastest correct of the four candidates (runs with a forced config, `_alt` and the variants, are not candidates)."""
    best = max((kn for kn in CANDIDATES if isinstance(rec.get(kn), dict) and rec[kn].get("correct")),
               key=lambda kn: rec[kn]["tflops"], default=None)
    rec["fastest_kernel"] = best
    dev = torch.device("cuda", torch.cuda.current_device())
    for key, launcher, recipe in (("", "launch_fp32", "fp32"), ("_ue8m0", "launch_ue8m0", "ue8m0")):
        r = rec.get(launcher)
        ok = isinstance(r, dict) and r.get("correct")
        rule = L.masked_gemm_kernel(recipe, dev, rec["k"], n=rec["n"], expected_m=rec["expected_m"])
        rec["kernel" + key] = f"{rule}_{recipe}"
        rec[f"ours{key}_tflops"] = r["tflops"] if ok else float("nan")
    r = rec.get("launch_ue8m0_stated")
    rec["ours_ue8m0_stated_tflops"] = r["tflops"] if isinstance(r, dict) and r.get("correct") else float("nan")
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--merge-into", default=None, help="a bench_gpu.py JSON to extend with card/date/gemm_vs_peers")
    ap.add_argument("--fills", default=",".join(map(str, FILLS)))
    ap.add_argument("--shapes", default=",".join(f"{n}x{k}" for n, k in SHAPES))
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--no-gluon", action="store_true")
    ap.add_argument("--variants", default="{}", help='JSON {name: config overrides} of extra Gluon FP32 runs')
    ap.add_argument("--ncu-one", type=int, default=None, metavar="ROWS",
                    help="for Nsight Compute: two calls each of the Gluon FP32 kernel and DeepGEMM at the first shape")
    args = ap.parse_args()
    if args.ncu_one:
        return ncu_one(args)
    fills = [int(f) if f.isdigit() else f for f in args.fills.split(",")]
    shapes = [tuple(map(int, s.split("x"))) for s in args.shapes.split(",")]
    dg, dg_err = optional_import("deep_gemm")
    gluon, gluon_err = (None, "disabled") if args.no_gluon else optional_import("backend.ops.triton.gluon_gemm")
    if gluon is not None and not gluon.available():
        gluon, gluon_err = None, gluon.unavailable_reason()
    env = BG.environment() or {}
    res = dict(card=env.get("card"), date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               environment=env, deepgemm=dict(version=getattr(dg, "__version__", None), error=dg_err),
               gluon_error=gluon_err, command=" ".join(sys.argv), gemm_vs_peers=[])
    e_num, m_cap = args.experts, max(f if isinstance(f, int) else int(f.split("_")[-1]) for f in fills)
    gen = torch.Generator(device="cuda").manual_seed(11)
    t0 = time.time()
    for n, k in shapes:
        x = make_inputs(n, k, e_num, m_cap, gen)
        outs = {nm: torch.empty((e_num * m_cap, n), dtype=torch.bfloat16, device="cuda") for nm in ("dg", "ours")}
        for fill in fills:
            try:
                rec = pick_ours(run_fill(dg, x, outs, n, k, e_num, m_cap, fill, gen, gluon, json.loads(args.variants)))
            except Exception as exc:
                traceback.print_exc()
                rec = dict(n=n, k=k, experts=e_num, rows_per_expert=fill, error=repr(exc)[:500])
            res["gemm_vs_peers"].append(rec)
            print(f"[{time.time() - t0:6.1f}s] {summary_line(rec)}", flush=True)
            write_json(pathlib.Path(args.out), res, indent=1, newline=False, default=str)
        del x, outs
        torch.cuda.empty_cache()
    if args.merge_into:
        merge(pathlib.Path(args.merge_into), res)
    print("\n".join(summary_line(r) for r in res["gemm_vs_peers"]), flush=True)


def ncu_one(args):
    """Two calls each of the Gluon FP32 kernel and DeepGEMM, ROWS valid rows per expert, nothing timed (for ncu)."""
    from backend.ops.triton import gluon_gemm
    n, k = (tuple(map(int, s.split("x"))) for s in args.shapes.split(",")).__next__()
    dg, _ = optional_import("deep_gemm")
    gen = torch.Generator(device="cuda").manual_seed(11)
    x = make_inputs(n, k, args.experts, args.ncu_one, gen)
    out = torch.empty((args.experts * args.ncu_one, n), dtype=torch.bfloat16, device="cuda")
    counts = torch.full((args.experts,), args.ncu_one, dtype=torch.int32, device="cuda")
    for _ in range(2):
        gluon_gemm.group_gemm_masked_fp32(x["a"], x["b"], x["fa_mn"], x["fb"], counts, out, None, args.ncu_one,
                                          expected_m=args.ncu_one)
        if dg is not None:
            deepgemm_call(dg, x, out, args.experts, args.ncu_one, "fp32", args.ncu_one)(counts)
    torch.cuda.synchronize()


def summary_line(rec: dict) -> str:
    if "error" in rec:
        return f"N={rec['n']} K={rec['k']} fill={rec['rows_per_expert']}: ERROR {rec['error'][:200]}"
    cells = [f"N={rec['n']} K={rec['k']} fill={rec['rows_per_expert']!s:>13} cuBLAS {rec['cublas_tflops']:5.0f}"
             f" DG {rec.get('deepgemm_tflops', float('nan')):5.0f}"]
    if "ours_vs_deepgemm_paired" in rec:
        cells.append(f"launch_fp32/DG paired {rec['ours_vs_deepgemm_paired']:.2f}x")
    ours = ("tl_", "gluon_", "launch_", "deep_gemm_provider")
    for name in [kn for kn in rec if kn.startswith(ours) and isinstance(rec[kn], dict)]:
        r = rec[name]
        if r is None:
            continue
        if "error" in r:
            cells.append(f"{name} ERR")
            continue
        paired = f" paired {r['vs_deepgemm_paired']:.2f}x" if "vs_deepgemm_paired" in r else ""
        cells.append(f"{name} {r['tflops']:5.0f} ({r.get('vs_deepgemm', float('nan')):.2f}x DG{paired}"
                     f"{'' if r['correct'] else ' WRONG'} d={r.get('calc_diff_vs_deepgemm', float('nan')):.1e})")
    return " | ".join(cells)


def merge(path: pathlib.Path, res: dict) -> None:
    """Add card, date and gemm_vs_peers at the top level of a bench_gpu.py result, keeping its sections."""
    base = json.loads(path.read_text()) if path.exists() else {"sections": {}, "errors": []}
    base.update(card=res["card"], date=res["date"], gemm_vs_peers=res["gemm_vs_peers"],
                gemm_vs_peers_meta={k: res[k] for k in ("environment", "deepgemm", "gluon_error", "command")})
    write_json(path, base, indent=1, newline=False, default=str)


if __name__ == "__main__":
    main()
