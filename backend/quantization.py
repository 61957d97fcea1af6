"""Block-wise FP8 quantization config: which fused-MoE method a `FusedMoE` layer gets.

`BlockWiseFP8Config.get_quant_method(layer)` follows upstream FastDeploy's
`block_wise_fp8.py` (with PR #7053), reading the switches at call time (`backend.envs`):

| FD_USE_BLACKWELL_GEMM | FD_USE_DEEP_GEMM | layer.ep_size | method |
|---|---|---|---|
| 1 | any | any | `BlackwellGemmFusedMoeMethod` (ours, `backend.moe.blackwell_method`) |
| 0 | 1   | any | `DeepGemmFusedMoeMethod` (upstream's) |
| 0 | 0   | > 1 | `DeepGemmFusedMoeMethod` (upstream's) |
| 0 | 0   | 1   | `TritonBlockWiseFP8MoEMethod` (upstream's `BlockWiseFP8MoEMethod`) |

Upstream asserts `FD_USE_DEEP_GEMM=1` in the first row; ours does not (see `backend.envs`).

Scale groups (`quant_group_size`, FastDeploy #7666, open; docs/upstream.md §2, §4): 128 (default; #7053 and
develop) quantizes activations in 1x128 groups and reads 128x128 weight blocks; 32 quantizes weights (at
load, from a BF16 checkpoint) and activations in 1x32 UE8M0 groups, uint8 scales `[E, N, ceil(K/32)]`
(`backend.ops.group_wise_quant`). Upstream sets it on the layer (`layer.quant_group_size = 32` whenever
FD_USE_BLACKWELL_GEMM, MOE f0ea6f80:271-274), not through `weight_block_size`, which keeps describing the
checkpoint's FP8 blocks: `weight_block_size=[1, 32]` is refused with a pointer to `quant_group_size=32`.
A method runs 32 only if it says so (`QUANT_GROUP_SIZES`); `get_quant_method` refuses it otherwise.
The upstream methods are represented by small named classes whose `apply` raises
`NotImplementedError`: they are upstream's kernels, not this project's, and exist here only so
the switch can be tested. Upstream's Cutlass fused-MoE method (`fused_moe_cutlass_backend.py`)
serves the weight-only and W4A8 configs; no block-wise FP8 selection returns it, upstream or
here, and `CutlassFusedMoeMethod` is named for completeness.
"""
from __future__ import annotations

from typing import Sequence

from moe_ref.quant import GROUP_SIZE

from . import envs
from .moe.blackwell_method import BlackwellGemmFusedMoeMethod

SUPPORTED_WEIGHT_BLOCK_SIZE = [GROUP_SIZE, GROUP_SIZE]
QUANT_GROUP_SIZES = (GROUP_SIZE, 32)          # 1x128 (#7053, develop) and 1x32 UE8M0 groups (#7666)


class UpstreamFusedMoeMethod:
    """An upstream FastDeploy fused-MoE method this project does not implement.

    `create_weights` allocates nothing (upstream allocates its own layouts);
    `process_weights_after_loading` and `apply` raise NotImplementedError naming the upstream
    class and module.
    """
    upstream_class = ""
    upstream_module = ""

    def __init__(self, quant_config: "BlockWiseFP8Config") -> None:
        self.quant_config = quant_config

    def _unavailable(self, what: str) -> NotImplementedError:
        return NotImplementedError(
            f"{type(self).__name__}.{what}: this is upstream FastDeploy's {self.upstream_class} "
            f"({self.upstream_module}), which this project does not implement; set "
            f"FD_USE_BLACKWELL_GEMM=1 to use BlackwellGemmFusedMoeMethod")

    def create_weights(self, layer) -> None:
        """No-op: the layer keeps no parameters for a method that cannot run here."""

    def process_weights_after_loading(self, layer) -> None:
        raise self._unavailable("process_weights_after_loading")

    def apply(self, layer, x, routing, runner=None):
        raise self._unavailable("apply")


class DeepGemmFusedMoeMethod(UpstreamFusedMoeMethod):
    """Upstream's DeepGEMM fused-MoE method (contiguous / masked grouped GEMM, Hopper and SM100)."""
    upstream_class = "DeepGemmFusedMoeMethod"
    upstream_module = "fastdeploy/model_executor/layers/moe/fused_moe_deepgemm_backend.py"


class TritonBlockWiseFP8MoEMethod(UpstreamFusedMoeMethod):
    """Upstream's Triton block-wise FP8 fused-MoE method (TP without DeepGEMM)."""
    upstream_class = "BlockWiseFP8MoEMethod"
    upstream_module = "fastdeploy/model_executor/layers/moe/fused_moe_triton_backend.py"


class CutlassFusedMoeMethod(UpstreamFusedMoeMethod):
    """Upstream's Cutlass fused-MoE method (weight-only / W4A8); never selected for block-wise FP8."""
    upstream_class = "CutlassMoEMethod"
    upstream_module = "fastdeploy/model_executor/layers/moe/fused_moe_cutlass_backend.py"


def _check_weight_block_size(weight_block_size) -> list[int]:
    if isinstance(weight_block_size, (str, bytes)) or not isinstance(weight_block_size, Sequence):
        raise TypeError(f"weight_block_size: expected a list [BN, BK], got {weight_block_size!r}")
    wbs = list(weight_block_size)
    if len(wbs) != 2 or any(isinstance(b, bool) or not isinstance(b, int) for b in wbs):
        raise ValueError(f"weight_block_size: expected two ints [BN, BK], got {weight_block_size!r}")
    if wbs != SUPPORTED_WEIGHT_BLOCK_SIZE:
        # The Blackwell kernels, DeepGEMM and the UE8M0 per-row scale layout all assume 128x128
        # weight blocks and 1x128 activation groups (SPEC §3); upstream asserts the same for UE8M0.
        hint = (" (1x32 groups are quant_group_size=32, #7666: weight_block_size describes an FP8 checkpoint's "
                "blocks)" if wbs == [1, 32] else "")
        raise ValueError(f"weight_block_size: expected {SUPPORTED_WEIGHT_BLOCK_SIZE}, got {weight_block_size!r}{hint}")
    return wbs


def _check_quant_group_size(quant_group_size, is_checkpoint_bf16: bool) -> int:
    if isinstance(quant_group_size, bool) or quant_group_size not in QUANT_GROUP_SIZES:
        raise ValueError(f"quant_group_size: expected one of {', '.join(map(str, QUANT_GROUP_SIZES))}, "
                         f"got {quant_group_size!r}")
    if quant_group_size != GROUP_SIZE and not is_checkpoint_bf16:
        # #7666 quantizes BF16 weights at load; its FP8-checkpoint branch never runs (docs/upstream.md §4).
        raise ValueError(f"quant_group_size: {quant_group_size} needs a BF16 checkpoint (weights quantized at load "
                         f"in 1x{quant_group_size} groups, as FastDeploy #7666); an FP8 checkpoint's 128x128 scales "
                         f"take quant_group_size={GROUP_SIZE}")
    return int(quant_group_size)


# the FusedMoE classes whose quant method this config returns: ours and upstream FastDeploy's (the method is a drop-in)
FUSED_MOE_MODULES = ("backend.moe.layer", "fastdeploy.model_executor.layers.moe.moe")


def _is_fused_moe(layer) -> bool:
    """Whether `layer` is a FusedMoE of `FUSED_MOE_MODULES` (or a subclass), without importing those modules:
    ours imports this one (a layer takes its config), so importing it back would make a cycle."""
    return any(c.__module__ in FUSED_MOE_MODULES and c.__name__ == "FusedMoE" for c in type(layer).__mro__)


class BlockWiseFP8Config:
    """FP8 e4m3 weights in 128x128 blocks, activations quantized per token in 1x128 groups; or, with
    quant_group_size=32 (#7666), weights and activations in 1x32 UE8M0 groups.

    weight_block_size: must be [128, 128] (anything else is a ValueError naming it).
    is_checkpoint_bf16: True when the checkpoint holds BF16 weights (quantized online at load);
    False when it holds FP8 weights with FP32 128x128 scales.
    quant_group_size: 128 (default) or 32 (BF16 checkpoints only); see the module docstring.
    """

    def __init__(self, weight_block_size=(GROUP_SIZE, GROUP_SIZE), is_checkpoint_bf16: bool = False,
                 quant_group_size: int = GROUP_SIZE) -> None:
        self.weight_block_size = _check_weight_block_size(weight_block_size)
        if not isinstance(is_checkpoint_bf16, bool):
            raise TypeError(f"is_checkpoint_bf16: expected a bool, got {is_checkpoint_bf16!r}")
        self.is_checkpoint_bf16 = is_checkpoint_bf16
        self.quant_group_size = _check_quant_group_size(quant_group_size, is_checkpoint_bf16)

    def name(self) -> str:
        return "block_wise_fp8"

    @classmethod
    def from_config(cls, config: dict) -> "BlockWiseFP8Config":
        """From a checkpoint's quantization_config: `weight_block_size` (default [128, 128]) and
        `is_quantized` (default False, i.e. a BF16 checkpoint), as upstream reads them; `quant_group_size`
        (ours, default 128: upstream #7666 sets it on the layer)."""
        return cls(config.get("weight_block_size", list(SUPPORTED_WEIGHT_BLOCK_SIZE)),
                   not bool(config.get("is_quantized", False)), config.get("quant_group_size", GROUP_SIZE))

    def get_quant_method(self, layer):
        """The fused-MoE method for `layer` (a `backend.moe.layer.FusedMoE`); see the module table.

        Reads FD_USE_BLACKWELL_GEMM and FD_USE_DEEP_GEMM now (ValueError for values other than 0/1).
        A layer that is not a FusedMoE is a TypeError: upstream returns its linear method there,
        which this project does not rebuild.
        """
        if not _is_fused_moe(layer):
            raise TypeError(f"layer: expected a FusedMoE of {' or '.join(FUSED_MOE_MODULES)}, "
                            f"got {type(layer).__name__} "
                            f"(upstream's BlockWiseFP8LinearMethod is not part of this project)")
        use_blackwell = envs.use_blackwell_gemm()
        use_deep_gemm = envs.use_deep_gemm()
        if use_blackwell:
            method_cls = BlackwellGemmFusedMoeMethod
        elif layer.ep_size > 1 or use_deep_gemm:
            method_cls = DeepGemmFusedMoeMethod
        else:
            method_cls = TritonBlockWiseFP8MoEMethod
        supported = getattr(method_cls, "QUANT_GROUP_SIZES", (GROUP_SIZE,))
        if self.quant_group_size not in supported:
            raise NotImplementedError(f"quant_group_size: {method_cls.__name__} runs {', '.join(map(str, supported))}, "
                                      f"got {self.quant_group_size} (1x32 groups are FastDeploy #7666's "
                                      f"BlackwellGemmFusedMoeMethod)")
        return method_cls(self)

    def __repr__(self) -> str:
        return (f"BlockWiseFP8Config(weight_block_size={self.weight_block_size}, "
                f"is_checkpoint_bf16={self.is_checkpoint_bf16}, quant_group_size={self.quant_group_size})")
