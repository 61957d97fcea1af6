"""DeviceExchange(graphs=True) on a GPU (issue 13): dispatch and combine replayed from CUDA graphs they captured
themselves, in a one-process NCCL group (the all_to_all captured in the graph, as on 2 GPUs).

Every call of a sequence with changing T and inputs equals the plain eager exchange bit for bit (same kernels on
the same bytes: no tolerance), the outputs stay the same device buffers, and a replayed call issues no Triton
launch through fast_launch (the kernels are in the graph). The 2-GPU run is benchmarks/bench_ep_gpu.py
--exchange-graphs off,on (bit-exact against the in-process simulation on every rank).
"""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]

H, E_LOCAL, K_TOP, CHUNK = 7168, 32, 8, 256


@pytest.fixture(scope="module")
def nccl_world_of_one(tmp_path_factory):
    import torch.distributed as dist
    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    store = tmp_path_factory.mktemp("nccl") / "store"
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=0, world_size=1,
                            device_id=torch.device("cuda:0"))
    yield dist
    dist.destroy_process_group()


def _inputs(gen, t):
    x = torch.randn(t, H, device="cuda", generator=gen).clamp(-400, 400).to(torch.float8_e4m3fn)
    scale = torch.randint(0, 2 ** 31 - 1, (t, H // 512), device="cuda", generator=gen, dtype=torch.int32)
    ids = torch.argsort(torch.rand(t, E_LOCAL, device="cuda", generator=gen), dim=1)[:, :K_TOP].contiguous()
    ids[::7] = -1                                                    # tokens sent nowhere
    return x, scale, ids, torch.rand(t, K_TOP, device="cuda", generator=gen)


def _same(a, b) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and torch.equal(a.contiguous().view(torch.uint8),
                                                                     b.contiguous().view(torch.uint8))


def test_replayed_exchange_equals_eager(nccl_world_of_one):
    from backend.ops.triton import ep_exchange as X
    plain, rep = X.DeviceExchange(E_LOCAL, CHUNK), X.DeviceExchange(E_LOCAL, CHUNK, graphs=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    ptrs = set()
    for t in (CHUNK, 100, CHUNK, 7, 0, 200):
        ins = _inputs(gen, t)
        want, got = plain.dispatch(*ins), rep.dispatch(*ins)
        partial = (got[0].float() * (1 + got[3][:, :1])).to(torch.bfloat16)
        w_out, g_out = plain.combine(partial, want[4]), rep.combine(partial, got[4])
        torch.cuda.synchronize()
        assert all(_same(a, b) for a, b in zip(want[:4], got[:4])), t
        assert _same(w_out, g_out), t
        if t:                       # a zero-row view reports data_ptr() 0 (torch: no data for numel 0)
            ptrs.add((got[0].data_ptr(), g_out.data_ptr()))
        c0 = X.K.launch_count()
        rep.dispatch(*ins)
        assert X.K.launch_count() == c0                       # replayed: no launch of its own
    assert len(ptrs) == 1
    with pytest.raises(ValueError, match="CUDA tensors"):
        rep.dispatch(*(v.cpu() for v in _inputs(gen, 4)), slot=1)
    ins = _inputs(gen, CHUNK)
    print(f"\nhost us per dispatch (T={CHUNK}, 1 rank): eager {_host_us(lambda: plain.dispatch(*ins)):.1f}, "
          f"graphs {_host_us(lambda: rep.dispatch(*ins)):.1f}")


def _host_us(fn, n: int = 20) -> float:
    """Median host microseconds of one call, the queue drained before each."""
    import statistics
    import time
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return statistics.median(times)
