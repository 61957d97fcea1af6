"""Memory report of one forward of the masked chain: the buffers `BlackwellGemmFusedMoeMethod`
allocates, next to upstream's at FastDeploy PR #7053 (SPEC §13), the generation that zero-fills them.
Pure arithmetic on the sizes; the buffers are #7053's chain (packed int32 scales between the ops).
"""
from __future__ import annotations

from moe_ref.constants import TMA_ALIGN, align, num_scale_groups, packed_words

from moe_ref.cutlass_sf import SF_TILE_ROWS


def forward_buffer_bytes(num_local_experts: int, max_m_per_expert: int, hidden_size: int,
                         moe_intermediate_size: int, *, num_worst_tokens: int | None = None,
                         top_k: int | None = None, valid_rows: int | None = None) -> dict:
    """Bytes one forward of the masked chain allocates, ours next to upstream's at #7053.

    E = num_local_experts, M = max_m_per_expert, H, I; W = num_worst_tokens and K_top = top_k add the
    token-row tensors (x_q, dispatch output, indice map, partial); valid_rows (Σ masked_m) adds the
    bytes the two GEMMs actually write. Returns
    {"ours": {buffer: bytes, ..., "total", "zero_filled"}, "upstream": {..., "total", "zero_filled"},
     "gemm_written_valid_rows": bytes or None}.

    Both allocate the same masked buffers (they are the layout's worst case: every row on one
    expert). The difference is the memset: upstream at #7053 zero-fills up_gate_proj_out (E·M·2I bf16)
    every call (from #7374 on it allocates with paddle.empty, as ours does), 17.2 GB at E=32, M=65536, I=2048 (SPEC §13), and allocates a separate E·M·H bf16
    output unless H == 2I; ours zero-fills nothing (paddle.empty; the provider writes valid rows
    only) and reuses the GEMM 1 buffer for GEMM 2 when H == 2I, as upstream does.
    """
    e, m, h, i = (int(v) for v in (num_local_experts, max_m_per_expert, hidden_size, moe_intermediate_size))
    c_h = packed_words(num_scale_groups(h))       # packed UE8M0 words per row, K = H
    c_i = packed_words(num_scale_groups(i))       # K = I
    m_tma, m_sf = align(m, TMA_ALIGN), align(m, SF_TILE_ROWS)
    masked = {
        "permute_x [E, M, H] fp8": e * m * h,
        "permute_scale [E, C_H, align(M,4)] int32": e * c_h * m_tma * 4,
        "sfa GEMM1 [E, align(M,128), 16 C_H] uint8": e * m_sf * 16 * c_h,
        "up_gate_proj_out [E·M, 2I] bf16": e * m * 2 * i * 2,
        "act [E, M, I] fp8": e * m * i,
        "act_scale [E, C_I, align(M,4)] int32": e * c_i * m_tma * 4,
        "sfa GEMM2 [E, align(M,128), 16 C_I] uint8": e * m_sf * 16 * c_i,
        "ffn_out [E·M, H] bf16": 0 if h == 2 * i else e * m * h * 2,
    }
    rows = {}
    if num_worst_tokens is not None:
        w = int(num_worst_tokens)
        rows["recv_x [W, H] fp8 + recv_x_scale [W, C_H] int32"] = w * h + w * c_h * 4
        rows["partial [W, H] bf16"] = w * h * 2
        if top_k is not None:
            rows["indice_map [W, K_top] int32 + recv ids/weights"] = w * int(top_k) * (4 + 8 + 4)
    ours = {**masked, **rows}
    ours["total"] = sum(ours.values())
    ours["zero_filled"] = 0
    upstream = dict(masked)
    upstream["ffn_out [E·M, H] bf16"] = 0 if h == 2 * i else e * m * h * 2
    upstream.update(rows)
    upstream["total"] = sum(upstream.values())
    upstream["zero_filled"] = e * m * 2 * i * 2
    written = None if valid_rows is None else int(valid_rows) * (2 * i + h) * 2
    return {"ours": ours, "upstream": upstream, "gemm_written_valid_rows": written}
