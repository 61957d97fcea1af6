# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,-all
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Scale conversion: from FP32 scales to the bytes the Blackwell GEMM reads
#
# An FP8 value means nothing without its scale: `x ≈ q · s`, one `s` per 128 values of a
# token ("1x128") or per 128x128 block of a weight (SPEC §3). Hopper's DeepGEMM takes those
# scales as float32. Blackwell's block-scaled tensor-core MMA
# (`tcgen05.mma.kind::mxf8f6f4.block_scale`, [PTX ISA](https://docs.nvidia.com/cuda/parallel-thread-execution/);
# the MXFP8 recipe of the [OCP MX spec](https://www.opencompute.org/documents/ocp-microscaling-formats-mx-v1-0-spec-final-pdf))
# takes **one 8-bit power-of-two exponent (UE8M0) per 32 values**, stored in a tiled byte
# order that CUTLASS calls the SfAtom layout
# ([CUTLASS: Blackwell SM100 GEMMs](https://github.com/NVIDIA/cutlass/blob/main/media/docs/cpp/blackwell_functionality.md)).
#
# This notebook follows one scale all the way:
#
# 1. FP32 scale `amax / 448`;
# 2. rounded **up** to a power of two (`ceil_to_ue8m0`), and why truncating (`bits >> 23`) breaks;
# 3. four UE8M0 bytes packed into one int32 word (what the quantization kernels emit);
# 4. weights: per-128x128-block scales expanded to per-row scales;
# 5. one byte per 32 K-elements (the 128 → 32 replication) and the CUTLASS tile swizzle, drawn;
# 6. `unpack_and_convert_scale` (blackwell_ops) and its inverse `cutlass_scale_to_fp32`, round trip.
#
# Everything is computed by `moe_ref` (reference), `backend.ops` (the contract and its provider)
# and `backend.ops.cutlass_sf` (the one swizzle formula); the notebook only calls, checks and
# draws (timings are in `04_performance`).

# %%
# Setup: quiet imports, seeded RNGs below.
import contextlib
import io
import logging
import warnings

warnings.filterwarnings("ignore")
# Importing Paddle prints advice to stderr when OMP_NUM_THREADS > 1 (`make` sets 2) and warns
# that ccache is missing; neither concerns these notebooks, and stderr must not vary by machine.
with contextlib.redirect_stderr(io.StringIO()):
    import paddle

# Paddle installs an INFO handler on the root logger: keep library INFO lines (matplotlib's
# font cache, the backend's provider choice) out of the outputs.
for name in ("matplotlib", "backend"):
    logging.getLogger(name).setLevel(logging.WARNING)

import numpy as np

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from moe_ref import fp8, layout, quant, routing
from moe_ref.fp8 import BYTES_PER_WORD, E4M3_MAX, UE8M0_BIAS
from moe_ref.metrics import calc_diff
from backend import ops
from backend.ops import cutlass_sf

# %matplotlib inline
np.set_printoptions(linewidth=110, precision=4)

# %% tags=["parameters"]
NUM_TOKENS = 8        # T
HIDDEN = 768          # H: S = 6 groups of 128 -> 2 packed words per row (the second half-full)
WEIGHT_ROWS = 256     # N of a weight [N, K=H]: two 128-row blocks
NUM_EXPERTS = 4       # E for the masked-layout part
TOP_K = 2
MAX_TOKEN_NUM = 8     # M: rows per expert (padded to 128 for the CUTLASS layout)
SEED = 0

# %%
paddle.seed(SEED)
rng = np.random.default_rng(SEED)
S = -(-HIDDEN // quant.GROUP_SIZE)
C = -(-S // BYTES_PER_WORD)
# Activations whose groups span several orders of magnitude, so the scales differ.
magnitude = 10.0 ** rng.uniform(-2, 1, size=(NUM_TOKENS, S))
x_np = (rng.normal(size=(NUM_TOKENS, S, quant.GROUP_SIZE)) * magnitude[..., None]).reshape(NUM_TOKENS, -1)[:, :HIDDEN]
x = paddle.to_tensor(x_np.astype(np.float32))
print(f"T={NUM_TOKENS}  H={HIDDEN}  S={S} groups  C={C} packed words per row")

# %% [markdown]
# ## 1. FP32 scales
#
# Per token and 128-wide group: `amax = max(|x|, 1e-4)`, `s = amax / 448`, `q = e4m3(x / s)`
# (`moe_ref.quant.per_token_group_quant`, SPEC §3). The largest value of each group lands
# exactly on ±448, the top of e4m3's range: no value overflows and the group uses the whole
# range of the format.

# %%
q32, s32 = quant.per_token_group_quant(x, use_ue8m0=False)
print("scale [T, S] float32, tokens 0..2:\n", s32.numpy()[:3])
deq32 = quant.dequant_per_token_group(q32, s32)
print(f"calc_diff(dequant, x) with FP32 scales: {calc_diff(deq32, x):.2e}")
assert calc_diff(deq32, x) < 1e-3      # DeepGEMM's bound for one FP8 quantization (SPEC §12)

# %% [markdown]
# ## 2. `ceil_to_ue8m0`, and why truncation breaks
#
# UE8M0 stores only an exponent: byte `e` means `2^(e-127)` (SPEC §2). A float32 `s` is
# `2^(E-127) · 1.m`, with `E = (bits >> 23) & 0xFF` its exponent field and `m` the 23-bit
# mantissa. The right power of two is the smallest one **>= s** (`ceil_to_ue8m0`): exponent
# field plus one when the mantissa is non-zero. Then `|x / s_ue8m0| <= 448` still holds.
#
# Taking just `bits >> 23` rounds **down** for every scale that is not already a power of
# two. Two serving engines shipped exactly that and got garbage and NaN on B200 (SPEC §2).

# %%
s_row = s32.numpy()[0]
bits = s_row.view(np.int32)
trunc = np.float32(2.0) ** (((bits >> 23) & 0xFF).astype(np.float32) - UE8M0_BIAS)   # the bug, for display
ceil_ = fp8.ceil_to_ue8m0(paddle.to_tensor(s_row)).numpy()
print(f"{'s (FP32)':>12} {'bits':>10} {'exp':>4} {'mantissa':>8} {'ceil (ours)':>12} {'bits>>23 (bug)':>14}")
for s_, b_, c_, t_ in zip(s_row, bits.tolist(), ceil_, trunc):
    print(f"{s_:12.4e} {b_ & 0xFFFFFFFF:#010x} {(b_ >> 23) & 0xFF:4d} {b_ & 0x7FFFFF:#8x} {c_:12.4e} {t_:14.4e}")
assert (ceil_ >= s_row).all() and (ceil_ < 2 * s_row).all()
assert (trunc <= s_row).all()

# %% [markdown]
# What the wrong rounding does. **(a) Broken pairing:** the data is quantized with one
# scale and the GEMM multiplies by another. If a kernel quantizes with the FP32 `s` but the
# packed scale was truncated to `2^floor(log2 s)`, every group comes back multiplied by
# `s_trunc / s`, somewhere in (0.5, 1]: a silent, group-dependent shrink.
# **(b) Overflow:** if the data is quantized *with* the truncated scale, `x / s_trunc` reaches up
# to `2 · 448 = 896`, far past e4m3's largest value. A cast that does not clamp turns that into
# NaN (PyTorch's classic cast: every `|v| > 464`, SPEC §1); ours clamps, which still destroys
# the largest values of the group.

# %%
s_all = s32.numpy()
s_trunc = np.float32(2.0) ** ((((s_all.view(np.int32)) >> 23) & 0xFF).astype(np.float32) - UE8M0_BIAS)
s_ceil = fp8.ceil_to_ue8m0(s32).numpy()
# (a) pairing broken: q computed with s, dequantized with s_trunc
deq_a = quant.dequant_per_token_group(q32, paddle.to_tensor(s_trunc))
# (b) data quantized with s_trunc: beyond +-448 before the cast
ratio = np.abs(x_np).reshape(NUM_TOKENS, S, -1) / s_trunc[..., None]
q_b = fp8.cast_to_e4m3(paddle.to_tensor((x_np.reshape(NUM_TOKENS, S, -1) / s_trunc[..., None]).reshape(NUM_TOKENS, -1)
                                         .astype(np.float32)))
deq_b = quant.dequant_per_token_group(q_b, paddle.to_tensor(s_trunc))
# correct: quantize with the ceil'ed UE8M0 scale
q_ue, s_ue = quant.per_token_group_quant(x, use_ue8m0=True)
deq_ue = quant.dequant_per_token_group(q_ue, s_ue)
assert np.array_equal(s_ue.numpy(), s_ceil)
print(f"{'variant':48s} calc_diff vs x")
print(f"{'FP32 scales':48s} {calc_diff(deq32, x):.2e}")
print(f"{'UE8M0, ceil (ours)':48s} {calc_diff(deq_ue, x):.2e}")
print(f"{'(a) quantized with s, scale truncated':48s} {calc_diff(deq_a, x):.2e}")
print(f"{'(b) quantized with truncated scale, clamped':48s} {calc_diff(deq_b, x):.2e}")
print(f"(b) values beyond 448: {(ratio > E4M3_MAX).sum()} of {ratio.size}; beyond 464 (NaN in a non-clamping cast): "
      f"{(ratio > 464).sum()}")
assert calc_diff(deq_ue, x) < 1e-3
assert calc_diff(deq_a, x) > 10 * calc_diff(deq_ue, x) and calc_diff(deq_b, x) > 10 * calc_diff(deq_ue, x)

# %% [markdown]
# Encoding never rounds silently: `ue8m0_encode` accepts only exact powers of two, so an FP32
# scale that slipped through unrounded is an error, not a truncation.

# %%
try:
    fp8.ue8m0_encode(s32)
    raise AssertionError("encoding a non-power-of-two must raise")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 3. Packing four bytes into an int32
#
# Kernels move scales 4 bytes at a time: word `p` of a row holds groups `4p..4p+3`,
# little-endian (byte `j` of the word = group `4p+j`), missing groups are byte 0 (SPEC §2).
# In hex the **rightmost** two digits are group `4p`. With `S = 6` groups, word 1 holds
# groups 4 and 5 and two zero bytes.

# %%
b_ue = fp8.ue8m0_encode(s_ue)                              # [T, S] uint8
words = fp8.pack_ue8m0(b_ue)                               # [T, C] int32
print("UE8M0 bytes [T, S] (e: scale = 2^(e-127)):\n", b_ue.numpy())
print("packed words [T, C] as hex:")
for t in range(NUM_TOKENS):
    print(f"  token {t}: " + "  ".join(f"{int(w) & 0xFFFFFFFF:08x}" for w in words.numpy()[t]))

# %%
w0 = int(words.numpy()[0, 0]) & 0xFFFFFFFF
assert [(w0 >> (8 * j)) & 0xFF for j in range(4)] == b_ue.numpy()[0, :4].tolist()   # little-endian
assert np.array_equal(fp8.unpack_ue8m0(words, S).numpy(), b_ue.numpy())              # round trip
if S % BYTES_PER_WORD:
    assert ((words.numpy()[:, -1].astype(np.int64) & 0xFFFFFFFF) >> (8 * (S % BYTES_PER_WORD)) == 0).all()

# %% [markdown]
# **Backend.** `backend.ops.per_token_quant(x, 128, use_ue8m0=True)` returns the packed words
# directly (as the Blackwell quantization kernel does). Same bytes and same FP8 data as the
# reference:

# %%
provider = ops.get_provider()
bq, bwords = provider.per_token_quant(x, 128, True)
print("provider:", provider.name, "| packed scale", list(bwords.shape), str(bwords.dtype))
assert np.array_equal(bwords.numpy(), words.numpy())
assert np.array_equal(bq.view(paddle.uint8).numpy(), q_ue.view(paddle.uint8).numpy())

# %% [markdown]
# ## 4. Weight scales: per block → per row
#
# A weight `w [N, K]` has one scale per 128x128 block, `[ceil(N/128), ceil(K/128)]`. The SM100
# kernel wants one scale row per **output row** (it treats A and B alike: both are "MN"
# operands with a scale per row and K-group), so the block scale is repeated over its 128
# rows: `sf_row[n, kb] = sf[n // 128, kb]`, shape `[N, ceil(K/128)]`, then packed to
# `[N, ceil(ceil(K/128)/4)]` int32 (SPEC §3).

# %%
# One magnitude per 128x128 block, so that the block scales differ.
block_mag = 10.0 ** rng.uniform(-1, 1, size=(-(-WEIGHT_ROWS // 128), S))
w_np = rng.normal(size=(WEIGHT_ROWS, HIDDEN)) * 0.02 * np.kron(block_mag, np.ones((128, 128)))[:WEIGHT_ROWS, :HIDDEN]
w = paddle.to_tensor(w_np.astype(np.float32))
wq, w_scale = quant.per_block_quant(w, use_ue8m0=True)
w_rows = quant.expand_block_scale_to_rows(w_scale, WEIGHT_ROWS)
w_words = fp8.pack_ue8m0(fp8.ue8m0_encode(w_rows))
print("block scales", list(w_scale.shape), "-> per-row", list(w_rows.shape), "-> packed", list(w_words.shape),
      str(w_words.dtype))
print("UE8M0 bytes of block rows 0 and 1:\n", fp8.ue8m0_encode(w_scale).numpy())
for n in (0, 127, 128, WEIGHT_ROWS - 1):
    print(f"  row {n:3d}: " + "  ".join(f"{int(v) & 0xFFFFFFFF:08x}" for v in w_words.numpy()[n]))
assert np.array_equal(w_rows.numpy()[127], w_scale.numpy()[0]) and np.array_equal(w_rows.numpy()[128], w_scale.numpy()[1])

# %% [markdown]
# ## 5. 128 → 32 replication and the CUTLASS tile swizzle
#
# **Replication.** The MMA reads one scale byte per 32 K-elements. Our recipes have one scale
# per 128, so each byte is simply written 4 times: `sf32[r, kb] = byte(r, kb // 4)`, with
# `KB = 16·C` columns (4 groups per word × 4 copies). The math is unchanged (SPEC §3).
#
# **Swizzle.** The bytes are then stored in tiles of 128 rows × 4 columns (512 bytes), tiles
# ordered row-tile first; inside a tile, 32 lines of 16 bytes, line `i` holding rows
# `i, i+32, i+64, i+96`, 4 columns each: one 128-bit load per thread of a warp fetches a
# whole tile. CUTLASS writes the tile as the CuTe layout `((32,4),(SFVecSize,4)):((16,4),(0,1))`
# (`SfKMajorAtom` of `Sm1xxBlockScaledBasicChunk` in `include/cutlass/detail/sm100_blockscaled_layout.hpp`);
# the stride 0 over `SFVecSize` is the "one byte serves 32 K-elements" of the replication above.
# Element `(r, kb)` of the `[MN, KB]` matrix goes to byte (SPEC §4,
# `backend.ops.cutlass_sf.sf_byte_offset`):
#
#     ((r // 128) · (KB // 4) + kb // 4) · 512  +  (r % 32) · 16  +  ((r % 128) // 32) · 4  +  kb % 4

# %%
for r, kb in [(0, 0), (0, 1), (0, 3), (0, 4), (1, 0), (32, 0), (64, 2), (127, 3), (128, 0)]:
    print(f"(r={r:3d}, kb={kb}) -> byte {cutlass_sf.sf_byte_offset(r, kb, 8):5d}   (KB = 8)")
assert sorted(cutlass_sf.sf_index_map(256, 8).numpy().ravel().tolist()) == list(range(256 * 8))   # a permutation

# %% [markdown]
# **Picture.** Left: the `[MN=256, KB=8]` scale matrix of one expert, each cell coloured by the
# byte offset it is stored at (four tiles: row tile 0 = bytes 0..1023, row tile 1 =
# 1024..2047). Right: one 512-byte tile in memory, 32 lines of 16 bytes; each byte is labelled
# with the `(row, column)` it holds. Rows 0, 32, 64, 96 share line 0.

# %%
def draw_swizzle(ax_l, ax_r, mn, kb):
    offsets = cutlass_sf.sf_index_map(mn, kb).numpy()
    im = ax_l.imshow(offsets, aspect="auto", cmap="viridis", interpolation="nearest")
    for t in range(mn // cutlass_sf.SF_TILE_ROWS + 1):
        ax_l.axhline(t * cutlass_sf.SF_TILE_ROWS - 0.5, color="w", lw=1.5)
    for c in range(kb // cutlass_sf.SF_TILE_COLS + 1):
        ax_l.axvline(c * cutlass_sf.SF_TILE_COLS - 0.5, color="w", lw=1.5)
    ax_l.set_xlabel("kb (one byte per 32 K-elements)")
    ax_l.set_ylabel("row r (token slot or weight row)")
    ax_l.set_title(f"byte offset of (r, kb), [MN={mn}, KB={kb}]", fontsize=10)
    plt.colorbar(im, ax=ax_l, fraction=0.05)
    inv = cutlass_sf.sf_inverse_map(mn, kb).numpy()[:cutlass_sf.SF_TILE_BYTES]     # row-major index held by byte p
    rows, cols = inv // kb, inv % kb
    lines = cutlass_sf.SF_TILE_BYTES // 16
    ax_r.imshow((rows // cutlass_sf.SF_ROW_GROUP).reshape(lines, 16), aspect="auto", cmap="Pastel1",
                interpolation="nearest", vmin=0, vmax=8)
    for p in range(cutlass_sf.SF_TILE_BYTES):
        i, j = divmod(p, 16)
        if i < 4 or i == lines - 1:
            ax_r.text(j, i, f"{rows[p]},{cols[p]}", ha="center", va="center", fontsize=6.5)
    ax_r.text(7.5, 16, "⋮", ha="center", va="center", fontsize=14)
    ax_r.set_xticks(range(16))
    ax_r.set_yticks([0, 1, 2, 3, lines - 1])
    ax_r.set_xlabel("byte within the 16-byte line")
    ax_r.set_ylabel("line (bytes 16·line ..)")
    ax_r.set_title("tile 0 in memory: byte → (row, kb); colour = row group r // 32", fontsize=10)


fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.6]})
draw_swizzle(ax_l, ax_r, 256, 8)
fig.text(0.01, 0.01, "CPU · notebooks/02_scale_conversion.ipynb (make notebooks)", fontsize=7, color="0.4")
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 6. `unpack_and_convert_scale` and its inverse
#
# `unpack_and_convert_scale(scale, masked_m)` (blackwell_ops, SPEC §4) does section 5 in one
# go: packed UE8M0 int32 `[E, MN, C]` (any strides: the MN-major view out of the permute is
# fine) → uint8 `[E, align(MN,128), 16·C]` in CUTLASS byte order. With `masked_m`
# (activations), rows at or past `masked_m[e]` become zero bytes. Upstream requires
# `MN % 128 == 0` and writes out of range otherwise; ours pads MN to a multiple of 128 with
# zero bytes. Our inverse `cutlass_scale_to_fp32` turns the bytes back into FP32 scales, which
# makes a round trip testable.
#
# **Activations**: UE8M0 scales packed by the quantizer, permuted to the masked layout (01),
# then converted.

# %%
logits = paddle.to_tensor(rng.normal(size=(NUM_TOKENS, NUM_EXPERTS)).astype(np.float32))
_, topk_ids = routing.softmax_topk(logits, TOP_K)
lay = layout.prefill_permute_to_masked_gemm(q_ue, words, topk_ids, NUM_EXPERTS, MAX_TOKEN_NUM)
masked_m = lay.token_nums_per_expert
scale_view = lay.permute_scale.logical_view()             # [E, M, C] int32, MN-major strides
sfa = ops.unpack_and_convert_scale(scale_view, masked_m)
print("permuted packed scales", list(scale_view.shape), "strides", lay.permute_scale.strides,
      "| masked_m", masked_m.numpy().ravel().tolist())
print("CUTLASS SF bytes", list(sfa.shape), str(sfa.dtype), f"(MN {MAX_TOKEN_NUM} padded to {int(sfa.shape[1])}, "
      f"KB = 16·C = {16 * C})")
print("expert 0, first 32 bytes:", sfa.numpy()[0].ravel()[:32].tolist())
print("  bytes 0-3: row 0, kb 0..3 (group 0, 4 copies); 4-15: rows 32, 64, 96 (past masked_m: 0); 16-19: row 1")

# %% [markdown]
# **Check against the formula.** For each valid row `r` and column `kb`, byte
# `sf_byte_offset(r, kb, KB)` of the expert's buffer must hold group `kb // 4`'s UE8M0 byte;
# every other byte (invalid rows, padding rows, padding groups) is zero.

# %%
sfa_np = sfa.numpy().reshape(NUM_EXPERTS, -1)
perm_bytes = fp8.unpack_ue8m0(lay.permute_scale.to_contiguous(), S).numpy()          # [E, M, S]
kb_n = 16 * C
for e in range(NUM_EXPERTS):
    m_e = int(masked_m.numpy()[e, 0])
    r, kb = np.meshgrid(np.arange(m_e), np.arange(kb_n), indexing="ij")
    expected = np.zeros((m_e, kb_n), np.uint8)
    expected[:, : 4 * S] = np.repeat(perm_bytes[e, :m_e], 4, axis=1)               # 128 -> 32 replication
    got = sfa_np[e][cutlass_sf.sf_byte_offset(r, kb, kb_n)]
    assert np.array_equal(got, expected), e
    assert sfa_np[e].astype(np.int64).sum() == expected.astype(np.int64).sum()      # nothing else is non-zero
print("every byte is where the formula says; rows past masked_m are zero")

# %% [markdown]
# **Round trip.** `cutlass_scale_to_fp32` must give back exactly the power-of-two scales of the
# valid rows (each 128-group's 4 copies must agree, or it raises).

# %%
back = ops.cutlass_scale_to_fp32(sfa, MAX_TOKEN_NUM).numpy()                         # [E, M, KB/4]
for e in range(NUM_EXPERTS):
    m_e = int(masked_m.numpy()[e, 0])
    rows_tokens = np.nonzero(lay.permuted_indice_map.numpy() // MAX_TOKEN_NUM == e)[0]   # token of each slot, in order
    np.testing.assert_array_equal(back[e, :m_e, :S], s_ue.numpy()[rows_tokens])
print("activations: unpack_and_convert_scale -> cutlass_scale_to_fp32 == UE8M0 scales of the permuted tokens")

# %% [markdown]
# **Weights** (no `masked_m`): the per-row packed scales of section 4 for `E` experts.

# %%
w_words_e = paddle.stack([w_words] * NUM_EXPERTS)                                   # [E, N, C]
sfb = ops.unpack_and_convert_scale(w_words_e)
back_w = ops.cutlass_scale_to_fp32(sfb, WEIGHT_ROWS).numpy()
print("weight SF bytes", list(sfb.shape), "| round trip", list(back_w.shape))
for e in range(NUM_EXPERTS):
    np.testing.assert_array_equal(back_w[e, :, :S], w_rows.numpy())
print("weights: round trip exact")

# %% [markdown]
# **Failing safely.** Three inputs upstream would accept and misuse:

# %%
cases = {
    "FP32 scales instead of packed UE8M0": lambda: ops.unpack_and_convert_scale(s32.unsqueeze(0)),
    "a NaN byte (255) in a word": lambda: ops.unpack_and_convert_scale(paddle.full([1, 4, 1], -1, dtype=paddle.int32)),
    "masked_m larger than MN": lambda: ops.unpack_and_convert_scale(w_words_e, paddle.to_tensor(
        [WEIGHT_ROWS + 1] + [0] * (NUM_EXPERTS - 1), dtype=paddle.int32)),
}
for what, call in cases.items():
    try:
        call()
        raise AssertionError(f"{what}: must raise")
    except (TypeError, ValueError) as err:
        print(f"{what}:\n    {type(err).__name__}: {err}")

# %% [markdown]
# ## Summary
#
# | step | function | in → out | rule |
# |---|---|---|---|
# | FP32 scale | `quant.per_token_group_quant` / `per_block_quant` | `[T, H]` → `[T, S]` fp32 | `s = max(amax, 1e-4) / 448` |
# | UE8M0 | `fp8.ceil_to_ue8m0` | fp32 → fp32 power of two | round **up**; `bits >> 23` rounds down and breaks the pairing |
# | encode + pack | `fp8.ue8m0_encode`, `fp8.pack_ue8m0` | `[.., S]` → `[.., ceil(S/4)]` int32 | little-endian, pad byte 0, non-powers of two rejected |
# | weight rows | `quant.expand_block_scale_to_rows` | `[N/128, K/128]` → `[N, K/128]` | `sf_row[n] = sf[n // 128]` |
# | to CUTLASS | `backend.ops.unpack_and_convert_scale` | `[E, MN, C]` int32 → `[E, align(MN,128), 16·C]` uint8 | 4 copies per byte, SfAtom swizzle, rows ≥ masked_m zero |
# | inverse | `backend.ops.cutlass_scale_to_fp32` | uint8 → `[E, rows, KB/4]` fp32 | exact round trip (asserted above) |
#
# Next: `03_correctness` measures what these UE8M0 scales cost in accuracy across the layer.
