"""The ht layer on one rank as named stages on static buffers, for benchmarks/bench_gpu.py's `chain_layer` section
(issue 12: where the time goes, against DeepGEMM's two GEMMs on the same routed rows).

FP32 recipe (Hopper's, DeepGEMM's format): quant (1x128 FP32 scales) -> permute (MN-major FP32 scales, routing
errors recorded on the device, no host read) -> GEMM 1 -> SwiGLU + quant (MN-major FP32) -> GEMM 2 -> combine.
The GEMMs are ours (`launch.group_gemm_masked_fp32`: on SM90 the CuTe DSL kernel from 256 rows per expert when
the DSL imports, else the Gluon kernel; launch.masked_gemm_kernel) or DeepGEMM's
`m_grouped_fp8_gemm_nt_masked` (through backend.ops.deep_gemm_launch.call_masked, the one home of that call) on the
same buffers: the permute's and the SwiGLU's outputs are already the scales DeepGEMM reads on SM90, so the second
variant is "our glue + DeepGEMM's GEMMs" with nothing converted. No stage reads anything back to the host, so the
whole layer is captured in one CUDA graph.

Per-op times (`per_op_ms`) come from CUDA events recorded between the stages of back-to-back eager runs, queued
behind a sleep kernel so that the host is ahead of the GPU: GPU time of each stage with the caches as the layer
leaves them, and the stages add up to one run. Imports torch and the repository (no Paddle).
"""
from __future__ import annotations

import statistics

import torch

from backend.ops import deep_gemm_launch as DGL
from backend.ops import device_errors as DE
from backend.ops.triton import launch as L
from backend.ops.triton.chain import quantize_weight_blocks_fp32
from backend.ops.triton.graphs import capture_graph

STAGES = ("quant", "permute", "gemm1", "swiglu", "gemm2", "combine")
FUSED_STAGES = ("quant", "permute", "gemm1_swiglu", "gemm2", "combine")   # GEMM 1 + SwiGLU + quant in one launch
M_ALIGN = 256        # M a multiple of DeepGEMM's largest SM90 BLOCK_M: its whole-tile stores stay in the expert's rows


class StagedLayer:
    """x [W, H] bf16, topk_ids [W, K_top] int64, topk_weights [W, K_top] fp32; w_up [E, 2I, H] / w_dn [E, H, I] fp8
    with fp32 128x128 scales s_up / s_dn; M rows per expert; expected_m: the rows hint of both GEMM kernels.
    `gemm(name, a, b, sa, sb, out)` runs one masked GEMM (ours or DeepGEMM's), set per variant."""

    def __init__(self, x, topk_ids, topk_weights, w_up, s_up, w_dn, s_dn, m: int, expected_m: int):
        self.x, self.ids, self.wts = x, topk_ids, topk_weights
        self.w_up, self.s_up, self.w_dn, self.s_dn = w_up, s_up, w_dn, s_dn
        self.e, inter2, self.h = (int(d) for d in w_up.shape)
        self.i, self.m, self.expected_m = inter2 // 2, int(m), int(expected_m)
        dev = x.device
        self.up = torch.empty(self.e * self.m, 2 * self.i, dtype=torch.bfloat16, device=dev)
        self.down = torch.empty(self.e * self.m, self.h, dtype=torch.bfloat16, device=dev)
        self.errors = torch.zeros(DE.RECORD_LEN, dtype=torch.int64, device=dev)
        self.st: dict = {}
        self.gemm = self.ours_gemm
        self.fused = False       # True: GEMM 1 with SwiGLU + quant in its epilogue (ours only; DeepGEMM has none)

    def ours_gemm(self, a, b, sa, sb, out):
        L.group_gemm_masked_fp32(a, b, sa, sb, self.st["counts"], out, None, self.m, expected_m=self.expected_m)

    def deepgemm(self, dg):
        """A `gemm` running DeepGEMM's masked GEMM (SM90 FP32 scales) on the same operands."""
        def run(a, b, sa, sb, out):
            DGL.call_masked(dg, a.view(self.e, self.m, -1), sa, b, sb, out.view(self.e, self.m, -1),
                            self.st["counts"].view(-1), self.expected_m, 9)
        return run

    def stages(self) -> dict:
        st, e, m = self.st, self.e, self.m

        def quant():
            st["q"], st["s"] = L.per_token_quant(self.x, 128, False)

        def permute():
            st["px"], st["ps"], st["imap"], st["counts"] = L.prefill_permute_to_masked_gemm(
                st["q"], st["s"], self.ids, e, m, errors=self.errors)

        def gemm1():
            self.gemm(st["px"].view(e * m, self.h), self.w_up, st["ps"], self.s_up, self.up)

        def swiglu():
            st["act"], st["act_s"] = L.fused_mask_swiglu_fp8_quant(self.up.view(e, m, 2 * self.i), st["counts"], 128,
                                                                   False)

        def gemm2():
            self.gemm(st["act"].view(e * m, self.i), self.w_dn, st["act_s"], self.s_dn, self.down)

        def gemm1_swiglu():
            st["act"], st["act_s"] = L.group_gemm_masked_fp32_swiglu_fp8_quant(
                st["px"].view(e * m, self.h), self.w_up, st["ps"], self.s_up, st["counts"], m)

        def combine():
            st["out"] = L.depermute_prefill_combine(self.down.view(e, m, self.h), st["imap"], self.wts,
                                                    int(self.x.shape[0]))
        if self.fused:
            return dict(zip(FUSED_STAGES, (quant, permute, gemm1_swiglu, gemm2, combine)))
        return dict(zip(STAGES, (quant, permute, gemm1, swiglu, gemm2, combine)))

    def run(self) -> torch.Tensor:
        for f in self.stages().values():
            f()
        return self.st["out"]

    def two_gemms(self):
        """The two GEMMs alone on the buffers of the last run (same routed rows, same counts)."""
        stages = self.stages()
        stages["gemm1"]()
        stages["gemm2"]()


def capture(fn) -> "torch.cuda.CUDAGraph":
    """fn run once on a side stream (compilation, tile choice), then captured in a CUDA graph (graphs.capture_graph)."""
    return capture_graph(fn)[0]


def per_stage_ms(stages: dict, iters: int = 10, sleep_cycles: int = 50_000_000) -> dict:
    """Median GPU ms of each stage over `iters` back-to-back runs, from events recorded between the stages. A sleep
    kernel first (about 25 ms at H200 clocks) lets the host queue the runs ahead of the GPU, so host launch time does
    not show up as a stage's time."""
    torch.cuda.synchronize()
    torch.cuda._sleep(sleep_cycles)
    marks = [[torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)] for _ in range(iters)]
    for row in marks:
        row[0].record()
        for f, ev in zip(stages.values(), row[1:]):
            f()
            ev.record()
    torch.cuda.synchronize()
    return {name: statistics.median(row[j].elapsed_time(row[j + 1]) for row in marks)
            for j, name in enumerate(stages)}


def make_layer(w_tok: int, h: int, inter: int, e_num: int, k_top: int, device, seed: int = 3) -> StagedLayer:
    """Seeded inputs: x ~ N(0, 1) bf16, distinct top-k experts per token, weights ~ N(0, 0.02²) quantized 128x128 with
    FP32 scales; M = the largest expert count rounded up to M_ALIGN; expected_m = W·K_top / E."""
    gen = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(w_tok, h, device=device, generator=gen).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(w_tok, e_num, device=device, generator=gen), dim=1)[:, :k_top].contiguous()
    wts = torch.rand(w_tok, k_top, device=device, generator=gen) / k_top
    most = int(torch.bincount(ids.flatten(), minlength=e_num).max())
    m = -(-most // M_ALIGN) * M_ALIGN
    w_up, s_up = quantize_weight_blocks_fp32(torch.randn(e_num, 2 * inter, h, device=device, generator=gen) * 0.02)
    w_dn, s_dn = quantize_weight_blocks_fp32(torch.randn(e_num, h, inter, device=device, generator=gen) * 0.02)
    return StagedLayer(x, ids, wts, w_up, s_up.contiguous(), w_dn, s_dn.contiguous(), m,
                       max(1, w_tok * k_top // e_num))
