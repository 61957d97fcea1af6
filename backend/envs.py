"""Environment switches of the backend, read at call time (never at import time).

| variable | values | default | what it selects |
|---|---|---|---|
| `FD_USE_BLACKWELL_GEMM` | 0, 1 | 0 | `BlockWiseFP8Config.get_quant_method` returns `BlackwellGemmFusedMoeMethod` |
| `FD_USE_DEEP_GEMM`      | 0, 1 | 0 | otherwise: DeepGEMM fused-MoE method (upstream's; not implemented here) |
| `FD_MOE_OPS_PROVIDER`   | auto, blackwell_ops, deep_gemm, paddle, triton | auto | which provider `backend.ops.get_provider()` returns |
| `FD_BLACKWELL_OPS_GENERATION` | auto, 7053, develop | auto | which upstream generation of `blackwell_ops` the `blackwell_ops` provider calls (auto: detected from the installed package) |
| `FD_MOE_DEFERRED_CHECKS` | 0, 1 | 0 | `BlackwellGemmFusedMoeMethod`'s default check mode: 1 = "deferred" (routing errors recorded on the device, raised by `check_errors()`; no host synchronization for them), 0 = "eager" (raised at once) |
| `FD_USE_PFCC_DEEP_EP`   | 0, 1 | 0 | `DeepEPRunner` imports PFCC's DeepEP (`paddlefleet.ops.deep_ep`, else `deep_ep`) under `paddle.enable_compat`, as upstream's `load_deep_ep` (ep.py:33-65) |

Mapping to upstream FastDeploy (PR #7053):

- Upstream reads both switches as `bool(int(value))`, so "2" means on and "yes" raises a bare
  `ValueError: invalid literal for int()`. Ours accepts exactly "0" and "1" (surrounding spaces
  ignored); anything else, the empty string included, is a `ValueError` naming the variable
  and the value.
- Upstream asserts `FD_USE_DEEP_GEMM=1` whenever `FD_USE_BLACKWELL_GEMM=1`, because its other
  MoE paths (TP, the ht path without `num_worst_tokens`) still call DeepGEMM. Ours accepts both
  switches in every combination and does not need `FD_USE_DEEP_GEMM`: every path of our
  `BlackwellGemmFusedMoeMethod` (ht, ll and TP) runs through the ops contract
  (`backend.ops`). `FD_USE_DEEP_GEMM` only matters when `FD_USE_BLACKWELL_GEMM=0`, where it
  picks upstream's DeepGEMM method exactly as upstream does.

`FD_BLACKWELL_OPS_GENERATION` is ours (upstream has one generation per checkout): `7053` calls
`group_gemm_masked` with FastDeploy #7053's 9 arguments and has no fused Blackwell permute / SwiGLU ops;
`develop` (#7374 and later) passes the tenth argument `"w8a8"` and has them. auto (unset or empty) detects
develop when the installed `blackwell_ops` has `prefill_permute_to_blackwell_masked_gemm`, else 7053
(`backend.ops.blackwell_provider.generation`).

Module attributes mirror upstream's `envs.FD_USE_BLACKWELL_GEMM` style: reading
`backend.envs.FD_USE_BLACKWELL_GEMM` evaluates the variable at that moment (module
`__getattr__`), so a test can change `os.environ` between two reads.
"""
from __future__ import annotations

import os

SWITCHES = ("FD_USE_BLACKWELL_GEMM", "FD_USE_DEEP_GEMM", "FD_USE_PFCC_DEEP_EP")
OPS_PROVIDER_VAR = "FD_MOE_OPS_PROVIDER"
OPS_PROVIDERS = ("auto", "blackwell_ops", "deep_gemm", "paddle", "triton")
DEFAULT_OPS_PROVIDER = "auto"
GENERATION_VAR = "FD_BLACKWELL_OPS_GENERATION"
GENERATIONS = ("auto", "7053", "develop")


def _read_switch(name: str) -> bool:
    value = os.environ.get(name)
    if value is None:
        return False
    v = value.strip()
    if v == "0":
        return False
    if v == "1":
        return True
    raise ValueError(f"{name}: expected 0 or 1 (unset means 0), got {value!r}")


def use_blackwell_gemm() -> bool:
    """FD_USE_BLACKWELL_GEMM as a bool (unset = False); ValueError for anything but 0/1."""
    return _read_switch("FD_USE_BLACKWELL_GEMM")


def use_deep_gemm() -> bool:
    """FD_USE_DEEP_GEMM as a bool (unset = False); ValueError for anything but 0/1."""
    return _read_switch("FD_USE_DEEP_GEMM")


def normalize_choice(value: str, default: str) -> str:
    """The one reading rule of a choice, from a variable or from an argument such as `get_provider(name)`:
    case and surrounding spaces ignored, the empty string means the default."""
    return value.strip().lower() or default


def _read_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """A variable taking one of `choices` (read by `normalize_choice`), unset = default;
    anything else is a ValueError naming the variable, the allowed values and the value seen."""
    value = os.environ.get(name)
    if value is None:
        return default
    v = normalize_choice(value, default)
    if v not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)} (unset means {default}), got {value!r}")
    return v


def get_ops_provider_name() -> str:
    """FD_MOE_OPS_PROVIDER: one of auto | blackwell_ops | deep_gemm | paddle | triton (unset = auto).

    Case and surrounding spaces are ignored and the empty string means auto (as
    `backend.ops.get_provider` reads it); any other value is a ValueError naming the variable,
    the allowed values and the value seen.
    """
    return _read_choice(OPS_PROVIDER_VAR, OPS_PROVIDERS, DEFAULT_OPS_PROVIDER)


def normalize_ops_provider_name(value: str) -> str:
    """An explicit provider name read as FD_MOE_OPS_PROVIDER is read (see `normalize_choice`)."""
    return normalize_choice(value, DEFAULT_OPS_PROVIDER)


def use_pfcc_deep_ep() -> bool:
    """FD_USE_PFCC_DEEP_EP as a bool (unset = False); ValueError for anything but 0/1."""
    return _read_switch("FD_USE_PFCC_DEEP_EP")


def use_deferred_checks() -> bool:
    """FD_MOE_DEFERRED_CHECKS as a bool (unset = False); ValueError for anything but 0/1."""
    return _read_switch("FD_MOE_DEFERRED_CHECKS")


def get_blackwell_ops_generation() -> str:
    """FD_BLACKWELL_OPS_GENERATION: one of auto | 7053 | develop (unset or empty = auto); ValueError otherwise."""
    return _read_choice(GENERATION_VAR, GENERATIONS, "auto")


_READERS = {
    "FD_USE_BLACKWELL_GEMM": use_blackwell_gemm,
    "FD_USE_DEEP_GEMM": use_deep_gemm,
    "FD_USE_PFCC_DEEP_EP": use_pfcc_deep_ep,
    "FD_MOE_DEFERRED_CHECKS": use_deferred_checks,
    "FD_MOE_OPS_PROVIDER": get_ops_provider_name,
    "FD_BLACKWELL_OPS_GENERATION": get_blackwell_ops_generation,
}


def __getattr__(name: str):
    if name in _READERS:
        return _READERS[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_READERS))
