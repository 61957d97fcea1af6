"""Upstream's call sequences, replayed line by line against whatever `blackwell_ops` / FastDeploy ops are installed.

The expert part of `BlackwellGemmFusedMoeMethod` (no routing, no DeepEP: the caller hands in what the dispatch
returned), transcribed from fused_moe_blackwell_backend.py with the lines cited, so that

- with `install_fakes(gen)` the CallLog of a replay is exactly the op sequence upstream runs (`EXPECTED`), the
  yardstick for our method's log on the same path;
- the replays give numbers to compare our method's output with.

Weights are prepared as upstream's BF16-checkpoint loading does (develop BW:456-468, #7053 TRI:1663-1715, #7666
BW:450-461), with moe_ref's quantizers standing in for DeepGEMM's `per_block_cast_to_fp8`.
"""
from __future__ import annotations

import sys

import paddle

from moe_ref.fp8 import pack_scale_ue8m0, to_mn_major_tma_aligned
from moe_ref.quant import expand_block_scale_to_rows, per_block_quant

from ._modules import FD_OPS

BW = "blackwell_ops"
EXPECTED = {
    ("7053", "ht"): [f"{BW}.unpack_and_convert_scale"] * 2 + [
        f"{FD_OPS}.prefill_permute_to_masked_gemm", f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked",
        f"{FD_OPS}.fused_mask_swiglu_fp8_quant", f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked",
        f"{FD_OPS}.depermute_prefill_combine"],
    ("develop", "ht"): [f"{BW}.unpack_and_convert_scale"] * 2 + [
        f"{BW}.prefill_permute_to_blackwell_masked_gemm", f"{BW}.group_gemm_masked",
        f"{BW}.fused_mask_swiglu_fp8_quant_blackwell", f"{BW}.group_gemm_masked", f"{FD_OPS}.depermute_prefill_combine"],
    ("develop", "ll"): [f"{BW}.unpack_and_convert_scale"] * 2 + [
        f"{BW}.unpack_and_convert_scale", f"{BW}.group_gemm_masked", f"{BW}.fused_mask_swiglu_fp8_quant_blackwell",
        f"{BW}.group_gemm_masked"],
}


def _mods():
    return sys.modules[BW], sys.modules[FD_OPS] if FD_OPS in sys.modules else None


def load_weights_128(w: paddle.Tensor):
    """One BF16 weight [E, N, K] -> (fp8 [E, N, K], CUTLASS SF bytes): 128x128 UE8M0 blocks, per-row packed scales made
    MN-major, then `blackwell_ops.unpack_and_convert_scale(scale, None)` (develop BW:456-468; #7053 TRI:1663-1715)."""
    bw, _ = _mods()
    q, s = per_block_quant(w, use_ue8m0=True)                                   # DeepGEMM per_block_cast_to_fp8
    rows = expand_block_scale_to_rows(s, int(w.shape[1]))                       # transform_scale_ue8m0, FP8U:144
    scale = to_mn_major_tma_aligned(pack_scale_ue8m0(rows)).logical_view()      # .transpose.contiguous.transpose
    return q, bw.unpack_and_convert_scale(scale, None)


def ht_7053(recv_x, recv_scale, recv_topk_idx, recv_topk_weights, weights, num_local_experts, m):
    """#7053 BW:514-596. weights: (up_q [E, 2I, H], up_sf, down_q [E, H, I], down_sf). Returns [W, H] bf16."""
    bw, fd = _mods()
    up_q, up_sf, down_q, down_sf = weights
    e, two_i, h = (int(d) for d in up_q.shape)
    topk_ids = recv_topk_idx.cast(paddle.int64)                                                       # BW:88-89
    permute_input, permute_scale, indice_map, counts = fd.prefill_permute_to_masked_gemm(
        recv_x, recv_scale, topk_ids, num_local_experts, m)                                           # BW:91
    up_out = paddle.zeros([e, m, two_i], dtype=paddle.bfloat16)                                       # BW:524-531
    permute_input = permute_input.reshape([-1, permute_input.shape[-1]])                              # BW:532
    sfa = bw.unpack_and_convert_scale(permute_scale, counts)                                          # BW:534
    bw.group_gemm_masked(permute_input, up_q, sfa, up_sf, counts, up_out, None, m, -1)                # BW:546-556
    act, scale = fd.fused_mask_swiglu_fp8_quant(up_out, counts, 128, use_ue8m0=True)                  # BW:557-562
    ffn_out = up_out if h == two_i else paddle.zeros([e, m, h], dtype=paddle.bfloat16)                # BW:564-574
    act = act.reshape([-1, act.shape[-1]])                                                            # BW:576
    act_sf = bw.unpack_and_convert_scale(scale, counts)                                               # BW:578
    bw.group_gemm_masked(act, down_q, act_sf, down_sf, counts, ffn_out, None, m, -1)                  # BW:579-589
    return fd.depermute_prefill_combine(ffn_out, indice_map, recv_topk_weights, int(recv_x.shape[0]))  # BW:591-596


def ht_develop(recv_x, recv_scale, recv_topk_idx, recv_topk_weights, weights, num_local_experts, m):
    """develop BW:730-804 (= #7374 92ae10c3). Same arguments and result as ht_7053."""
    bw, fd = _mods()
    up_q, up_sf, down_q, down_sf = weights
    e, two_i, h = (int(d) for d in up_q.shape)
    topk_ids = recv_topk_idx.cast(paddle.int64)                                                       # BW:95-96
    permute_input, permute_scale, indice_map, counts = bw.prefill_permute_to_blackwell_masked_gemm(
        recv_x, recv_scale, topk_ids, num_local_experts, m)                                           # BW:99-101
    up_out = paddle.empty([e * m, two_i], dtype=paddle.bfloat16)                                      # BW:740-746
    bw.group_gemm_masked(permute_input, up_q, permute_scale, up_sf, counts, up_out, None, m, -1, "w8a8")  # :757-768
    act, scale = bw.fused_mask_swiglu_fp8_quant_blackwell(up_out, counts)                             # BW:769-772
    if h == two_i:
        ffn_out = up_out.reshape([e, m, -1])                                                          # BW:774-775
    else:
        ffn_out = paddle.empty([e, m, h], dtype=paddle.bfloat16)                                      # BW:777-784
    bw.group_gemm_masked(act, down_q, scale, down_sf, counts, ffn_out, None, m, -1, "w8a8")           # BW:786-797
    return fd.depermute_prefill_combine(ffn_out, indice_map, recv_topk_weights, int(recv_x.shape[0]))  # BW:799-804


def ll_develop(packed_x, packed_scale, counts, weights):
    """develop BW:978-1029 after DeepEP's low-latency dispatch: packed_x [E, R·N, H] fp8, packed_scale MN-major packed
    int32 [E, R·N, ceil(H/512)], counts int32 [E]. Returns ffn_out [E, R·N, H] bf16 (what the ll combine takes)."""
    bw, _ = _mods()
    up_q, up_sf, down_q, down_sf = weights
    e, two_i, h = (int(d) for d in up_q.shape)
    m = int(packed_x.shape[1])
    up_out = paddle.empty([e * m, two_i], dtype=paddle.bfloat16)                                      # BW:978-986
    ffn_out = paddle.empty([e, m, h], dtype=paddle.bfloat16)                                          # BW:988-995
    input_x = packed_x.reshape([-1, packed_x.shape[-1]])                                              # BW:996
    sfa = bw.unpack_and_convert_scale(packed_scale, counts)                                           # BW:998
    bw.group_gemm_masked(input_x, up_q, sfa, up_sf, counts, up_out, None, m, -1, "w8a8")              # BW:999-1011
    act, scale = bw.fused_mask_swiglu_fp8_quant_blackwell(up_out, counts)                             # BW:1012-1015
    bw.group_gemm_masked(act, down_q, scale, down_sf, counts, ffn_out, None, m, -1, "w8a8")           # BW:1017-1029
    return ffn_out
