"""Routing (SPEC §10): softmax top-k and DeepSeek-V3 "noaux_tc" grouped top-k.

Both return `(topk_weights [T, K_top] float32, topk_ids [T, K_top] int64)` with the columns
in descending weight. Ties (in the selection and in the column order) go to the lowest
expert index: every ranking here is a *stable* argsort of the negated scores, because
`paddle.topk` does not promise an order among equal values.
"""
from __future__ import annotations

from ._paddle import paddle
from .checks import FLOAT_DTYPES, check_dim, check_finite, check_positive_int, check_tensor

RENORMALIZE_MIN_SUM = 1e-12     # noaux_tc divides by max(sum of weights, this) (SPEC §10)


def _stable_rank_desc(scores: paddle.Tensor) -> paddle.Tensor:
    """scores [T, N] -> [T, N] int64 column indices, best first; equal scores keep index order."""
    return paddle.argsort(-scores, axis=-1, stable=True)


def _order_by_weight(weights: paddle.Tensor, ids: paddle.Tensor):
    """Reorder the K_top columns of each row: descending weight, ties to the lowest expert id."""
    by_id = paddle.argsort(ids, axis=-1, stable=True)
    ids = paddle.take_along_axis(ids, by_id, axis=-1)
    weights = paddle.take_along_axis(weights, by_id, axis=-1)
    by_weight = _stable_rank_desc(weights)
    return paddle.take_along_axis(weights, by_weight, axis=-1), paddle.take_along_axis(ids, by_weight, axis=-1)


def _check_logits(logits, top_k: int) -> int:
    check_tensor(logits, "logits", dtypes=FLOAT_DTYPES, ndim=2)
    check_finite(logits, "logits")
    k = check_positive_int(top_k, "top_k")
    if k > int(logits.shape[1]):
        raise ValueError(f"top_k: expected <= E_total = {int(logits.shape[1])}, got {k}")
    return k


def softmax_topk(logits: paddle.Tensor, top_k: int, renormalize: bool = True):
    """Softmax top-k routing.

    logits [T, E_total] float -> (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64).
    p = softmax(logits) in float32; the K_top largest p, descending, ties to the lowest id;
    renormalize=True divides the K_top weights by their sum (they then sum to 1).
    """
    k = _check_logits(logits, top_k)
    p = paddle.nn.functional.softmax(logits.astype(paddle.float32), axis=-1)
    ids = _stable_rank_desc(p)[:, :k]
    weights = paddle.take_along_axis(p, ids, axis=-1)
    if renormalize:
        weights = weights / weights.sum(axis=-1, keepdim=True)
    return weights, ids.astype(paddle.int64)


def noaux_tc_topk(logits: paddle.Tensor, e_score_correction_bias: paddle.Tensor, n_group: int, topk_group: int,
                  top_k: int, renormalize: bool = True, routed_scaling_factor: float = 1.0):
    """DeepSeek-V3 grouped routing without auxiliary loss ("noaux_tc").

    logits [T, E_total] float, e_score_correction_bias [E_total] float
    -> (topk_weights [T, K_top] float32, topk_ids [T, K_top] int64).

    p = sigmoid(logits); choice = p + bias. The E_total experts form n_group groups of
    E_total / n_group consecutive experts; a group's score is the sum of its two best `choice`
    values (its best one if a group has a single expert). The topk_group best groups are kept
    and the K_top best `choice` values inside them are selected. The weights are `p` (not
    `choice`) at those ids, divided by max(their sum, 1e-12) when renormalize=True, then
    multiplied by routed_scaling_factor. Columns are in descending weight.
    """
    k = _check_logits(logits, top_k)
    e_total = int(logits.shape[1])
    check_tensor(e_score_correction_bias, "e_score_correction_bias", dtypes=FLOAT_DTYPES, ndim=1)
    check_dim(e_score_correction_bias, 0, e_total, "e_score_correction_bias", "E_total")
    check_finite(e_score_correction_bias, "e_score_correction_bias")
    n_group = check_positive_int(n_group, "n_group")
    topk_group = check_positive_int(topk_group, "topk_group")
    if e_total % n_group:
        raise ValueError(f"n_group: must divide E_total = {e_total}, got {n_group}")
    if topk_group > n_group:
        raise ValueError(f"topk_group: expected <= n_group = {n_group}, got {topk_group}")
    group_size = e_total // n_group
    if k > topk_group * group_size:
        raise ValueError(f"top_k: expected <= topk_group * E_total / n_group = {topk_group * group_size}, got {k}")

    t = int(logits.shape[0])
    p = paddle.nn.functional.sigmoid(logits.astype(paddle.float32))
    choice = p + e_score_correction_bias.astype(paddle.float32).unsqueeze(0)

    grouped = choice.reshape([t, n_group, group_size])
    best_two = paddle.sort(grouped, axis=-1, descending=True)[:, :, : min(2, group_size)]
    group_score = best_two.sum(axis=-1)                                             # [T, n_group]
    kept_groups = _stable_rank_desc(group_score)[:, :topk_group]                    # [T, topk_group]
    group_mask = paddle.zeros([t, n_group], dtype=paddle.int32)
    group_mask = paddle.put_along_axis(group_mask, kept_groups, paddle.ones_like(kept_groups, dtype=paddle.int32),
                                       axis=-1)
    expert_mask = paddle.repeat_interleave(group_mask, group_size, axis=-1) > 0     # [T, E_total]
    masked_choice = paddle.where(expert_mask, choice, paddle.full_like(choice, float("-inf")))

    ids = _stable_rank_desc(masked_choice)[:, :k]
    weights = paddle.take_along_axis(p, ids, axis=-1)
    if renormalize:
        weights = weights / paddle.clip(weights.sum(axis=-1, keepdim=True), min=RENORMALIZE_MIN_SUM)
    weights = weights * float(routed_scaling_factor)
    return _order_by_weight(weights, ids.astype(paddle.int64))
