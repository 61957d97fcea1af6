"""Index formulas of the expert-parallel ht exchange (SPEC §9, docs/design.md exact semantics), numpy, for the host
runners (ep_runner.InProcessEPGroup, ep_distributed.PaddleDistributedEPRunner). The device exchange
(backend/ops/triton/ep_exchange.py: ep_index_kernel, ep_unpack_kernel) computes
the same values on the GPU; tests/test_ep_exchange.py checks the two against each other.

    rank of global expert g          g // E (E = experts per rank); g = -1: none
    token t goes to rank r           some k has ids[t, k] >= 0 and ids[t, k] // E == r (once, however many k)
    slot of t on r                   tokens before t that go to r (ascending token order)
    local id on rank r               g - r·E for g on r, else -1
"""
from __future__ import annotations

import numpy as np


def goes_to(ids: np.ndarray, num_local_experts: int, world: int) -> np.ndarray:
    """ids [T, K_top] global (-1 allowed) -> bool [R, T]: token t has >= 1 expert on rank r."""
    dest = np.where(ids >= 0, ids // num_local_experts, -1)
    return np.stack([(dest == r).any(axis=1) for r in range(world)]) if world else np.zeros((0, len(ids)), bool)


def sent_tokens(ids: np.ndarray, num_local_experts: int, world: int) -> list:
    """-> per rank r, int64 token indices sent to r, ascending (slot = position in that list)."""
    return [np.nonzero(row)[0].astype(np.int64) for row in goes_to(ids, num_local_experts, world)]


def send_map(ids: np.ndarray, num_local_experts: int, world: int, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """-> (map [T, R] int64 = r·chunk + slot of t on r, or -1; counts [R] int64): what ep_exchange.route returns."""
    to = goes_to(ids, num_local_experts, world)                                 # [R, T]
    slot = np.cumsum(to, axis=1) - to
    index_map = np.where(to, np.arange(world)[:, None] * chunk + slot, -1).T
    return index_map.astype(np.int64), to.sum(axis=1).astype(np.int64)


def local_ids(ids: np.ndarray, rank: int, num_local_experts: int) -> np.ndarray:
    """Global ids -> ids local to `rank` (g - rank·E for its experts), -1 for the others and for -1."""
    return np.where((ids >= 0) & (ids // num_local_experts == rank), ids - rank * num_local_experts, -1)
