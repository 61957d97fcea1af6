"""The ops contract: provider selection (FD_MOE_OPS_PROVIDER, auto fallback, explicit requests),
the blackwell_ops adapter's availability logic (with fake packages and fake GPUs), and the
argument checks of every op (errors name the argument, the expected and the seen value).
"""
import importlib
import inspect
import logging
import sys
import threading
import time
import types

import numpy as np
import paddle
import pytest

import backend.ops as ops
from backend.ops import blackwell_provider, contract, paddle_provider
from fakes.gpu import fake_paddle_gpu

ENV = "FD_MOE_OPS_PROVIDER"


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)
    ops.reset_provider_cache()
    yield
    ops.reset_provider_cache()


def _fake_module(name, available=True, reason="fake", op_names=None):
    """A provider-shaped module whose ops (default: every contract op) record their arguments and return
    ("fake", op name)."""
    mod = types.ModuleType(f"fake_{name}")
    mod.NAME = name
    mod.calls = []
    mod.is_available = lambda: (available, reason)
    for op in ops.OP_NAMES if op_names is None else op_names:
        def fn(*args, _op=op, **kwargs):
            mod.calls.append((_op, args + tuple(kwargs.values())))
            return ("fake", _op)
        setattr(mod, op, fn)
    return mod


@pytest.fixture
def no_blackwell_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "blackwell_ops", None)      # `import blackwell_ops` raises ImportError


@pytest.fixture
def no_triton(monkeypatch):
    real = ops._load_provider_module
    monkeypatch.setattr(ops, "_load_provider_module",
                        lambda name: (None, "torch/triton not importable (test)") if name == "triton" else real(name))


def _fake_torch(monkeypatch, cuda: bool):
    torch = types.SimpleNamespace(cuda=types.SimpleNamespace(is_available=lambda: cuda))
    monkeypatch.setitem(sys.modules, "torch", torch)


def _fake_packages(monkeypatch):
    """Loose fakes of `blackwell_ops` (develop's ops) and FastDeploy's ops, each holding the ops upstream takes from
    it (contract.OPS' `package`); the strict fakes of tests/fakes check arity and dtypes (test_blackwell_provider)."""
    from backend.ops.contract import BLACKWELL_OPS, FD_OPS
    pkg = _fake_module("blackwell_ops", op_names=[r.name for r in contract.OPS if r.package == BLACKWELL_OPS])
    pkg.fd = _fake_module(FD_OPS, op_names=[r.name for r in contract.OPS if r.package == FD_OPS])
    monkeypatch.setitem(sys.modules, "blackwell_ops", pkg)
    monkeypatch.setitem(sys.modules, FD_OPS, pkg.fd)
    return pkg


@pytest.fixture
def fake_blackwell(monkeypatch):
    """Fake `blackwell_ops` and FastDeploy ops packages on a fake SM100 GPU."""
    pkg = _fake_packages(monkeypatch)
    fake_paddle_gpu(monkeypatch, (10, 0))
    return pkg


def _x():
    return paddle.ones([2, 128], dtype=paddle.bfloat16)


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("value", ["paddle", " Paddle ", "PADDLE"])
def test_env_selects_paddle(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    assert ops.get_provider().name == "paddle"
    assert ops.last_provider_name() is None
    ops.per_token_quant(_x())
    assert ops.last_provider_name() == "paddle"


@pytest.mark.parametrize("value", ["cuda", "blackwell", "1"])
def test_bad_env_value_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(ENV, value)
    with pytest.raises(ValueError, match=rf"{ENV}: expected one of auto, blackwell_ops, deep_gemm, paddle, triton.*{value!r}"):
        ops.get_provider()
    with pytest.raises(ValueError, match=ENV):
        ops.per_token_quant(_x())


def test_bad_name_argument():
    with pytest.raises(ValueError, match="name: expected one of"):
        ops.get_provider("cutlass")


@pytest.mark.parametrize("env", [None, "auto", ""])
def test_auto_falls_back_to_paddle_and_says_so(monkeypatch, caplog, no_blackwell_package, no_triton, env):
    if env is not None:
        monkeypatch.setenv(ENV, env)
    caplog.set_level(logging.INFO, logger="backend.ops")
    ops.fused_mask_swiglu_fp8_quant(paddle.ones([1, 4, 256], dtype=paddle.bfloat16),
                                    paddle.to_tensor([2], dtype=paddle.int32))
    assert ops.last_provider_name() == "paddle"
    assert "provider 'paddle' selected (auto" in caplog.text
    assert "blackwell_ops: the blackwell_ops package cannot be imported" in caplog.text
    assert "triton: torch/triton not importable" in caplog.text


def test_selection_is_cached_until_reset(no_blackwell_package, no_triton):
    first = ops.get_provider()
    assert ops.get_provider() is first and repr(first) == "OpsProvider('paddle')"
    ops.reset_provider_cache()
    assert ops.get_provider() is not first


@pytest.mark.parametrize("name", [None, "paddle"])
def test_concurrent_first_calls_select_once(monkeypatch, caplog, no_blackwell_package, no_triton, name):
    # The R threads of the in-process EP runner call get_provider at once: one selection, one INFO
    # line, one shared object. A slow availability check keeps the threads inside selection together.
    real = ops._availability

    def slow_availability(candidate):
        time.sleep(0.05)
        return real(candidate)

    monkeypatch.setattr(ops, "_availability", slow_availability)
    caplog.set_level(logging.INFO, logger="backend.ops")
    n = 8
    start = threading.Barrier(n)
    got, errors = [None] * n, []

    def call(i):
        try:
            start.wait()
            got[i] = ops.get_provider(name)
        except BaseException as e:          # noqa: BLE001 (reported by the main thread)
            errors.append(e)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not errors and not any(t.is_alive() for t in threads)
    selected = [r for r in caplog.records if r.name == "backend.ops" and "selected" in r.getMessage()]
    assert len(selected) == 1, [r.getMessage() for r in selected]
    assert got[0] is not None and got[0].name == "paddle"
    assert all(p is got[0] for p in got)
    assert ops.get_provider(name) is got[0]


def test_explicit_blackwell_without_package_raises(monkeypatch, no_blackwell_package):
    with pytest.raises(RuntimeError, match=r"'blackwell_ops' was requested but is not available: the blackwell_ops "
                                           r"package cannot be imported .*install.*FD_MOE_OPS_PROVIDER=auto"):
        ops.get_provider("blackwell_ops")
    monkeypatch.setenv(ENV, "blackwell_ops")
    with pytest.raises(RuntimeError, match="blackwell_ops package cannot be imported"):
        ops.per_token_quant(_x())


@pytest.mark.parametrize("capability, message", [
    ((9, 0), r"compute capability 9\.0 found, >= 10\.0 \(Blackwell, SM100\) needed"),
    ((8, 9), r"compute capability 8\.9 found"),
    (None, r"no CUDA GPU visible to Paddle \(blackwell_ops needs compute capability >= 10\.0\)"),
])
def test_blackwell_needs_sm100(monkeypatch, capability, message):
    _fake_packages(monkeypatch)
    fake_paddle_gpu(monkeypatch, capability)
    ok, reason = blackwell_provider.is_available()
    assert not ok and reason
    with pytest.raises(RuntimeError, match=message):
        ops.get_provider("blackwell_ops")


@pytest.mark.parametrize("capability", [(10, 0), (12, 0)])
def test_auto_picks_blackwell_on_sm100(monkeypatch, fake_blackwell, capability, caplog):
    fake_paddle_gpu(monkeypatch, capability)
    caplog.set_level(logging.INFO, logger="backend.ops")
    assert blackwell_provider.is_available() == (True, f"blackwell_ops on a GPU with compute capability "
                                                       f"{capability[0]}.{capability[1]}")
    assert ops.get_provider().name == "blackwell_ops"
    assert ops.per_token_quant(_x()) == ("fake", "per_token_quant")
    assert ops.last_provider_name() == "blackwell_ops"
    assert "provider 'blackwell_ops' selected (auto)" in caplog.text


def test_blackwell_forwards_validated_arguments_in_upstream_order(fake_blackwell, monkeypatch):
    bw = ops.get_provider("blackwell_ops")
    fd = fake_blackwell.fd
    x = _x()
    bw.per_token_quant(x, 128, True)
    q = paddle.zeros([3, 128], dtype=paddle.float8_e4m3fn)
    s = paddle.ones([3, 1])
    ids = paddle.to_tensor([[0, -1, -1, -1], [1, -1, -1, -1], [-1] * 4], dtype=paddle.int32)
    bw.prefill_permute_to_masked_gemm(q, s, ids, 2, 4)
    words = paddle.full([2, 4, 1], 0x7F7F7F7F, dtype=paddle.int32)        # four groups of scale 2^0
    bw.unpack_and_convert_scale(words, paddle.to_tensor([[3], [1]], dtype=paddle.int64))
    a = paddle.zeros([8, 128], dtype=paddle.float8_e4m3fn)
    b = paddle.zeros([2, 16, 128], dtype=paddle.float8_e4m3fn)
    sf = paddle.zeros([2, 128, 4], dtype=paddle.uint8)
    out = paddle.zeros([8, 16], dtype=paddle.bfloat16)
    mm = paddle.to_tensor([4, 0], dtype=paddle.int32)
    assert bw.group_gemm_masked(a, b, sf, sf, mm, out, None, 4, 132) is out
    up = paddle.zeros([2, 4, 256], dtype=paddle.bfloat16)
    bw.fused_mask_swiglu_fp8_quant(up, mm, 128, True)
    ffn = paddle.zeros([2, 4, 8], dtype=paddle.bfloat16)
    imap = paddle.to_tensor([[0, -1, -1, -1], [5, -1, -1, -1], [-1] * 4], dtype=paddle.int64)
    w = paddle.ones([3, 4])
    monkeypatch.setattr(fd, "depermute_prefill_combine", lambda *args: fd.calls.append(
        ("depermute_prefill_combine", args)) or paddle.full([3, 8], 7.0, dtype=paddle.bfloat16))
    combined = bw.depermute_prefill_combine(ffn, imap, w, 3)
    # FastDeploy leaves a row with no valid index unwritten: the provider zeroes it, as the contract says
    assert combined.astype(paddle.float32).numpy()[:, 0].tolist() == [7.0, 7.0, 0.0]
    fd_calls, bw_calls = dict(fd.calls), dict(fake_blackwell.calls)
    assert set(fd_calls) == {"per_token_quant", "prefill_permute_to_masked_gemm", "fused_mask_swiglu_fp8_quant",
                             "depermute_prefill_combine"}
    assert set(bw_calls) == {"unpack_and_convert_scale", "group_gemm_masked"}
    assert fd_calls["per_token_quant"] == (x, 128, True)
    permute_args = fd_calls["prefill_permute_to_masked_gemm"]
    assert permute_args[:2] == (q, s) and permute_args[3:] == (2, 4)
    assert permute_args[2].dtype == paddle.int64 and permute_args[2].numpy().tolist() == ids.numpy().tolist()
    scale_arg, masked = bw_calls["unpack_and_convert_scale"]
    assert scale_arg.strides[1] == 1 and scale_arg.numpy().tolist() == words.numpy().tolist()    # made MN-major
    assert masked.dtype == paddle.int32 and masked.numpy().tolist() == [3, 1]   # [E, 1] int64 normalized to [E] int32
    gemm = bw_calls["group_gemm_masked"]
    assert gemm[:4] == (a, b, sf, sf) and gemm[5:] == (out, None, 4, 132, "w8a8")    # develop: the tenth argument
    assert fd_calls["fused_mask_swiglu_fp8_quant"][0] is up and fd_calls["fused_mask_swiglu_fp8_quant"][2:] == (128, True)
    imap_arg = fd_calls["depermute_prefill_combine"][1]
    assert imap_arg.dtype == paddle.int32 and imap_arg.numpy().tolist() == imap.numpy().tolist()
    # ours, not in the package: cutlass_scale_to_fp32 runs the portable implementation
    sf = paddle_provider.unpack_and_convert_scale(words, None)
    np.testing.assert_array_equal(bw.cutlass_scale_to_fp32(sf, 4).numpy(), np.ones([2, 4, 4], dtype=np.float32))
    assert ops.last_provider_name() == "blackwell_ops"


def test_blackwell_ops_fail_clearly_without_package(no_blackwell_package):
    with pytest.raises(RuntimeError, match="fastdeploy.model_executor.ops.gpu package cannot be imported"):
        blackwell_provider.per_token_quant(_x(), 128, False)          # FastDeploy's op, not blackwell_ops
    for op, nargs in [("prefill_permute_to_masked_gemm", 5), ("unpack_and_convert_scale", 2),
                      ("group_gemm_masked", 10), ("fused_mask_swiglu_fp8_quant", 4), ("depermute_prefill_combine", 4),
                      ("prefill_permute_to_blackwell_masked_gemm", 5), ("group_wise_quant", 3)]:
        options = {name: None for name in contract.op(op).options}
        with pytest.raises(RuntimeError, match="package cannot be imported"):
            getattr(blackwell_provider, op)(*([None] * nargs), **options)


def test_no_device_query_at_import(monkeypatch):
    def boom(*a):
        raise AssertionError("device queried at import time")
    monkeypatch.setattr(paddle.device.cuda, "get_device_capability", boom)
    monkeypatch.setattr(paddle.device.cuda, "device_count", boom)
    importlib.reload(blackwell_provider)
    importlib.reload(paddle_provider)


def test_triton_explicit_unavailable_and_auto_picks_it_when_available(monkeypatch, no_blackwell_package):
    fake = _fake_module("triton", available=False, reason="no CUDA GPU visible to torch")
    real = ops._load_provider_module
    monkeypatch.setattr(ops, "_load_provider_module", lambda name: (fake, "") if name == "triton" else real(name))
    with pytest.raises(RuntimeError, match="'triton' was requested but is not available: no CUDA GPU visible to torch"):
        ops.get_provider("triton")
    fake.is_available = lambda: (True, "fake GPU")
    _fake_torch(monkeypatch, cuda=True)
    ops.reset_provider_cache()
    assert ops.get_provider().name == "triton"
    assert ops.depermute_prefill_combine(paddle.zeros([1, 2, 4]), paddle.to_tensor([[1]], dtype=paddle.int32),
                                         paddle.ones([1, 1]), 1) == ("fake", "depermute_prefill_combine")
    assert ops.last_provider_name() == "triton"


@pytest.mark.parametrize("torch_state", ["no_gpu", "no_torch"])
def test_auto_never_picks_the_triton_interpreter(monkeypatch, no_blackwell_package, torch_state, caplog):
    fake = _fake_module("triton", available=True, reason="TRITON_INTERPRET=1")
    real = ops._load_provider_module
    monkeypatch.setattr(ops, "_load_provider_module", lambda name: (fake, "") if name == "triton" else real(name))
    if torch_state == "no_torch":
        monkeypatch.setitem(sys.modules, "torch", None)
        expected = "triton: torch cannot be imported"
    else:
        _fake_torch(monkeypatch, cuda=False)
        expected = "triton: no CUDA GPU visible to torch"
    caplog.set_level(logging.INFO, logger="backend.ops")
    assert ops.get_provider().name == "paddle"
    assert expected in caplog.text
    assert ops.get_provider("triton").name == "triton"          # an explicit request may use the interpreter


def test_triton_missing_module_is_a_reason_not_a_crash(monkeypatch):
    monkeypatch.setitem(ops._PROVIDER_MODULES, "triton", "backend.ops.no_such_provider_module")
    module, ok, reason = ops._availability("triton")
    assert module is None and not ok and "cannot import backend.ops.no_such_provider_module" in reason


def test_provider_object_has_the_seven_documented_ops():
    p = ops.get_provider("paddle")
    for op in ops.OP_NAMES:
        assert callable(getattr(p, op)) and getattr(p, op).__doc__ == getattr(ops, op).__doc__
        assert callable(getattr(paddle_provider, op)) and callable(getattr(blackwell_provider, op))
    assert paddle_provider.is_available()[0]


def _params(fn):
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def test_functions_and_methods_come_from_one_table():
    """backend.ops.<op> and OpsProvider.<op> have the signature (defaults included) and docstring of the op's
    row in backend.ops.contract.OPS; every provider module implements each op with the row's parameters and
    no default (defaults are stated once: a provider's own default could drift, as a literal 128 once did)."""
    from backend.ops import contract
    from backend.ops._checks import CHECKS
    assert ops.OP_NAMES == tuple(row.name for row in contract.OPS) and set(CHECKS) == set(ops.OP_NAMES)
    triton_provider = pytest.importorskip("backend.ops.triton.provider")
    for row in contract.OPS:
        want = [(p.name, p.kind, p.default) for p in row.signature.parameters.values()]
        assert _params(getattr(ops, row.name)) == want and getattr(ops, row.name).__doc__ == row.doc
        assert _params(getattr(ops.OpsProvider, row.name))[1:] == want
        for module in (paddle_provider, triton_provider):
            got = _params(getattr(module, row.name))
            assert [(n, k) for n, k, _ in got] == [(n, k) for n, k, _ in want], (module.__name__, row.name)
            assert all(d is inspect.Parameter.empty for _, _, d in got), (module.__name__, row.name, got)
    assert inspect.signature(ops.per_token_quant).parameters["block_size"].default == 128


@pytest.mark.parametrize("generation, tail", [("7053", (-1,)), ("develop", (-1, "w8a8"))])
def test_blackwell_forwarder_keeps_our_options(fake_blackwell, monkeypatch, generation, tail):
    """sfb_per_block, sfa_per_group and expected_m are ours: the package gets the upstream positional arguments of
    its generation, as upstream calls it (9 for #7053, 10 with "w8a8" for develop)."""
    monkeypatch.setenv("FD_BLACKWELL_OPS_GENERATION", generation)
    out = paddle.zeros([8, 16], dtype=paddle.bfloat16)
    a, b = paddle.zeros([8, 128], dtype=FP8), paddle.zeros([2, 16, 128], dtype=FP8)
    sf, mm = paddle.zeros([2, 128, 4], dtype=paddle.uint8), paddle.to_tensor([4, 0], dtype=paddle.int32)
    assert ops.get_provider("blackwell_ops").group_gemm_masked(a, b, sf, sf, mm, out, None, 4, sfb_per_block=True,
                                                               sfa_per_group=True, expected_m=3) is out
    gemm = dict(fake_blackwell.calls)["group_gemm_masked"]
    assert gemm[5:] == (out, None, 4) + tail


# ----------------------------------------------------------------------------- argument checks

def _words(e, mn, c, byte=127):
    """Packed UE8M0 words [E, MN, C], every byte `byte` (255 is the UE8M0 NaN)."""
    return paddle.to_tensor(np.full([e, mn, c], byte * 0x01010101, dtype=np.uint32).view(np.int32))


FP8 = paddle.float8_e4m3fn
Q = paddle.zeros([3, 256], dtype=FP8)
S32 = paddle.ones([3, 2])
IDS = paddle.to_tensor([[0, 1], [1, -1], [0, 0]])
A = paddle.zeros([2 * 4, 256], dtype=FP8)
B = paddle.zeros([2, 16, 256], dtype=FP8)
SFA = paddle.zeros([2, 128, 8], dtype=paddle.uint8)
OUT = paddle.zeros([8, 16], dtype=paddle.bfloat16)
MM = paddle.to_tensor([4, 1], dtype=paddle.int32)
UP = paddle.zeros([2, 4, 256], dtype=paddle.bfloat16)
FFN = paddle.zeros([2, 4, 8], dtype=paddle.bfloat16)
IMAP = paddle.to_tensor([[0, 5], [-1, -1]], dtype=paddle.int32)
TW = paddle.ones([2, 2])
NAN_X = paddle.to_tensor([[1.0, float("nan")] + [0.0] * 126])


def _sf_with(sf, index, byte):
    """A copy of CUTLASS SF bytes with one byte set."""
    arr = sf.numpy().copy()
    arr[index] = byte
    return paddle.to_tensor(arr)


def _gemm(**kw):
    args = dict(a=A, b=B, sfa=SFA, sfb=SFA, masked_m=MM, out=OUT, bias=None, max_m_per_expert=4, sm_count=-1)
    args.update(kw)
    return lambda: ops.group_gemm_masked(**args)


BAD_CALLS = {
    # per_token_quant
    "ptq x dtype": (lambda: ops.per_token_quant(paddle.ones([2, 128], dtype=paddle.int32)),
        TypeError, r"^x: expected dtype"),
    "ptq x rank": (lambda: ops.per_token_quant(paddle.ones([2, 2, 128])),
        ValueError, r"^x: expected rank 2, got shape \[2, 2, 128\]"),
    "ptq x nan": (lambda: ops.per_token_quant(NAN_X), ValueError, r"^x: non-finite value nan at index \(0, 1\)"),
    "ptq block_size": (lambda: ops.per_token_quant(_x(), 0),
        ValueError, r"^block_size: expected a positive int, got 0"),
    "ptq use_ue8m0": (lambda: ops.per_token_quant(_x(), 128, "yes"),
        TypeError, r"^use_ue8m0: expected a bool, got 'yes'"),
    "ptq not tensor": (lambda: ops.per_token_quant(np.ones([2, 128])),
        TypeError, r"^x: expected a paddle.Tensor, got ndarray"),
    # prefill_permute_to_masked_gemm
    "perm x dtype": (lambda: ops.prefill_permute_to_masked_gemm(paddle.zeros([3, 256]), S32, IDS, 2, 4),
        TypeError, r"^x: expected dtype"),
    "perm scale groups": (lambda: ops.prefill_permute_to_masked_gemm(Q, paddle.ones([3, 3]), IDS, 2, 4), ValueError,
                          r"^scale: expected shape\[1\] == S = ceil\(H/128\) \(FP32 scales\) = 2, got shape \[3, 3\]"),
    "perm scale words": (lambda: ops.prefill_permute_to_masked_gemm(Q, paddle.ones([3, 2], dtype=paddle.int32), IDS, 2, 4),
                         ValueError, r"^scale: expected shape\[1\] == ceil\(S/4\) \(packed UE8M0 scales\) = 1"),
    "perm scale rows": (lambda: ops.prefill_permute_to_masked_gemm(Q, paddle.ones([2, 2]), IDS, 2, 4),
        ValueError, r"^scale: expected shape\[0\] == W"),
    "perm scale dtype": (lambda: ops.prefill_permute_to_masked_gemm(Q, paddle.ones([3, 2], dtype=paddle.bfloat16), IDS, 2, 4),
                         TypeError, r"^scale: expected dtype"),
    "perm scale none": (lambda: ops.prefill_permute_to_masked_gemm(Q, None, IDS, 2, 4),
        ValueError, r"^scale: expected a \[W, S'\]"),
    "perm ids dtype": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS.astype("float32"), 2, 4),
        TypeError, r"^topk_ids: expected dtype"),
    "perm ids rows": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS[:2], 2, 4),
        ValueError, r"^topk_ids: expected shape\[0\] == W"),
    "perm id too big": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS, 1, 4), ValueError,
                        r"^topk_ids: expected expert ids in \[-1, 1\) \(num_local_experts = 1\), got 1 at index \(0, 1\)"),
    "perm id -2": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, paddle.to_tensor([[0], [-2], [0]]), 2, 4), ValueError,
                   r"^topk_ids: .* got -2 at index \(1, 0\)"),
    "perm overflow": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS, 2, 2), ValueError,
                      r"^topk_ids: expert 0 receives 3 rows, more than max_token_num = 2"),
    "perm E": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS, 0, 4),
        ValueError, r"^num_local_experts: expected a positive int"),
    "perm M": (lambda: ops.prefill_permute_to_masked_gemm(Q, S32, IDS, 2, 2.5),
        ValueError, r"^max_token_num: expected a positive int"),
    # unpack_and_convert_scale
    "unpack float": (lambda: ops.unpack_and_convert_scale(paddle.ones([1, 4, 1]), None),
        TypeError, r"^scale: expected packed UE8M0"),
    "unpack rank": (lambda: ops.unpack_and_convert_scale(_words(1, 4, 1)[0], None),
        ValueError, r"^scale: expected rank 3"),
    "unpack empty": (lambda: ops.unpack_and_convert_scale(paddle.zeros([1, 0, 1], dtype=paddle.int32), None),
        ValueError, r"^scale: expected a non-empty"),
    "unpack nan": (lambda: ops.unpack_and_convert_scale(_words(1, 4, 1, byte=255), None),
        ValueError, r"^scale: UE8M0 byte 0 of word \(0, 0, 0\) is 255"),
    "unpack masked shape": (lambda: ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.ones([2, 2], dtype=paddle.int32)),
                            ValueError, r"^masked_m: expected shape \[E\] or \[E, 1\] with E = 2, got \[2, 2\]"),
    "unpack masked E": (lambda: ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.ones([3], dtype=paddle.int32)),
                        ValueError, r"^masked_m: expected shape\[0\] == E = 2"),
    "unpack masked big": (lambda: ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.to_tensor([1, 9], dtype=paddle.int32)),
                          ValueError, r"^masked_m: expert 1 has count 9, expected 0 <= count <= MN = 4"),
    "unpack masked neg": (lambda: ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.to_tensor([-1, 0], dtype=paddle.int32)),
                          ValueError, r"^masked_m: expert 0 has count -1"),
    "unpack masked dtype": (lambda: ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.ones([2])),
        TypeError, r"^masked_m: expected dtype"),
    # cutlass_scale_to_fp32
    "sf dtype": (lambda: ops.cutlass_scale_to_fp32(paddle.zeros([1, 128, 4], dtype=paddle.int32)),
        TypeError, r"^sf: expected dtype"),
    "sf rows": (lambda: ops.cutlass_scale_to_fp32(paddle.zeros([1, 100, 4], dtype=paddle.uint8)), ValueError,
                r"^sf: expected \[E, MN_pad, KB\] with MN_pad a multiple of 128 .* got shape \[1, 100, 4\]"),
    "sf num_rows": (lambda: ops.cutlass_scale_to_fp32(SFA, 129),
        ValueError, r"^num_rows: expected <= MN_pad = 128, got 129"),
    "sf num_rows 0": (lambda: ops.cutlass_scale_to_fp32(SFA, 0), ValueError, r"^num_rows: expected a positive int"),
    # group_gemm_masked
    "gemm a dtype": (_gemm(a=paddle.zeros([8, 256], dtype=paddle.bfloat16)), TypeError, r"^a: expected dtype"),
    "gemm a rows": (_gemm(a=A[:6]),
        ValueError, r"^a: expected shape\[0\] == E·M \(E from b, M = max_m_per_expert\) = 8, got shape \[6, 256\]"),
    "gemm a K": (_gemm(a=paddle.zeros([8, 128], dtype=FP8)),
        ValueError, r"^a: expected shape\[1\] == K \(from b\) = 256"),
    "gemm b rank": (_gemm(b=B[0]), ValueError, r"^b: expected rank 3"),
    "gemm sfa rows": (_gemm(sfa=paddle.zeros([2, 4, 8], dtype=paddle.uint8)),
        ValueError, r"^sfa: expected shape\[1\] == align\(M, 128\) = 128"),
    "gemm sfb kb": (_gemm(sfb=paddle.zeros([2, 128, 4], dtype=paddle.uint8)), ValueError,
                    r"^sfb: expected shape\[2\] a multiple of 4 and >= ceil\(K/32\) = 8, got shape \[2, 128, 4\]"),
    "gemm sfa E": (_gemm(sfa=paddle.zeros([3, 128, 8], dtype=paddle.uint8)),
        ValueError, r"^sfa: expected shape\[0\] == E = 2"),
    "gemm sfb dtype": (_gemm(sfb=paddle.zeros([2, 128, 8], dtype=paddle.int32)), TypeError, r"^sfb: expected dtype"),
    "gemm masked big": (_gemm(masked_m=paddle.to_tensor([5, 0], dtype=paddle.int32)), ValueError,
                        r"^masked_m: expert 0 has count 5, expected 0 <= count <= max_m_per_expert = 4"),
    "gemm out dtype": (_gemm(out=paddle.zeros([8, 16])),
        TypeError, r"^out: expected dtype in \(bfloat16\), got float32"),
    "gemm out N": (_gemm(out=paddle.zeros([8, 8], dtype=paddle.bfloat16)),
        ValueError, r"^out: expected shape\[1\] == N \(from b\) = 16"),
    "gemm bias": (_gemm(bias=paddle.zeros([2, 8])), ValueError, r"^bias: expected shape\[1\] == N = 16"),
    "gemm M": (_gemm(max_m_per_expert=0), ValueError, r"^max_m_per_expert: expected a positive int, got 0"),
    "gemm sm_count": (_gemm(sm_count="all"), TypeError, r"^sm_count: expected an int, got 'all'"),
    "gemm sfa NaN byte": (_gemm(sfa=_sf_with(SFA, (1, 3, 5), 255)), ValueError,
                          r"^sfa: byte at index \(1, 3, 5\) is 255 \(UE8M0 NaN\); expected exponents 0..254"),
    "gemm sfb NaN byte": (_gemm(sfb=_sf_with(SFA, (0, 127, 7), 255)), ValueError,
                          r"^sfb: byte at index \(0, 127, 7\) is 255"),
    "gemm sfb_per_block": (_gemm(sfb_per_block=1), TypeError, r"^sfb_per_block: expected a bool, got 1"),
    "gemm sfa_per_group": (_gemm(sfa_per_group="yes"), TypeError, r"^sfa_per_group: expected a bool, got 'yes'"),
    "gemm expected_m": (_gemm(expected_m=0), ValueError, r"^expected_m: expected a positive int, got 0"),
    "gemm expected_m float": (_gemm(expected_m=64.0), ValueError, r"^expected_m: expected a positive int, got 64.0"),
    "gemm 11 positional": (lambda: ops.group_gemm_masked(A, B, SFA, SFA, MM, OUT, None, 4, -1, "w8a8", True),
                           TypeError, r"too many positional arguments"),
    "gemm recipe": (lambda: ops.group_gemm_masked(A, B, SFA, SFA, MM, OUT, None, 4, -1, True), ValueError,
                    r"^recipe: expected None \(#7053's nine arguments\) or 'w8a8' \(develop's tenth argument\), got True"),
    "gemm recipe w4a8": (_gemm(recipe="w4a8"), ValueError, r"^recipe: .* got 'w4a8'"),
    # fused_mask_swiglu_fp8_quant
    "swiglu dtype": (lambda: ops.fused_mask_swiglu_fp8_quant(UP.astype("int32"), MM),
        TypeError, r"^up: expected dtype"),
    "swiglu odd": (lambda: ops.fused_mask_swiglu_fp8_quant(paddle.zeros([2, 4, 5], dtype=paddle.bfloat16), MM), ValueError,
                   r"^up: expected shape\[2\] == 2I \(even, > 0\), got shape \[2, 4, 5\]"),
    "swiglu counts": (lambda: ops.fused_mask_swiglu_fp8_quant(UP, paddle.to_tensor([5, 0], dtype=paddle.int32)), ValueError,
                      r"^token_nums_per_expert: expert 0 has count 5, expected 0 <= count <= M = 4"),
    "swiglu block": (lambda: ops.fused_mask_swiglu_fp8_quant(UP, MM, -1),
        ValueError, r"^block_size: expected a positive int"),
    "swiglu ue8m0": (lambda: ops.fused_mask_swiglu_fp8_quant(UP, MM, 128, 1),
        TypeError, r"^use_ue8m0: expected a bool, got 1"),
    # depermute_prefill_combine
    "deperm dtype": (lambda: ops.depermute_prefill_combine(FFN.astype("int32"), IMAP, TW, 2),
        TypeError, r"^ffn_out: expected dtype"),
    "deperm map dtype": (lambda: ops.depermute_prefill_combine(FFN, IMAP.astype("float32"), TW, 2),
        TypeError, r"^indice_map: expected dtype"),
    "deperm weights dtype": (lambda: ops.depermute_prefill_combine(FFN, IMAP, TW.astype("bfloat16"), 2),
        TypeError, r"^topk_weights: expected dtype"),
    "deperm weights shape": (lambda: ops.depermute_prefill_combine(FFN, IMAP, paddle.ones([2, 3]), 2), ValueError,
                             r"^topk_weights: expected shape \[2, 2\] \(as indice_map\), got \[2, 3\]"),
    "deperm W": (lambda: ops.depermute_prefill_combine(FFN, IMAP, TW, 3),
        ValueError, r"^indice_map: expected shape\[0\] == W = num_worst_tokens = 3"),
    "deperm W type": (lambda: ops.depermute_prefill_combine(FFN, IMAP, TW, 2.0),
        TypeError, r"^num_worst_tokens: expected an int, got 2.0"),
    "deperm idx": (lambda: ops.depermute_prefill_combine(FFN, paddle.to_tensor([[0, 8], [-1, -1]], dtype=paddle.int32), TW, 2),
                   ValueError, r"^indice_map: expected values in \[-1, 8\) \(E·M\), got 8 at index \(0, 1\)"),
    # prefill_permute_to_blackwell_masked_gemm
    "bw perm x dtype": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q.astype("bfloat16"), W32, IDS, 2, 4),
                        TypeError, r"^x: expected dtype in \(float8_e4m3fn\)"),
    "bw perm scale fp32": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, S32, IDS, 2, 4),
                           TypeError, r"^scale: expected dtype in \(int32, uint8\), got float32"),
    "bw perm words": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, paddle.ones([3, 2], dtype="int32"), IDS, 2, 4),
                      ValueError, r"^scale: expected shape\[1\] == ceil\(S/4\) \(packed UE8M0 scales, 1x128 groups\) = 1"),
    "bw perm bytes": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, paddle.ones([3, 4], dtype="uint8"), IDS, 2, 4),
                      ValueError, r"^scale: expected shape\[1\] == ceil\(H/32\) \(UE8M0 bytes, 1x32 groups\) = 8"),
    "bw perm NaN byte": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(
        Q, paddle.to_tensor(np.full([3, 8], 255, np.uint8)), IDS, 2, 4), ValueError, r"^scale: byte at index \(0, 0\) is 255"),
    "bw perm NaN word": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, _words(1, 3, 1, 255)[0], IDS, 2, 4),
                         ValueError, r"^scale: UE8M0 byte 0 of word \(0, 0\) is 255"),
    "bw perm overflow": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, W32, IDS, 2, 2), ValueError,
                         r"^topk_ids: expert 0 receives 3 rows, more than max_token_num = 2"),
    "bw perm id": (lambda: ops.prefill_permute_to_blackwell_masked_gemm(Q, W32, IDS, 1, 4), ValueError,
                   r"^topk_ids: expected expert ids in \[-1, 1\)"),
    # fused_mask_swiglu_fp8_quant_blackwell
    "bw swiglu 3-D": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP, MM), ValueError, r"^up: expected rank 2"),
    "bw swiglu fp32": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2.astype("float32"), MM),
                       TypeError, r"^up: expected dtype in \(bfloat16\)"),
    "bw swiglu rows": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2[:7], MM), ValueError,
                       r"^up: expected shape \[E·M, 2I\] with E = 2 .* got \[7, 256\]"),
    "bw swiglu counts": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2, paddle.to_tensor([5, 0], dtype="int32")),
                         ValueError, r"^token_nums_per_expert: expert 0 has count 5, expected 0 <= count <= M = rows\(up\) / E = 4"),
    "bw swiglu nan": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2_NAN, MM), ValueError,
                      r"^up: non-finite value nan at index \(1, 0, 3\)"),
    "bw swiglu group": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2, MM, group_size=64), ValueError,
                        r"^group_size: expected one of 32, 128, got 64"),
    "bw swiglu positional group": (lambda: ops.fused_mask_swiglu_fp8_quant_blackwell(UP2, MM, 128), TypeError,
                                   r"too many positional arguments"),
    # group_wise_quant
    "gwq dtype": (lambda: ops.group_wise_quant(paddle.ones([2, 64], dtype="int32")), TypeError, r"^x: expected dtype"),
    "gwq rank": (lambda: ops.group_wise_quant(paddle.ones([64])), ValueError, r"^x: expected rank 2 or 3"),
    "gwq flag": (lambda: ops.group_wise_quant(paddle.ones([2, 64]), True), ValueError, r"^flag: expected False"),
    "gwq swizzle": (lambda: ops.group_wise_quant(paddle.ones([100, 128]), False, True), ValueError,
                    r"^x: use_swizzle needs N a multiple of 128 .* got shape \[100, 128\]"),
    "gwq nan": (lambda: ops.group_wise_quant(NAN_X), ValueError, r"^x: non-finite value nan"),
}
W32 = paddle.ones([3, 1], dtype=paddle.int32) * 0x7F7F7F7F
UP2 = paddle.zeros([8, 256], dtype=paddle.bfloat16)
UP2_NAN = paddle.to_tensor(np.where(np.arange(8 * 256).reshape(8, 256) == 4 * 256 + 3, np.nan, 0).astype(np.float32)
                           ).astype(paddle.bfloat16)


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_name_the_argument(monkeypatch, case):
    monkeypatch.setenv(ENV, "paddle")
    call, exc, pattern = BAD_CALLS[case]
    with pytest.raises(exc, match=pattern):
        call()
    assert ops.last_provider_name() is None, "the provider must not run on invalid arguments"


def test_valid_baseline_calls_pass(monkeypatch):
    """The shared tensors of BAD_CALLS are valid as they stand: each bad case changes one thing."""
    monkeypatch.setenv(ENV, "paddle")
    ops.prefill_permute_to_masked_gemm(Q, S32, IDS, 2, 4)
    ops.unpack_and_convert_scale(_words(2, 4, 1), paddle.to_tensor([1, 4], dtype=paddle.int32))
    ops.cutlass_scale_to_fp32(SFA, 5)
    ops.group_gemm_masked(A, B, SFA, SFA, MM, OUT.clone(), paddle.zeros([2, 16]), 4)
    ops.fused_mask_swiglu_fp8_quant(UP, MM, 128, False)
    ops.depermute_prefill_combine(FFN, IMAP, TW, 2)
    ops.prefill_permute_to_blackwell_masked_gemm(Q, W32, IDS, 2, 4)
    ops.prefill_permute_to_blackwell_masked_gemm(Q, paddle.full([3, 8], 127, dtype=paddle.uint8), IDS, 2, 4)
    ops.fused_mask_swiglu_fp8_quant_blackwell(UP2, MM, group_size=32)
    ops.group_wise_quant(paddle.ones([128, 128]), False, True)
    assert ops.last_provider_name() == "paddle"


# get_provider(name) reads an explicit name as FD_MOE_OPS_PROVIDER is read (issue 15 item 9)
@pytest.mark.parametrize("name", ["Paddle", "PADDLE", " paddle ", "paddle\t", "Auto", " AUTO"])
def test_explicit_name_ignores_case_and_spaces_like_the_variable(name, monkeypatch):
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", name)
    from_variable = ops.get_provider().name
    assert ops.get_provider(name).name == from_variable
    assert ops.get_provider(name).name == ops.get_provider(name.strip().lower()).name


@pytest.mark.parametrize("name", ["padle", "paddle provider", 3])
def test_explicit_name_that_is_no_provider_is_still_an_error(name, monkeypatch):
    monkeypatch.delenv("FD_MOE_OPS_PROVIDER", raising=False)
    with pytest.raises(ValueError, match=r"name: expected one of .* got"):
        ops.get_provider(name)
