#!/usr/bin/env python3
"""GPU benchmark of the `triton` provider's kernels (backend/ops/triton), torch only (no Paddle).

One run on one card measures, each against a baseline timed in the same run:

- masked grouped FP8 GEMM (SPEC §6), DeepSeek-V3 routed experts (E = 32 local experts),
  N=4096/K=7168 (up projection, 2I x H) and N=7168/K=2048 (down, H x I), valid rows per expert in
  {64, 128, 256, 512, 1024, 2048} and two uneven fills; three kernels: explicit scales with the
  CUTLASS UE8M0 bytes (Blackwell recipe), explicit FP32 1x128 / 128x128 scales (Hopper recipe),
  and `tl.dot_scaled` (one UE8M0 byte per 32 K). Baseline: cuBLASLt blockwise FP8
  (`torch._scaled_mm`, 1x128 x 128x128 FP32 scales) on one dense GEMM with the same FLOPs.
- memory-bound kernels (per-token quant, permute, SwiGLU + quant, depermute/combine, scale
  conversion): bytes moved / time against a device-to-device copy.
- the whole ht-prefill chain on one rank through the triton ops vs a plain torch bf16 loop over
  experts, and the share of the chain's time spent in the two GEMMs.
- issue 12 (section chain_layer, benchmarks/chain_layer.py): per W in --chain-tokens, the layer (FP32 recipe, our
  GEMMs) eager and as one CUDA-graph replay, its GPU time per stage, DeepGEMM's two masked GEMMs alone on the same
  routed rows and our glue with DeepGEMM's GEMMs -> top-level `chain` records; memory-bound ops also timed as
  CUDA-graph replays -> top-level `memory_bound` list (op, ratio_to_copy).

Every kernel is checked first at the same shapes against a torch reference on fresh random data,
outputs poisoned with NaN before the run (NaN never passes). Results: JSON (card, driver, versions,
every number) to --out; a summary table last on stdout.

    python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_<card>.json
    TRITON_INTERPRET=1 python3 benchmarks/bench_gpu.py --dry     # tiny shapes on CPU: checks the script
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
import traceback

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # for _common, also when loaded by file path
from _common import repo_on_path, write_json  # noqa: E402

repo_on_path()
from backend.ops.triton import kernels as KERN  # noqa: E402 - imports neither Paddle nor anything that needs it
from backend.ops.triton import chain as CH  # noqa: E402
from backend.ops.triton import launch as L  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402

DRY = False
DEV = "cuda"
RESULTS: dict = {"sections": {}, "errors": []}
OUT_PATH: pathlib.Path | None = None
T0 = time.time()


def save():
    RESULTS["gemm_tuning"] = dict(log=L.TUNER.log, chosen={"|".join(map(str, k)): v for k, v in L.TUNER.chosen().items()})
    if OUT_PATH is not None:
        write_json(OUT_PATH, RESULTS, indent=1, newline=False, default=str)


# which kernel each timed GEMM runs (launch.masked_gemm_kernel: the launcher's rule, no expected_m given, so
# rows = M; "explicit_fp32_tl" forces the tl kernel, the kernel the FP32 rows measured before the Gluon wiring)
GEMM_KERNEL = {
    "explicit_ue8m0": lambda dev, n, k, m: L.masked_gemm_kernel("ue8m0", dev, k, True, n=n, expected_m=m),
    "explicit_fp32": lambda dev, n, k, m: L.masked_gemm_kernel("fp32", dev, k, n=n, expected_m=m),
    "explicit_fp32_tl": lambda dev, n, k, m: "tl",
    "dot_scaled_ue8m0": lambda dev, n, k, m: "tl_dot_scaled",
}


def log(*a):
    print(f"[{time.time() - T0:6.1f}s]", *a, flush=True)


def bench_ms(fn, rep=60) -> float:
    if DRY:
        fn()
        t = time.perf_counter()
        fn()
        return (time.perf_counter() - t) * 1e3
    return float(triton.testing.do_bench(fn, warmup=15, rep=rep, return_mode="median"))


def calc_diff(x, y) -> float:
    x, y = x.double(), y.double()
    denom = (x * x).sum() + (y * y).sum()
    return 0.0 if float(denom) == 0 else float(1 - 2 * (x * y).sum() / denom)


def section(name):
    def deco(fn):
        def run(*a, **k):
            log(f"== {name}")
            try:
                RESULTS["sections"][name] = fn(*a, **k)
            except Exception as exc:   # keep going: the other sections still report
                traceback.print_exc()
                RESULTS["errors"].append(dict(section=name, error=repr(exc)[:2000], tb=traceback.format_exc()[-3000:]))
            save()
            return RESULTS["sections"].get(name)
        return run
    return deco


# ----------------------------------------------------------------------------- references (torch)

def ue8m0_exponent(s: torch.Tensor) -> torch.Tensor:
    """float32 s > 0 -> int32 UE8M0 byte of ceil_to_ue8m0(s) (SPEC §2, bit-exact)."""
    bits = s.view(torch.int32)
    e = ((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)
    return e.clamp(1, 254)


def pack_words(e: torch.Tensor) -> torch.Tensor:
    """[..., G] int32 bytes -> [..., ceil(G/4)] int32 little-endian words."""
    g = e.shape[-1]
    pad = (-g) % 4
    if pad:
        e = torch.cat([e, torch.zeros(*e.shape[:-1], pad, dtype=e.dtype, device=e.device)], -1)
    e = e.view(*e.shape[:-1], -1, 4).to(torch.int64)
    w = e[..., 0] | (e[..., 1] << 8) | (e[..., 2] << 16) | (e[..., 3] << 24)
    return torch.where(w >= 2 ** 31, w - 2 ** 32, w).to(torch.int32)


def ref_quant_rows(x: torch.Tensor, ue8m0: bool, floor: float, group=128):
    """x [R, L] float -> (q [R, L] fp8, scale fp32 [R, G], exponent bytes [R, G] or None)."""
    r, length = x.shape
    g = -(-length // group)
    xf = torch.nn.functional.pad(x.float(), (0, g * group - length)).view(r, g, group)
    amax = xf.abs().amax(-1).clamp(min=floor)
    s = amax / torch.full_like(amax, 448.0)     # tensor / tensor: torch turns "/ scalar" into "* (1/scalar)"
    e = None
    if ue8m0:
        e = ue8m0_exponent(s)
        s = (e << 23).view(torch.float32)
    q = (xf / s[..., None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(r, g * group)[:, :length]
    return q, s, e


def rand_fp8(shape, gen, scale=1.0):
    return (torch.randn(shape, device=DEV, generator=gen) * scale).clamp(-448, 448).to(torch.float8_e4m3fn)


def mn_major(t: torch.Tensor) -> torch.Tensor:
    """[E, M, C] contiguous -> MN-major TMA-aligned view of the same values (SPEC §2)."""
    e, m, c = t.shape
    mp = -(-m // 4) * 4
    phys = torch.zeros(e, c, mp, dtype=t.dtype, device=t.device)
    phys[:, :, :m] = t.transpose(1, 2)
    return phys.as_strided((e, m, c), (c * mp, 1, mp))


# ----------------------------------------------------------------------------- environment

@section("environment")
def environment():
    info = dict(torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                cuda=torch.version.cuda, dry=DRY)
    if not DRY:
        p = torch.cuda.get_device_properties(0)
        info.update(card=p.name, sm_count=p.multi_processor_count, capability=f"{p.major}.{p.minor}",
                    memory_gib=round(p.total_memory / 2 ** 30, 1), l2_mb=round(getattr(p, "L2_cache_size", 0) / 1e6, 1))
        try:
            q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.sm,clocks.max.sm,power.limit",
                                "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
            info["nvidia_smi"] = q
            info["driver"] = q.split(",")[0].strip()
        except Exception as exc:
            info["nvidia_smi"] = repr(exc)
    log(info)
    return info


@section("copy_ceiling")
def copy_ceiling():
    n = (1 << 20) if DRY else (2 << 30)
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    res = dict(bytes=2 * n, ms=ms, tb_per_s=2 * n / ms / 1e9)
    log(res)
    return res


# ----------------------------------------------------------------------------- cuBLAS blockwise baseline

def cublas_blockwise(rows: int, n: int, k: int, gen):
    """Callable running one dense FP8 GEMM [rows, K] x [N, K]^T with 1x128 (a) and 128x128 (b) FP32 scales."""
    a = rand_fp8((rows, k), gen)
    b = rand_fp8((n, k), gen)
    kb = k // 128
    sa = (torch.rand(kb, rows, device=DEV, generator=gen) + 0.5).t()                    # [rows, K/128], M-major
    l4 = -(-kb // 4) * 4
    sb = (torch.rand(n // 128, l4, device=DEV, generator=gen) + 0.5).t()[:kb]          # [K/128, N/128] view
    bt = b.t()

    def run_legacy():
        if DRY:     # no blockwise FP8 GEMM on CPU: a stand-in with the same data, so the script runs
            return ((a.float() * sa.repeat_interleave(128, 1)) @ (b.float() * sb.t().repeat_interleave(128, 0)
                    .repeat_interleave(128, 1)).t()).to(torch.bfloat16)
        return torch._scaled_mm(a, bt, scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)

    out = run_legacy()
    # check it is the blockwise product (not silently another recipe)
    r = min(rows, 256)
    sa_full = sa[:r].repeat_interleave(128, 1)[:, :k]
    sb_full = sb.t().repeat_interleave(128, 0).repeat_interleave(128, 1)[:n, :k]
    ref = (a[:r].float() * sa_full) @ (b.float() * sb_full).t()
    diff = calc_diff(out[:r].float(), ref)
    return run_legacy, diff


# ----------------------------------------------------------------------------- GEMM

FILLS = (512, 64, 128, 256, 1024, 2048, "uneven_0_1024", "uneven_0_2048")   # 512 first: autotuning happens there


def counts_for(fill, e, gen):
    if isinstance(fill, int):
        return torch.full((e,), fill, dtype=torch.int32, device=DEV)
    hi = int(fill.split("_")[-1])
    return torch.randint(0, hi + 1, (e,), dtype=torch.int32, device=DEV, generator=gen)


@section("gemm")
def gemm_bench(shapes, e_num, m_cap, fills):
    gen = torch.Generator(device=DEV).manual_seed(1)
    rows_out = []
    for (n, k) in shapes:
        log(f"GEMM N={n} K={k}")
        s = k // 128
        a = rand_fp8((e_num * m_cap, k), gen)
        b = rand_fp8((e_num, n, k), gen, scale=0.5)
        # scales: UE8M0 exponents for both recipes (the FP32 recipe gets non-power-of-two values)
        ea = torch.randint(120, 130, (e_num, m_cap, s), dtype=torch.int32, device=DEV, generator=gen)
        eb = torch.randint(118, 126, (e_num, n // 128, s), dtype=torch.int32, device=DEV, generator=gen)
        sfa = L.unpack_and_convert_scale(mn_major(pack_words(ea)), None)
        sfb = L.unpack_and_convert_scale(pack_words(eb.repeat_interleave(128, 1)), None)
        fa = (torch.rand(e_num, m_cap, s, device=DEV, generator=gen) + 0.5) * 2.0 ** -4
        fb = (torch.rand(e_num, n // 128, s, device=DEV, generator=gen) + 0.5) * 2.0 ** -6
        fa_mn = mn_major(fa)
        out = torch.empty((e_num * m_cap, n), dtype=torch.bfloat16, device=DEV)
        kernels = {
            "explicit_ue8m0": lambda c: L.group_gemm_masked(a, b, sfa, sfb, c, out, None, m_cap, sfb_per_block=True),
            "explicit_fp32": lambda c: L.group_gemm_masked_fp32(a, b, fa_mn, fb, c, out, None, m_cap),
            "explicit_fp32_tl": lambda c: L.group_gemm_masked_fp32(a, b, fa_mn, fb, c, out, None, m_cap, kernel="tl"),
            "dot_scaled_ue8m0": lambda c: L.group_gemm_masked(a, b, sfa, sfb, c, out, None, m_cap, impl="dot_scaled"),
        }
        check_experts = [0, e_num // 2, e_num - 1]
        for fill in fills:
            counts = counts_for(fill, e_num, gen)
            valid = int(counts.sum())
            flops = 2.0 * valid * n * k
            row = dict(N=n, K=k, fill=fill, valid_rows=valid, counts=counts.tolist() if not isinstance(fill, int) else fill)
            cub_rows = -(-max(valid, 128) // 128) * 128      # cuBLASLt blockwise wants aligned rows
            try:
                cub, cub_diff = cublas_blockwise(cub_rows, n, k, gen)
                t_cub = bench_ms(cub)
                cub_tflops = 2.0 * cub_rows * n * k / t_cub / 1e9
            except Exception as exc:
                traceback.print_exc()
                cub_diff, t_cub, cub_tflops = repr(exc)[:300], float("nan"), float("nan")
            row.update(cublas_rows=cub_rows, cublas_ms=t_cub, cublas_tflops=cub_tflops, cublas_check_calc_diff=cub_diff)
            for name, fn in kernels.items():
                try:
                    out.fill_(float("nan"))
                    fn(counts)
                    torch.cuda.synchronize() if not DRY else None
                    ok, worst = True, 0.0
                    for ex in check_experts:
                        c = int(counts[ex])
                        blk = out[ex * m_cap:(ex + 1) * m_cap]
                        if c < m_cap and not torch.isnan(blk[c:].float()).all():
                            ok = False                               # wrote past masked_m
                        if c == 0:
                            continue
                        if name.startswith("explicit_fp32"):
                            da = a[ex * m_cap:ex * m_cap + c].float() * fa[ex, :c].repeat_interleave(128, 1)[:, :k]
                            db = b[ex].float() * fb[ex].repeat_interleave(128, 0)[:n].repeat_interleave(128, 1)[:, :k]
                        else:
                            da = a[ex * m_cap:ex * m_cap + c].float() * torch.exp2(
                                ea[ex, :c].float() - 127).repeat_interleave(128, 1)[:, :k]
                            db = b[ex].float() * torch.exp2(eb[ex].float() - 127).repeat_interleave(128, 0)[:n] \
                                .repeat_interleave(128, 1)[:, :k]
                        ref = da @ db.t()
                        got = blk[:c].float()
                        d = calc_diff(got, ref)
                        worst = max(worst, d)
                        if not (d < 1e-5) or torch.isnan(got).any():
                            ok = False
                    t = bench_ms(lambda: fn(counts))
                    row[name] = dict(ms=t, tflops=flops / t / 1e9, vs_cublas=flops / t / 1e9 / cub_tflops,
                                     correct=ok, calc_diff=worst, kernel=GEMM_KERNEL[name](a.device, n, k, m_cap))
                except Exception as exc:
                    traceback.print_exc()
                    row[name] = dict(error=repr(exc)[:500])
            rows_out.append(row)
            log({kk: (round(v["tflops"]) if isinstance(v, dict) and "tflops" in v else v)
                 for kk, v in row.items() if kk != "counts"}, f"cublas {row['cublas_tflops']:.0f}")
            save()
        del a, b, out
        torch.cuda.empty_cache() if not DRY else None
    return dict(rows=rows_out, tuning=L.TUNER.log, chosen={"|".join(map(str, k)): v for k, v in L.TUNER.chosen().items()})


# ----------------------------------------------------------------------------- memory-bound kernels

@section("memory_bound")
def memory_bound(t_tok, h, inter, e_num, k_top, copy_tbs):
    gen = torch.Generator(device=DEV).manual_seed(2)
    res = {}

    def record(name, ms, nbytes, graph_fn=None, **extra):
        """graph_fn: the op without host synchronization, also timed as one CUDA-graph replay (no launch overhead)."""
        tbs = nbytes / ms / 1e9
        res[name] = dict(ms=ms, bytes=nbytes, tb_per_s=tbs, vs_copy=tbs / copy_tbs if copy_tbs else None, **extra)
        if graph_fn is not None and not DRY:
            g_ms = graph_ms(graph_fn)
            res[name].update(graph_ms=g_ms, graph_vs_copy=nbytes / g_ms / 1e9 / copy_tbs if copy_tbs else None)
        log(name, {k: (round(v, 4) if isinstance(v, float) else v) for k, v in res[name].items()})
        save()

    # §3 per-token quant
    x = torch.randn(t_tok, h, device=DEV, generator=gen).to(torch.bfloat16) * 3
    s_groups = h // 128
    for ue in (False, True):
        q, s = L.per_token_quant(x, 128, ue)
        q_ref, s_ref, e_ref = ref_quant_rows(x, ue, 1e-4)
        exact_q = bool(torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)))
        exact_s = bool(torch.equal(s, pack_words(e_ref) if ue else s_ref))
        ms = bench_ms(lambda: L.per_token_quant(x, 128, ue))
        record(f"per_token_quant_{'ue8m0' if ue else 'fp32'}", ms,
               t_tok * h * 2 + t_tok * h + s.numel() * 4, graph_fn=lambda: L.per_token_quant(x, 128, ue),
               exact_q=exact_q, exact_scale=exact_s)

    # §5 permute (fp8 x + packed UE8M0 scale, as the Blackwell path)
    q, s = L.per_token_quant(x, 128, True)
    ids = torch.argsort(torch.rand(t_tok, e_num, device=DEV, generator=gen), dim=1)[:, :k_top].to(torch.int64)
    ids[torch.rand(t_tok, k_top, device=DEV, generator=gen) < 0.05] = -1
    ids[::97] = -1                                                   # padding rows anywhere
    cnt_ref = torch.bincount(ids[ids >= 0].flatten(), minlength=e_num)
    m_cap = int(cnt_ref.max()) + 64
    px, ps, imap, counts = L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap)
    flat = ids.flatten()
    onehot = torch.nn.functional.one_hot(flat.clamp(min=0), e_num) * (flat >= 0)[:, None]
    slot = (torch.cumsum(onehot, 0) - onehot).gather(1, flat.clamp(min=0)[:, None]).squeeze(1)
    map_ref = torch.where(flat >= 0, flat * m_cap + slot, -1).view(t_tok, k_top).to(torch.int32)
    ok_map = bool(torch.equal(imap, map_ref)) and bool(torch.equal(counts.flatten(), cnt_ref.to(torch.int32)))
    valid = map_ref.flatten() >= 0
    dst = map_ref.flatten()[valid].long()
    src = torch.arange(t_tok * k_top, device=DEV)[valid] // k_top
    pxb = px.view(torch.uint8).view(e_num * m_cap, h)
    ok_rows = bool(torch.equal(pxb[dst], q.view(torch.uint8)[src]))
    live = torch.zeros(e_num * m_cap, dtype=torch.bool, device=DEV)
    live[dst] = True
    ok_zero = bool((pxb[~live] == 0).all())
    ps_c = ps.reshape(e_num * m_cap, -1)
    ok_scale = bool(torch.equal(ps_c[dst], s[src])) and bool((ps_c[~live] == 0).all())
    ms = bench_ms(lambda: L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap))
    ms_idx = bench_ms(lambda: L.permute_indices(ids, e_num, m_cap))
    err = torch.zeros(5, dtype=torch.int64, device=DEV)             # backend.ops.device_errors record
    ms_deferred = bench_ms(lambda: L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap, errors=err))
    ms_idx_deferred = bench_ms(lambda: L.permute_indices(ids, e_num, m_cap, check=False, errors=err))
    ms_rows = bench_ms(lambda: L.permute_rows(q, s, imap, counts.flatten(), e_num, m_cap))
    nbytes = t_tok * h + s.numel() * 4 + e_num * m_cap * h + ps.numel() * 4 + imap.numel() * 4 * 2 + ids.numel() * 8
    record("prefill_permute", ms, nbytes, graph_fn=lambda: L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap,
                                                                                             errors=err),
           correct_map=ok_map, correct_rows=ok_rows, zero_tail=ok_zero,
           correct_scale=ok_scale, M=m_cap, indices_ms=ms_idx, rows_ms=ms_rows, deferred_ms=ms_deferred,
           indices_deferred_ms=ms_idx_deferred, deferred_ratio_to_copy=None if copy_tbs is None else
           nbytes / ms_deferred / 1e9 / copy_tbs, deferred_record_clear=not any(err.tolist()),
           rows_tb_per_s=(nbytes - imap.numel() * 4 * 2 - ids.numel() * 8) / ms_rows / 1e9, valid_rows=int(valid.sum()),
           note="bytes: x read once, all E*M rows written (copies + zero tail), scales, map; includes one host sync")

    # §4 unpack_and_convert_scale on the permuted activation scales
    sf = L.unpack_and_convert_scale(ps, counts)
    back = L.cutlass_scale_to_fp32(sf, m_cap)
    exps = ps.contiguous().view(torch.uint8).view(e_num, m_cap, -1)[:, :, :s_groups].to(torch.int32)
    exps = torch.where(torch.arange(m_cap, device=DEV)[None, :, None] < counts.view(-1, 1, 1), exps, 0)
    want = torch.where(exps == 0, 1 << 22, exps << 23).view(torch.float32)       # byte 0 decodes to 2^-127
    ok_sf = bool(torch.equal(back[:, :, :s_groups], want))
    ms = bench_ms(lambda: L.unpack_and_convert_scale(ps, counts))
    record("unpack_and_convert_scale", ms, ps.numel() * 4 + sf.numel(),
           graph_fn=lambda: L.unpack_and_convert_scale(ps, counts), round_trip_exact=ok_sf,
           copy_same_bytes_ms=copy_same_bytes_ms(ps.numel() * 4 + sf.numel()))

    # §7 SwiGLU + quant on the masked layout
    up = torch.randn(e_num, m_cap, 2 * inter, device=DEV, generator=gen).to(torch.bfloat16) * 2
    for ue in (True, False):
        act, act_s = L.fused_mask_swiglu_fp8_quant(up, counts, 128, ue)
        mismatch_q, mismatch_s, worst = 0, 0, 0.0
        for ex in (0, e_num - 1):
            c = int(counts[ex])
            u = up[ex, :c].float()
            gate, lin = u[:, :inter], u[:, inter:]
            y = (lin * gate / (1.0 + torch.exp(-gate))).to(torch.bfloat16).float()
            qr, sr, er = ref_quant_rows(y, ue, 1e-10)
            mismatch_q += int((act[ex, :c].view(torch.uint8) != qr.view(torch.uint8)).sum())
            got_s = act_s[ex, :c]
            mismatch_s += int((got_s != (pack_words(er) if ue else sr)).sum())
            deq = act[ex, :c].float().view(c, -1, 128) * ((got_s.flatten().view(torch.uint8).view(c, -1)[:, :inter // 128].to(
                torch.int32) << 23).view(torch.float32) if ue else got_s)[..., None]
            worst = max(worst, calc_diff(deq.view(c, inter), y))
            assert not torch.isnan(deq).any()
            assert bool((act[ex, c:].view(torch.uint8) == 0).all())
        n_valid = int(counts.sum())
        nbytes = n_valid * 2 * inter * 2 + e_num * m_cap * inter + act_s.numel() * 4
        ms = bench_ms(lambda: L.fused_mask_swiglu_fp8_quant(up, counts, 128, ue))
        record(f"swiglu_quant_{'ue8m0' if ue else 'fp32'}", ms, nbytes,
               graph_fn=lambda: L.fused_mask_swiglu_fp8_quant(up, counts, 128, ue), fp8_bytes_differing=mismatch_q,
               scales_differing=mismatch_s, dequant_calc_diff_vs_bf16_y=worst,
               copy_same_bytes_ms=copy_same_bytes_ms(nbytes),
               note="bytes: valid rows of up read, all E*M rows of act written (zeros past the count); "
                    "tl.exp is approximate on GPU, so a few bytes may differ by one e4m3 step")

    # §8 depermute + combine
    ffn = torch.randn(e_num, m_cap, h, device=DEV, generator=gen).to(torch.bfloat16)
    wts = torch.rand(t_tok, k_top, device=DEV, generator=gen)
    out = L.depermute_prefill_combine(ffn, imap, wts, t_tok)
    ff = ffn.view(e_num * m_cap, h)
    acc = torch.zeros(t_tok, h, device=DEV)
    for kk in range(k_top):
        idx = imap[:, kk].long()
        acc += torch.where(idx[:, None] >= 0, wts[:, kk:kk + 1] * ff[idx.clamp(min=0)].float(), 0.0)
    ref = acc.to(torch.bfloat16)
    diff = (out.float() - ref.float()).abs()
    step = torch.exp2(torch.floor(torch.log2(torch.maximum(out.float().abs(), ref.float().abs()).clamp(min=1e-30))) - 7)
    ulps = float((diff / step).max())
    n_valid = int((imap >= 0).sum())
    ms = bench_ms(lambda: L.depermute_prefill_combine(ffn, imap, wts, t_tok))
    record("depermute_prefill_combine", ms, n_valid * h * 2 + t_tok * h * 2 + imap.numel() * 8,
           graph_fn=lambda: L.depermute_prefill_combine(ffn, imap, wts, t_tok),
           max_diff_bf16_steps=ulps, elements_differing=int((diff > 0).sum()),
           max_diff_over_row_absmax=float((diff.max(1).values / ref.float().abs().max(1).values.clamp(min=1e-30)).max()),
           note_diff="FMA contraction vs separate mul+add: differences show only where terms cancel",
           calc_diff=calc_diff(out.float(), ref.float()),
           nan=bool(torch.isnan(out.float()).any()))
    permute_at_issue_shape(record, min(t_tok, 4096), h, e_num, k_top, gen)
    RESULTS["memory_bound"] = memory_bound_list(res)
    return res


def permute_at_issue_shape(record, w_tok, h, e_num, k_top, gen):
    """The permute at issue 12's shape (W=4096, top-8 of 32, H=7168; fp8 x), deferred checks (graph-safe), three
    scale outputs: packed UE8M0 MN-major, FP32 MN-major (the Hopper chain's), and CUTLASS SF bytes written by the
    permute (sf_group=128, checked equal to permute + unpack_and_convert_scale). Bytes: x read once, every E·M row
    written (copies and zero tail), scales read and written, map written; also timed: a device copy of as many
    bytes (its ratio does not depend on the 2 GiB ceiling copy's size). `*_gather`: the same with
    launch.PERMUTE_MOVE = "gather" (slot-block programs read their tokens' rows), outputs compared with scatter's."""
    x = torch.randn(w_tok, h, device=DEV, generator=gen).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(w_tok, e_num, device=DEV, generator=gen), dim=1)[:, :k_top].to(torch.int64)
    m_cap = int(torch.bincount(ids.flatten(), minlength=e_num).max()) + 64
    err = torch.zeros(5, dtype=torch.int64, device=DEV)
    scatter_out = {}
    for name, ue, sf_group, move in (("ue8m0", True, None, "scatter"), ("fp32", False, None, "scatter"),
                                     ("cutlass_sf", True, 128, "scatter"), ("ue8m0", True, None, "gather"),
                                     ("cutlass_sf", True, 128, "gather")):
        q, s = L.per_token_quant(x, 128, ue)
        fn = lambda: L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap, errors=err, sf_group=sf_group)  # noqa: E731
        L.PERMUTE_MOVE = move
        try:
            px, ps, imap, counts = fn()
            extra = {}
            if move == "scatter":
                scatter_out[name] = (px.view(torch.uint8), ps)
            else:
                extra["equal_to_scatter"] = bool(torch.equal(px.view(torch.uint8), scatter_out[name][0])
                                                 and torch.equal(ps, scatter_out[name][1]))
            if sf_group is not None:
                _, ps_mn, _, _ = L.prefill_permute_to_masked_gemm(q, s, ids, e_num, m_cap)
                extra["equals_permute_then_unpack"] = bool(torch.equal(ps, L.unpack_and_convert_scale(ps_mn, counts)))
            nbytes = w_tok * h + s.numel() * 4 + e_num * m_cap * h + ps.numel() * ps.element_size() + imap.numel() * 4
            extra["copy_same_bytes_ms"] = copy_same_bytes_ms(nbytes)
            extra["fill_written_bytes_ms"] = fill_ms(e_num * m_cap * h + ps.numel() * ps.element_size() + imap.numel() * 4)
            if not DRY:          # the two parts as CUDA-graph replays: index step (count + slot kernels), move kernel
                extra.update(permute_parts_graph_ms(q, s, ids, e_num, m_cap, err, sf_group))
            record(f"prefill_permute_w{w_tok}_{name}" + ("_gather" if move == "gather" else ""), bench_ms(fn), nbytes,
                   graph_fn=fn, W=w_tok, M=m_cap, record_clear=not any(err.tolist()), move=move, **extra)
        finally:
            L.PERMUTE_MOVE = "scatter"


def permute_parts_graph_ms(q, s, ids, e_num, m_cap, err, sf_group) -> dict:
    """GPU ms of the permute's index step (launch._permute_index_step: count + slot kernels) and of its move kernel
    (launch._move_rows) each as one CUDA-graph replay: where the whole op's time goes."""
    imap, counts, _, inv = L._permute_index_step(ids, e_num, m_cap, err, True)
    return dict(index_graph_ms=graph_ms(lambda: L._permute_index_step(ids, e_num, m_cap, err, True)),
                move_graph_ms=graph_ms(lambda: L._move_rows(q, s, imap, counts, inv, e_num, m_cap, sf_group)))


def memory_bound_list(res: dict) -> list:
    """issue 12's flat list: one entry per memory-bound op measured, ratio_to_copy from the CUDA-graph replay time
    where measured (the op's GPU time), else from the eager call (ratio_to_copy_eager, host launches included)."""
    out = []
    for op, v in res.items():
        ratio = v.get("graph_vs_copy") if v.get("graph_vs_copy") is not None else v.get("vs_copy")
        ms = v.get("graph_ms", v.get("ms"))
        out.append(dict(op=op, ratio_to_copy=ratio, ratio_to_copy_eager=v.get("vs_copy"), ms=ms, eager_ms=v.get("ms"),
                        bytes=v.get("bytes"), timing="graph" if v.get("graph_vs_copy") is not None else "eager"))
        if v.get("copy_same_bytes_ms"):
            out[-1]["ratio_to_copy_same_bytes"] = v["copy_same_bytes_ms"] / ms
        if v.get("fill_written_bytes_ms"):        # the write ceiling: a fill of the bytes the op writes
            out[-1]["ratio_to_fill_written_bytes"] = v["fill_written_bytes_ms"] / ms
    return out


def fill_ms(nbytes: int) -> float:
    """Median ms of a device fill writing nbytes (nothing read): the ceiling of a write-bound op (the permute writes
    ~9 bytes per byte it reads), beside the copy's. On an H200 a fill of int32 words runs at 1.05-1.09x a copy's bytes
    per second (benchmarks/bench_write_ceiling.py, 2026-12-01); a fill of bytes at 0.79x (4 bytes stored per thread),
    which this function timed before and which was taken for the card's write ceiling."""
    buf = torch.empty(-(-nbytes // 4), dtype=torch.int32, device=DEV)     # words: a byte fill stores 4 bytes a thread
    return bench_ms(lambda: buf.fill_(7))


def copy_same_bytes_ms(nbytes: int) -> float:
    """Median ms of a device copy moving nbytes in all (nbytes/2 read, nbytes/2 written): the ceiling for an op of
    that size, whose ratio does not depend on the 2 GiB ceiling copy's size (small ops pay launch and ramp-up)."""
    half = torch.empty(nbytes // 2, dtype=torch.uint8, device=DEV)
    other = torch.empty_like(half)
    return bench_ms(lambda: other.copy_(half))


def graph_ms(fn) -> float:
    """Median ms of fn captured in a CUDA graph and replayed (do_bench; L2 flushed before each replay)."""
    from chain_layer import capture
    graph = capture(fn)
    return bench_ms(graph.replay)


# ----------------------------------------------------------------------------- the ht-prefill chain

@section("chain")
def chain(w_tok, h, inter, e_num, k_top):
    gen = torch.Generator(device=DEV).manual_seed(3)
    x = (torch.randn(w_tok, h, device=DEV, generator=gen)).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(w_tok, e_num, device=DEV, generator=gen), dim=1)[:, :k_top].to(torch.int64)
    wts = torch.rand(w_tok, k_top, device=DEV, generator=gen) / k_top
    m_cap = int(torch.bincount(ids.flatten(), minlength=e_num).max()) + 64
    w_up_f = torch.randn(e_num, 2 * inter, h, device=DEV, generator=gen).to(torch.bfloat16) * 0.02
    w_dn_f = torch.randn(e_num, h, inter, device=DEV, generator=gen).to(torch.bfloat16) * 0.02

    res = {}
    for recipe in ("ue8m0", "fp32"):
        ue = recipe == "ue8m0"
        quant = CH.quantize_weight_blocks if ue else CH.quantize_weight_blocks_fp32    # scale: CUTLASS bytes | fp32
        (w_up, s_up), (w_dn, s_dn) = quant(w_up_f), quant(w_dn_f)
        up = torch.empty(e_num * m_cap, 2 * inter, dtype=torch.bfloat16, device=DEV)
        down = torch.empty(e_num * m_cap, h, dtype=torch.bfloat16, device=DEV)
        st = {}

        def s_quant():
            st["q"], st["s"] = L.per_token_quant(x, 128, ue)

        def s_permute():     # UE8M0: the permute writes the CUTLASS bytes GEMM 1 reads (no unpack launch)
            st["px"], st["ps"], st["imap"], st["counts"] = L.prefill_permute_to_masked_gemm(
                st["q"], st["s"], ids, e_num, m_cap, sf_group=128 if ue else None)

        def s_gemm1():
            if ue:
                L.group_gemm_masked(st["px"].view(e_num * m_cap, h), w_up, st["ps"], s_up, st["counts"], up, None,
                                    m_cap, sfb_per_block=True)
            else:
                L.group_gemm_masked_fp32(st["px"].view(e_num * m_cap, h), w_up, st["ps"], s_up, st["counts"], up,
                                         None, m_cap)

        def s_swiglu():
            st["act"], st["act_s"] = L.fused_mask_swiglu_fp8_quant(up.view(e_num, m_cap, 2 * inter), st["counts"], 128, ue)

        def s_gemm2():
            if ue:
                sfa = L.unpack_and_convert_scale(st["act_s"], st["counts"])
                L.group_gemm_masked(st["act"].view(e_num * m_cap, inter), w_dn, sfa, s_dn, st["counts"], down,
                                    None, m_cap, sfb_per_block=True)
            else:
                L.group_gemm_masked_fp32(st["act"].view(e_num * m_cap, inter), w_dn, st["act_s"], s_dn, st["counts"],
                                         down, None, m_cap)

        def s_combine():
            st["out"] = L.depermute_prefill_combine(down.view(e_num, m_cap, h), st["imap"], wts, w_tok)

        stages = dict(quant=s_quant, permute=s_permute, gemm1=s_gemm1, swiglu=s_swiglu, gemm2=s_gemm2,
                      combine=s_combine)

        def whole():
            for f in stages.values():
                f()

        up.fill_(float("nan"))
        down.fill_(float("nan"))
        whole()
        fp8_out = st["out"].float()
        times = {name: bench_ms(f) for name, f in stages.items()}
        t_chain = bench_ms(whole)
        res[recipe] = dict(ms=t_chain, stage_ms=times, gemm_share=(times["gemm1"] + times["gemm2"]) / t_chain,
                           nan=bool(torch.isnan(fp8_out).any()), M=m_cap,
                           gemm_kernels=[L.masked_gemm_kernel(recipe, x.device, kk, True) for kk in (h, inter)])
        log(recipe, res[recipe])
        save()

    # plain torch bf16 per-expert reference (same routing), weights dequantized from nothing: the bf16 originals
    def torch_bf16():
        out = torch.zeros(w_tok, h, dtype=torch.float32, device=DEV)
        flat = ids.flatten()
        order = torch.argsort(flat, stable=True)
        cnts = torch.bincount(flat, minlength=e_num).tolist()
        tok = order // k_top
        wt = wts.flatten()[order]
        start = 0
        for ex, c in enumerate(cnts):
            if c == 0:
                continue
            t_idx = tok[start:start + c]
            hmid = x[t_idx] @ w_up_f[ex].t()
            a_ = torch.nn.functional.silu(hmid[:, :inter].float()) * hmid[:, inter:].float()
            y = a_.to(torch.bfloat16) @ w_dn_f[ex].t()
            out.index_add_(0, t_idx, y.float() * wt[start:start + c, None])
            start += c
        return out.to(torch.bfloat16)

    ref = torch_bf16()
    t_ref = bench_ms(torch_bf16)
    res["torch_bf16"] = dict(ms=t_ref)
    for recipe in ("ue8m0", "fp32"):
        res[recipe]["speedup_vs_torch_bf16"] = t_ref / res[recipe]["ms"]
    res["calc_diff_fp8_chain_vs_torch_bf16_last_recipe"] = calc_diff(fp8_out, ref.float())
    res["shape"] = dict(W=w_tok, H=h, I=inter, E=e_num, K_top=k_top)
    log(res)
    return res


@section("chain_graph")
def chain_graph(w_tok, h, inter, e_num, k_top):
    """The ht chain with deferred routing checks (backend.ops.triton.chain.HtChain: no host read), eager vs one
    CUDA-graph replay: times, output identical, a planted bad id reported by check() after a replay (issue 12)."""
    from backend.ops.triton.chain import random_chain
    ch = random_chain(w_tok, h, inter, e_num, k_top, DEV)
    eager_out = ch.run().clone()
    ch.check()
    res = dict(tokens=w_tok, M=ch.m, eager_ms=bench_ms(ch.run), graph_captured=False)
    if DRY:                                   # no CUDA graphs under the interpreter
        return res
    ch.capture()
    ch.graph.replay()
    torch.cuda.synchronize()
    res.update(graph_captured=True, graph_equal=bool(torch.equal(ch.out, eager_out)),
               replay_ms=bench_ms(ch.graph.replay))
    good = ch.topk_ids.clone()
    ch.topk_ids[w_tok // 2, k_top - 1] = e_num + 3
    ch.graph.replay()
    try:
        ch.check()
        res["bad_id_reported"] = None
    except ValueError as err:
        res["bad_id_reported"] = str(err)
    ch.topk_ids.copy_(good)
    ch.graph.replay()
    res["graph_equal_after_restore"] = bool(torch.equal(ch.out, eager_out))
    log(res)
    return res


@section("chain_layer")
def chain_layer(tokens, h, inter, e_num, k_top):
    """issue 12's `chain` records (top level of the JSON), one per W in `tokens`: the whole ht layer, FP32 recipe with
    our GEMMs (Gluon on SM90), eager and as one CUDA-graph replay (`ours_ms`), per-stage GPU times (`per_op_ms`),
    DeepGEMM's two masked GEMMs alone on the same routed rows (`deepgemm_gemms_ms`), and our glue with DeepGEMM's
    GEMMs (`ours_glue_deepgemm_gemms_ms`, its per-stage times `deepgemm_variant_per_op_ms`)."""
    from _common import optional_import
    dg, dg_err = (None, "dry run") if DRY else optional_import("deep_gemm")
    RESULTS["chain"] = []
    for w_tok in tokens:
        try:
            rec = chain_layer_record(dg, w_tok, h, inter, e_num, k_top)
        except Exception as exc:
            traceback.print_exc()
            rec = dict(tokens=w_tok, error=repr(exc)[:1000])
        rec["deepgemm_error"] = dg_err
        RESULTS["chain"].append(rec)
        log("chain W", w_tok, {k: v for k, v in rec.items() if not isinstance(v, dict)})
        save()
        torch.cuda.empty_cache() if not DRY else None
    return dict(tokens=list(tokens), deepgemm_error=dg_err, records="top-level `chain`")


def _stage_times(layer) -> dict:
    import chain_layer as CL
    if DRY:                                  # no CUDA events on CPU: each stage timed on its own
        return {name: bench_ms(f) for name, f in layer.stages().items()}
    return CL.per_stage_ms(layer.stages())


def _whole(layer, rec: dict, prefix: str, reference: torch.Tensor) -> None:
    """Eager time of the whole layer, then one CUDA-graph capture + replay (output compared with `reference`)."""
    import chain_layer as CL
    rec[f"{prefix}eager_ms"] = bench_ms(layer.run)
    rec[f"{prefix}graph_captured"] = False
    if DRY:
        return
    try:
        graph = CL.capture(layer.run)
        graph.replay()
        torch.cuda.synchronize()
        rec[f"{prefix}graph_captured"] = True
        rec[f"{prefix}graph_equal"] = bool(torch.equal(layer.st["out"], reference))
        rec[f"{prefix}replay_ms"] = bench_ms(graph.replay)
    except Exception as exc:
        rec[f"{prefix}graph_error"] = repr(exc)[:500]


def _fused_variant(layer, rec: dict, out: torch.Tensor) -> None:
    """The same layer with GEMM 1 + SwiGLU + quant fused (`fused_*` keys; output compared with the unfused run's);
    `ours_ms` / `per_op_ms` / `ours_variant`: the faster of the two by graph replay (eager where not captured)."""
    layer.fused = True
    try:
        out_f = layer.run().clone()
        rec["fused_equal_to_unfused"] = bool(torch.equal(out_f, out))
        rec["fused_per_op_ms"] = _stage_times(layer)
        _whole(layer, rec, "fused_", out)
        rec["fused_ms"] = rec.get("fused_replay_ms", rec["fused_eager_ms"])
    except Exception as exc:
        traceback.print_exc()
        rec["fused_error"] = repr(exc)[:500]
    finally:
        layer.fused = False
    faster = rec.get("fused_equal_to_unfused") and rec["fused_ms"] < rec["unfused_ms"]
    rec["ours_variant"] = "fused" if faster else "unfused"
    rec["ours_ms"] = rec["fused_ms"] if faster else rec["unfused_ms"]
    rec["unfused_per_op_ms"] = rec["per_op_ms"]
    rec["per_op_ms"] = rec["fused_per_op_ms"] if faster else rec["unfused_per_op_ms"]


def chain_layer_record(dg, w_tok, h, inter, e_num, k_top) -> dict:
    import chain_layer as CL
    layer = CL.make_layer(w_tok, h, inter, e_num, k_top, DEV)
    kernel = {name: L.masked_gemm_kernel("fp32", layer.x.device, k, n=n, expected_m=layer.expected_m)
              for name, n, k in (("gemm1", 2 * inter, h), ("gemm2", h, inter))}
    rec = dict(tokens=w_tok, M=layer.m, expected_m=layer.expected_m, recipe="fp32", gemm_kernel=kernel,
               shape=dict(W=w_tok, H=h, I=inter, E=e_num, K_top=k_top))
    out = layer.run().clone()
    rec["routing_record_clear"] = not any(layer.errors.tolist())
    rec["nan"] = bool(torch.isnan(out.float()).any())
    rec["per_op_ms"] = _stage_times(layer)
    _whole(layer, rec, "", out)
    rec["unfused_ms"] = rec.get("replay_ms", rec["eager_ms"])
    rec["ours_timing"] = "graph replay" if "replay_ms" in rec else "eager"
    _fused_variant(layer, rec, out)
    rec["per_op_sum_ms"] = sum(rec["per_op_ms"].values())      # of the variant in ours_ms
    rec["glue_ms"] = sum(v for k, v in rec["per_op_ms"].items() if not k.startswith("gemm"))
    if dg is None:
        return rec
    layer.gemm = layer.deepgemm(dg)
    out_dg = layer.run().clone()
    rec["deepgemm_variant_calc_diff_vs_ours"] = calc_diff(out_dg.float(), out.float())
    rec["deepgemm_variant_equal_to_ours"] = bool(torch.equal(out_dg, out))
    rec["deepgemm_variant_per_op_ms"] = _stage_times(layer)
    rec["deepgemm_gemms_ms"] = bench_ms(layer.two_gemms)
    rec["deepgemm_gemms_per_op_ms"] = {k: rec["deepgemm_variant_per_op_ms"][k] for k in ("gemm1", "gemm2")}
    _whole(layer, rec, "deepgemm_variant_", out_dg)
    rec["ours_glue_deepgemm_gemms_ms"] = rec.get("deepgemm_variant_replay_ms", rec["deepgemm_variant_eager_ms"])
    rec["ours_vs_deepgemm_gemms"] = rec["ours_ms"] / rec["deepgemm_gemms_ms"]
    rec["ours_glue_deepgemm_gemms_vs_deepgemm_gemms"] = rec["ours_glue_deepgemm_gemms_ms"] / rec["deepgemm_gemms_ms"]
    return rec


# ----------------------------------------------------------------------------- compiled-kernel report

@section("compiled")
def compiled_report():
    rep = []
    for name in ("group_gemm_masked_kernel", "group_gemm_masked_dot_scaled_kernel"):
        fn = getattr(KERN, name)
        caches = getattr(fn, "device_caches", {})
        for dev_cache in caches.values():
            for ck in dev_cache[0].values():
                item = dict(kernel=name)
                for attr in ("n_regs", "n_spills"):
                    item[attr] = getattr(ck, attr, None)
                md = getattr(ck, "metadata", None)
                if md is not None:
                    item["shared"] = getattr(md, "shared", None)
                    item["num_warps"] = getattr(md, "num_warps", None)
                    item["num_stages"] = getattr(md, "num_stages", None)
                try:
                    sass = ck.asm["sass"]
                    for op in ("QGMMA", "HGMMA", "HMMA", "WARPGROUP.DEPBAR", "LDGSTS", "UTMALDG", "BAR.SYNC"):
                        item[op] = sass.count(op)
                except Exception as exc:
                    item["sass_error"] = repr(exc)[:200]
                try:
                    ptx = ck.asm["ptx"]
                    item["ptx_wgmma"] = ptx.count("wgmma.mma_async")
                    item["ptx_wgmma_wait"] = ptx.count("wgmma.wait_group")
                except Exception:
                    pass
                rep.append(item)
    log(rep)
    return rep


# ----------------------------------------------------------------------------- main

def summary():
    s = RESULTS["sections"]
    lines = []
    env = s.get("environment") or {}
    lines.append(f"card {env.get('card')} driver {env.get('driver')} torch {env.get('torch')} triton {env.get('triton')}")
    cp = s.get("copy_ceiling") or {}
    lines.append(f"copy {cp.get('tb_per_s', 0):.2f} TB/s")
    for row in (s.get("gemm") or {}).get("rows", []):
        cells = [f"N={row['N']} K={row['K']} fill={row['fill']!s:>14} cuBLAS {row['cublas_tflops']:6.0f}"]
        for name in ("explicit_ue8m0", "explicit_fp32", "explicit_fp32_tl", "dot_scaled_ue8m0"):
            v = row.get(name, {})
            cells.append(f"{name} {v.get('tflops', float('nan')):6.0f} ({v.get('vs_cublas', float('nan')):.2f}x"
                         f"{'' if v.get('correct') else ' WRONG' if 'correct' in v else ' ERR'})")
        lines.append(" | ".join(cells))
    for name, v in (s.get("memory_bound") or {}).items():
        lines.append(f"{name:32s} {v['tb_per_s']:.2f} TB/s  {v['vs_copy'] or 0:.2f}x copy  {v['ms']:.3f} ms"
                     + (f" | graph {v['graph_vs_copy'] or 0:.2f}x copy {v['graph_ms']:.3f} ms" if "graph_ms" in v else "")
                     + (f" | {v['copy_same_bytes_ms'] / v.get('graph_ms', v['ms']):.2f}x copy of as many bytes"
                        if v.get("copy_same_bytes_ms") else "")
                     + (f" | index {v['index_graph_ms']:.4f} ms move {v['move_graph_ms']:.4f} ms"
                        if "index_graph_ms" in v else ""))
    ch = s.get("chain") or {}
    for recipe in ("ue8m0", "fp32"):
        if recipe in ch:
            v = ch[recipe]
            lines.append(f"chain {recipe}: {v['ms']:.2f} ms, GEMM share {v['gemm_share']:.2f}, "
                         f"{v.get('speedup_vs_torch_bf16', 0):.2f}x torch bf16 ({ch.get('torch_bf16', {}).get('ms', 0):.2f} ms)")
    for rec in RESULTS.get("chain", []):
        if "error" in rec:
            lines.append(f"chain W={rec['tokens']}: ERROR {rec['error'][:200]}")
            continue
        ops_ = " ".join(f"{k} {v:.3f}" for k, v in rec["per_op_ms"].items())
        lines.append(f"chain W={rec['tokens']}: ours {rec['ours_ms']:.3f} ms ({rec['ours_timing']}; {ops_}), DeepGEMM "
                     f"GEMMs {rec.get('deepgemm_gemms_ms', float('nan')):.3f} ms -> "
                     f"{rec.get('ours_vs_deepgemm_gemms', float('nan')):.2f}x; our glue + DeepGEMM GEMMs "
                     f"{rec.get('ours_glue_deepgemm_gemms_ms', float('nan')):.3f} ms; graph equal {rec.get('graph_equal')}")
    lines.append(f"errors: {len(RESULTS['errors'])}; elapsed {time.time() - T0:.0f} s")
    print("\n".join(lines), flush=True)


def ncu_one(cfg_json: str):
    """One launch of the explicit UE8M0 GEMM (N=4096, K=7168, 512 rows per expert) with a given config, for ncu."""
    cfg = json.loads(cfg_json)
    gen = torch.Generator(device=DEV).manual_seed(1)
    e_num, m_cap, n, k = 32, 512, 4096, 7168
    a = rand_fp8((e_num * m_cap, k), gen)
    b = rand_fp8((e_num, n, k), gen, scale=0.5)
    ea = torch.randint(120, 130, (e_num, m_cap, k // 128), dtype=torch.int32, device=DEV, generator=gen)
    eb = torch.randint(118, 126, (e_num, n // 128, k // 128), dtype=torch.int32, device=DEV, generator=gen)
    sfa = L.unpack_and_convert_scale(mn_major(pack_words(ea)), None)
    sfb = L.unpack_and_convert_scale(pack_words(eb.repeat_interleave(128, 1)), None)
    out = torch.empty((e_num * m_cap, n), dtype=torch.bfloat16, device=DEV)
    counts = torch.full((e_num,), m_cap, dtype=torch.int32, device=DEV)
    L.TUNER.choose(("explicit_ue8m0", n, k, str(a.device)), cfg)
    L.group_gemm_masked(a, b, sfa, sfb, counts, out, None, m_cap, sfb_per_block=True)
    torch.cuda.synchronize()


def run_ncu():
    """Profile the chosen explicit-UE8M0 config once with Nsight Compute (clocks left alone)."""
    cfg = L.TUNER.chosen().get(("explicit_ue8m0", 4096, 7168, "cuda:0"))
    if cfg is None or OUT_PATH is None:
        return
    rep = OUT_PATH.parent / "ncu_gemm.txt"
    cmd = ["ncu", "--clock-control", "none", "--kernel-name", "regex:group_gemm_masked_kernel", "--launch-count", "1",
           "--section", "SpeedOfLight", "--section", "WarpStateStats", "--section", "ComputeWorkloadAnalysis",
           "--section", "Occupancy", "--section", "LaunchStats",
           sys.executable, __file__, "--ncu-one", json.dumps(cfg)]
    log("ncu:", " ".join(cmd[:12]), "...")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=180)
        rep.write_text(p.stdout[-60000:] + "\n--- stderr\n" + p.stderr[-5000:])
        RESULTS["ncu"] = dict(config=cfg, rc=p.returncode, file=rep.name)
    except Exception as exc:
        RESULTS["ncu"] = dict(config=cfg, error=repr(exc))
    save()


def main():
    global DRY, DEV, OUT_PATH
    ap = argparse.ArgumentParser()
    ap.add_argument("--dry", action="store_true", help="tiny shapes on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--out", default=None)
    ap.add_argument("--skip", default="", help="comma list of sections to skip: gemm,memory,chain,chain_graph,"
                    "chain_layer")
    ap.add_argument("--chain-tokens", default="1024,4096,16384",
                    help="W values of the chain_layer section (issue 12's `chain` records)")
    ap.add_argument("--graph", action="store_true", help="only the chain_graph section (the ht chain with deferred "
                    "routing checks, eager vs CUDA-graph replay); skip it otherwise with --skip chain_graph")
    ap.add_argument("--ncu", action="store_true", help="after the run, profile the chosen GEMM config with ncu")
    ap.add_argument("--ncu-one", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.ncu_one:
        ncu_one(args.ncu_one)
        return
    DRY = args.dry
    DEV = "cpu" if DRY else "cuda"
    OUT_PATH = pathlib.Path(args.out) if args.out else None
    skip = set(filter(None, args.skip.split(",")))
    if args.graph:
        skip |= {"memory", "gemm", "chain", "chain_layer"}
    torch.manual_seed(0)
    env = environment()
    RESULTS.update(card=env.get("card", "cpu"),     # bench_gemm_peers.py --merge-into restamps both with its own run
                   date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
    cp = copy_ceiling() or {}
    if DRY:
        shapes, e_num, m_cap, fills = [(256, 256)], 4, 128, (64, 128, "uneven_0_128")
        mem = dict(t_tok=64, h=512, inter=256, e_num=4, k_top=2)
        ch = dict(w_tok=32, h=256, inter=128, e_num=4, k_top=2)
    else:
        shapes, e_num, m_cap, fills = [(4096, 7168), (7168, 2048)], 32, 2048, FILLS
        mem = dict(t_tok=16384, h=7168, inter=2048, e_num=32, k_top=8)
        ch = dict(w_tok=4096, h=7168, inter=2048, e_num=32, k_top=8)
    if "memory" not in skip:
        memory_bound(copy_tbs=cp.get("tb_per_s"), **mem)
    if "gemm" not in skip:
        gemm_bench(shapes, e_num, m_cap, fills)
    if "chain" not in skip:
        chain(**ch)
    if "chain_graph" not in skip:
        chain_graph(**ch)
    if "chain_layer" not in skip:
        chain_layer([int(t) for t in args.chain_tokens.split(",")] if not DRY else [16, 32],
                    **{k: v for k, v in ch.items() if k != "w_tok"})
    compiled_report()
    RESULTS["elapsed_s"] = time.time() - T0
    save()
    summary()
    if args.ncu and not DRY:
        run_ncu()


if __name__ == "__main__":
    main()
