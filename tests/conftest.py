"""Shared pytest setup.

Triton picks interpreter or compiler when a function is decorated, and its own standard library
is decorated when `triton` is first imported. So the Triton kernels (tests/test_triton_provider.py,
CPU-only CI) need TRITON_INTERPRET=1 before anything imports triton. It is set here just long
enough to import triton and our kernels, then removed again, so that provider selection in every
other test (`FD_MOE_OPS_PROVIDER=auto` skips triton without a GPU) is unchanged. Set
TRITON_INTERPRET yourself (0 on a GPU machine) to keep this hook out.
"""
import os

import pytest


def _decorate_triton_kernels_for_the_interpreter() -> None:
    if "TRITON_INTERPRET" in os.environ:
        return
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
        import triton.experimental.gluon  # noqa: F401  (the interpreter imports it lazily; it checks the flag)
        import backend.ops.triton.kernels  # noqa: F401
    except ImportError:
        pass
    finally:
        del os.environ["TRITON_INTERPRET"]


_decorate_triton_kernels_for_the_interpreter()


@pytest.fixture
def gemm1_overflow_case():
    """A finite x (1e37, bf16) whose GEMM 1 overflows: gate weights -1, up weights +1, every token on expert 0
    (issue 15 item 1). (x [3, 256] bf16, w_up [2, 256, 256], w_down [2, 256, 128] fp32, topk_weights [3, 1],
    topk_ids [3, 1]) for a layer with E = 2, K_top = 1, H = 256, I = 128."""
    import paddle
    e, h, i, t = 2, 256, 128, 3
    w_up = paddle.concat([paddle.full([e, i, h], -1.0), paddle.ones([e, i, h])], axis=1)
    x = paddle.full([t, h], 1e37).astype(paddle.bfloat16)
    return x, w_up, paddle.full([e, h, i], 0.01), paddle.ones([t, 1]), paddle.zeros([t, 1], dtype=paddle.int64)


@pytest.fixture(scope="module")
def triton_launch():
    """backend.ops.triton.launch with its kernels interpreted (TRITON_INTERPRET=1) and torch on one thread while a
    module runs (the interpreter's sums then do not depend on the thread count); skips where the kernels were
    compiled for a GPU (TRITON_INTERPRET=0 set before the run: the GPU machine, where tests/test_gpu_*.py run)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    mp = pytest.MonkeyPatch()
    mp.setenv("TRITON_INTERPRET", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    from backend.ops.triton import launch
    try:
        if not launch.interpreting():
            pytest.skip("the Triton kernels were compiled for a GPU (TRITON_INTERPRET was set to 0 before the run)")
        yield launch
    finally:
        torch.set_num_threads(threads)
        mp.undo()


@pytest.fixture(scope="module")
def peers():
    """benchmarks/bench_gemm_peers.py as a module (its inputs, fills, DeepGEMM calls and row checks), for the GPU tests
    that run the same kernels the GEMM benchmark times (tests/test_gpu_providers.py, tests/test_gpu_cute_gemm.py)."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gemm_peers.py"
    spec = importlib.util.spec_from_file_location("bench_gemm_peers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
