"""`FusedMoE`: the sizes, ranks, routing options and weights of one routed-expert MoE layer.

The layer owns no math: `forward` routes (or takes given top-k), then delegates to the quant
method chosen by `quant_config.get_quant_method(self)` (`backend.quantization`), which also
allocates the weights (`create_weights`) and converts them after loading
(`process_weights_after_loading`).

Sizes use SPEC §0 names: H = hidden_size, I = moe_intermediate_size, E = local experts
(num_experts // ep_size), R = ep_size, K_top = top_k.

Which path `apply` takes (SPEC §9, docs/design.md):

| runner | moe_phase | path | rows per expert M |
|---|---|---|---|
| None (needs ep_size == 1) | any | "tp": no dispatch | T of the call |
| given | "prefill" | "ht": DeepEP normal dispatch, W = num_worst_tokens rows | min(W, R · max_tokens_per_rank) |
| given | "decode"  | "ll": DeepEP low-latency dispatch | R · num_max_dispatch_tokens_per_rank |

Upstream sizes the ht buffers with M = R · max_tokens_per_rank; a rank receives at most W rows
and a row lands on an expert at most once, so min(W, ·) is the same worst case when
W = R · max_tokens_per_rank (the default) and smaller when W is.
"""
from __future__ import annotations

import math

import paddle

from moe_ref.checks import FLOAT_DTYPES, check_dim, check_finite, check_nonnegative_int, check_positive_int, check_tensor
from ..quantization import BlockWiseFP8Config
from .quantize import swap_last_two
from .upstream import route_gate_out

TOPK_METHODS = ("softmax", "noaux_tc")
MOE_PHASES = {"prefill": "ht", "decode": "ll"}
# load_weights argument ([E, N, K] orientation) -> the method's checkpoint parameter ([E, K, N], upstream's)
_CHECKPOINT_PARAMS = {"up_gate_proj_weight": "up_gate_proj_weight", "down_proj_weight": "down_proj_weight",
                      "up_gate_proj_weight_scale": "up_gate_proj_weight_scale_inv",
                      "down_proj_weight_scale": "down_proj_weight_scale_inv"}


class FusedMoE(paddle.nn.Layer):
    """A routed-expert MoE layer (shared experts are the caller's: add them to the output).

    num_experts: experts of the whole model (E_total = E · R); top_k: K_top;
    hidden_size: H; moe_intermediate_size: I; quant_config: a `BlockWiseFP8Config`.
    ep_size R, ep_rank: this rank holds global experts [ep_rank · E, (ep_rank + 1) · E).
    topk_method: "softmax" (p = softmax(logits), top-k, renormalize optional) or "noaux_tc"
    (DeepSeek-V3: sigmoid, e_score_correction_bias [num_experts], n_group groups of which
    topk_group are kept, renormalize, times routed_scaling_factor). routed_scaling_factor
    applies to noaux_tc only (upstream's softmax top-k ignores it): != 1 with softmax is an error.
    moe_phase: "prefill" (EP path "ht") or "decode" (EP path "ll").
    max_tokens_per_rank: most tokens one rank passes to `forward` on the ht path (needed there);
    num_worst_tokens W: rows a rank receives from ht dispatch (default R · max_tokens_per_rank);
    num_max_dispatch_tokens_per_rank: N of the ll path (needed there).
    Every argument is validated here; errors name it, the expectation and the value seen.
    """

    def __init__(self, num_experts: int, top_k: int, hidden_size: int, moe_intermediate_size: int,
                 quant_config, *, ep_size: int = 1, ep_rank: int = 0, topk_method: str = "softmax",
                 renormalize: bool = True, n_group: int = 1, topk_group: int = 1,
                 e_score_correction_bias: paddle.Tensor | None = None, routed_scaling_factor: float = 1.0,
                 moe_phase: str = "prefill", max_tokens_per_rank: int | None = None,
                 num_worst_tokens: int | None = None, num_max_dispatch_tokens_per_rank: int | None = None):
        super().__init__()
        self._init_sizes(num_experts, top_k, hidden_size, moe_intermediate_size, ep_size, ep_rank)
        self._init_routing(topk_method, renormalize, n_group, topk_group, e_score_correction_bias,
                           routed_scaling_factor)
        self._init_ep_paths(moe_phase, max_tokens_per_rank, num_worst_tokens, num_max_dispatch_tokens_per_rank)
        if not isinstance(quant_config, BlockWiseFP8Config):
            raise TypeError(f"quant_config: expected a backend.quantization.BlockWiseFP8Config, "
                            f"got {type(quant_config).__name__}")
        self.quant_config = quant_config
        self.quant_method = quant_config.get_quant_method(self)
        self.quant_method.create_weights(self)

    def _init_sizes(self, num_experts, top_k, hidden_size, moe_intermediate_size, ep_size, ep_rank) -> None:
        self.num_experts = check_positive_int(num_experts, "num_experts")
        self.top_k = check_positive_int(top_k, "top_k")
        self.hidden_size = check_positive_int(hidden_size, "hidden_size")
        self.moe_intermediate_size = check_positive_int(moe_intermediate_size, "moe_intermediate_size")
        self.ep_size = check_positive_int(ep_size, "ep_size")
        self.ep_rank = check_nonnegative_int(ep_rank, "ep_rank")
        if self.ep_rank >= self.ep_size:
            raise ValueError(f"ep_rank: expected 0 <= ep_rank < ep_size = {self.ep_size}, got {ep_rank}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"num_experts: expected a multiple of ep_size = {self.ep_size}, got {num_experts}")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k: expected <= num_experts = {self.num_experts}, got {top_k}")
        self.num_local_experts = self.num_experts // self.ep_size
        self.expert_id_offset = self.ep_rank * self.num_local_experts

    def _init_routing(self, topk_method, renormalize, n_group, topk_group, e_score_correction_bias,
                      routed_scaling_factor) -> None:
        if topk_method not in TOPK_METHODS:
            raise ValueError(f"topk_method: expected one of {', '.join(TOPK_METHODS)}, got {topk_method!r}")
        self.topk_method = topk_method
        if not isinstance(renormalize, bool):
            raise TypeError(f"renormalize: expected a bool, got {renormalize!r}")
        self.renormalize = renormalize
        if isinstance(routed_scaling_factor, bool) or not isinstance(routed_scaling_factor, (int, float)) \
                or not math.isfinite(routed_scaling_factor) or routed_scaling_factor <= 0:
            raise ValueError(f"routed_scaling_factor: expected a finite number > 0, got {routed_scaling_factor!r}")
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.n_group = check_positive_int(n_group, "n_group")
        self.topk_group = check_positive_int(topk_group, "topk_group")
        self.e_score_correction_bias = None
        if topk_method == "softmax":
            if self.routed_scaling_factor != 1.0:
                raise ValueError(f"routed_scaling_factor: applies to topk_method='noaux_tc' only, expected 1.0 "
                                 f"with 'softmax', got {routed_scaling_factor!r}")
            if e_score_correction_bias is not None or self.n_group != 1 or self.topk_group != 1:
                raise ValueError("e_score_correction_bias, n_group, topk_group: apply to topk_method='noaux_tc' "
                                 f"only, got bias={'set' if e_score_correction_bias is not None else None}, "
                                 f"n_group={n_group}, topk_group={topk_group} with 'softmax'")
            return
        self._init_noaux_tc(n_group, topk_group, e_score_correction_bias)

    def _init_noaux_tc(self, n_group, topk_group, e_score_correction_bias) -> None:
        if self.num_experts % self.n_group:
            raise ValueError(f"n_group: expected a divisor of num_experts = {self.num_experts}, got {n_group}")
        if self.topk_group > self.n_group:
            raise ValueError(f"topk_group: expected <= n_group = {self.n_group}, got {topk_group}")
        per_group = self.num_experts // self.n_group
        if self.top_k > self.topk_group * per_group:
            raise ValueError(f"top_k: expected <= topk_group · num_experts / n_group = "
                             f"{self.topk_group * per_group}, got {self.top_k}")
        if e_score_correction_bias is None:
            e_score_correction_bias = paddle.zeros([self.num_experts], dtype=paddle.float32)
        check_tensor(e_score_correction_bias, "e_score_correction_bias", dtypes=FLOAT_DTYPES, ndim=1)
        check_dim(e_score_correction_bias, 0, self.num_experts, "e_score_correction_bias", "num_experts")
        check_finite(e_score_correction_bias, "e_score_correction_bias")
        self.e_score_correction_bias = e_score_correction_bias.astype(paddle.float32)

    def _init_ep_paths(self, moe_phase, max_tokens_per_rank, num_worst_tokens,
                       num_max_dispatch_tokens_per_rank) -> None:
        if moe_phase not in MOE_PHASES:
            raise ValueError(f"moe_phase: expected one of {', '.join(MOE_PHASES)}, got {moe_phase!r}")
        self.moe_phase = moe_phase
        self.max_tokens_per_rank = (None if max_tokens_per_rank is None
                                    else check_positive_int(max_tokens_per_rank, "max_tokens_per_rank"))
        if num_worst_tokens is None:
            self.num_worst_tokens = (None if self.max_tokens_per_rank is None
                                     else self.ep_size * self.max_tokens_per_rank)
        else:
            self.num_worst_tokens = check_positive_int(num_worst_tokens, "num_worst_tokens")
        self.num_max_dispatch_tokens_per_rank = (
            None if num_max_dispatch_tokens_per_rank is None
            else check_positive_int(num_max_dispatch_tokens_per_rank, "num_max_dispatch_tokens_per_rank"))

    @property
    def gate_correction_bias(self):
        """Upstream's name of e_score_correction_bias (what the method's routing reads, MOE:260-265)."""
        return self.e_score_correction_bias

    # ------------------------------------------------------------------ sizes of the EP paths

    @property
    def ep_mode(self) -> str:
        """"ht" (moe_phase prefill) or "ll" (decode): the EP path a runner-driven `forward` takes."""
        return MOE_PHASES[self.moe_phase]

    def local_expert_range(self) -> tuple[int, int]:
        """(first, last + 1) global expert ids held by this rank: slice global weights with it."""
        return self.expert_id_offset, self.expert_id_offset + self.num_local_experts

    def ht_rows_per_expert(self) -> int:
        """M of the ht path: min(W, R · max_tokens_per_rank) (see the module docstring)."""
        if self.max_tokens_per_rank is None:
            raise ValueError("max_tokens_per_rank: the ht (prefill EP) path needs it, got None")
        return min(self.num_worst_tokens, self.ep_size * self.max_tokens_per_rank)

    def ll_rows_per_expert(self) -> int:
        """M of the ll path: R · num_max_dispatch_tokens_per_rank."""
        if self.num_max_dispatch_tokens_per_rank is None:
            raise ValueError("num_max_dispatch_tokens_per_rank: the ll (decode EP) path needs it, got None")
        return self.ep_size * self.num_max_dispatch_tokens_per_rank

    # ------------------------------------------------------------------ routing (SPEC §10)

    def route(self, gate_logits: paddle.Tensor):
        """gate_logits [T, num_experts] float, finite -> (topk_weights [T, K_top] float32,
        topk_ids [T, K_top] int64 global expert ids); columns in descending weight, ties to the
        lowest expert id: `moe_ref.routing.softmax_topk` or `noaux_tc_topk` with the layer's options
        (`backend.moe.upstream.route_gate_out`, which reads upstream's attribute names)."""
        return route_gate_out(self, gate_logits, "gate_logits")

    # ------------------------------------------------------------------ weights and forward

    def load_weights(self, up_gate_proj_weight: paddle.Tensor, down_proj_weight: paddle.Tensor,
                     up_gate_proj_weight_scale: paddle.Tensor | None = None,
                     down_proj_weight_scale: paddle.Tensor | None = None) -> None:
        """Copy this rank's checkpoint tensors into the parameters, then run
        `quant_method.process_weights_after_loading(self)`.

        BF16 checkpoint: up_gate_proj_weight [E, 2I, H] bf16, down_proj_weight [E, H, I] bf16, no scales.
        FP8 checkpoint: the same shapes in float8_e4m3fn plus FP32 128x128 scales
        up_gate_proj_weight_scale [E, ceil(2I/128), ceil(H/128)] and
        down_proj_weight_scale [E, ceil(H/128), ceil(I/128)].
        E is num_local_experts: slice global tensors with `local_expert_range()`. The method's parameters
        hold them transposed, [E, K, N] as upstream's FusedMoE loads them (BF16 ones marked fully loaded in
        their `tensor_track`), and `process_weights_after_loading` converts both in one call.

        All or nothing: every tensor is checked before the first is copied, and the conversion
        replaces the layer's weights only when it succeeds (`process_weights_after_loading`), so a
        failed load leaves a loaded layer computing exactly what it computed before. A second load
        is an error, raised before anything is copied (the weights are converted by then).
        """
        method = self.quant_method
        if getattr(method, "processed_weights", lambda layer: ())(self):
            raise RuntimeError("load_weights: already called for this layer (its weights are converted to "
                               "UE8M0 FP8); build a new FusedMoE to load another checkpoint")
        given = {"up_gate_proj_weight": up_gate_proj_weight, "down_proj_weight": down_proj_weight,
                 "up_gate_proj_weight_scale": up_gate_proj_weight_scale,
                 "down_proj_weight_scale": down_proj_weight_scale}
        expected = getattr(method, "checkpoint_tensor_names", None)
        if expected is None:
            raise NotImplementedError(f"load_weights: {type(method).__name__} declares no checkpoint "
                                      f"tensors (it is not implemented in this project)")
        for name, value in given.items():
            if name not in expected:
                if value is not None:
                    raise ValueError(f"{name}: not part of a "
                                     f"{'BF16' if self.quant_config.is_checkpoint_bf16 else 'FP8'} checkpoint, "
                                     f"expected None")
                continue
            param = getattr(self, _CHECKPOINT_PARAMS[name])
            check_tensor(value, name, dtypes=(param.dtype,), ndim=param.ndim)
            want = [param.shape[0], param.shape[2], param.shape[1]]      # the parameter is [E, K, N]
            if list(value.shape) != want:
                raise ValueError(f"{name}: expected shape {want}, got {list(value.shape)}")
        for name in expected:            # what upstream's weight_loader does shard by shard, whole tensors here
            param = getattr(self, _CHECKPOINT_PARAMS[name])
            param.set_value(swap_last_two(given[name]))
            if getattr(param, "tensor_track", None) is not None:
                param.tensor_track.mark_all()
        method.process_weights_after_loading(self)

    def load_global_weights(self, up_gate_proj_weight: paddle.Tensor, down_proj_weight: paddle.Tensor,
                            up_gate_proj_weight_scale: paddle.Tensor | None = None,
                            down_proj_weight_scale: paddle.Tensor | None = None) -> None:
        """`load_weights` from the whole model's checkpoint tensors (leading axis num_experts = E · R):
        this rank keeps experts `local_expert_range()` of each. Shapes and dtypes as in `load_weights`."""
        first, last = self.local_expert_range()
        tensors = (up_gate_proj_weight, down_proj_weight, up_gate_proj_weight_scale, down_proj_weight_scale)
        for name, t in zip(("up_gate_proj_weight", "down_proj_weight", "up_gate_proj_weight_scale",
                            "down_proj_weight_scale"), tensors):
            if t is not None:
                check_tensor(t, name, min_ndim=1)
                check_dim(t, 0, self.num_experts, name, "num_experts (global checkpoint)")
        self.load_weights(*(None if t is None else t[first:last] for t in tensors))

    def forward(self, x: paddle.Tensor, gate_logits: paddle.Tensor | None = None, *, topk=None, runner=None):
        """x [T, H] bf16 -> [T, H] bf16 routed-expert output (summed over ranks on EP paths).

        Exactly one of gate_logits [T, num_experts] (routed with `route`) or
        topk = (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64 global ids).
        runner: an EP runner (`backend.moe.ep_runner`) for the ht/ll paths, None for TP.
        """
        if (gate_logits is None) == (topk is None):
            raise ValueError("gate_logits, topk: expected exactly one of them, got "
                             f"{'both' if topk is not None else 'neither'}")
        routing = gate_logits if gate_logits is not None else topk
        return self.quant_method.apply(self, x, routing, runner=runner)

    def check_errors(self) -> None:
        """Raise the first routing error recorded on the device since the last call (the method in "deferred"
        check mode: `BlackwellGemmFusedMoeMethod.raise_deferred_errors`), with the message eager mode raises in
        forward; one host synchronization. In eager mode (or with a method without deferred checks) returns."""
        check = getattr(self.quant_method, "raise_deferred_errors", None)
        if check is not None:
            check(self)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, top_k={self.top_k}, hidden_size={self.hidden_size}, "
                f"moe_intermediate_size={self.moe_intermediate_size}, ep_size={self.ep_size}, "
                f"ep_rank={self.ep_rank}, topk_method={self.topk_method!r}, moe_phase={self.moe_phase!r}, "
                f"quant_method={type(self.quant_method).__name__}")
