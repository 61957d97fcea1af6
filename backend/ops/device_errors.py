"""Routing errors recorded on the device, raised when the caller asks (deferred checks, README "Failure modes").

In deferred mode nothing in the layer reads a value back to the host: the routing checks that eager mode runs
with one synchronization each (an expert id out of range, a token repeating an expert, an expert receiving more
than M rows) write a record into a small int64 tensor instead, and the ops drop what they cannot place (bad ids
and rows past M get the map value -1 and are neither written nor combined; counts are clamped to M). The user
raises the recorded error at a synchronization point of their choice (`raise_recorded`, through
`BlackwellGemmFusedMoeMethod.raise_deferred_errors` / `FusedMoE.check_errors`), with eager mode's message.

The record: errors [RECORD_LEN] int64 = [code, a, b, c, d]; code NONE (0) means no error. The first error since
the record was cleared wins (later ones leave it alone), in the order eager mode would meet them.

    BAD_GLOBAL_ID  a, b = (t, k) index in topk_ids, c = the id, d = num_experts   (the method's routing check)
    REPEAT         a = token, b = expert, c = bitmask of its top-k positions      (the method's routing check)
    BAD_LOCAL_ID   a, b = (t, k) index in topk_ids, c = the id, d = E             (the permute)
    OVERFLOW       a = expert (the first over M), b = its count, c = M            (the permute)

Importing this module imports neither Paddle nor torch (the triton launcher reads the layout from here, and
`message` formats a torch record on a machine without Paddle); the Paddle recorders import Paddle when called.
"""
from __future__ import annotations

import contextlib
import threading

from moe_ref.messages import expert_overflow_message, id_out_of_range_message, repeated_expert_message

RECORD_LEN = 5
NONE, BAD_GLOBAL_ID, REPEAT, BAD_LOCAL_ID, OVERFLOW = range(5)
CODES = ("NONE", "BAD_GLOBAL_ID", "REPEAT", "BAD_LOCAL_ID", "OVERFLOW")


def new_record(place=None):
    """A cleared record: int64 [RECORD_LEN] zeros on `place` (Paddle)."""
    import paddle
    rec = paddle.zeros([RECORD_LEN], dtype=paddle.int64)
    return rec if place is None else rec.to(place)


def check_record(errors, name: str = "errors") -> None:
    """errors must be an int64 [RECORD_LEN] Paddle tensor (TypeError / ValueError naming it)."""
    import paddle
    if not isinstance(errors, paddle.Tensor) or errors.dtype != paddle.int64 or list(errors.shape) != [RECORD_LEN]:
        seen = (f"dtype {errors.dtype}, shape {list(errors.shape)}" if isinstance(errors, paddle.Tensor)
                else type(errors).__name__)
        raise TypeError(f"{name}: expected an int64 [{RECORD_LEN}] error record (backend.ops.device_errors."
                        f"new_record), got {seen}")


def message(values) -> str | None:
    """The eager-mode message of a record read back to the host (a sequence of RECORD_LEN ints), None if clear."""
    code, a, b, c, d = (int(v) for v in values)
    if code == BAD_GLOBAL_ID:
        return id_out_of_range_message("topk_ids", "global expert ids", f"num_experts = {d}", "", c, (a, b))
    if code == REPEAT:
        positions = [k for k in range(63) if (c >> k) & 1]
        return repeated_expert_message("topk_ids", a, b, positions)
    if code == BAD_LOCAL_ID:
        return id_out_of_range_message("topk_ids", "expert ids", d, f" (num_local_experts = {d})", c, (a, b))
    if code == OVERFLOW:
        return expert_overflow_message(a, b, c)
    return None


def raise_recorded(errors) -> None:
    """Read the record (a Paddle or torch tensor; one synchronization), clear it, and raise its ValueError (eager
    mode's message) if any."""
    values = [int(v) for v in errors.tolist()]
    text = message(values)
    if text is not None:
        errors.zero_()
        raise ValueError(text)


# ----------------------------------------------------------------------------- Paddle recorders (no host reads)

def _first_true(mask):
    """mask bool [N] (N > 0) -> (any int64 [1] 0 | 1, index int64 [1] of the first True, 0 if none)."""
    import paddle
    flat = mask.astype(paddle.int32)
    return flat.max().astype(paddle.int64).reshape([1]), paddle.argmax(flat).astype(paddle.int64).reshape([1])


def record_first(errors, candidate) -> None:
    """errors := candidate if errors is clear and candidate holds an error (code != 0), in place, on the device."""
    import paddle
    take = paddle.logical_and(errors[0:1] == NONE, candidate[0:1] != NONE)
    paddle.assign(paddle.where(take, candidate, errors), output=errors)


def record_bad_ids(errors, ids, upper: int, code: int) -> None:
    """ids [T, K_top] int: the first id outside [-1, upper) (row-major), as code BAD_GLOBAL_ID or BAD_LOCAL_ID."""
    import paddle
    if int(ids.shape[0]) * int(ids.shape[1]) == 0:
        return
    k_top = int(ids.shape[1])
    flat = ids.astype(paddle.int64).flatten()
    found, at = _first_true(paddle.logical_or(flat < -1, flat >= upper))
    value = paddle.gather(flat, at)
    rec = paddle.concat([paddle.full([1], code, paddle.int64), at // k_top, at % k_top, value,
                         paddle.full([1], upper, paddle.int64)])
    record_first(errors, rec * found)


def record_repeats(errors, ids) -> None:
    """ids [T, K_top] int: the first token repeating an expert (check_distinct_experts' order), code REPEAT."""
    import paddle
    t, k_top = (int(d) for d in ids.shape)
    if t == 0 or k_top < 2:
        return
    ids64 = ids.astype(paddle.int64)
    srt = paddle.sort(ids64, axis=1)
    same = paddle.logical_and(srt[:, 1:] == srt[:, :-1], srt[:, 1:] >= 0).flatten()
    found, at = _first_true(same)
    token = at // (k_top - 1)
    expert = paddle.gather(srt.flatten(), token * k_top + at % (k_top - 1))
    row = paddle.gather(ids64, token, axis=0).reshape([k_top])
    weights = paddle.to_tensor([1 << k for k in range(k_top)], dtype=paddle.int64, place=ids.place)
    bits = ((row == expert).astype(paddle.int64) * weights).sum()
    rec = paddle.concat([paddle.full([1], REPEAT, paddle.int64), token, expert, bits.reshape([1]),
                         paddle.zeros([1], paddle.int64)])
    record_first(errors, rec * found)


def record_overflow(errors, counts, m: int) -> None:
    """counts [E] int (rows each expert was routed, before clamping to M): the first expert over m, code OVERFLOW."""
    import paddle
    c = counts.astype(paddle.int64).flatten()
    found, ex = _first_true(c > m)
    rec = paddle.concat([paddle.full([1], OVERFLOW, paddle.int64), ex, paddle.gather(c, ex),
                         paddle.full([1], m, paddle.int64), paddle.zeros([1], paddle.int64)])
    record_first(errors, rec * found)


# ----------------------------------------------------------------------------- deferred mode of the value checks

_MODE = threading.local()


def value_checks_on() -> bool:
    """False inside `deferred()`: the contract's checks that read tensor values (finite inputs, counts <= M, no
    UE8M0 NaN byte, combine map in range) are skipped, as each costs a host synchronization. In the layer's
    chain those values come from the chain itself (counts clamped by the permute, bytes from our quantizers,
    the map from the permute); the routing, which comes from the user, is recorded instead (module docstring)."""
    return not getattr(_MODE, "deferred", False)


@contextlib.contextmanager
def deferred():
    """Within: value checks off in this thread (`value_checks_on`); restored on exit, errors included."""
    before = getattr(_MODE, "deferred", False)
    _MODE.deferred = True
    try:
        yield
    finally:
        _MODE.deferred = before
