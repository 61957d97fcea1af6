"""A strict single-rank fake of DeepEP's `Buffer` (normal mode), for `backend.moe.ep_distributed.DeepEPRunner`.

Signatures of deepseek-ai/DeepEP `deep_ep/buffer.py` (v1.2): `get_dispatch_layout(topk_idx, num_experts,
previous_event=None, async_finish=False, allocate_on_comm_stream=False)`, `dispatch(x, handle=None,
num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None, num_tokens_per_expert=None,
topk_idx=None, topk_weights=None, expert_alignment=1, num_worst_tokens=0, config=None, previous_event=None,
async_finish=False, allocate_on_comm_stream=False)`, `combine(x, handle, topk_weights=None, bias=None, config=None,
previous_event=None, async_finish=False, allocate_on_comm_stream=False)`. PFCC's (PaddleFleet / PFCCLab) adds
`skip_x_record_stream` to both, which upstream FastDeploy passes when the signature has it (ep.py:661-667, 694).
`make_buffer(pfcc=..., worst=...)` builds one; `worst=False` is a DeepEP without `num_worst_tokens`.

The checks are DeepEP's host asserts that concern the adapter: dtypes and shapes of the dispatch inputs, and in
the combine `src_idx.size(0) == x.size(0)` (intranode_combine): x must have exactly the rows the dispatch handed
out - num_worst_tokens of them when it was given. A failed check raises AssertionError, as EP_HOST_ASSERT does.
Every call is recorded in `buffer.calls` as (method, {argument: value}).
"""
from __future__ import annotations

import types

import numpy as np
import paddle

FP8 = paddle.float8_e4m3fn


class Buffer:
    """R = 1: every token with a routed expert is received, in token order; ids stay (all experts are local)."""

    group_size, rank = 1, 0

    def __init__(self):
        self.calls = []

    def get_dispatch_layout(self, topk_idx, num_experts, previous_event=None, async_finish=False,
                            allocate_on_comm_stream=False):
        assert topk_idx.dtype == paddle.int64 and topk_idx.ndim == 2, (topk_idx.dtype, topk_idx.shape)
        ids = topk_idx.numpy()
        in_rank = (ids >= 0).any(axis=1)
        per_expert = np.bincount(ids[ids >= 0], minlength=num_experts).astype(np.int32)
        self.calls.append(("get_dispatch_layout", {"num_experts": num_experts}))
        return (paddle.to_tensor([int(in_rank.sum())], dtype=paddle.int32), None, paddle.to_tensor(per_expert),
                paddle.to_tensor(in_rank.reshape([-1, 1])), None)

    def _dispatch(self, x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx, topk_weights,
                  num_worst_tokens, kwargs):
        x, scales = x if isinstance(x, tuple) else (x, None)
        t = int(x.shape[0])
        assert x.ndim == 2 and x.dtype in (FP8, paddle.bfloat16), (x.dtype, x.shape)
        if scales is not None:
            assert x.dtype == FP8 and scales.ndim == 2 and int(scales.shape[0]) == t
            assert scales.dtype in (paddle.float32, paddle.int32), scales.dtype
        assert topk_idx.dtype == paddle.int64 and list(topk_idx.shape)[0] == t
        assert topk_weights.dtype == paddle.float32 and topk_weights.shape == topk_idx.shape
        assert list(is_token_in_rank.shape) == [t, 1] and num_tokens_per_rank is not None
        assert num_tokens_per_expert is not None
        src = np.nonzero(is_token_in_rank.numpy()[:, 0])[0]
        rows = num_worst_tokens if num_worst_tokens > 0 else src.size
        assert src.size <= rows, f"num_worst_tokens {num_worst_tokens} < {src.size} received tokens"
        index = np.concatenate([src, np.full([rows - src.size], t)]).astype(np.int64)
        pick = lambda v, fill: paddle.to_tensor(np.concatenate(       # noqa: E731
            [np.asarray(v), np.full([1] + list(np.asarray(v).shape[1:]), fill, np.asarray(v).dtype)])[index])
        recv_x = pick(x.view(paddle.uint8).numpy(), 0).view(x.dtype)
        recv = recv_x if scales is None else (recv_x, pick(scales.numpy(), 0))
        handle = types.SimpleNamespace(src_idx=src, rows=rows, num_tokens=t)
        self.calls.append(("dispatch", {"num_worst_tokens": num_worst_tokens, **kwargs}))
        return (recv, pick(topk_idx.numpy(), -1), pick(topk_weights.numpy(), 0), [], handle, None)

    def _combine(self, x, handle, topk_weights, kwargs):
        assert x.dtype == paddle.bfloat16 and x.ndim == 2, (x.dtype, x.shape)
        assert int(x.shape[0]) == handle.rows, f"src_idx.size(0) == x.size(0): {handle.rows} != {int(x.shape[0])}"
        if topk_weights is not None:
            assert topk_weights.dtype == paddle.float32 and int(topk_weights.shape[0]) == handle.rows
        out = np.zeros([handle.num_tokens, int(x.shape[1])], dtype=np.float32)
        out[handle.src_idx] = x.astype(paddle.float32).numpy()[: handle.src_idx.size]
        self.calls.append(("combine", {"rows": int(x.shape[0]), **kwargs}))
        return paddle.to_tensor(out).astype(paddle.bfloat16), topk_weights, None


def make_buffer(pfcc: bool = False, worst: bool = True) -> Buffer:
    """A Buffer whose dispatch / combine have DeepEP's parameters: num_worst_tokens when `worst`, PFCC's
    skip_x_record_stream when `pfcc` (the adapter reads the signatures, as upstream does)."""
    buf = Buffer()
    if worst and pfcc:
        def dispatch(x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                     num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1,
                     num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                     allocate_on_comm_stream=False, skip_x_record_stream=False):
            return buf._dispatch(x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                 topk_weights, num_worst_tokens, {"skip_x_record_stream": skip_x_record_stream})
    elif worst:
        def dispatch(x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                     num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1,
                     num_worst_tokens=0, config=None, previous_event=None, async_finish=False,
                     allocate_on_comm_stream=False):
            return buf._dispatch(x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                 topk_weights, num_worst_tokens, {})
    else:
        def dispatch(x, handle=None, num_tokens_per_rank=None, num_tokens_per_rdma_rank=None, is_token_in_rank=None,
                     num_tokens_per_expert=None, topk_idx=None, topk_weights=None, expert_alignment=1, config=None,
                     previous_event=None, async_finish=False, allocate_on_comm_stream=False):
            return buf._dispatch(x, num_tokens_per_rank, is_token_in_rank, num_tokens_per_expert, topk_idx,
                                 topk_weights, 0, {})
    if pfcc:
        def combine(x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                    allocate_on_comm_stream=False, skip_x_record_stream=False):
            return buf._combine(x, handle, topk_weights, {"skip_x_record_stream": skip_x_record_stream})
    else:
        def combine(x, handle, topk_weights=None, bias=None, config=None, previous_event=None, async_finish=False,
                    allocate_on_comm_stream=False):
            return buf._combine(x, handle, topk_weights, {})
    buf.dispatch, buf.combine = dispatch, combine
    buf.low_latency_dispatch = lambda x, topk_idx, num_max_dispatch_tokens_per_rank, num_experts, use_fp8=True: None
    return buf


def module(name: str = "deep_ep") -> types.ModuleType:
    """A stand-in DeepEP module: only its name and Buffer (the adapter is given a ready buffer)."""
    mod = types.ModuleType(name)
    mod.Buffer = Buffer
    return mod
