"""backend.moe.memory: the buffers of one forward of the masked chain, ours next to upstream's (SPEC §13)."""
from backend.moe.memory import forward_buffer_bytes


def test_forward_buffer_bytes():
    # SPEC §13: upstream zero-fills E·M·2I bf16 every call: 17.2 GB at E=32, M=65536, I=2048
    sizes = forward_buffer_bytes(32, 65536, 7168, 2048)
    assert sizes["upstream"]["zero_filled"] == 32 * 65536 * 4096 * 2 == 17_179_869_184
    assert sizes["ours"]["zero_filled"] == 0
    assert sizes["ours"]["up_gate_proj_out [E·M, 2I] bf16"] == 17_179_869_184
    assert sizes["ours"]["total"] == sizes["upstream"]["total"] > 17_179_869_184
    assert sizes["gemm_written_valid_rows"] is None
    reuse = forward_buffer_bytes(4, 100, 512, 256, num_worst_tokens=50, top_k=8, valid_rows=70)
    assert reuse["ours"]["ffn_out [E·M, H] bf16"] == 0                    # H == 2I: GEMM 2 reuses GEMM 1's buffer
    assert reuse["ours"]["partial [W, H] bf16"] == 50 * 512 * 2
    assert reuse["gemm_written_valid_rows"] == 70 * (512 + 512) * 2
