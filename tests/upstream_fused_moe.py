"""A stand-in for FastDeploy's `FusedMoE` (develop dad5a432, fastdeploy/model_executor/layers/moe/moe.py) and the
loader around it, so that a test drives `BlackwellGemmFusedMoeMethod` exactly as upstream does (docs/upstream.md §4):

- `FusedMoE.__init__` sets the attributes upstream's sets (MOE:203-301), asks the config for the method
  (`get_quant_method(self)`), calls `init_ep(self)` when ep_size > 1 and then
  `create_weights(self, weight_loader=..., model_format=..., num_experts=..., hidden_size=...,
  moe_intermediate_size=...)`;
- `FusedMoE.weight_loader(param, loaded_weight, expert_id, shard_id)` is upstream's CUDA branch (MOE:310-439:
  SHARD_ID_TO_SHARDED_DIM = {"gate": 1, "down": 0, "up": 1}, gate / up halves of the 2I axis, `tensor_track` marks);
- `load_checkpoint` replays the default_v1 loader: weight_loader per checkpoint tensor, then upstream's
  `process_weights_after_loading` hook per parameter (utils.py:160-196: only BF16 checkpoints, only when the
  parameter's tracker is complete), then `process_final_after_loading` (utils.py:247-272: once for FP8 checkpoints);
- `FusedMoE.forward(x, gate, ...)` is forward_normal's call (MOE:883-891): `quant_method.apply(self, x, gate,
  topk_ids_hookfunc, shared_experts, fc1_latent_proj, fc2_latent_proj)`, all positional.

Checkpoint tensors are Paddle-format per expert: gate and up [H, I], down [I, H] (x @ W orientation).
The class's module is upstream's, so `BlockWiseFP8Config.get_quant_method` accepts it as upstream's would.
"""
from __future__ import annotations

import types

import paddle

SHARD_ID_TO_SHARDED_DIM = {"gate": 1, "down": 0, "up": 1}       # MOE:329 (CUDA)


def fd_config(*, phase="prefill", max_num_batched_tokens=64, tensor_parallel_size=1, ep_size=1, ep_rank=0,
              num_max_dispatch_tokens_per_rank=16, is_checkpoint_bf16=True):
    """The pieces of FDConfig that FusedMoE and the Blackwell method read (docs/upstream.md §4)."""
    ns = types.SimpleNamespace
    return ns(
        parallel_config=ns(tensor_parallel_rank=0, tensor_parallel_size=tensor_parallel_size,
                           expert_parallel_size=ep_size, expert_parallel_rank=ep_rank, tp_group=None),
        scheduler_config=ns(max_num_batched_tokens=max_num_batched_tokens, splitwise_role="mixed"),
        model_config=ns(moe_phase=ns(phase=phase), num_max_dispatch_tokens_per_rank=num_max_dispatch_tokens_per_rank,
                        moe_layer_start_index=0, model_format="paddle", is_quantized=not is_checkpoint_bf16,
                        model="unused"),
        load_config=ns(load_choices="default_v1", is_pre_sharded=False, dynamic_load_weight=False),
        routing_replay_config=ns(enable_routing_replay=False),
    )


class FusedMoE(paddle.nn.Layer):
    """Upstream's FusedMoE, the attributes the Blackwell method reads, set in upstream's order (MOE:203-301)."""

    def __init__(self, fd_config, quant_config, *, num_experts, top_k, hidden_size, moe_intermediate_size,
                 layer_idx=0, weight_key_map=None, topk_method="softmax", topk_group=1, n_group=1,
                 routed_scaling_factor=1.0, gate_correction_bias=None, renormalize=True, expert_id_offset=0):
        super().__init__()
        self.fd_config = fd_config
        self.layer_idx = layer_idx
        self.renormalize = renormalize
        self.tp_rank = fd_config.parallel_config.tensor_parallel_rank
        self.tp_size = fd_config.parallel_config.tensor_parallel_size
        self.ep_size = fd_config.parallel_config.expert_parallel_size
        self.ep_rank = fd_config.parallel_config.expert_parallel_rank
        if self.ep_size > 1:
            self.tp_size, self.tp_rank = 1, 0
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.num_local_experts = self.num_experts // self.ep_size
        self.moe_intermediate_size = moe_intermediate_size // self.tp_size
        self.top_k = top_k
        self.weight_key_map = weight_key_map or {}
        self.with_bias, self.activation = False, "swiglu"
        if self.ep_size > 1:
            expert_id_offset = expert_id_offset + self.ep_rank * self.num_local_experts
        self.expert_id_offset = expert_id_offset
        self.topk_method, self.topk_group, self.n_group = topk_method, topk_group, n_group
        self.routed_scaling_factor = routed_scaling_factor
        self.weight_dtype = paddle.bfloat16               # self._helper.get_default_dtype() when serving
        self.moe_quant_config = quant_config
        self.quant_method = quant_config.get_quant_method(self)
        self.redundant_table_manger = None
        self.is_rearrange = False
        if self.ep_size > 1:
            self.quant_method.init_ep(self)
        self.gate_correction_bias = gate_correction_bias
        self.quant_method.create_weights(
            self, weight_loader=self.weight_loader, model_format=fd_config.model_config.model_format,
            num_experts=self.num_local_experts if self.ep_size > 1 else self.num_experts,
            hidden_size=self.hidden_size, moe_intermediate_size=self.moe_intermediate_size)

    def weight_loader(self, param, loaded_weight, expert_id, shard_id=None):
        """MOE:310-371 (CUDA): experts of other ranks are skipped; fused gate-up is split into its halves."""
        local = expert_id - self.expert_id_offset
        if not 0 <= local < self.num_local_experts:
            return
        if shard_id is None:
            half = int(param[local].shape[SHARD_ID_TO_SHARDED_DIM["gate"]]) // 2
            for sid, start in (("gate", 0), ("up", half)):
                self._load_expert_weight(param, local, loaded_weight[:, start:start + half], sid)
            return
        assert shard_id in ("gate", "down", "up")
        self._load_expert_weight(param, local, loaded_weight, shard_id)

    def _load_expert_weight(self, param, local, loaded_weight, shard_id):
        """_load_gate_up_weight / _load_down_weight (MOE:373-473) without TP slicing (tp_size 1 or EP)."""
        if shard_id == "down":
            assert list(param[local].shape) == list(loaded_weight.shape), (param.shape, loaded_weight.shape)
            if hasattr(param, "tensor_track"):
                param.tensor_track.mark(start=0, batch_id=local)
            param[local] = loaded_weight.astype(param.dtype)
            return
        half = int(param.shape[2]) // 2
        start = 0 if shard_id == "gate" else half
        assert list(param[local, :, start:start + half].shape) == list(loaded_weight.shape)
        if hasattr(param, "tensor_track"):
            param.tensor_track.mark(start=start, end=start + half, batch_id=local)
        param[local, :, start:start + half] = loaded_weight.astype(param.dtype)

    def forward(self, x, gate, topk_ids_hookfunc=None, shared_experts=None, fc1_latent_proj=None,
                fc2_latent_proj=None):
        """forward_normal (MOE:883-891): the seven positional arguments of MoEMethodBase.apply."""
        return self.quant_method.apply(self, x, gate, topk_ids_hookfunc, shared_experts, fc1_latent_proj,
                                       fc2_latent_proj)


def _after_loading_hook(layer, param, calls):
    """utils.process_weights_after_loading's fn (utils.py:160-196) for one loaded parameter."""
    if not layer.moe_quant_config.is_checkpoint_bf16:
        return                                             # offline-quantized: skipped here
    track = getattr(param, "tensor_track", "absent")
    if track is None or (track != "absent" and not track.is_fully_copied()):
        return
    calls.append("process_weights_after_loading")
    layer.quant_method.process_weights_after_loading(layer)


def load_checkpoint(layer, shards):
    """Replay the default_v1 loader: shards = [(param_name, tensor, expert_id, shard_id)] in checkpoint order.
    Returns the hook calls made, with the processed weights after each: [("...", (weights...)), ...]."""
    calls, seen = [], []
    for name, tensor, expert_id, shard_id in shards:
        param = getattr(layer, name)
        layer.weight_loader(param, tensor, expert_id, shard_id)
        before = len(calls)
        _after_loading_hook(layer, param, calls)
        if len(calls) > before:
            seen.append((name, expert_id, shard_id, layer.quant_method.processed_weights(layer)))
    if not layer.moe_quant_config.is_checkpoint_bf16:      # process_final_after_loading (utils.py:247-272)
        layer.quant_method.process_weights_after_loading(layer)
    return seen


def bf16_shards(w_up, w_down, experts):
    """Checkpoint shards of global experts `experts` from [E_total, 2I, H] / [E_total, H, I] weights (moe_ref's
    orientation), as Paddle-format tensors: gate, up [H, I], down [I, H]; gate and up interleaved per expert."""
    i = int(w_up.shape[1]) // 2
    shards = []
    for e in experts:
        shards.append(("up_gate_proj_weight", w_up[e, :i].transpose([1, 0]), e, "gate"))
        shards.append(("up_gate_proj_weight", w_up[e, i:].transpose([1, 0]), e, "up"))
    shards += [("down_proj_weight", w_down[e].transpose([1, 0]), e, "down") for e in experts]
    return shards


class Gate(paddle.nn.Layer):
    """The router upstream hands the method: gate(x) -> logits [T, E_total] (float32 here)."""

    def __init__(self, weight):
        super().__init__()
        self.weight = weight                               # [H, E_total] float32

    def forward(self, x):
        return paddle.matmul(x.astype(paddle.float32), self.weight)


FusedMoE.__module__ = "fastdeploy.model_executor.layers.moe.moe"
