"""backend/ops/triton/fast_launch: the key it launches compiled kernels by refines Triton's specialization (CPU),
and on a GPU the direct launches compute what the plain JIT launches do, in eager mode and in a CUDA graph."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")

from triton.runtime.jit import JITFunction  # noqa: E402

from backend.ops.triton import fast_launch as F  # noqa: E402


def _scale_copy(x_ptr, y_ptr, n, mult, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + i, tl.load(x_ptr + i, mask=i < n) * mult, mask=i < n)


def _constexpr_first(BLOCK: tl.constexpr, x_ptr):
    pass


def test_key_separates_what_triton_specializes_on():
    """Integers: 1, multiples of 16 and the 32/64-bit range get different keys; tensors: dtype and 16-byte
    alignment; floats, bools and None by type; an unknown type has no key (the plain path)."""
    keys = {F._spec(v) for v in (1, 2, 16, 32, 2 ** 40, 2 ** 63 + 16)}
    assert len(keys) == 5                                       # 16 and 32 share one: both % 16 == 0, i32
    assert F._spec(16) == F._spec(32) and F._spec(2) == F._spec(3)
    buf = torch.zeros(64, dtype=torch.uint8)
    assert F._spec(buf[0:]) != F._spec(buf[4:])                 # data_ptr % 16 differs (the storage is aligned)
    assert F._spec(buf[0:]) != F._spec(buf.view(torch.int32))
    assert F._spec(True) != F._spec(1) and F._spec(2.0) == F._spec(3.5) != F._spec(None)
    assert F._spec(object()) is None


def test_key_of_a_tma_descriptor_is_its_signature():
    """Gluon's host TensorDescriptor: keyed by what Triton's signature of it holds (dtype, block shape, shared
    layout), not by its base pointer, shape or strides (runtime values of the TMA descriptor)."""
    gluon = pytest.importorskip("triton.experimental.gluon")
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
    gl = gluon.language
    a, b = torch.zeros(256, 128, dtype=torch.float8_e4m3fn), torch.zeros(512, 256, dtype=torch.float8_e4m3fn)
    lay = gl.NVMMASharedLayout.get_default_for([64, 128], gl.float8e4nv)
    key = F._spec(TensorDescriptor.from_tensor(a, [64, 128], lay))
    assert key is not None and key == F._spec(TensorDescriptor.from_tensor(b, [64, 128], lay))
    assert key != F._spec(TensorDescriptor.from_tensor(a, [128, 128], gl.NVMMASharedLayout.get_default_for(
        [128, 128], gl.float8e4nv)))
    assert key != F._spec(TensorDescriptor.from_tensor(a.view(torch.uint8), [64, 128], lay))
    lay32 = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1)
    assert F._spec(TensorDescriptor.from_tensor(torch.zeros(256), [64], lay32)) not in (None, key)
    from triton.tools.tensor_descriptor import TensorDescriptor as TlDescriptor     # tl kernels' (no layout)
    tl_key = F._spec(TlDescriptor.from_tensor(a, [64, 128]))
    assert tl_key is not None and tl_key == F._spec(TlDescriptor.from_tensor(b, [64, 128])) != key
    assert tl_key != F._spec(TlDescriptor.from_tensor(a, [32, 128]))


def test_fast_path_needs_constexprs_after_runtime_arguments():
    ok = F.FastKernel(JITFunction(_scale_copy))
    assert ok.ok and ok.n_runtime == 4 and [p.name for p in ok.constexprs] == ["BLOCK"]
    assert not F.FastKernel(JITFunction(_constexpr_first)).ok


def test_kernels_namespace_wraps_kernels_and_keeps_the_rest():
    from backend.ops.triton import kernels, launch
    assert isinstance(launch.K.ep_pack_kernel, F.FastKernel) and launch.K.ep_pack_kernel.fn is kernels.ep_pack_kernel
    assert launch.K.SF_TILE_ROWS is kernels.SF_TILE_ROWS


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_direct_launches_equal_plain_launches_on_gpu():
    plain = triton.jit(_scale_copy)
    fast = F.FastKernel(triton.jit(_scale_copy))
    base = torch.arange(4096, dtype=torch.float32, device="cuda")
    for n, off, mult in ((1000, 0, 2.0), (1000, 0, 3.0), (999, 1, 0.5), (16, 4, 1.0), (1, 0, -1.0), (1000, 0, 2.0)):
        x = base[off:off + n]
        want, got = torch.zeros(n, device="cuda"), torch.zeros(n, device="cuda")
        grid = (triton.cdiv(n, 256),)
        plain[grid](x, want, n, mult, BLOCK=256)
        fast[grid](x, got, n, mult, BLOCK=256)
        assert torch.equal(got, want) and torch.equal(got, x * mult)
    assert len(fast.cache) >= 3                               # aligned / misaligned pointer, n == 1: own keys
    x, y = base[:1000], torch.zeros(1000, device="cuda")
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fast[(4,)](x, y, 1000, 4.0, BLOCK=256)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, x * 4.0)
