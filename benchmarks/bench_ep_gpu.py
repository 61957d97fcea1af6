#!/usr/bin/env python3
"""Expert-parallel ht MoE layer over torch.distributed (NCCL on GPUs, gloo on CPU), torch only.

One process per GPU (torchrun). Each rank runs the DeepEP-"normal" exchange of SPEC §9 with the
exact semantics of docs/design.md (the same bytes and sums as backend.moe.ep_distributed's Paddle
runner, ported to torch) around the FP8 expert chain:

    per_token_quant (1x128, UE8M0) -> dispatch (counts all_gather, then one all_to_all_single of
    packed uint8 rows [x fp8 | packed scale | ids int64 | weights fp32]) -> permute -> GEMM 1 ->
    SwiGLU + quant -> GEMM 2 -> weighted depermute -> combine (all_to_all_single back, float32 sum
    in rank order, one bf16 rounding)

The chain is engineer D's Triton launchers (backend/ops/triton/launch.py, torch tensors) when they
import and a GPU (or TRITON_INTERPRET=1) is there, else a plain torch reference chain.

Measured in one run, each against its baseline:
1. check: every rank's layer output equals an in-process simulation of all R ranks (same chain,
   same R, computed on each rank from the seeded inputs of every rank) bit for bit, at the timed
   shape and at an uneven routing (every token to rank 0's experts: rank 0 receives W rows).
2. exchange: achieved bandwidth of the dispatch all_to_all (bytes to other ranks / time) against a
   plain NCCL all_to_all_single of the same bytes (equal splits), plus the whole dispatch and
   combine (counts, host sync, packing, exchange, unpacking).
3. layer: the ht layer on R GPUs (T tokens each, E_total / R experts each) against one GPU doing
   the same R·T tokens with all E_total experts (no exchange): the strong-scaling speedup.

    NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py --out $OUT/ep_gpu.json
    torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py --backend gloo --device cpu --dry   # CPU check
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
            self.up_sf = launch.unpack_and_convert_scale(torch.stack(up_p), None)
            self.dn_sf = launch.unpack_and_convert_scale(torch.stack(dn_p), None)

    def __call__(self, x_q, x_scale, ids, weights, m: int) -> torch.Tensor:
        """x_q [W, H] fp8, x_scale [W, C] packed UE8M0, ids [W, K_top] local ids or -1, weights
        [W, K_top] fp32, m rows per expert -> partial [W, H] bf16 (weighted, SPEC §5-8)."""
        if self.launch is None:
            return self._torch_chain(x_q, x_scale, ids, weights)
        L, e, h, i = self.launch, self.e, self.h, self.i
        w = x_q.shape[0]
        px, ps, imap, counts = L.prefill_permute_to_masked_gemm(x_q, x_scale, ids, e, m)
        up = torch.empty(e * m, 2 * i, dtype=torch.bfloat16, device=x_q.device)
        L.group_gemm_masked(px.view(e * m, h), self.up_q, L.unpack_and_convert_scale(ps, counts), self.up_sf,
                            counts, up, None, m, sfb_per_block=True)
        act, act_s = L.fused_mask_swiglu_fp8_quant(up.view(e, m, 2 * i), counts, GROUP, True)
        down = torch.empty(e * m, h, dtype=torch.bfloat16, device=x_q.device)
        L.group_gemm_masked(act.view(e * m, i), self.dn_q, L.unpack_and_convert_scale(act_s, counts), self.dn_sf,
                            counts, down, None, m, sfb_per_block=True)
        return L.depermute_prefill_combine(down.view(e, m, h), imap, weights, w)

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


# ----------------------------------------------------------------------------- the exchange (SPEC §9, exact)

def _bytes(t: torch.Tensor) -> torch.Tensor:
    """[n, c] any dtype -> [n, c·itemsize] uint8, the same bytes."""
    return t.contiguous().view(torch.uint8).reshape(t.shape[0], t.shape[1] * t.element_size())


ROW_ALIGN = 16     # bytes: NCCL moves 16-byte-aligned chunks faster (DeepEP aligns its rows the same way)


def pack_token_rows(x_q, x_scale, ids, weights) -> torch.Tensor:
    """One uint8 row per token: [x fp8 (H) | scale words (4C) | ids int64 (8K) | weights fp32 (4K) | pad
    to a multiple of ROW_ALIGN]."""
    parts = [_bytes(x_q), _bytes(x_scale), _bytes(ids.to(torch.int64)), _bytes(weights.float())]
    width = sum(p.shape[1] for p in parts)
    if width % ROW_ALIGN:
        parts.append(torch.zeros(x_q.shape[0], ROW_ALIGN - width % ROW_ALIGN, dtype=torch.uint8, device=x_q.device))
    return torch.cat(parts, 1)


def unpack_token_rows(rows, h: int, c: int, k: int):
    o = [0, h, h + 4 * c, h + 4 * c + 8 * k, h + 4 * c + 12 * k]
    n = rows.shape[0]

    def part(j, dt):
        width = (o[j + 1] - o[j]) // torch.empty(0, dtype=dt).element_size()
        if n == 0:
            return torch.empty(0, width, dtype=dt, device=rows.device)
        return rows[:, o[j]:o[j + 1]].clone().view(dt)    # clone: a fresh, aligned buffer (a 1-row slice keeps its offset)
    return part(0, torch.float8_e4m3fn), part(1, torch.int32), part(2, torch.int64), part(3, torch.float32)


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


class TorchEP:
    """dispatch/combine over a torch.distributed group; stats in self.stats."""

    def __init__(self, e_local: int):
        self.rank, self.world, self.e = dist.get_rank(), dist.get_world_size(), e_local
        self.stats = {}

    def counts(self, sent) -> torch.Tensor:
        mine = torch.tensor([len(s) for s in sent], dtype=torch.int64, device=sent[0].device)
        allc = torch.empty(self.world * self.world, dtype=torch.int64, device=mine.device)
        dist.all_gather_into_tensor(allc, mine)
        return allc.view(self.world, self.world).cpu()          # the one host sync of a dispatch

    def dispatch(self, x_q, x_scale, ids, weights, w: int):
        me, k, h, c = self.rank, ids.shape[1], x_q.shape[1], x_scale.shape[1]
        _, sent = route(ids, self.e, self.world)
        counts = self.counts(sent)
        recv_counts = counts.sum(0)
        for r in range(self.world):
            if int(recv_counts[r]) > w:
                raise ValueError(f"num_worst_tokens: rank {r} receives {int(recv_counts[r])} tokens, more than "
                                 f"num_worst_tokens W = {w}")
        rows = pack_token_rows(x_q, x_scale, ids, weights)
        send = rows[torch.cat(sent)]
        recv = torch.empty(int(recv_counts[me]), rows.shape[1], dtype=torch.uint8, device=rows.device)
        self.stats["dispatch_bytes_to_others"] = int(counts[me].sum() - counts[me, me]) * rows.shape[1]
        self.stats["dispatch_send_bytes"] = int(send.numel())
        self.stats["row_bytes"] = int(rows.shape[1])
        dist.all_to_all_single(recv, send, counts[:, me].tolist(), counts[me].tolist())
        r_x, r_s, r_ids, r_w = unpack_token_rows(recv, h, c, k)
        n = recv.shape[0]
        self.stats["recv_tokens"] = n
        handle = (counts, sent, x_q.shape[0], n)
        return (pad_rows(r_x, w, 0), pad_rows(r_s, w, 0), pad_rows(to_local(r_ids, me, self.e), w, -1),
                pad_rows(r_w, w, 0.0), n, handle)

    def combine(self, partial, handle) -> torch.Tensor:
        counts, sent, t, n = handle
        me, h = self.rank, partial.shape[1]
        back = torch.empty(int(counts[me].sum()), 2 * h, dtype=torch.uint8, device=partial.device)
        dist.all_to_all_single(back, _bytes(partial[:n]), counts[me].tolist(), counts[:, me].tolist())
        back = back.view(torch.bfloat16)
        acc = torch.zeros(t, h, dtype=torch.float32, device=partial.device)
        at = 0
        for r in range(self.world):                          # rank order is part of the contract
            idx = sent[r]
            if idx.numel():
                acc[idx] = acc[idx] + back[at: at + idx.numel()].float()
            at += idx.numel()
        return acc.to(torch.bfloat16)


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


# ----------------------------------------------------------------------------- main

def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default=None, help="nccl (default with CUDA) or gloo")
    ap.add_argument("--device", default=None, help="cuda (default when available) or cpu")
    ap.add_argument("--ops", default="auto", choices=("auto", "triton", "torch"))
    ap.add_argument("--tokens", type=int, default=4096, help="T per rank (timed shape)")
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=32, help="E_total (split evenly over the ranks)")
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dry", action="store_true", help="tiny shapes (CPU check of the script)")
    ap.add_argument("--out", default=None, help="JSON results path (rank 0 writes)")
    a = ap.parse_args()
    if a.dry:
        a.tokens, a.hidden, a.intermediate, a.experts, a.top_k, a.iters, a.warmup = 24, 256, 128, 4, 2, 2, 1
    use_cuda = torch.cuda.is_available() if a.device is None else a.device == "cuda"
    backend = a.backend or ("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("FD_TRITON_AUTOTUNE", "0")   # one fixed GEMM config: bounded compile time, same on every rank
    dist.init_process_group(backend, device_id=device if use_cuda else None)
    rank, world = dist.get_rank(), dist.get_world_size()
    if a.experts % world:
        raise SystemExit(f"--experts: {a.experts} does not split over {world} ranks")
    launch = None
    if a.ops != "torch" and (use_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        launch = import_triton_launch()
        if launch is None and a.ops == "triton":
            raise SystemExit("--ops triton: the launchers do not import")
    e_local = a.experts // world
    t, h, i, k = a.tokens, a.hidden, a.intermediate, a.top_k
    w = world * t                                   # num_worst_tokens: nothing can overflow
    result = {"versions": versions(device), "ops": "triton" if launch is not None else "torch",
              "shape": dict(T_per_rank=t, H=h, I=i, E_total=a.experts, E_local=e_local, K_top=k, R=world, W=w),
              "gemm_autotune": os.environ.get("FD_TRITON_AUTOTUNE"), "checks": {}, "timing_ms": {}}
    log(f"R={world} backend={backend} device={device.type} ops={result['ops']} shape={result['shape']}")

    t0 = time.time()
    all_experts = {r: Experts(r * e_local, e_local, h, i, a.seed, device, launch) for r in range(world)}
    mine = all_experts[rank]
    ep = TorchEP(e_local)
    log(f"weights quantized in {time.time() - t0:.1f} s")

    def layer(x, wts, ids):
        x_q, x_s = quantize_act(x, launch)
        r_x, r_s, r_ids, r_w, _, handle = ep.dispatch(x_q, x_s, ids, wts, w)
        return ep.combine(mine(r_x, r_s, r_ids, r_w, w), handle)

    # 1. bit-for-bit against the in-process simulation, random and uneven routing
    for name, uneven in (("random", False), ("uneven", True)):
        ins = [make_inputs(s, t, h, a.experts, k, a.seed, device, uneven) for s in range(world)]
        out = layer(*ins[rank])
        q_ins = [(*quantize_act(x, launch), ids, wts) for x, wts, ids in ins]
        ref = simulate(q_ins, lambda r: all_experts[r], e_local, w, w)[rank]
        same = bool(torch.equal(out.view(torch.int16), ref.view(torch.int16)))
        flag = torch.tensor([0 if same else 1], device=device)
        dist.all_reduce(flag)
        recv = torch.tensor([ep.stats["recv_tokens"]], dtype=torch.int64, device=device)
        recv_all = torch.empty(world, dtype=torch.int64, device=device)
        dist.all_gather_into_tensor(recv_all, recv)
        result["checks"][name] = {"bit_exact_all_ranks": int(flag.item()) == 0,
                                  "recv_tokens_per_rank": recv_all.tolist(), "W": w}
        log(f"check {name}: {'bit-exact on every rank' if int(flag.item()) == 0 else 'MISMATCH'}")
        if int(flag.item()):
            diff = (out.float() - ref.float()).abs().max().item()
            result["checks"][name]["max_abs_diff_rank" + str(rank)] = diff
        del ins, q_ins, ref, out
    result["checks"]["uneven"]["note"] = "every token picks experts 0..K_top-1: rank 0 receives W = R*T rows"

    # 2. exchange bandwidth
    x, wts, ids = make_inputs(rank, t, h, a.experts, k, a.seed, device)
    x_q, x_s = quantize_act(x, launch)
    _, sent = route(ids, e_local, world)
    counts = ep.counts(sent)
    rows = pack_token_rows(x_q, x_s, ids, wts)
    send = rows[torch.cat(sent)].contiguous()
    recv = torch.empty(int(counts[:, rank].sum()), rows.shape[1], dtype=torch.uint8, device=device)
    in_split, out_split = counts[rank].tolist(), counts[:, rank].tolist()
    total = send.numel()
    biggest = torch.tensor([total], dtype=torch.int64, device=device)
    dist.all_reduce(biggest, op=dist.ReduceOp.MAX)         # equal splits need one size on every rank
    chunk = -(-int(biggest.item()) // (world * 128)) * 128   # 128-byte aligned chunks: the best case for NCCL
    plain_in = torch.zeros(chunk * world, dtype=torch.uint8, device=device)
    plain_out = torch.empty_like(plain_in)
    to_others = int(counts[rank].sum() - counts[rank, rank]) * rows.shape[1]
    plain_to_others = chunk * (world - 1)
    dispatched = {}

    def run_dispatch():
        dispatched["d"] = ep.dispatch(x_q, x_s, ids, wts, w)

    run_dispatch()
    r_x, r_s, r_ids, r_w, n_recv, handle = dispatched["d"]
    partial = mine(r_x, r_s, r_ids, r_w, w)
    # combine's exchange alone: the partial rows back to their sources (bf16, 2H bytes a row)
    c_send = _bytes(partial[:n_recv])
    c_recv = torch.empty(int(counts[rank].sum()), 2 * h, dtype=torch.uint8, device=device)
    c_in, c_out = counts[:, rank].tolist(), counts[rank].tolist()
    c_to_others = int(counts[:, rank].sum() - counts[rank, rank]) * 2 * h
    c_big = torch.tensor([c_send.numel()], dtype=torch.int64, device=device)
    dist.all_reduce(c_big, op=dist.ReduceOp.MAX)
    c_chunk = -(-int(c_big.item()) // (world * 128)) * 128
    c_plain_in = torch.zeros(c_chunk * world, dtype=torch.uint8, device=device)
    c_plain_out = torch.empty_like(c_plain_in)
    bw = interleaved({
        "dispatch_all_to_all": lambda: dist.all_to_all_single(recv, send, out_split, in_split),
        "dispatch_plain": lambda: dist.all_to_all_single(plain_out, plain_in),
        "combine_all_to_all": lambda: dist.all_to_all_single(c_recv, c_send, c_out, c_in),
        "combine_plain": lambda: dist.all_to_all_single(c_plain_out, c_plain_in),
    }, device, rounds=7, n=a.iters)
    ms_dispatch = timed(run_dispatch, device, a.iters, a.warmup)
    ms_combine = timed(lambda: ep.combine(partial, handle), device, a.iters, a.warmup)
    ms_counts = timed(lambda: ep.counts(sent), device, a.iters, a.warmup)
    gbps = lambda nbytes, ms: nbytes / ms / 1e6   # noqa: E731
    result["exchange"] = {
        "method": "per-op ms of back-to-back calls (CUDA events), median of 7 interleaved rounds, max over ranks; "
                  "plain = all_to_all_single with equal 128-byte-aligned splits of at least the same bytes",
        "dispatch_row_bytes": int(rows.shape[1]), "dispatch_send_bytes_rank0": int(total),
        "dispatch_bytes_to_other_ranks_rank0": to_others, "tokens_sent_per_rank_rank0": in_split,
        "all_to_all_ms": bw["dispatch_all_to_all"], "all_to_all_GBps": gbps(to_others, bw["dispatch_all_to_all"]),
        "plain_nccl_all_to_all_single_ms": bw["dispatch_plain"],
        "plain_GBps": gbps(plain_to_others, bw["dispatch_plain"]),
        "bandwidth_ratio_ours_vs_plain": gbps(to_others, bw["dispatch_all_to_all"]) / gbps(plain_to_others, bw["dispatch_plain"]),
        "combine_bytes_to_other_ranks_rank0": c_to_others,
        "combine_all_to_all_ms": bw["combine_all_to_all"], "combine_all_to_all_GBps": gbps(c_to_others, bw["combine_all_to_all"]),
        "combine_plain_ms": bw["combine_plain"], "combine_plain_GBps": gbps(c_chunk * (world - 1), bw["combine_plain"]),
        "combine_bandwidth_ratio_ours_vs_plain": gbps(c_to_others, bw["combine_all_to_all"]) / gbps(c_chunk * (world - 1), bw["combine_plain"]),
        "dispatch_ms": ms_dispatch, "combine_ms": ms_combine, "dispatch_counts_allgather_and_host_sync_ms": ms_counts,
        "dispatch_combine_note": "whole dispatch/combine, wall per call with a barrier before each: counts, host sync, "
                                 "packing, exchange, unpacking, padding to W / float32 sums",
    }
    log("exchange:", json.dumps(result["exchange"]))

    # 3. the ht layer on R GPUs vs one GPU doing all R*T tokens with all experts
    ms_layer = timed(lambda: layer(x, wts, ids), device, a.iters, a.warmup)
    ms_chain = timed(lambda: mine(r_x, r_s, r_ids, r_w, w), device, a.iters, a.warmup)
    result["timing_ms"].update(layer_R_gpus=ms_layer, experts_only_R_gpus=ms_chain)
    del partial, dispatched, r_x, r_s, r_ids, r_w
    one = None
    if rank == 0:
        one = Experts(0, a.experts, h, i, a.seed, device, launch)
        all_x, all_w, all_ids = (torch.cat(p) for p in zip(*[make_inputs(s, t, h, a.experts, k, a.seed, device)
                                                            for s in range(world)]))

        def layer_one():
            q, s = quantize_act(all_x, launch)
            return one(q, s, all_ids, all_w, world * t)

        for _ in range(a.warmup):
            layer_one()
        times = []
        for _ in range(a.iters):
            sync(device)
            t1 = time.perf_counter()
            layer_one()
            sync(device)
            times.append((time.perf_counter() - t1) * 1e3)
        ms_one = statistics.median(times)
        result["timing_ms"]["layer_1_gpu_all_tokens"] = ms_one
        result["timing_ms"]["speedup_R_gpus_vs_1"] = ms_one / ms_layer
        result["timing_ms"]["note"] = (f"1 GPU: {world}*T tokens, all {a.experts} experts, no exchange; "
                                       f"R GPUs: T tokens and {e_local} experts each, with dispatch/combine")
        log("layer:", json.dumps(result["timing_ms"]))
    dist.barrier()
    if rank == 0 and a.out:
        path = pathlib.Path(a.out)
        write_json(path, result, indent=1, newline=False)
        log(f"wrote {path}")
    ok = all(c.get("bit_exact_all_ranks") for c in result["checks"].values())
    dist.destroy_process_group()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
