"""backend.envs: the two switches and the ops-provider name, read at call time."""
import pytest

from backend import envs

SWITCHES = ("FD_USE_BLACKWELL_GEMM", "FD_USE_DEEP_GEMM", "FD_USE_PFCC_DEEP_EP", "FD_MOE_DEFERRED_CHECKS")
READERS = {"FD_USE_BLACKWELL_GEMM": envs.use_blackwell_gemm, "FD_USE_DEEP_GEMM": envs.use_deep_gemm,
           "FD_USE_PFCC_DEEP_EP": envs.use_pfcc_deep_ep, "FD_MOE_DEFERRED_CHECKS": envs.use_deferred_checks}


@pytest.mark.parametrize("name", SWITCHES)
def test_switch_unset_is_off(monkeypatch, name):
    monkeypatch.delenv(name, raising=False)
    assert READERS[name]() is False
    assert getattr(envs, name) is False


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value, expected", [("0", False), ("1", True), (" 1 ", True), ("0\n", False)])
def test_switch_values(monkeypatch, name, value, expected):
    monkeypatch.setenv(name, value)
    assert READERS[name]() is expected
    assert getattr(envs, name) is expected


@pytest.mark.parametrize("name", SWITCHES)
@pytest.mark.parametrize("value", ["2", "true", "yes", "", "01x", "-1"])
def test_switch_bad_value_names_variable_and_value(monkeypatch, name, value):
    # upstream reads bool(int(v)): "2" would be on and "yes" a bare int() error; ours rejects both
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name) as info:
        READERS[name]()
    assert repr(value) in str(info.value)


def test_switches_are_read_at_call_time(monkeypatch):
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "0")
    assert envs.FD_USE_BLACKWELL_GEMM is False
    monkeypatch.setenv("FD_USE_BLACKWELL_GEMM", "1")
    assert envs.FD_USE_BLACKWELL_GEMM is True


@pytest.mark.parametrize("value, expected", [(None, "auto"), ("auto", "auto"), ("paddle", "paddle"),
                                             ("PADDLE", "paddle"), (" triton ", "triton"),
                                             ("blackwell_ops", "blackwell_ops"), (" Deep_GEMM", "deep_gemm"),
                                             ("", "auto")])
def test_ops_provider_name(monkeypatch, value, expected):
    if value is None:
        monkeypatch.delenv("FD_MOE_OPS_PROVIDER", raising=False)
    else:
        monkeypatch.setenv("FD_MOE_OPS_PROVIDER", value)
    assert envs.get_ops_provider_name() == expected
    assert envs.FD_MOE_OPS_PROVIDER == expected


def test_ops_provider_bad_value(monkeypatch):
    monkeypatch.setenv("FD_MOE_OPS_PROVIDER", "cuda")
    with pytest.raises(ValueError, match=r"FD_MOE_OPS_PROVIDER.*auto, blackwell_ops, deep_gemm, paddle, triton.*'cuda'"):
        envs.get_ops_provider_name()


def test_unknown_attribute_and_dir():
    with pytest.raises(AttributeError, match="FD_NOPE"):
        envs.FD_NOPE  # noqa: B018
    assert {"FD_USE_BLACKWELL_GEMM", "FD_USE_DEEP_GEMM", "FD_MOE_OPS_PROVIDER"} <= set(dir(envs))
