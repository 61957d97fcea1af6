"""The CuTe kernel's walk over the tiles of a masked grouped GEMM (DeepGEMM's scheduler for masked experts): which
block each CTA of a cluster computes. Plain arithmetic with the select and max passed in, so that the kernel
(_sm90_masked, on device values) and the tests (tests/test_cute_gemm.py, on ints) run the same code.
"""
from __future__ import annotations


def expert_units(m_tiles, n_tiles, cluster_m: int):
    """Cluster tiles of an expert with m_tiles 128-row tiles (1 | 2 CTAs each: ceil(m_tiles · n_tiles /
    cluster_m)). Plain arithmetic: the kernel calls it on device values, the tests on ints."""
    return (m_tiles * n_tiles + cluster_m - 1) // cluster_m


def cluster_block(u, m_tiles, n_tiles, rank, cluster_m: int, select, imax):
    """The block (m-tile, n-tile, multicast) that CTA `rank` of a cluster works on in cluster tile u of an expert
    with m_tiles x n_tiles blocks (u < expert_units; DeepGEMM's walk of masked experts). cluster_m = 1: the
    block u, m fastest. cluster_m = 2: the pairs of m-tiles (0, 1), (2, 3), ... share an n-tile, m fastest,
    B multicast to both CTAs; an odd last m-tile is paired along N instead, n-tiles (0, 1), (2, 3), ..., no
    multicast, so no CTA idles on an expert with one m-tile or an odd count (the old walk left one CTA of the
    pair idle there); with n_tiles odd the expert's last pair has a second block at n-tile n_tiles, past N,
    which the CTA loads clamped and skips. select(cond, a, b) and imax: the DSL's on device values, Python's
    on ints (plain arithmetic, no branches: the same code runs in the kernel and in the tests)."""
    if cluster_m == 1:
        return u % m_tiles, u // m_tiles, False
    half = m_tiles // 2
    paired = half * n_tiles                       # the multicast tiles come first
    mc = u < paired
    h = imax(half, 1)
    return select(mc, u % h * 2 + rank, m_tiles - 1), select(mc, u // h, (u - paired) * 2 + rank), mc
