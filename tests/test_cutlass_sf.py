"""The CUTLASS SM100 scale-factor byte order (SPEC §4 step 2), checked against its description.

Integer outputs: exact.
"""
import itertools

import numpy as np
import paddle
import pytest

from moe_ref import cutlass_sf
from moe_ref.cutlass_sf import (SF_TILE_BYTES, SF_TILE_COLS, SF_TILE_ROWS, check_sf_shape, sf_byte_offset,
                                    sf_index_map, sf_inverse_map, swizzle, unswizzle)


def _byte_order_from_description(mn: int, kb: int) -> list[tuple[int, int]]:
    """(r, kb) of each byte, in storage order, built from the prose of SPEC §4: tiles of 128 rows x 4
    columns, row-tile first; inside a tile [32 rows][4 row groups of 32][4 columns]."""
    order = []
    for tile_r, tile_c in itertools.product(range(mn // 128), range(kb // 4)):
        for r32, group, col in itertools.product(range(32), range(4), range(4)):
            order.append((tile_r * 128 + group * 32 + r32, tile_c * 4 + col))
    return order


def test_constants():
    assert (SF_TILE_ROWS, SF_TILE_COLS, SF_TILE_BYTES, cutlass_sf.SF_VEC_SIZE) == (128, 4, 512, 32)


@pytest.mark.parametrize("r, kb, num_cols, expected", [
    (0, 0, 8, 0), (0, 1, 8, 1), (0, 3, 8, 3),      # columns inside a tile: consecutive bytes
    (1, 0, 8, 16),                                 # next row of the same group of 32: 16 bytes on
    (32, 0, 8, 4), (64, 0, 8, 8), (96, 0, 8, 12),  # row groups of 32 interleave by 4 bytes
    (31, 0, 8, 31 * 16), (127, 3, 8, 511),         # last byte of the first tile
    (0, 4, 8, 512),                                # second column tile
    (128, 0, 8, 1024), (128, 0, 4, 512),           # second row tile comes after all column tiles
    (130, 5, 8, (2 + 1) * 512 + 2 * 16 + 1),
])
def test_offset_golden(r, kb, num_cols, expected):
    assert sf_byte_offset(r, kb, num_cols) == expected


@pytest.mark.parametrize("mn, kb", [(128, 4), (128, 8), (256, 12)])
def test_index_map_matches_description(mn, kb):
    inv = sf_inverse_map(mn, kb).numpy()
    expected = [r * kb + c for r, c in _byte_order_from_description(mn, kb)]
    np.testing.assert_array_equal(inv, np.array(expected))
    fwd = sf_index_map(mn, kb).numpy()
    assert fwd.shape == (mn, kb)
    np.testing.assert_array_equal(np.sort(fwd.ravel()), np.arange(mn * kb))      # a permutation
    np.testing.assert_array_equal(inv[fwd.ravel()], np.arange(mn * kb))           # inverse of each other


def test_offset_works_on_numpy_and_paddle_alike():
    r, c = np.meshgrid(np.arange(256), np.arange(16), indexing="ij")
    np.testing.assert_array_equal(sf_byte_offset(r, c, 16), sf_index_map(256, 16).numpy())


def test_swizzle_round_trip_and_batch():
    x = paddle.arange(2 * 256 * 8, dtype=paddle.int32).reshape([2, 256, 8])
    s = swizzle(x)
    assert s.shape == x.shape
    fwd = sf_index_map(256, 8).numpy().ravel()
    for e in range(2):
        np.testing.assert_array_equal(s.numpy()[e].ravel()[fwd], x.numpy()[e].ravel())
    np.testing.assert_array_equal(unswizzle(s).numpy(), x.numpy())
    u8 = (x % 251).astype(paddle.uint8)
    np.testing.assert_array_equal(unswizzle(swizzle(u8)).numpy(), u8.numpy())


@pytest.mark.parametrize("mn, kb", [(100, 4), (128, 6), (0, 4), (128, 0)])
def test_bad_shapes(mn, kb):
    with pytest.raises(ValueError, match="multiple of 128"):
        check_sf_shape(mn, kb)
    with pytest.raises(ValueError, match=rf"\[{mn}, {kb}\]"):
        sf_index_map(mn, kb)


@pytest.mark.parametrize("mn, kb", [(128, 4), (256, 12), (384, 8)])
def test_tile_dims_match_the_byte_formula(mn, kb):
    """SF_TILE_SHAPE / SF_TILE_PERM (the view-and-copy form of the order) against sf_byte_offset: element (r, kb)
    of the [MN, KB // 4, 4] result must be the byte at sf_byte_offset(r, kb) of the stored matrix."""
    import numpy as np

    from moe_ref.cutlass_sf import SF_TILE_COLS, SF_TILE_PERM, SF_TILE_ROWS, SF_TILE_SHAPE, sf_byte_offset
    stored = np.arange(mn * kb, dtype=np.int64)                 # each byte holds its own offset
    tiles = stored.reshape(mn // SF_TILE_ROWS, kb // SF_TILE_COLS, *SF_TILE_SHAPE)
    got = tiles.transpose(*SF_TILE_PERM).reshape(mn, kb // SF_TILE_COLS, SF_TILE_COLS)
    r, c = np.meshgrid(np.arange(mn), np.arange(kb), indexing="ij")
    want = sf_byte_offset(r, c, kb).reshape(mn, kb // SF_TILE_COLS, SF_TILE_COLS)
    assert (got == want).all()
    assert not (tiles.transpose(0, 1, 2, 3, 4).reshape(mn, -1, SF_TILE_COLS) == want).all()  # the perm matters
