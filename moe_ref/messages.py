"""Error messages raised in two places: by the checks that read values now (`moe_ref.checks`, the ops contract)
and from a record kept on the device (`backend.ops.device_errors`, deferred checks), so both read the same.

Imports nothing (no Paddle, no torch): the torch-only GPU machine formats a device record too.
"""
from __future__ import annotations


def id_out_of_range_message(name: str, what: str, bound, note: str, value: int, index: tuple) -> str:
    """moe_ref.checks.check_ids_in_range's message."""
    return f"{name}: expected {what} in [-1, {bound}){note}, got {value} at index {index}"


def repeated_expert_message(name: str, token: int, expert: int, positions: list) -> str:
    """moe_ref.checks.check_distinct_experts's message."""
    return (f"{name}: token {token} repeats expert {expert} at top-k positions {positions}; "
            f"each token's experts must be distinct")


def expert_overflow_message(expert: int, count: int, max_token_num: int) -> str:
    """The permute's message for an expert over M rows."""
    return f"topk_ids: expert {expert} receives {count} rows, more than max_token_num = {max_token_num}"
