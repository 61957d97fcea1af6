#!/usr/bin/env python3
"""Expert-parallel ht MoE layer over torch.distributed (NCCL on GPUs, gloo on CPU), torch only.

One process per GPU (torchrun). Each rank runs the DeepEP-"normal" exchange of SPEC §9 with the exact semantics of
docs/design.md around the FP8 expert chain, the exchange built on the device (backend/ops/triton/ep_exchange.py:
route / pack / unpack kernels, no host read, fixed chunks of T rows per rank = num_worst_tokens):

    per_token_quant (1x128, UE8M0) -> index + pack (kernels; padding rows marked) -> all_to_all_single (workspace
    buffers) -> unpack (kernel) -> permute -> GEMM 1 -> SwiGLU + quant -> GEMM 2 -> weighted depermute (one row per
    token and rank, summed over that rank's experts) -> all_to_all_single back -> sum over ranks (kernel, float32,
    rank order, one bf16 rounding)

--overlap on splits the layer into two micro-batches, the collectives on their own CUDA stream, so the exchange of
one overlaps the expert GEMMs of the other (ep_exchange.overlapped_layer); off: one micro-batch, one stream.

The chain is the Triton launchers (backend/ops/triton/launch.py) when they import and a GPU (or TRITON_INTERPRET=1)
is there, else a plain torch reference chain. The exchange kernels always run (under TRITON_INTERPRET=1 on CPU).

Measured per T (--tokens, comma-separated), each against its baseline:
1. checks: every rank's layer output (each --overlap setting) equals an in-process simulation of all R ranks
   (same chain, computed on each rank from the seeded inputs of every rank) bit for bit, at random routing and at an
   uneven one (every token to rank 0's experts: rank 0 receives W = R*T rows).
2. exchange: dispatch and combine alone: wall ms, steady-state ms, host ms per call (launches only), bytes sent to
   other ranks against DeepEP's ideal, the dispatch all_to_all against a plain all_to_all_single of the same bytes.
3. layer: the ht layer on R GPUs (T tokens each, E_total / R experts each) against one GPU doing the same R*T tokens
   with all E_total experts and the same chain (no exchange): speedup_2_gpus_vs_1 per overlap setting, with a
   per-stream timeline (CUDA events) of one call on rank 0.
4. graph (--graph on, GPU): the same layer and the dispatch alone captured in CUDA graphs (after all eager numbers).
   --exchange-graphs on: the eager layer and exchange numbers of 1-3 again with DeviceExchange(graphs=
   True), dispatch and combine replaying the CUDA graphs they captured at their first call (input copies + one
   replay each); its checks and records carry exchange_graphs "on" (checks: keys ending in _exchange_graphs),
   its exchange numbers are under exchange_by_graphs["on"]; off,on measures both in the same run. On CPU (gloo)
   an eager stand-in replays instead of a graph (graphs.rerun_capture): checks only.
5. ll (--ll N, default 128; 0: off): the low-latency pair (ep_exchange.LowLatencyExchange, moe_ref.ep.ll_dispatch /
   ll_combine semantics, fixed buffers of N tokens per rank) at T = N per rank around the masked chain: bit-exact
   against simulate_ll on every rank, dispatch / combine wall, loop and host ms, launches per call, bytes against
   the ll ideal, and dispatch, combine and the layer replayed from CUDA graphs -> result["ll"].
Launches per call (`*_launches`) count the Triton launches through backend/ops/triton/fast_launch; collectives per
call are listed beside them. --overlap-sms S caps the expert GEMMs at S SMs while micro-batches overlap (NCCL keeps
the rest).

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py --tokens 4096,1024 --overlap off,on \
        --exchange-graphs off,on --ll 128 --out $OUT/ep.json; python3 benchmarks/merge_ep_results.py benchmarks/results/ep_gpu_h200x2.json \
        $OUT/ep.json
    TRITON_INTERPRET=1 torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py --backend gloo --device cpu --dry
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # for _common, also when loaded by file path
from _common import repo_on_path, write_json  # noqa: E402

repo_on_path()
from backend.ops.triton import ep_exchange as X  # noqa: E402  (torch + triton, no Paddle)
from backend.ops.triton.graphs import capture_graph, rerun_capture  # noqa: E402

GROUP = 128
E4M3_MAX = 448.0
ACT_AMAX_FLOOR = 1e-4       # per_token_quant (moe_ref.quant.DEEPGEMM_AMAX_FLOOR)
SWIGLU_AMAX_FLOOR = 1e-10   # SPEC §7


def log(*a):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----------------------------------------------------------------------------- the ops chain

def import_triton_launch():
    """backend.ops.triton.launch (it imports no Paddle), or None when it cannot be imported."""
    repo_on_path()
    try:
        from backend.ops.triton import launch
        return launch
    except Exception as exc:    # noqa: BLE001 - reported, the torch chain is used instead
        log(f"triton launchers unavailable ({exc!r}); using the torch reference chain")
        return None


def ue8m0_exponent(s: torch.Tensor) -> torch.Tensor:
    """float32 s > 0 -> int32 exponent byte of the smallest power of two >= s (SPEC §2)."""
    bits = s.contiguous().view(torch.int32)
    return (((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)).clamp(1, 254)


def pack_bytes(e: torch.Tensor) -> torch.Tensor:
    """[..., G] int32 bytes -> [..., ceil(G/4)] int32 words, little-endian, missing groups 0."""
    g = e.shape[-1]
    if g % 4:
        e = torch.cat([e, torch.zeros(*e.shape[:-1], 4 - g % 4, dtype=e.dtype, device=e.device)], -1)
    return e.to(torch.uint8).contiguous().view(torch.int32)


def unpack_scales(words: torch.Tensor, groups: int) -> torch.Tensor:
    """[..., C] int32 packed UE8M0 -> [..., groups] float32 powers of two."""
    b = words.contiguous().view(torch.uint8)[..., :groups].to(torch.int32)
    return (b << 23).view(torch.float32)


def quant_rows_ue8m0(x: torch.Tensor, floor: float):
    """x [R, L] -> (q [R, L] fp8, packed UE8M0 [R, ceil(ceil(L/128)/4)] int32): SPEC §3."""
    r, length = x.shape
    g = -(-length // GROUP)
    xf = torch.nn.functional.pad(x.float(), (0, g * GROUP - length)).view(r, g, GROUP)
    e = ue8m0_exponent(xf.abs().amax(-1).clamp(min=floor) / E4M3_MAX)
    s = (e << 23).view(torch.float32)
    q = (xf / s[..., None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(r, g * GROUP)[:, :length]
    return q.contiguous(), pack_bytes(e)


def quantize_weight(w: torch.Tensor):
    """w [N, K] float -> (q [N, K] fp8, block scales [ceil(N/128), ceil(K/128)] float32 powers of
    two, per-row packed UE8M0 [N, ceil(ceil(K/128)/4)] int32): 128x128 blocks (SPEC §3)."""
    n, k = w.shape
    nb, kb = -(-n // GROUP), -(-k // GROUP)
    wp = torch.nn.functional.pad(w.float(), (0, kb * GROUP - k, 0, nb * GROUP - n)).view(nb, GROUP, kb, GROUP)
    e = ue8m0_exponent(wp.abs().amax(dim=(1, 3)).clamp(min=ACT_AMAX_FLOOR) / E4M3_MAX)
    s = (e << 23).view(torch.float32)
    q = (wp / s[:, None, :, None]).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    q = q.view(nb * GROUP, kb * GROUP)[:n, :k].contiguous()
    rows = e.repeat_interleave(GROUP, dim=0)[:n]
    return q, s, pack_bytes(rows)


class Experts:
    """E experts' FP8 weights on one device, and the chain run on a rank's received rows."""

    def __init__(self, first: int, count: int, h: int, i: int, seed: int, device, launch):
        self.e, self.h, self.i, self.launch = count, h, i, launch
        self.sm_count = -1
        up_q, up_s, up_p, dn_q, dn_s, dn_p = ([] for _ in range(6))
        for g in range(first, first + count):
            gen = torch.Generator(device=device).manual_seed(seed * 100003 + g)
            w_up = torch.randn(2 * i, h, device=device, generator=gen) * 0.02
            w_dn = torch.randn(h, i, device=device, generator=gen) * 0.02
            for (q, s, p), lists in ((quantize_weight(w_up), (up_q, up_s, up_p)),
                                     (quantize_weight(w_dn), (dn_q, dn_s, dn_p))):
                for item, lst in zip((q, s, p), lists):
                    lst.append(item)
        self.up_q, self.dn_q = torch.stack(up_q), torch.stack(dn_q)
        self.up_s, self.dn_s = torch.stack(up_s), torch.stack(dn_s)
        if launch is not None:
            self.errors = torch.zeros(launch.DE.RECORD_LEN, dtype=torch.int64, device=device)   # deferred checks
            self.up_sf = launch.unpack_and_convert_scale(torch.stack(up_p), None)
            self.dn_sf = launch.unpack_and_convert_scale(torch.stack(dn_p), None)

    def __call__(self, x_q, x_scale, ids, weights, m: int) -> torch.Tensor:
        """x_q [W, H] fp8, x_scale [W, C] packed UE8M0, ids [W, K_top] local ids or -1, weights
        [W, K_top] fp32, m rows per expert -> partial [W, H] bf16 (weighted, SPEC §5-8)."""
        if self.launch is None:
            return self._torch_chain(x_q, x_scale, ids, weights)
        st = dict(x_q=x_q, x_scale=x_scale)
        for step in self.steps(ids, weights, m, st).values():
            step()
        return st["out"]

    def steps(self, ids, weights, m: int, st: dict) -> dict:
        """The chain of __call__ as named steps in order (permute, the masked chain's, combine), each reading and
        writing the state st (in: x_q, x_scale, read when the permute runs; out: st["out"]);
        benchmarks/profile_host.py times them one by one."""
        L, e, h = self.launch, self.e, self.h

        def permute():
            st["px"], st["ps"], st["imap"], st["counts"] = L.prefill_permute_to_masked_gemm(
                st["x_q"], st["x_scale"], ids, e, m, errors=self.errors)

        def combine():
            st["out"] = L.depermute_prefill_combine(st["down"].view(e, m, h), st["imap"], weights,
                                                    st["x_q"].shape[0])
        return dict(permute=permute, **self._masked_steps(st, m), combine=combine)

    def masked(self, px, ps, counts, m: int) -> torch.Tensor:
        """The masked chain: px [E, M, H] fp8, ps MN-major scales (the permute's), counts [E] int32 -> [E, M, H]
        bf16 (GEMM 1, SwiGLU + quant, GEMM 2; unweighted). sm_count (attribute, -1: all) bounds the GEMMs' SMs."""
        st = dict(px=px, ps=ps, counts=counts)
        for step in self._masked_steps(st, m).values():
            step()
        return st["down"].view(self.e, m, self.h)

    def _masked_steps(self, st: dict, m: int) -> dict:
        """masked() as steps over st (px, ps, counts in; down [E·M, H] bf16 out): both scale conversions, GEMM 1,
        SwiGLU + quant, GEMM 2."""
        L, e, h, i = self.launch, self.e, self.h, self.i

        def unpack1():
            st["sfa"] = L.unpack_and_convert_scale(st["ps"], st["counts"])

        def gemm1():
            st["up"] = torch.empty(e * m, 2 * i, dtype=torch.bfloat16, device=st["px"].device)
            L.group_gemm_masked(st["px"].view(e * m, h), self.up_q, st["sfa"], self.up_sf, st["counts"], st["up"], None,
                                m, sm_count=self.sm_count, sfb_per_block=True)

        def swiglu():
            st["act"], st["act_s"] = L.fused_mask_swiglu_fp8_quant(st["up"].view(e, m, 2 * i), st["counts"], GROUP,
                                                                   True)

        def unpack2():
            st["sfa2"] = L.unpack_and_convert_scale(st["act_s"], st["counts"])

        def gemm2():
            st["down"] = torch.empty(e * m, h, dtype=torch.bfloat16, device=st["px"].device)
            L.group_gemm_masked(st["act"].view(e * m, i), self.dn_q, st["sfa2"], self.dn_sf, st["counts"],
                                st["down"], None, m, sm_count=self.sm_count, sfb_per_block=True)
        return dict(unpack1=unpack1, gemm1=gemm1, swiglu=swiglu, unpack2=unpack2, gemm2=gemm2)

    def _torch_chain(self, x_q, x_scale, ids, weights):
        """The same math in plain torch (dequantize, float32 GEMMs), for machines without Triton."""
        w_rows, h = x_q.shape
        s_h = -(-h // GROUP)
        xs = unpack_scales(x_scale, s_h).repeat_interleave(GROUP, dim=1)[:, :h]
        xd = x_q.float() * xs
        up_w = self.up_q.float() * self.up_s.repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)[:, :2 * self.i, :h]
        dn_w = self.dn_q.float() * self.dn_s.repeat_interleave(GROUP, 1).repeat_interleave(GROUP, 2)[:, :h, :self.i]
        out = torch.zeros(w_rows, h, dtype=torch.float32, device=x_q.device)
        for k in range(ids.shape[1]):
            for e in range(self.e):
                rows = torch.nonzero(ids[:, k] == e).flatten()
                if rows.numel() == 0:
                    continue
                up = (xd[rows] @ up_w[e].T).to(torch.bfloat16).float()
                gate, lin = up[:, :self.i], up[:, self.i:]
                y = (lin * gate / (1 + torch.exp(-gate))).to(torch.bfloat16)
                q, sc = quant_rows_ue8m0(y, SWIGLU_AMAX_FLOOR)
                yd = q.float() * unpack_scales(sc, -(-self.i // GROUP)).repeat_interleave(GROUP, 1)[:, :self.i]
                val = (yd @ dn_w[e].T).to(torch.bfloat16).float()
                out[rows] = out[rows] + weights[rows, k:k + 1] * val
        return out.to(torch.bfloat16)


# ----------------------------------------------------------------------------- the reference exchange (SPEC §9, exact)


def route(ids: torch.Tensor, e_local: int, world: int):
    """ids [T, K] global -> (dest [T, K] rank or -1, token indices sent to each rank, ascending)."""
    dest = torch.where(ids >= 0, torch.div(ids, e_local, rounding_mode="floor"), torch.full_like(ids, -1))
    return dest, [torch.nonzero((dest == r).any(1)).flatten() for r in range(world)]


def to_local(ids: torch.Tensor, rank: int, e_local: int) -> torch.Tensor:
    mine = (ids >= 0) & (torch.div(ids, e_local, rounding_mode="floor") == rank)
    return torch.where(mine, ids - rank * e_local, torch.full_like(ids, -1))


def pad_rows(t: torch.Tensor, w: int, fill) -> torch.Tensor:
    if t.shape[0] == w:
        return t
    pad = torch.full((w - t.shape[0],) + tuple(t.shape[1:]), fill, dtype=t.dtype, device=t.device) \
        if t.dtype != torch.float8_e4m3fn else torch.zeros((w - t.shape[0],) + tuple(t.shape[1:]),
                                                             dtype=torch.uint8, device=t.device).view(t.dtype)
    if t.dtype == torch.float8_e4m3fn:
        return torch.cat([t.view(torch.uint8), pad.view(torch.uint8)]).view(t.dtype)
    return torch.cat([t, pad])


def simulate(inputs: list, experts_of_rank, e_local: int, w: int, m: int) -> list:
    """All R ranks in one process, docs/design.md semantics -> each rank's layer output.
    inputs[s] = (x_q, x_scale, ids, weights) of source rank s."""
    world = len(inputs)
    routes = [route(ids, e_local, world)[1] for _, _, ids, _ in inputs]
    partial = []
    for r in range(world):
        parts = [[t[routes[s][r]] for t in inputs[s]] for s in range(world)]
        x = torch.cat([p[0].view(torch.uint8) for p in parts]).view(torch.float8_e4m3fn)
        sc, ids, wts = (torch.cat([p[j] for p in parts]) for j in (1, 2, 3))
        if x.shape[0] > w:
            raise ValueError(f"num_worst_tokens: rank {r} receives {x.shape[0]} tokens, more than num_worst_tokens W = {w}")
        partial.append(experts_of_rank(r)(pad_rows(x, w, 0), pad_rows(sc, w, 0),
                                          pad_rows(to_local(ids, r, e_local), w, -1), pad_rows(wts, w, 0.0), m))
    outs = []
    for s in range(world):
        t = inputs[s][0].shape[0]
        acc = torch.zeros(t, partial[0].shape[1], dtype=torch.float32, device=partial[0].device)
        for r in range(world):
            before = sum(len(routes[q][r]) for q in range(s))
            idx = routes[s][r]
            if idx.numel():
                acc[idx] = acc[idx] + partial[r][before: before + idx.numel()].float()
        outs.append(acc.to(torch.bfloat16))
    return outs


def simulate_ll(inputs: list, experts_of_rank, e_local: int, n: int, launch) -> list:
    """All R ranks in one process, moe_ref.ep.ll_dispatch / ll_combine semantics -> each rank's ll layer output:
    every rank's tokens concatenated in (source rank, token) order and permuted to rank r's [E, R·N] slots with the
    ids local to r (slots in (source, token, k) order), the masked chain, then per source token
    bf16(Σ_{k ascending} w · float32(row of (t, k))) (launch.depermute_prefill_combine over all ranks' rows)."""
    world, rn = len(inputs), len(inputs) * n
    x_all = torch.cat([i[0].view(torch.uint8) for i in inputs]).view(torch.float8_e4m3fn)
    s_all, ids_all, w_all = (torch.cat([i[j] for i in inputs]) for j in (1, 2, 3))
    rows, gmap = [], torch.full(ids_all.shape, -1, dtype=torch.int64, device=ids_all.device)
    for r in range(world):
        px, ps, imap, counts = launch.prefill_permute_to_masked_gemm(x_all, s_all, to_local(ids_all, r, e_local),
                                                                     e_local, rn)
        down = experts_of_rank(r).masked(px, ps, counts, rn)
        rows.append(down.reshape(-1, down.shape[-1]))
        gmap = torch.where(imap >= 0, imap.long() + r * e_local * rn, gmap)
    allrows = torch.cat(rows)
    out = launch.depermute_prefill_combine(allrows.view(1, *allrows.shape), gmap, w_all, ids_all.shape[0])
    bounds = [0]
    for i in inputs:
        bounds.append(bounds[-1] + i[0].shape[0])
    return [out[bounds[s]: bounds[s + 1]] for s in range(world)]


# ----------------------------------------------------------------------------- inputs

def make_inputs(rank: int, t: int, h: int, e_total: int, k: int, seed: int, device, uneven: bool = False):
    """Seeded x [T, H] bf16 and softmax top-k routing of source rank `rank` (any rank can make any)."""
    gen = torch.Generator(device=device).manual_seed(seed * 7919 + rank + 1)
    x = torch.randn(t, h, device=device, generator=gen).to(torch.bfloat16)
    logits = torch.randn(t, e_total, device=device, generator=gen)
    p = torch.softmax(logits, -1)
    order = torch.sort(-p, dim=-1, stable=True).indices[:, :k]
    wts = torch.gather(p, 1, order)
    wts = wts / wts.sum(-1, keepdim=True)
    ids = order.to(torch.int64)
    if uneven:
        ids = torch.arange(k, device=device).remainder(e_total).expand(t, k).contiguous()
    return x, wts.float(), ids


def quantize_act(x, launch):
    if launch is not None:
        return launch.per_token_quant(x, GROUP, True)
    return quant_rows_ue8m0(x, ACT_AMAX_FLOOR)


# ----------------------------------------------------------------------------- timing

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, iters: int, warmup: int) -> float:
    """Median wall ms over iters, ranks aligned by a barrier before each; the max over ranks."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    med = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(med, op=dist.ReduceOp.MAX)
    return float(med.item())


def loop_ms(fn, device, n: int) -> float:
    """Per-op ms of n back-to-back calls (one sync at the end: steady state, no per-op barrier),
    ranks aligned by a barrier first; the max over ranks."""
    dist.barrier()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        sync(device)
        ms = start.elapsed_time(end) / n
    else:
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        ms = (time.perf_counter() - t0) * 1e3 / n
    t = torch.tensor([ms], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def interleaved(fns: dict, device, rounds: int, n: int) -> dict:
    """Median over `rounds` of loop_ms for each fn, the fns alternating within every round (so
    clock or link drift hits all of them alike)."""
    for fn in fns.values():
        loop_ms(fn, device, 2)
    seen = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            seen[k].append(loop_ms(fn, device, n))
    return {k: statistics.median(v) for k, v in seen.items()}


def versions(device) -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "backend": dist.get_backend(),
            "world_size": dist.get_world_size()}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type == "cuda":
        info["card"] = torch.cuda.get_device_name(device)
        info["gpu_count"] = torch.cuda.device_count()
        info["cuda"] = torch.version.cuda
        info["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        try:
            info["driver"] = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                            capture_output=True, text=True, timeout=20).stdout.split("\n")[0].strip()
            topo = subprocess.run(["nvidia-smi", "topo", "-m"], capture_output=True, text=True, timeout=20).stdout
            info["topology"] = topo.strip().split("\n")[:4]
        except Exception:  # noqa: BLE001
            pass
    return info



# ----------------------------------------------------------------------------- measurements

def host_ms(fn, device, n: int) -> float:
    """Median host ms of one call (its launches; the queue drained before each), max over ranks."""
    fn()
    times = []
    for _ in range(n):
        sync(device)
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    sync(device)
    t = torch.tensor([statistics.median(times)], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def rank_sum(v: float, device) -> float:
    t = torch.tensor([float(v)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def check_key(name: str, parts: int, graphs: bool) -> str:
    """The name of a bit-exactness check: routing, overlap setting, exchange graphs."""
    return f"{name}_overlap_{'on' if parts > 1 else 'off'}" + ("_exchange_graphs" if graphs else "")


def check_bit_exact(ctx, t: int, parts_list, graphs_list=(False,)) -> dict:
    """Every rank's layer output (each overlap and exchange-graphs setting) against the in-process simulation of
    all ranks."""
    a, rank, world, device = ctx["a"], ctx["rank"], ctx["world"], ctx["device"]
    out = {}
    for name, uneven in (("random", False), ("uneven", True)):
        ins = [make_inputs(s, t, a.hidden, a.experts, a.top_k, a.seed, device, uneven) for s in range(world)]
        q_ins = [(*quantize_act(x, ctx["launch"]), ids, wts) for x, wts, ids in ins]
        w = world * t
        ref = simulate(q_ins, lambda r: ctx["all_experts"][r], ctx["e_local"], w, w)[rank]
        _, sent = route(ins[rank][2], ctx["e_local"], world)
        for parts, graphs in ((p, g) for g in graphs_list for p in parts_list):
            got = ctx["layer"](*ins[rank], parts, graphs=graphs)
            flag = torch.tensor([0 if torch.equal(got.view(torch.int16), ref.view(torch.int16)) else 1], device=device)
            dist.all_reduce(flag)
            recv = torch.tensor([[len(s) for s in sent]], dtype=torch.int64, device=device)
            cnt = torch.empty(world, world, dtype=torch.int64, device=device)
            dist.all_gather_into_tensor(cnt, recv)
            key = check_key(name, parts, graphs)
            out[key] = {"bit_exact_all_ranks": int(flag.item()) == 0,
                        "recv_tokens_per_rank": cnt.sum(0).tolist(), "W": w}
            log(f"T={t} check {key}: {'bit-exact on every rank' if out[key]['bit_exact_all_ranks'] else 'MISMATCH'}")
        del ins, q_ins, ref
    return out


def exchange_numbers(ctx, x_q, x_s, ids, wts, t: int, graphs: bool = False) -> dict:
    """Dispatch and combine alone (one micro-batch, fixed chunks): wall ms with a barrier before each call,
    steady-state ms (back-to-back, CUDA events), host ms (launches), bytes on the wire vs DeepEP's ideal.
    graphs: DeviceExchange(graphs=True) (fixed chunks whatever --layout): host ms = input copies + replay."""
    a, device, world, rank = ctx["a"], ctx["device"], ctx["world"], ctx["rank"]
    ex = X.DeviceExchange(ctx["e_local"], t, exact=a.layout == "exact" and not graphs, graphs=graphs,
                          capture=ctx.get("exchange_capture") if graphs else None)
    d = {}

    def dispatch():
        d["d"] = ex.dispatch(x_q, x_s, ids, wts)

    dispatch()
    r_x, r_s, r_ids, r_w, h = d["d"]
    partial = ctx["mine"](r_x, r_s, r_ids, r_w, world * t)
    ex.combine(partial, h)
    bytes_sent = rank_sum(ex.stats["dispatch_bytes_to_others"] + ex.stats["combine_bytes_to_others"], device)
    lay = X.RowLayout(x_q.shape[1], x_s.shape[1], ids.shape[1])
    ideal = rank_sum(sum(X.ideal_bytes(ex.counts_matrix(h).tolist(), rank, lay, 2 * x_q.shape[1])), device)
    biggest = torch.tensor([h.send.numel() * 4], dtype=torch.int64, device=device)
    dist.all_reduce(biggest, op=dist.ReduceOp.MAX)                   # equal splits: one size on every rank
    plain_in = torch.zeros(-(-int(biggest.item()) // (world * 128)) * world * 128, dtype=torch.uint8, device=device)
    plain_out = torch.empty_like(plain_in)
    loop = interleaved({"dispatch": dispatch, "combine": lambda: ex.combine(partial, h),
                        "dispatch_all_to_all": lambda: dist.all_to_all_single(h.recv[:h.rows_recv], h.send,
                                                                              *ex.splits(h, True)),
                        "plain_all_to_all_same_bytes": lambda: dist.all_to_all_single(plain_out, plain_in)},
                       device, rounds=5, n=a.iters)
    return {
        "layout": "exact (one host read of the counts)" if ex.exact else "fixed chunks of T rows per rank (no host read)",
        "exchange_graphs": "on" if graphs else "off",
        "dispatch_ms": timed(dispatch, device, a.iters, a.warmup),
        "combine_ms": timed(lambda: ex.combine(partial, h), device, a.iters, a.warmup),
        "dispatch_loop_ms": loop["dispatch"], "combine_loop_ms": loop["combine"],
        "dispatch_all_to_all_ms": loop["dispatch_all_to_all"], "plain_all_to_all_same_bytes_ms":
            loop["plain_all_to_all_same_bytes"],
        "dispatch_host_ms": host_ms(dispatch, device, a.iters),
        "combine_host_ms": host_ms(lambda: ex.combine(partial, h), device, a.iters),
        "dispatch_launches": launches(dispatch), "combine_launches": launches(lambda: ex.combine(partial, h)),
        "collectives_per_call": {"dispatch": 2 if ex.exact else 1, "combine": 1},
        "bytes_sent": int(bytes_sent), "bytes_ideal": int(ideal), "bytes_sent_vs_ideal": bytes_sent / max(ideal, 1),
        "row_bytes": lay.row_words * 4, "ideal_row_bytes": lay.ideal_row_bytes,
        "note": "ms: wall per call with a barrier before each, max over ranks (loop_ms: back-to-back, CUDA events); "
                "host_ms: the call's return time with an empty queue (launches only); bytes: all ranks, to other "
                "ranks only, dispatch + combine; ideal: a token once per other rank hosting >= 1 of its experts "
                "(fp8 x, packed UE8M0 scales, ids int64, weights fp32), one bf16 row back per token received",
    }


def launches(fn) -> int:
    """Triton launches (through backend.ops.triton.fast_launch's kernels) of one call of fn."""
    c0 = X.K.launch_count()
    fn()
    return X.K.launch_count() - c0


def ll_layer(ctx, llx, x, wts, ids):
    """quant -> ll dispatch -> masked chain on [E, R·N] -> ll combine: this rank's [T, H] bf16."""
    q, sc = quantize_act(x, ctx["launch"])
    px, ps, cnt, h = llx.dispatch(q, sc, ids, wts)
    return llx.combine(ctx["mine"].masked(px, ps, cnt, llx.world * llx.n), wts, h)


def ll_check(ctx, llx, n: int) -> bool:
    """Every rank's ll layer output against simulate_ll (random routing, T = N on every rank)."""
    a, world, device = ctx["a"], ctx["world"], ctx["device"]
    ins = [make_inputs(s, n, a.hidden, a.experts, a.top_k, a.seed + 1, device) for s in range(world)]
    q_ins = [(*quantize_act(x, ctx["launch"]), ids, wts) for x, wts, ids in ins]
    ref = simulate_ll(q_ins, lambda r: ctx["all_experts"][r], ctx["e_local"], n, ctx["launch"])[ctx["rank"]]
    got = ll_layer(ctx, llx, *ins[ctx["rank"]])
    flag = torch.tensor([0 if torch.equal(got.view(torch.int16), ref.view(torch.int16)) else 1], device=device)
    dist.all_reduce(flag)
    return int(flag.item()) == 0


def ll_ideal_bytes(ids: torch.Tensor, e_local: int, rank: int, world: int, lay, hidden: int) -> int:
    """This rank's share of DeepEP's ll ideal: its tokens once per other rank hosting >= 1 of their experts, one
    bf16 row back per (token, k) whose expert is on another rank."""
    rk = torch.where(ids >= 0, torch.div(ids, e_local, rounding_mode="floor"), torch.full_like(ids, -1))
    rows = sum(int((rk == r).any(1).sum()) for r in range(world) if r != rank)
    entries = int(((rk >= 0) & (rk != rank)).sum())
    return rows * lay.ideal_row_bytes + entries * 2 * hidden


def ll_numbers(ctx, n: int) -> dict:
    """The ll path (backend/ops/triton/ep_exchange.LowLatencyExchange) at T = N tokens per rank: bit-exact against
    simulate_ll, dispatch / combine wall, loop and host ms per call, launches per call, bytes, CUDA-graph replay."""
    a, rank, world, device, launch = ctx["a"], ctx["rank"], ctx["world"], ctx["device"], ctx["launch"]
    if launch is None:
        return {"N": n, "skipped": "the ll path needs the Triton launchers"}
    llx = X.LowLatencyExchange(ctx["e_local"], n)
    rec = {"N": n, "T_per_rank": n, "bit_exact": ll_check(ctx, llx, n)}
    log(f"ll N={n} check: {'bit-exact on every rank' if rec['bit_exact'] else 'MISMATCH'}")
    x, wts, ids = make_inputs(rank, n, a.hidden, a.experts, a.top_k, a.seed + 1, device)
    q, sc = quantize_act(x, launch)
    d = {}

    def dispatch():
        d["d"] = llx.dispatch(q, sc, ids, wts)

    dispatch()
    px, ps, cnt, h = d["d"]
    eo = ctx["mine"].masked(px, ps, cnt, world * n)
    combine = lambda: llx.combine(eo, wts, h)            # noqa: E731
    combine()
    lay = X.RowLayout(q.shape[1], sc.shape[1], ids.shape[1])
    rec.update(dispatch_ms=timed(dispatch, device, a.iters, a.warmup), combine_ms=timed(combine, device, a.iters,
               a.warmup), dispatch_loop_ms=loop_ms(dispatch, device, a.iters),
               combine_loop_ms=loop_ms(combine, device, a.iters), dispatch_host_ms=host_ms(dispatch, device, a.iters),
               combine_host_ms=host_ms(combine, device, a.iters), dispatch_launches=launches(dispatch),
               combine_launches=launches(combine), collectives_per_call={"dispatch": 1, "combine": 1},
               layer_ms=timed(lambda: ll_layer(ctx, llx, x, wts, ids), device, a.iters, a.warmup),
               bytes_sent=int(rank_sum(llx.stats["dispatch_bytes_to_others"] + llx.stats["combine_bytes_to_others"],
                                       device)),
               bytes_ideal=int(rank_sum(ll_ideal_bytes(ids, ctx["e_local"], rank, world, lay, a.hidden), device)))
    rec["bytes_sent_vs_ideal"] = rec["bytes_sent"] / max(rec["bytes_ideal"], 1)
    rec.update(ll_graph_numbers(ctx, llx, dispatch, combine, (x, wts, ids)))
    log(f"ll N={n}:", json.dumps(rec))
    return rec


def ll_graph_numbers(ctx, llx, dispatch, combine, inputs) -> dict:
    """dispatch, combine and the whole ll layer captured in CUDA graphs: replay ms, layer graph == eager."""
    device, a = ctx["device"], ctx["a"]
    if device.type != "cuda":
        return {"graph": "skipped (CUDA graphs need a GPU)"}
    out = {}
    try:
        for name, fn in (("dispatch", dispatch), ("combine", combine)):
            g, _ = captured(fn, device)
            out[f"{name}_graph_ms"] = timed(g.replay, device, a.iters, a.warmup)
            out[f"{name}_graph_loop_ms"] = loop_ms(g.replay, device, a.iters)
            del g
        g, y = captured(lambda: ll_layer(ctx, llx, *inputs), device)
        g.replay()
        same = torch.tensor([int(torch.equal(y, ll_layer(ctx, llx, *inputs)))], device=device)
        dist.all_reduce(same, op=dist.ReduceOp.MIN)
        out["layer_graph_ms"] = timed(g.replay, device, a.iters, a.warmup)
        out["graph_equals_eager"] = bool(same.item())
        del g, y
    except Exception as exc:   # noqa: BLE001 - recorded; the eager numbers stand on their own
        out["graph_error"] = repr(exc)[:500]
        log(f"ll graph capture failed: {exc!r}")
    return out


def one_gpu_ms(ctx, t: int) -> float | None:
    """Rank 0: one GPU, all R·T tokens, all E_total experts, the same chain, no exchange (median wall ms)."""
    a, world, device, launch = ctx["a"], ctx["world"], ctx["device"], ctx["launch"]
    if ctx["rank"] != 0:
        return None
    if ctx.get("one") is None:
        ctx["one"] = Experts(0, a.experts, a.hidden, a.intermediate, a.seed, device, launch)
    one = ctx["one"]
    all_x, all_w, all_ids = (torch.cat(p) for p in zip(*[make_inputs(s, t, a.hidden, a.experts, a.top_k, a.seed,
                                                                     device) for s in range(world)]))

    def layer_one():
        q, s = quantize_act(all_x, launch)
        return one(q, s, all_ids, all_w, world * t)

    for _ in range(a.warmup):
        layer_one()
    ctx["one_graph_ms"] = None
    if device.type == "cuda":
        try:
            g, _ = captured(layer_one, device)
            ctx["one_graph_ms"] = statistics.median(_replay_ms(g, device, a.iters))
            del g
        except Exception as exc:   # noqa: BLE001 - recorded as missing
            log(f"1-GPU graph capture failed: {exc!r}")
    times = []
    for _ in range(a.iters):
        sync(device)
        t1 = time.perf_counter()
        layer_one()
        sync(device)
        times.append((time.perf_counter() - t1) * 1e3)
    return statistics.median(times)


def _replay_ms(g, device, n: int) -> list:
    times = []
    for _ in range(n):
        sync(device)
        t1 = time.perf_counter()
        g.replay()
        sync(device)
        times.append((time.perf_counter() - t1) * 1e3)
    return times


def captured(fn, device):
    """fn captured in a CUDA graph (run once eagerly on a side stream first) -> (graph, its output tensor)."""
    return capture_graph(fn, device)


def graph_numbers(ctx, x, wts, ids, parts_list, t: int) -> dict:
    """The fixed-chunk layer (and dispatch alone) captured in CUDA graphs (no host read anywhere, NCCL captured):
    replay wall ms, host ms per replay, replay output == eager output; rank 0 also the 1-GPU chain captured."""
    device, a = ctx["device"], ctx["a"]
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a GPU"}
    out = {}
    try:
        x_q, x_s = quantize_act(x, ctx["launch"])
        ex = X.DeviceExchange(ctx["e_local"], t)
        g, _ = captured(lambda: ex.dispatch(x_q, x_s, ids, wts), device)
        out["dispatch_graph_host_ms"] = host_ms(g.replay, device, a.iters)
        out["dispatch_graph_ms"] = timed(g.replay, device, a.iters, a.warmup)
        for parts in parts_list:
            key = "on" if parts > 1 else "off"
            g, y = captured(lambda: ctx["layer"](x, wts, ids, parts), device)
            g.replay()
            same = torch.tensor([int(torch.equal(y, ctx["layer"](x, wts, ids, parts)))], device=device)
            dist.all_reduce(same, op=dist.ReduceOp.MIN)
            out[f"layer_graph_ms_overlap_{key}"] = timed(g.replay, device, a.iters, a.warmup)
            out[f"layer_graph_host_ms_overlap_{key}"] = host_ms(g.replay, device, a.iters)
            out[f"graph_equals_eager_overlap_{key}"] = bool(same.item())
            del g, y
    except Exception as exc:   # noqa: BLE001 - recorded; the eager numbers stand on their own
        out["error"] = repr(exc)[:500]
        log(f"T={t} graph capture failed: {exc!r}")
    return out


def timeline_of(ctx, x, wts, ids, parts: int, graphs: bool = False) -> list:
    """Per-stream spans (CUDA events) of one layer call on this rank, [] off CUDA."""
    tl = X.Timeline(ctx["device"].type == "cuda")
    ctx["layer"](x, wts, ids, parts, tl, graphs=graphs)
    sync(ctx["device"])
    return tl.spans()


def run_tokens(ctx, t: int) -> dict:
    """Everything measured at T tokens per rank -> one entry of result["per_T"]."""
    a, rank, device = ctx["a"], ctx["rank"], ctx["device"]
    parts_list = [2 if o == "on" else 1 for o in a.overlap]
    graphs_list = [g == "on" for g in a.exchange_graphs]
    res = {"T_per_rank": t, "W": ctx["world"] * t, "checks": check_bit_exact(ctx, t, parts_list, graphs_list)}
    x, wts, ids = make_inputs(rank, t, a.hidden, a.experts, a.top_k, a.seed, device)
    x_q, x_s = quantize_act(x, ctx["launch"])
    res["exchange_by_graphs"] = {}
    for graphs in graphs_list:
        mode = "on" if graphs else "off"
        res["exchange_by_graphs"][mode] = exchange_numbers(ctx, x_q, x_s, ids, wts, t, graphs)
        log(f"T={t} exchange (exchange graphs {mode}):", json.dumps(res["exchange_by_graphs"][mode]))
    res["exchange"] = res["exchange_by_graphs"]["off" if False in graphs_list else "on"]
    ms_one = one_gpu_ms(ctx, t)
    dist.barrier()
    res["layer_1_gpu_ms"] = ms_one
    res["records"] = [layer_record(ctx, res, (x, wts, ids), parts, graphs)
                      for graphs in graphs_list for parts in parts_list]
    res["experts_only_2_gpus_ms"] = experts_only_ms(ctx, x_q, x_s, ids, wts, t)
    res["one_graph_ms"] = ctx.get("one_graph_ms")
    return res


def layer_record(ctx, res: dict, inputs: tuple, parts: int, graphs: bool) -> dict:
    """The layer at one (overlap, exchange graphs) setting: wall and host ms, speedup over one GPU, timeline, the
    exchange numbers of that exchange mode, the bit-exactness checks of that setting."""
    a, device, t, ms_one = ctx["a"], ctx["device"], res["T_per_rank"], res["layer_1_gpu_ms"]
    run = lambda: ctx["layer"](*inputs, parts, graphs=graphs)        # noqa: E731
    ms = timed(run, device, a.iters, a.warmup)
    rec = {"T_per_rank": t, "overlap": "on" if parts > 1 else "off", "micro_batches": parts,
           "exchange_graphs": "on" if graphs else "off", "layer_2_gpus_ms": ms, "layer_1_gpu_ms": ms_one,
           "speedup_2_gpus_vs_1": None if ms_one is None else ms_one / ms,
           "layer_host_ms": host_ms(run, device, a.iters),
           "timeline_rank0": timeline_of(ctx, *inputs, parts, graphs)}
    ex = res["exchange_by_graphs"][rec["exchange_graphs"]]
    for k in ("dispatch_ms", "combine_ms", "dispatch_host_ms", "combine_host_ms", "bytes_sent", "bytes_ideal"):
        rec[k] = ex[k]
    rec["bit_exact"] = {k: res["checks"][k]["bit_exact_all_ranks"]
                        for k in (check_key(n, parts, graphs) for n in ("random", "uneven"))}
    log(f"T={t} overlap={rec['overlap']} exchange graphs={rec['exchange_graphs']}: 2 GPUs {ms:.3f} ms, 1 GPU "
        f"{ms_one} ms, speedup {rec['speedup_2_gpus_vs_1']}, host {rec['layer_host_ms']:.3f} ms")
    return rec


def add_graph_numbers(ctx, res: dict) -> None:
    """The CUDA-graph numbers of one T (after every eager number is on record: a capture that fails cannot cost
    them) into res and its records."""
    a, t = ctx["a"], res["T_per_rank"]
    x, wts, ids = make_inputs(ctx["rank"], t, a.hidden, a.experts, a.top_k, a.seed, ctx["device"])
    res["graph"] = graph_numbers(ctx, x, wts, ids, sorted({r["micro_batches"] for r in res["records"]}), t)
    if res.get("one_graph_ms") is not None:
        res["graph"]["layer_1_gpu_graph_ms"] = res["one_graph_ms"]
    for rec in res["records"]:
        g_ms = res["graph"].get(f"layer_graph_ms_overlap_{rec['overlap']}")
        rec["layer_2_gpus_graph_ms"] = g_ms
        one = res["graph"].get("layer_1_gpu_graph_ms")
        rec["speedup_2_gpus_vs_1_graph"] = None if g_ms is None or one is None else one / g_ms
    log(f"T={t} graph:", json.dumps(res["graph"]))


def experts_only_ms(ctx, x_q, x_s, ids, wts, t: int) -> float:
    ex = X.DeviceExchange(ctx["e_local"], t)
    r_x, r_s, r_ids, r_w, _ = ex.dispatch(x_q, x_s, ids, wts)
    a = ctx["a"]
    return timed(lambda: ctx["mine"](r_x, r_s, r_ids, r_w, ctx["world"] * t), ctx["device"], a.iters, a.warmup)


# ----------------------------------------------------------------------------- main

def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--ops", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--tokens", default="4096,1024", help="T per rank, comma-separated (one record set each)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64, help="E_total (split evenly over the ranks)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--overlap", default="off,on", help="on (two micro-batches, collectives on their own stream), "
                                                       "off, or both: off,on")
    ap.add_argument("--exchange-graphs", default="off",
                    help="off, on or off,on: the eager layer and exchange numbers with DeviceExchange(graphs=True) "
                         "(dispatch / combine replay CUDA graphs they captured; on CPU an eager stand-in: checks only)")
    ap.add_argument("--layout", default="fixed", choices=("fixed", "exact"),
                    help="receive layout timed in the exchange numbers (the layer always uses fixed chunks)")
    ap.add_argument("--graph", default="on", choices=("on", "off"),
                    help="also time the layer and the dispatch captured in CUDA graphs (GPU only), after the eager runs")
    ap.add_argument("--nccl-priority", default="high", choices=("high", "normal"),
                    help="priority of the NCCL process group's stream")
    ap.add_argument("--ll", type=int, default=128,
                    help="num_max_dispatch_tokens_per_rank N of the ll (low-latency) records, T = N per rank; 0: none")
    ap.add_argument("--overlap-sms", type=int, default=0,
                    help="SMs the expert GEMMs may use while overlapped (micro-batches > 1); 0: all")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--out", default=None, help="JSON results path (rank 0 writes)")
    a = ap.parse_args()
    a.tokens = [int(v) for v in str(a.tokens).split(",")]
    a.overlap = [v.strip() for v in a.overlap.split(",")]
    a.exchange_graphs = [v.strip() for v in a.exchange_graphs.split(",")]
    for name, vals in (("--overlap", a.overlap), ("--exchange-graphs", a.exchange_graphs)):
        if not vals or any(v not in ("on", "off") for v in vals):
            raise SystemExit(f"{name}: expected on, off or off,on, got {vals}")
    if a.dry:
        a.tokens, a.hidden, a.intermediate, a.experts, a.top_k, a.iters, a.warmup = [24, 8], 256, 128, 4, 2, 2, 1
        a.ll = min(a.ll, 6)
    return a


def setup(a):
    use_cuda = torch.cuda.is_available() if a.device is None else a.device == "cuda"
    backend = a.backend or ("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    elif os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu: the exchange kernels run under the Triton interpreter; set TRITON_INTERPRET=1")
    os.environ.setdefault("FD_TRITON_AUTOTUNE", "0")   # one fixed GEMM config: bounded compile time, same on every rank
    opts = None
    if backend == "nccl" and a.nccl_priority == "high":
        try:
            opts = dist.ProcessGroupNCCL.Options()
            opts.is_high_priority_stream = True      # NCCL's kernels jump the queue of GEMM blocks (overlap)
        except AttributeError as exc:                # a torch without NCCL options: normal priority
            log(f"--nccl-priority high not available ({exc!r})")
            opts = None
    dist.init_process_group(backend, device_id=device if use_cuda else None, pg_options=opts)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.experts % world:
        raise SystemExit(f"--experts: {a.experts} does not split over {world} ranks")
    launch = None
    if a.ops != "torch":
        launch = import_triton_launch()
        if launch is None and a.ops == "triton":
            raise SystemExit("--ops triton: the launchers do not import")
    return dict(a=a, device=device, rank=rank, world=world, launch=launch, e_local=a.experts // world)


def make_layer(ctx):
    """layer(x, wts, ids, parts, timeline=None, graphs=False): quant, then the device exchange around this rank's
    experts, `parts` micro-batches (2: collectives on their own stream, overlapping the other micro-batch's
    experts); graphs: the exchange's dispatch and combine replay CUDA graphs (DeviceExchange(graphs=True))."""
    comm = torch.cuda.Stream(ctx["device"], priority=-1) if ctx["device"].type == "cuda" else None
    exchanges = {}

    def layer(x, wts, ids, parts, timeline=None, graphs=False):
        x_q, x_s = quantize_act(x, ctx["launch"])
        t = x.shape[0]
        chunk = -(-t // parts)
        if (chunk, parts, graphs) not in exchanges:
            capture = ctx.get("exchange_capture") if graphs else None
            exchanges[(chunk, parts, graphs)] = X.DeviceExchange(ctx["e_local"], chunk, graphs=graphs, capture=capture)
        mine = ctx["mine"]
        mine.sm_count = ctx["a"].overlap_sms if parts > 1 and ctx["a"].overlap_sms > 0 else -1
        try:
            return X.overlapped_layer(exchanges[(chunk, parts, graphs)], mine, x_q, x_s, ids, wts, parts,
                                      comm if parts > 1 else None, timeline)
        finally:
            mine.sm_count = -1
    return layer


def save(result: dict, a, rank: int) -> None:
    """Rank 0 writes what is measured so far (a later crash keeps it)."""
    if rank == 0 and a.out:
        write_json(pathlib.Path(a.out), result, indent=1, newline=False)
        log(f"wrote {a.out}")


def exchange_graphs_modes(ctx) -> dict:
    """How --exchange-graphs on runs: CUDA graphs on CUDA with NCCL; elsewhere (the CPU dry run) the replay
    bookkeeping with graphs.rerun_capture, an eager stand-in for the capture (checks only: its times mean nothing)."""
    if ctx["device"].type == "cuda" and dist.get_backend() == "nccl":
        return {"measured": ctx["a"].exchange_graphs, "capture": "CUDA graphs"}
    ctx["exchange_capture"] = rerun_capture
    return {"measured": ctx["a"].exchange_graphs, "capture": "rerun_capture: an eager stand-in (no CUDA), times "
                                                             "of the graphs mode not meaningful"}


def main() -> int:
    a = parse_args()
    ctx = setup(a)
    rank, world, device = ctx["rank"], ctx["world"], ctx["device"]
    result = {"versions": versions(device), "ops": "triton" if ctx["launch"] is not None else "torch",
              "nccl_stream_priority": a.nccl_priority if dist.get_backend() == "nccl" else None,
              "shape": dict(T_per_rank=a.tokens, H=a.hidden, I=a.intermediate, E_total=a.experts,
                            E_local=ctx["e_local"], K_top=a.top_k, R=world),
              "gemm_autotune": os.environ.get("FD_TRITON_AUTOTUNE"), "per_T": {}}
    result["exchange_graphs"] = exchange_graphs_modes(ctx)
    log(f"R={world} device={device.type} ops={result['ops']} shape={result['shape']} overlap={a.overlap} "
        f"exchange graphs={result['exchange_graphs']}")
    t0 = time.time()
    ctx["all_experts"] = {r: Experts(r * ctx["e_local"], ctx["e_local"], a.hidden, a.intermediate, a.seed, device,
                                     ctx["launch"]) for r in range(world)}
    ctx["mine"] = ctx["all_experts"][rank]
    ctx["layer"] = make_layer(ctx)
    log(f"weights quantized in {time.time() - t0:.1f} s")
    for t in a.tokens:
        result["per_T"][f"T{t}"] = run_tokens(ctx, t)
        save(result, a, rank)
    if a.ll > 0:
        result["ll"] = [ll_numbers(ctx, a.ll)]
        save(result, a, rank)
    if a.graph == "on":
        for res in result["per_T"].values():
            add_graph_numbers(ctx, res)
            save(result, a, rank)
    release_graphs(ctx)
    dist.barrier()
    ok = all(c["bit_exact_all_ranks"] for r in result["per_T"].values() for c in r["checks"].values())
    ok = ok and all(r.get("bit_exact", True) for r in result.get("ll", []))
    dist.destroy_process_group()
    return 0 if ok else 1


def release_graphs(ctx) -> None:
    """Free every CUDA graph that holds NCCL work (the layer's DeviceExchange(graphs=True) objects) before the
    process group goes: the 2x H200 run of 2026-11-30 16:55 UTC wrote all its results, then did not exit while
    those graphs were alive at destroy_process_group (killed by its time limit); NCCL reclaims a captured
    collective's resources when its graph is destroyed. (This order was not yet run on the GPUs.)"""
    import gc
    ctx.pop("layer", None)
    gc.collect()
    if ctx["device"].type == "cuda":
        torch.cuda.synchronize()


if __name__ == "__main__":
    sys.exit(main())
