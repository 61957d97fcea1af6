"""The ht layer's launch chain on torch tensors with deferred routing checks: graph-safe (no host read).

quant -> permute (routing errors recorded in `errors`, `backend.ops.device_errors`) -> CUTLASS bytes of the
activation scales -> GEMM 1 with SwiGLU + quant in its epilogue, writing CUTLASS bytes (`fused=True`; the default
up to FUSED_MAX_ROWS rows per expert; bit-identical to `fused=False`: GEMM 1 -> SwiGLU + quant -> CUTLASS bytes)
-> GEMM 2 -> combine: the chain
benchmarks/bench_gpu.py times (UE8M0 recipe), on static buffers, so that `capture()` records it in a
torch.cuda.CUDAGraph and `graph.replay()` recomputes it for whatever the static inputs hold. A bad expert id or
an expert over M rows in the inputs of a replay lands in `errors` (the entry dropped, nothing out of range);
`check()` raises it with eager mode's message.

Every launcher used here is free of host synchronization: the GEMM runs impl="explicit" (exact for CUTLASS
bytes made by unpack_and_convert_scale, every 4 bytes equal), the SwiGLU without its finite check, the permute
with `errors`. The GEMM's tile choice is timed at the first call of a shape, so `capture()` runs once eagerly
first. Imports torch and triton, not Paddle.
"""
from __future__ import annotations

import torch

from moe_ref.fp8_torch import mn_major_view, mn_major_zeros

from .. import device_errors as DE
from . import launch as L
from .graphs import capture_graph


def _weight_blocks(w: torch.Tensor, ue8m0: bool):
    """w [E, N, K] bf16 | fp32 (N, K multiples of 128) -> (q [E, N, K] fp8, s fp32 [E, N/128, K/128], UE8M0 exponent
    bytes int32 of s or None): 128x128 blocks, s = amax/448 (amax floor 1e-4), with ue8m0 the smallest power of two
    >= that (its byte clamped to 1..254)."""
    e, n, k = (int(d) for d in w.shape)
    blocks = w.float().view(e, n // 128, 128, k // 128, 128)
    s = (blocks.abs().amax(dim=(2, 4)).clamp(min=1e-4) / 448.0).contiguous()
    exp = None
    if ue8m0:
        bits = s.view(torch.int32)
        exp = (((bits >> 23) & 0xFF) + ((bits & 0x7FFFFF) != 0).to(torch.int32)).clamp(1, 254)   # ceil to 2^x
        s = (exp << 23).view(torch.float32)
    return (blocks / s[:, :, None, :, None]).clamp(-448, 448).to(torch.float8_e4m3fn).view(e, n, k), s, exp


def quantize_weight_blocks(w: torch.Tensor):
    """w [E, N, K] bf16 | fp32 (N, K multiples of 128) -> (q [E, N, K] fp8, sfb [E, align(N,128), 16·ceil(K/512)]
    uint8 CUTLASS SF bytes): 128x128 blocks, UE8M0 scale = the smallest power of two >= amax/448 (amax floor 1e-4),
    each block's byte copied to its 128 rows (what the method builds at weight load; sfb_per_block holds)."""
    q, _, exp = _weight_blocks(w, True)
    words = L.byte_words(exp.repeat_interleave(128, 1).to(torch.uint8))
    return q, L.unpack_and_convert_scale(words, None)


def quantize_weight_blocks_fp32(w: torch.Tensor):
    """w [E, N, K] bf16 | fp32 (N, K multiples of 128) -> (q [E, N, K] fp8, scale fp32 [E, N/128, K/128]): 128x128
    blocks, s = amax/448 (amax floor 1e-4), the Hopper recipe's weights (SPEC §3)."""
    q, s, _ = _weight_blocks(w, False)
    return q, s


def random_gemm1(counts: list, m: int, h: int, inter: int, recipe: str, device, seed: int = 0):
    """A seeded GEMM 1 problem as the chain feeds it (tests, benchmarks/bench_fused_gemm1.py): x ~ N(0, 1) bf16
    [E·M, H] quantized 1x128 (recipe "ue8m0": UE8M0 scales as CUTLASS bytes for valid rows; "fp32": fp32 [E, M, S]),
    w_up ~ N(0, 0.02²) [E, 2I, H] in 128x128 blocks. -> (a fp8, w_up fp8, sa, sb, counts [E] int32)."""
    e_num = len(counts)
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(e_num * m, h, device=device, generator=gen).to(torch.bfloat16)
    w = torch.randn(e_num, 2 * inter, h, device=device, generator=gen) * 0.02
    cnt = torch.tensor(counts, dtype=torch.int32, device=device)
    a, s = L.per_token_quant(x, 128, recipe == "ue8m0")
    if recipe == "ue8m0":
        w_q, sb = quantize_weight_blocks(w)
        return a, w_q, L.unpack_and_convert_scale(s.view(e_num, m, -1), cnt), sb, cnt
    w_q, sb = quantize_weight_blocks_fp32(w)
    return a, w_q, s.view(e_num, m, -1), sb, cnt


def gemm1_swiglu_quant(a, w_up, sa, sb, counts, m: int, recipe: str = "ue8m0", fused: bool = True, up=None,
                       out=None, kernel: str | None = None):
    """GEMM 1 -> SwiGLU -> 1x128 FP8 quant of the chain: a [E·M, H] fp8, w_up [E, 2I, H] fp8 with sa / sb as GEMM 1's
    recipe takes them ("ue8m0": CUTLASS bytes, sb block-uniform; "fp32": fp32 [E, M, S] and [E, 2I/128, S]);
    counts [E] int32. -> (act [E, M, I] fp8, the scales GEMM 2 reads: CUTLASS bytes | fp32 MN-major view).
    fused: one launch (launch.group_gemm_masked[_fp32]_swiglu_fp8_quant; rows past the counts not written, or left
    as in `out`); else GEMM 1 into `up` [E·M, 2I] bf16 (new if None), fused_mask_swiglu_fp8_quant and, for "ue8m0",
    unpack_and_convert_scale (rows past the counts zero). kernel: the GEMMs' "tl" | "gluon" (None: the rules)."""
    e_num, inter2, _ = w_up.shape
    if fused and recipe == "ue8m0":
        return L.group_gemm_masked_swiglu_fp8_quant(a, w_up, sa, sb, counts, m, sfb_per_block=True, out=out,
                                                    kernel=kernel)
    if fused:
        return L.group_gemm_masked_fp32_swiglu_fp8_quant(a, w_up, sa, sb, counts, m, out=out, kernel=kernel)
    up = torch.empty(e_num * m, inter2, dtype=torch.bfloat16, device=a.device) if up is None else up
    if recipe == "ue8m0":
        L.group_gemm_masked(a, w_up, sa, sb, counts, up, None, m, impl="explicit", sfb_per_block=True, kernel=kernel)
        act, act_s = L.fused_mask_swiglu_fp8_quant(up.view(e_num, m, inter2), counts, 128, True)
        return act, L.unpack_and_convert_scale(act_s, counts)
    L.group_gemm_masked_fp32(a, w_up, sa, sb, counts, up, None, m, kernel=kernel)
    return L.fused_mask_swiglu_fp8_quant(up.view(e_num, m, inter2), counts, 128, False)


def zero_outputs(e_num: int, m: int, inter: int, recipe: str, device):
    """Zeroed (act, scales) in the layouts gemm1_swiglu_quant returns: `out` for the fused op, so that its rows past
    the counts are zero, as the unfused path writes them (whole-tensor comparisons in tests and benchmarks)."""
    act = torch.zeros(e_num, m, inter, dtype=torch.float8_e4m3fn, device=device)
    s = inter // 128
    if recipe == "ue8m0":
        return act, torch.zeros(e_num, -(-m // 128) * 128, 16 * -(-s // 4), dtype=torch.uint8, device=device)
    return act, mn_major_view(mn_major_zeros(e_num, m, s, torch.float32, device), m)


# The fused GEMM 1 + SwiGLU + quant (64-row tiles: gate and up of one 128-column group per CTA) against GEMM 1 (the
# rule's tile) + the SwiGLU launch, UE8M0 recipe, H200 2026-11-30 15:56 UTC (benchmarks/bench_fused_gemm1.py,
# results/fused_gemm1_h200.json): 1.07x faster at 256 rows per expert and on an uneven fill of up to 377, 0.91x
# (slower) at 1024. HtChain fuses up to this many rows per expert (W·K_top / E) unless told otherwise.
FUSED_MAX_ROWS = 256


class HtChain:
    """x [W, H] bf16, topk_ids [W, K_top] int32 | int64 local ids (or -1), topk_weights [W, K_top] fp32;
    w_up [E, 2I, H] / w_dn [E, H, I] fp8 with their CUTLASS SF bytes sfb_up / sfb_dn (128x128 blocks, each block
    byte copied to its rows: sfb_per_block); M rows per expert. Inputs are used in place (static buffers):
    write new values into them (copy_) between replays. fused: GEMM 1 with SwiGLU + quant in its epilogue
    (launch.group_gemm_masked_swiglu_fp8_quant), else the three launches; the output is the same bit for bit;
    None: fused when W·K_top / E <= FUSED_MAX_ROWS (where it measured faster)."""

    def __init__(self, x, topk_ids, topk_weights, w_up, sfb_up, w_dn, sfb_dn, max_token_num: int,
                 fused: bool | None = None):
        self.x, self.topk_ids, self.topk_weights = x, topk_ids, topk_weights
        self.w_up, self.sfb_up, self.w_dn, self.sfb_dn = w_up, sfb_up, w_dn, sfb_dn
        self.e, inter2, self.h = (int(d) for d in w_up.shape)
        self.i, self.m = inter2 // 2, int(max_token_num)
        dev = x.device
        if fused is None:
            fused = topk_ids.numel() / self.e <= FUSED_MAX_ROWS
        self.fused = bool(fused)
        self.up = None if self.fused else torch.empty(self.e * self.m, 2 * self.i, dtype=torch.bfloat16, device=dev)
        self.down = torch.empty(self.e * self.m, self.h, dtype=torch.bfloat16, device=dev)
        self.errors = torch.zeros(DE.RECORD_LEN, dtype=torch.int64, device=dev)
        self.graph = None
        self.out = None

    def run(self) -> torch.Tensor:
        """One forward -> out [W, H] bf16 (also kept as self.out)."""
        e, m, h, i = self.e, self.m, self.h, self.i
        q, s = L.per_token_quant(self.x, 128, True)
        px, ps, imap, counts = L.prefill_permute_to_masked_gemm(q, s, self.topk_ids, e, m, errors=self.errors)
        sfa = L.unpack_and_convert_scale(ps, counts)
        act, sfa2 = gemm1_swiglu_quant(px.view(e * m, h), self.w_up, sfa, self.sfb_up, counts, m, "ue8m0",
                                       self.fused, self.up)
        L.group_gemm_masked(act.view(e * m, i), self.w_dn, sfa2, self.sfb_dn, counts, self.down, None, m,
                            impl="explicit", sfb_per_block=True)
        self.out = L.depermute_prefill_combine(self.down.view(e, m, h), imap, self.topk_weights,
                                               int(self.x.shape[0]))
        return self.out

    def capture(self) -> "torch.cuda.CUDAGraph":
        """Run once eagerly on a side stream (tile choice, compilation), clear the record, capture one run.
        After `self.graph.replay()`, self.out holds the output and self.errors the routing record."""
        self.graph, _ = capture_graph(self.run)
        self.errors.zero_()              # the warm-up's record (capturing runs nothing)
        return self.graph

    def check(self) -> None:
        """Raise the recorded routing error (eager mode's ValueError message) and clear it; one host read."""
        DE.raise_recorded(self.errors)


def random_chain(w_tok: int, h: int, inter: int, e_num: int, k_top: int, device, seed: int = 3,
                 headroom: int = 64) -> HtChain:
    """A seeded HtChain (tests, benchmarks/bench_gpu.py --graph): x ~ N(0, 1) bf16, distinct top-k ids per token,
    weights ~ N(0, 0.02²) in 128x128 UE8M0 blocks, M = the largest expert count + headroom."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(w_tok, h, device=device, generator=gen).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(w_tok, e_num, device=device, generator=gen), dim=1)[:, :k_top].contiguous()
    wts = torch.rand(w_tok, k_top, device=device, generator=gen) / k_top
    m_cap = int(torch.bincount(ids.flatten(), minlength=e_num).max()) + headroom
    w_up, sfb_up = quantize_weight_blocks(torch.randn(e_num, 2 * inter, h, device=device, generator=gen) * 0.02)
    w_dn, sfb_dn = quantize_weight_blocks(torch.randn(e_num, h, inter, device=device, generator=gen) * 0.02)
    return HtChain(x, ids, wts, w_up, sfb_up, w_dn, sfb_dn, m_cap)


def dropped_ids(topk_ids: torch.Tensor, num_experts: int, max_token_num: int) -> torch.Tensor:
    """The routing the chain computes for topk_ids: ids outside [-1, E) and entries past max_token_num rows of
    their expert (token-major then k) set to -1; a host loop, for tests (eager reference of a deferred run)."""
    ids = topk_ids.cpu().clone()
    seen = [0] * num_experts
    for t in range(ids.shape[0]):
        for k in range(ids.shape[1]):
            e = int(ids[t, k])
            if e < -1 or e >= num_experts:
                ids[t, k] = -1
            elif e >= 0:
                seen[e] += 1
                if seen[e] > max_token_num:
                    ids[t, k] = -1
    return ids.to(topk_ids.device)
