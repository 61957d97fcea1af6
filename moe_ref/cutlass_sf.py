"""The SM100 block-scale byte order ("SfAtom") of CUTLASS, SPEC §4 step 2: the one formula.

A scale-factor matrix `sf [MN, KB]` (one UE8M0 byte per 32 K-elements, KB columns) is stored
in tiles of 128 rows x 4 columns, 512 bytes each, tiles ordered row-tile first; inside a
tile the bytes are ordered `[32 rows][4 row groups of 32][4 columns]`. Element (r, kb) lives at

    ((r // 128) · (KB // 4) + kb // 4) · 512 + (r % 32) · 16 + ((r % 128) // 32) · 4 + kb % 4

Requires MN % 128 == 0 and KB % 4 == 0 (the contract pads MN with zero rows first).
Every provider imports the formula from here: `sf_byte_offset` works on Python ints and on
any integer array type with `//`, `%`, `*`, `+` (Paddle, NumPy, torch, Triton block values).
The constants and `sf_byte_offset` import without Paddle (the Triton kernels use them on machines
that have none); the functions on Paddle tensors import it when called.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import paddle

SF_VEC_SIZE = 32                 # K-elements per scale byte on SM100
SF_TILE_ROWS = 128               # rows of one SfAtom tile
SF_TILE_COLS = 4                 # scale columns of one SfAtom tile
SF_ROW_GROUP = 32                # rows of one row group inside a tile
SF_TILE_BYTES = SF_TILE_ROWS * SF_TILE_COLS                       # 512
_ROW_STRIDE = SF_TILE_COLS * (SF_TILE_ROWS // SF_ROW_GROUP)       # 16 bytes between rows r and r+1 (same group)


def sf_byte_offset(r, kb, num_cols: int):
    """Flat byte offset of element (r, kb) of a `[MN, KB]` scale matrix in CUTLASS SM100 order.

    r, kb: row and column (ints or integer arrays of any library, broadcast together);
    num_cols: KB, a multiple of 4. Returns the same kind of value as r/kb.
    """
    tile = (r // SF_TILE_ROWS) * (num_cols // SF_TILE_COLS) + kb // SF_TILE_COLS
    return (tile * SF_TILE_BYTES + (r % SF_ROW_GROUP) * _ROW_STRIDE
            + ((r % SF_TILE_ROWS) // SF_ROW_GROUP) * SF_TILE_COLS + kb % SF_TILE_COLS)


# The same order as array dimensions: sf [..., MN, KB] with MN % 128 == KB % 4 == 0 reshaped to
# [..., MN // 128, KB // 4, 32, 4, 4] has dims (row tile, column tile, r % 32, (r % 128) // 32, kb % 4);
# SF_TILE_PERM (on the last 5 dims) brings them to (row tile, (r % 128) // 32, r % 32, column tile, kb % 4), whose
# reshape to [..., MN, KB // 4, 4] is row r, 128-wide K group kb // 4, byte kb % 4 (tests/test_cutlass_sf.py
# derives it from sf_byte_offset). For view-and-copy conversions where a gather through sf_byte_offset is slow.
SF_TILE_SHAPE = (SF_ROW_GROUP, SF_TILE_ROWS // SF_ROW_GROUP, SF_TILE_COLS)
SF_TILE_PERM = (0, 3, 2, 1, 4)


def check_sf_shape(num_rows: int, num_cols: int) -> None:
    """Raise ValueError unless [num_rows, num_cols] can be laid out in whole SfAtom tiles."""
    if num_rows % SF_TILE_ROWS or num_cols % SF_TILE_COLS or num_rows <= 0 or num_cols <= 0:
        raise ValueError(f"CUTLASS SF layout: expected [MN, KB] with MN a positive multiple of {SF_TILE_ROWS} "
                         f"and KB a positive multiple of {SF_TILE_COLS}, got [{num_rows}, {num_cols}]")


def sf_index_map(num_rows: int, num_cols: int) -> paddle.Tensor:
    """[MN, KB] int64: entry (r, kb) is the flat CUTLASS byte offset of element (r, kb).

    Scatter with it (`out_flat[map] = sf.flatten()`) to swizzle a row-major matrix.
    """
    import paddle

    check_sf_shape(num_rows, num_cols)
    r = paddle.arange(num_rows, dtype=paddle.int64).unsqueeze(1)
    kb = paddle.arange(num_cols, dtype=paddle.int64).unsqueeze(0)
    return sf_byte_offset(r, kb, num_cols)


def sf_inverse_map(num_rows: int, num_cols: int) -> paddle.Tensor:
    """[MN · KB] int64: entry p is the row-major index r · KB + kb of the element stored at byte p.

    The inverse permutation of `sf_index_map(...).flatten()`. Gather with it
    (`swizzled = flat.gather(inv)`) to swizzle, or scatter with it to unswizzle.
    """
    import paddle

    forward = sf_index_map(num_rows, num_cols).flatten()
    n = num_rows * num_cols
    return paddle.scatter(paddle.zeros([n], dtype=paddle.int64), forward, paddle.arange(n, dtype=paddle.int64))


def swizzle(sf: paddle.Tensor) -> paddle.Tensor:
    """Row-major `sf [..., MN, KB]` -> the same values in CUTLASS byte order, shape [..., MN, KB].

    Any dtype with a `gather` kernel (uint8, int32, float32); MN % 128 == 0, KB % 4 == 0.
    """
    import paddle

    mn, kbn = int(sf.shape[-2]), int(sf.shape[-1])
    inv = sf_inverse_map(mn, kbn)
    flat = sf.reshape([-1, mn * kbn])
    return paddle.gather(flat, inv, axis=1).reshape(sf.shape)


def unswizzle(sf: paddle.Tensor) -> paddle.Tensor:
    """Inverse of `swizzle`: CUTLASS-ordered `[..., MN, KB]` bytes -> row-major `[..., MN, KB]`."""
    import paddle

    mn, kbn = int(sf.shape[-2]), int(sf.shape[-1])
    fwd = sf_index_map(mn, kbn).flatten()
    flat = sf.reshape([-1, mn * kbn])
    return paddle.gather(flat, fwd, axis=1).reshape(sf.shape)
