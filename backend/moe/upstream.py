"""What a fused-MoE method needs from FastDeploy's `FusedMoE` layer (develop, dad5a432 = #7374's 92ae10c3),
read so that the same method runs on that layer and on ours (`backend.moe.layer.FusedMoE`): docs/upstream.md §4.

- `TensorTracker`: the load tracking upstream attaches to BF16 parameters (`fastdeploy/model_executor/utils.py`
  :65-110, same interface): `mark(start, end, batch_id)` per loaded shard, `is_fully_copied()`.
- `route_gate_out(layer, gate_out)`: top-k from the layer's routing attributes, under upstream's names
  (`topk_method`, `top_k`, `renormalize`, `n_group`, `topk_group`, `routed_scaling_factor`, `gate_correction_bias`).
- `moe_phase`, `ht_sizes`, `ll_rows_per_expert`: the phase and buffer sizes, from our layer's attributes or from
  upstream's `layer.fd_config` (BW:721-726, BASE:235, BW:978-986).
"""
from __future__ import annotations

import paddle

from moe_ref.checks import FLOAT_DTYPES, check_dim, check_finite, check_tensor
from moe_ref.routing import noaux_tc_topk, softmax_topk


class TensorTracker:
    """Which slices of a 3-D parameter [E, A, B] were loaded: per expert, the tracked axis is B when output_dim
    (gate / up shards along 2I of up_gate_proj_weight [E, H, 2I]) else A (down_proj_weight [E, I, H], loaded
    whole). Upstream's TensorTracker (utils.py:65-110) with the same methods."""

    def __init__(self, shape, output_dim: bool):
        if len(shape) != 3:
            raise ValueError(f"shape: expected a 3-D parameter shape [E, A, B], got {list(shape)}")
        self.shape, self.output_dim = list(shape), bool(output_dim)
        self.track_dim = 2 if output_dim else 1
        self._marked = [set() for _ in range(self.shape[0])]

    def mark(self, start: int = 0, end: int | None = None, batch_id: int | None = None) -> None:
        length = self.shape[self.track_dim]
        end = length if end is None else end
        if batch_id is None or not 0 <= batch_id < self.shape[0]:
            raise ValueError(f"batch_id: expected an expert in [0, {self.shape[0]}), got {batch_id!r}")
        if start < 0 or end > length or start >= end:
            raise ValueError(f"start, end: expected 0 <= start < end <= {length}, got {start}, {end}")
        self._marked[batch_id].update(range(start, end))

    def mark_all(self) -> None:
        """Every expert fully loaded (a whole [E, A, B] tensor copied at once)."""
        for e in range(self.shape[0]):
            self.mark(0, None, e)

    def is_fully_copied(self) -> bool:
        return all(len(m) == self.shape[self.track_dim] for m in self._marked)


def weight_fully_copied(param) -> bool:
    """Upstream's `weight_fully_copied` (utils.py:241-244): a tracker is attached and complete."""
    track = getattr(param, "tensor_track", None)
    return track is not None and track.is_fully_copied()


def route_gate_out(layer, gate_out: paddle.Tensor, name: str = "gate_out"):
    """gate_out [T, num_experts] float, finite -> (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64
    global ids): noaux_tc (`moe_ref.routing.noaux_tc_topk`, bias `layer.gate_correction_bias`, zeros when None) or
    softmax top-k (`softmax_topk`), with `layer.renormalize` (default True, as upstream's getattr)."""
    check_tensor(gate_out, name, dtypes=FLOAT_DTYPES, ndim=2)
    check_dim(gate_out, 1, layer.num_experts, name, "num_experts")
    check_finite(gate_out, name)
    renormalize = getattr(layer, "renormalize", True)
    if layer.topk_method == "noaux_tc":
        bias = getattr(layer, "gate_correction_bias", None)
        bias = paddle.zeros([layer.num_experts]) if bias is None else bias.reshape([-1]).astype(paddle.float32)
        return noaux_tc_topk(gate_out, bias, layer.n_group, layer.topk_group, layer.top_k, renormalize,
                             layer.routed_scaling_factor)
    return softmax_topk(gate_out, layer.top_k, renormalize)


def moe_phase(layer) -> str:
    """"prefill" or "decode": upstream's `layer.fd_config.model_config.moe_phase.phase`, else our `layer.moe_phase`."""
    fd_config = getattr(layer, "fd_config", None)
    if fd_config is not None:
        return fd_config.model_config.moe_phase.phase
    return layer.moe_phase


def ht_sizes(layer, runner) -> tuple[int, int, int]:
    """(max_tokens_per_rank, M, W) of the ht path. Ours: the layer's (`ht_rows_per_expert`). Upstream (BW:721-726):
    max_tokens_per_rank = max_num_batched_tokens // tensor_parallel_size, M = ep_size · that, W = the runner's
    num_worst_tokens (M when the runner has none)."""
    if hasattr(layer, "ht_rows_per_expert"):
        m = layer.ht_rows_per_expert()
        return layer.max_tokens_per_rank, m, layer.num_worst_tokens
    cfg = layer.fd_config
    mtpr = cfg.scheduler_config.max_num_batched_tokens // cfg.parallel_config.tensor_parallel_size
    m = layer.ep_size * mtpr
    return mtpr, m, int(getattr(runner, "num_worst_tokens", 0) or m)


def ll_dispatch_tokens(layer) -> int:
    """N of the ll path: our layer's num_max_dispatch_tokens_per_rank, or upstream's
    fd_config.model_config.num_max_dispatch_tokens_per_rank (BW:978-986)."""
    if hasattr(layer, "ll_rows_per_expert"):
        return layer.ll_rows_per_expert() // layer.ep_size
    return int(layer.fd_config.model_config.num_max_dispatch_tokens_per_rank)
