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
# 2. rounded to a power of two: the three rounding rules in use (FLOOR, RCEIL, truncation) and
#    why truncating `amax / 448` breaks;
# 3. four UE8M0 bytes packed into one int32 word (what the quantization kernels emit);
# 4. weights: per-128x128-block scales expanded to per-row scales;
# 5. one byte per 32 K-elements (the 128 → 32 replication) and the CUTLASS tile swizzle, drawn;
# 6. `unpack_and_convert_scale` (blackwell_ops) and its inverse `cutlass_scale_to_fp32`, round trip.
#
# Everything is computed by `moe_ref` (reference), `backend.ops` (the contract and its provider)
# and `moe_ref.cutlass_sf` (the one swizzle formula). Section 5 derives the swizzle a second
# time, independently, the way Triton's block-scaled matmul tutorial and torchao write it, and
# checks the provider's bytes against that derivation and against golden offsets (timings are
# in `04_performance`). Notebook `00_fp8_primer` introduces e4m3, the amax floor and `calc_diff`.

# %%
# Setup. Importing Paddle emits two known notices that say nothing about these notebooks:
# "No ccache found" (a UserWarning, filtered where it arises, in moe_ref/_paddle.py) and, when
# OMP_NUM_THREADS > 1 (`make` sets 2), advice about OMP_NUM_THREADS printed to stderr. Exactly
# those advice lines are dropped here; any other warning or stderr line of the import shows.
import contextlib
import io
import logging
import sys

_import_stderr = io.StringIO()
with contextlib.redirect_stderr(_import_stderr):
    from moe_ref._paddle import paddle
_PADDLE_OMP_ADVICE = ("WARNING: OMP_NUM_THREADS set to", "PLEASE USE OMP_NUM_THREADS WISELY")
sys.stderr.write("".join(line for line in _import_stderr.getvalue().splitlines(True)
                         if not line.startswith(_PADDLE_OMP_ADVICE)))

# Paddle installs an INFO handler on the root logger: keep library INFO lines (matplotlib's
# font cache, the backend's provider choice) out of the outputs. Warnings still show.
for name in ("matplotlib", "backend"):
    logging.getLogger(name).setLevel(logging.WARNING)

import numpy as np

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from moe_ref import fp8, layout, quant, routing
from moe_ref.fp8 import BYTES_PER_WORD, E4M3_MAX, UE8M0_BIAS, align
from moe_ref.metrics import calc_diff
from backend import ops
from moe_ref import cutlass_sf
from nbtools import md, show

# %matplotlib inline
np.set_printoptions(linewidth=110, precision=4)

# %% tags=["parameters"]
NUM_TOKENS = 8        # T, at least 1
HIDDEN = 768          # H: a multiple of 128, S groups of 128 (768: 6 groups -> 2 packed words, the second half-full)
WEIGHT_ROWS = 256     # N, at least 1, rows of a weight [N, H] (256: two 128-row blocks)
NUM_EXPERTS = 4       # E, at least 1, for the masked-layout part
TOP_K = 2             # K_top, 1 to E
MAX_TOKEN_NUM = None  # M: rows per expert (padded to 128 for the CUTLASS layout); None: T, the worst case
SEED = 0

# %%
paddle.seed(SEED)
rng = np.random.default_rng(SEED)
S = -(-HIDDEN // quant.GROUP_SIZE)
C = -(-S // BYTES_PER_WORD)
M = NUM_TOKENS if MAX_TOKEN_NUM is None else MAX_TOKEN_NUM
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
# ## 2. Rounding a scale to a power of two: FLOOR, RCEIL, truncation
#
# UE8M0 stores only an exponent: byte `e` means `2^(e-127)` (SPEC §2). A float32 `s` is
# `2^(E-127) · 1.m`, with `E = (bits >> 23) & 0xFF` its exponent field and `m` the 23-bit
# mantissa. Three rules for turning a block's `amax` into a power-of-two scale are in use, and
# the field names them:
#
# | rule | scale | where it is used | `amax / s` lands in |
# |---|---|---|---|
# | **FLOOR** | `2^(floor(log2 amax) − 8)`, 8 = exponent of e4m3's largest power of two (256) | the OCP MX v1.0 spec's reference conversion | [256, 512): values above 448 are clamped |
# | **RCEIL** (round up) | `2^ceil(log2(amax / 448))` | cuBLAS / NVIDIA's MXFP8 recipes, DeepGEMM's `ceil_to_ue8m0`; ours (`moe_ref.fp8.ceil_to_ue8m0`) | (224, 448]: nothing clamped |
# | **truncation** of `amax / 448` | `2^floor(log2(amax / 448))`, i.e. `bits >> 23` of the FP32 scale | nobody on purpose: the bug | [448, 896): up to half the range clamped |
#
# (FLOOR and RCEIL are the names of torchao's `ScaleCalculationMode`, which cites the OCP spec for
# FLOOR and the cuBLAS documentation, "Computing scaling and conversion factors for FP8 with
# UE8M0 scales", for RCEIL.) RCEIL never clamps and uses at least half of e4m3's top octave; FLOOR keeps the block's
# largest values one step nearer the top but clamps those that land in (448, 512). Truncation
# is what happens when an FP32 scale that is not a power of two is packed by taking its
# exponent field: sglang hit it on B200 ([issue #12878](https://github.com/sgl-project/sglang/issues/12878),
# fixed by requantizing weight scales in [PR #13067](https://github.com/sgl-project/sglang/pull/13067):
# DeepGEMM's Blackwell packer takes `value >> 23` of each FP32 scale) and vLLM on SM120
# ([PR #51372](https://github.com/vllm-project/vllm/pull/51372): all-NaN DeepGEMM output with
# non-power-of-two weight scales), SPEC §2.
#
# First the three rules on the scales of token 0, written out inline (a few lines each) and
# checked against the package where it has them:

# %%
def scale_floor_ocp(amax):
    return np.float32(2.0) ** (np.floor(np.log2(amax)) - 8)          # OCP MX: 8 = floor(log2(448))


def scale_rceil(amax):
    return np.float32(2.0) ** np.ceil(np.log2(amax / np.float32(E4M3_MAX)))


def scale_trunc(s_fp32):
    exp_field = (s_fp32.astype(np.float32).view(np.int32) >> 23) & 0xFF   # the bug: drop the mantissa
    return np.float32(2.0) ** (exp_field.astype(np.float32) - UE8M0_BIAS)


s_all = s32.numpy()
amax_all = np.maximum(np.abs(x.numpy().reshape(NUM_TOKENS, S, -1)).max(axis=-1), np.float32(quant.DEEPGEMM_AMAX_FLOOR))
rules = {"FLOOR (OCP)": scale_floor_ocp(amax_all), "RCEIL (ours)": scale_rceil(amax_all),
         "truncation": scale_trunc(s_all)}
np.testing.assert_array_equal(rules["RCEIL (ours)"], fp8.ceil_to_ue8m0(s32).numpy())   # the package's RCEIL
bits = s_all[0].view(np.int32)
print(f"{'s = amax/448':>12} {'bits':>10} {'exp':>4} {'mantissa':>8} " + " ".join(f"{k:>13}" for k in rules))
for g in range(S):
    b_ = int(bits[g])
    print(f"{s_all[0, g]:12.4e} {b_ & 0xFFFFFFFF:#010x} {(b_ >> 23) & 0xFF:4d} {b_ & 0x7FFFFF:#8x} "
          + " ".join(f"{v[0, g]:13.4e}" for v in rules.values()))
assert (rules["RCEIL (ours)"] >= s_all).all() and (rules["RCEIL (ours)"] < 2 * s_all).all()
assert (rules["truncation"] <= s_all).all()

# %% [markdown]
# What each rule does to the data. Each quantizes `x` with its own scale (`q = e4m3(clamp(x / s))`)
# and dequantizes with the same scale; the table counts the clamped values and measures the
# error (`calc_diff`, 0 = exact; notebook 00 explains it). A fourth row shows the bug in its
# other form, a **broken pairing**: data quantized with the FP32 `s` while the packed scale was
# truncated, so every group comes back multiplied by `s_trunc / s`, somewhere in (0.5, 1].
# With a cast that does not clamp, values beyond 464 become NaN (PyTorch's classic cast, SPEC §1).

# %%
groups = x.numpy().reshape(NUM_TOKENS, S, -1)             # float32, as the quantizer sees it
rule_rows = {}
for name, s_rule in rules.items():
    v = groups / s_rule[..., None]
    q = fp8.cast_to_e4m3(paddle.to_tensor(v.reshape(NUM_TOKENS, -1).astype(np.float32)))
    deq = quant.dequant_per_token_group(q, paddle.to_tensor(s_rule.astype(np.float32)))
    rule_rows[name] = {"clamped": int((np.abs(v) > E4M3_MAX).sum()), "nan": int((np.abs(v) > 464).sum()),
                       "calc_diff": calc_diff(deq, x)}
deq_pair = quant.dequant_per_token_group(q32, paddle.to_tensor(rules["truncation"]))
rule_rows["broken pairing (q with s, scale truncated)"] = {"clamped": 0, "nan": 0, "calc_diff": calc_diff(deq_pair, x)}
rule_rows["FP32 scales (no rounding)"] = {"clamped": 0, "nan": 0, "calc_diff": calc_diff(deq32, x)}
n_vals = groups.size
print(f"{'rule':44s} {'clamped':>8s} {'NaN if not clamped':>19s} {'calc_diff vs x':>15s}   ({n_vals} values)")
for name, r in rule_rows.items():
    print(f"{name:44s} {r['clamped']:8d} {r['nan']:19d} {r['calc_diff']:15.2e}")
q_ue, s_ue = quant.per_token_group_quant(x, use_ue8m0=True)
deq_ue = quant.dequant_per_token_group(q_ue, s_ue)
assert np.array_equal(s_ue.numpy(), rules["RCEIL (ours)"])
assert calc_diff(deq_ue, x) < 1e-3                                    # DeepGEMM's bound for one quantization
assert abs(calc_diff(deq_ue, x) / rule_rows["RCEIL (ours)"]["calc_diff"] - 1) < 0.01   # same rule, same error
assert rule_rows["RCEIL (ours)"]["clamped"] == 0 and rule_rows["truncation"]["clamped"] > 0
worst_ok = max(rule_rows["RCEIL (ours)"]["calc_diff"], rule_rows["FLOOR (OCP)"]["calc_diff"])
bad = min(rule_rows["truncation"]["calc_diff"], rule_rows["broken pairing (q with s, scale truncated)"]["calc_diff"])
if NUM_TOKENS * S >= 8:     # on a handful of groups a truncation can land just above 448 and cost little
    assert bad > worst_ok
md(f"RCEIL and FLOOR cost about the same here (`calc_diff` {rule_rows['RCEIL (ours)']['calc_diff']:.1e} and "
   f"{rule_rows['FLOOR (OCP)']['calc_diff']:.1e}; FLOOR clamped {rule_rows['FLOOR (OCP)']['clamped']} of {n_vals} "
   f"values). Truncation clamped {rule_rows['truncation']['clamped']} values "
   f"({rule_rows['truncation']['nan']} would be NaN without the clamp) and the broken pairing shrinks every group: "
   f"{rule_rows['truncation']['calc_diff'] / worst_ok:.1f}x and "
   f"{rule_rows['broken pairing (q with s, scale truncated)']['calc_diff'] / worst_ok:.1f}x the error of the worse of "
   f"RCEIL and FLOOR. Ours is RCEIL, as DeepGEMM's; FastDeploy's `per_token_quant` "
   f"computes RCEIL of `amax/448 + 5e-7` (notebook 00 shows when that bias changes a scale).")

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
# In hex the **rightmost** two digits are group `4p` (the sentence after the table spells it
# out for this `S`).

# %%
b_ue = fp8.ue8m0_encode(s_ue)                              # [T, S] uint8
words = fp8.pack_ue8m0(b_ue)                               # [T, C] int32
print("UE8M0 bytes [T, S] (e: scale = 2^(e-127)):\n", b_ue.numpy())
print("packed words [T, C] as hex:")
for t in range(NUM_TOKENS):
    print(f"  token {t}: " + "  ".join(f"{int(w) & 0xFFFFFFFF:08x}" for w in words.numpy()[t]))
last = C - 1
md(f"With `S = {S}` groups each row packs into `C = {C}` words; the last word (word {last}) holds groups "
   f"{4 * last}..{S - 1}" + (f" and {4 * C - S} zero byte(s) (the leftmost hex digits)." if S % 4 else " (it is full)."))

# %%
w0 = int(words.numpy()[0, 0]) & 0xFFFFFFFF
assert [(w0 >> (8 * j)) & 0xFF for j in range(min(4, S))] == b_ue.numpy()[0, :4].tolist()   # little-endian
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
print("UE8M0 bytes of the block scales [ceil(N/128), S]:\n", fp8.ue8m0_encode(w_scale).numpy())
show_rows = sorted({0, min(127, WEIGHT_ROWS - 1), min(128, WEIGHT_ROWS - 1), WEIGHT_ROWS - 1})
for n in show_rows:
    print(f"  row {n:4d} (block {n // 128}): " + "  ".join(f"{int(v) & 0xFFFFFFFF:08x}" for v in w_words.numpy()[n]))
np.testing.assert_array_equal(w_rows.numpy(), np.repeat(w_scale.numpy(), 128, axis=0)[:WEIGHT_ROWS])   # sf[n // 128]

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
# Element `(r, kb)` of the `[MN, KB]` matrix goes to byte (SPEC §4, the package's
# `moe_ref.cutlass_sf.sf_byte_offset`, which the providers use):
#
#     ((r // 128) · (KB // 4) + kb // 4) · 512  +  (r % 32) · 16  +  ((r % 128) // 32) · 4  +  kb % 4
#
# **An independent derivation.** Checking the provider's bytes against that same function would
# be circular. Triton's block-scaled matmul tutorial (`python/tutorials/10-block-scaled-matmul.py`)
# writes the scale layout as a 5-D shape `(MN/128, K/32/4, 32, 4, 4)`, and torchao's `to_blocked`
# (`torchao/prototype/mx_formats/utils.py`) produces it with two reshapes and a transpose.
# In numpy, from a row-major `[MN, KB]` matrix:
#
#     view as (MN/128, 4, 32, KB/4, 4)    = (row tile, row group of 32, row in group, column tile, column)
#     transpose to (0, 3, 2, 1, 4)        = (row tile, column tile, row in group, row group, column)
#
# and the flattened result is the byte stream. The offsets below come from that derivation and
# from literal numbers worked out by hand from the CuTe layout; the package formula must agree.

# %%
def to_blocked(sf):
    """sf [MN, KB] (MN % 128 == 0, KB % 4 == 0) -> the flat byte stream in CUTLASS SfAtom order."""
    mn, kb = sf.shape
    return sf.reshape(mn // 128, 4, 32, kb // 4, 4).transpose(0, 3, 2, 1, 4).reshape(-1)


def derived_offsets(mn, kb):
    """[MN, KB] int64: the byte each element lands on, read off to_blocked of the element indices."""
    off = np.empty(mn * kb, np.int64)
    off[to_blocked(np.arange(mn * kb).reshape(mn, kb))] = np.arange(mn * kb)
    return off.reshape(mn, kb)


GOLDEN_KB8 = {(0, 0): 0, (0, 1): 1, (0, 3): 3, (0, 4): 512, (1, 0): 16, (32, 0): 4, (64, 2): 10,
              (127, 3): 511, (128, 0): 1024, (255, 7): 2047}     # by hand, KB = 8
off8 = derived_offsets(256, 8)
for (r, kb), byte in GOLDEN_KB8.items():
    print(f"(r={r:3d}, kb={kb}) -> byte {byte:5d}   derived {off8[r, kb]:5d}   package {cutlass_sf.sf_byte_offset(r, kb, 8):5d}")
    assert off8[r, kb] == byte == cutlass_sf.sf_byte_offset(r, kb, 8)
mn_chk, kb_chk = align(max(WEIGHT_ROWS, M), 128), 16 * C
r_g, kb_g = np.meshgrid(np.arange(mn_chk), np.arange(kb_chk), indexing="ij")
assert np.array_equal(derived_offsets(mn_chk, kb_chk), cutlass_sf.sf_byte_offset(r_g, kb_g, kb_chk))   # every element
assert sorted(off8.ravel().tolist()) == list(range(256 * 8))                                         # a permutation
print(f"package formula == derivation on all {mn_chk}x{kb_chk} elements of [align(max(N, M), 128), 16·C]")

# %% [markdown]
# **Picture.** Left: the `[MN, KB]` scale matrix of the weight of section 4
# (`MN = align(N, 128)`, `KB = 16·C`), each cell coloured by the byte offset it is stored at,
# white lines at tile borders (one row tile holds `KB/4` tiles of 512 bytes). Right: one
# 512-byte tile in memory, 32 lines of 16 bytes; each byte is labelled with the `(row, column)`
# it holds. Rows 0, 32, 64, 96 share line 0.

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


mn_pic, kb_pic = align(WEIGHT_ROWS, 128), 16 * C
fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [1, 1.6]})
draw_swizzle(ax_l, ax_r, mn_pic, kb_pic)
fig.text(0.01, 0.01, "CPU · notebooks/02_scale_conversion.ipynb (make notebooks)", fontsize=7, color="0.4")
fig.tight_layout()
show(fig, f"Left: byte offset of each element of a [{mn_pic}, {kb_pic}] scale matrix, in "
          f"{(mn_pic // 128) * (kb_pic // 4)} tiles of 128 rows by 4 columns. Right: tile 0 as 32 lines of 16 bytes, "
          f"line i holding rows i, i+32, i+64, i+96.")

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
lay = layout.prefill_permute_to_masked_gemm(q_ue, words, topk_ids, NUM_EXPERTS, M)
masked_m = lay.token_nums_per_expert
scale_view = lay.permute_scale.logical_view()             # [E, M, C] int32, MN-major strides
sfa = ops.unpack_and_convert_scale(scale_view, masked_m)
print("permuted packed scales", list(scale_view.shape), "strides", lay.permute_scale.strides,
      "| masked_m", masked_m.numpy().ravel().tolist())
print("CUTLASS SF bytes", list(sfa.shape), str(sfa.dtype), f"(MN {M} padded to {int(sfa.shape[1])}, "
      f"KB = 16·C = {16 * C})")
mn_a, kb_a = int(sfa.shape[1]), int(sfa.shape[2])
inv_a = np.argsort(derived_offsets(mn_a, kb_a).ravel())          # byte p holds row-major element inv_a[p]
m0 = int(masked_m.numpy()[0, 0])
print(f"expert 0 (masked_m = {m0}), first 32 bytes:", sfa.numpy()[0].ravel()[:32].tolist())
for p0 in range(0, 32, 4):
    r_, k_ = divmod(int(inv_a[p0]), kb_a)
    print(f"  bytes {p0:2d}-{p0 + 3:2d}: row {r_:3d}, kb {k_}..{k_ + 3} (group {k_ // 4}, 4 copies)"
          + ("" if r_ < m0 else "  past masked_m: zero"))

# %% [markdown]
# **Check against the independent derivation.** For each expert, build the `[align(M,128), KB]`
# matrix the contract describes (valid rows: group `kb // 4`'s UE8M0 byte; rows at or past
# `masked_m[e]`, padding rows and padding groups: zero), run it through `to_blocked`, and
# compare the whole byte stream with the provider's.

# %%
sfa_np = sfa.numpy().reshape(NUM_EXPERTS, -1)
perm_bytes = fp8.unpack_ue8m0(lay.permute_scale.to_contiguous(), S).numpy()          # [E, M, S]
for e in range(NUM_EXPERTS):
    m_e = int(masked_m.numpy()[e, 0])
    expected = np.zeros((mn_a, kb_a), np.uint8)
    expected[:m_e, : 4 * S] = np.repeat(perm_bytes[e, :m_e], 4, axis=1)             # 128 -> 32 replication
    assert np.array_equal(sfa_np[e], to_blocked(expected)), e
print(f"all {NUM_EXPERTS} experts: provider bytes == to_blocked(contract matrix); rows past masked_m are zero")

# %% [markdown]
# **Round trip.** `cutlass_scale_to_fp32` must give back exactly the power-of-two scales of the
# valid rows (each 128-group's 4 copies must agree, or it raises).

# %%
back = ops.cutlass_scale_to_fp32(sfa, M).numpy()                         # [E, M, KB/4]
for e in range(NUM_EXPERTS):
    m_e = int(masked_m.numpy()[e, 0])
    rows_tokens = np.nonzero(lay.permuted_indice_map.numpy() // M == e)[0]   # token of each slot, in order
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
# ## 7. What the GEMM does with these bytes
#
# `group_gemm_masked` (SPEC §6) multiplies the permuted FP8 activations by the FP8 weights and
# applies both scales per 128-wide K block. Its inner loop, written out in numpy for every
# expert: one block of K at a time, the FP8 product accumulated in float32 (the tensor-core
# MMA), then scaled by the activation row's and the weight row's scale for that block (read
# back from the CUTLASS bytes of sections 5-6) and added to the accumulator; bf16 at the end.
# The provider's result must agree up to float32 summation order (`calc_diff` below 1e-5, the
# bound of notebook 03 for the same reason).

# %%
wq_e = paddle.stack([wq.view(paddle.uint8)] * NUM_EXPERTS).view(paddle.float8_e4m3fn)   # [E, N, H] (no fp8 stack on CPU)
out = paddle.empty([NUM_EXPERTS * M, WEIGHT_ROWS], dtype=paddle.bfloat16)
provider.group_gemm_masked(lay.permute_x.reshape([NUM_EXPERTS * M, HIDDEN]), wq_e, sfa, sfb,
                           masked_m.reshape([-1]), out, None, M, -1)
a_f = fp8.e4m3_to_float32(lay.permute_x).numpy()                                    # [E, M, H]
b_f = fp8.e4m3_to_float32(wq).numpy()                                               # [N, H]
sa = ops.cutlass_scale_to_fp32(sfa, M).numpy()                                      # [E, M, KB/4]: per 128 of K
sb = ops.cutlass_scale_to_fp32(sfb, WEIGHT_ROWS).numpy()                            # [E, N, KB/4]
got = out.astype(paddle.float32).numpy().reshape(NUM_EXPERTS, M, WEIGHT_ROWS)
for e in range(NUM_EXPERTS):
    m_e = int(masked_m.numpy()[e, 0])
    acc = np.zeros((m_e, WEIGHT_ROWS), np.float32)
    for g in range(S):                                                              # one 128-wide K block
        k = slice(128 * g, 128 * (g + 1))
        partial = a_f[e, :m_e, k] @ b_f[:, k].T                                     # the FP8 MMA, float32
        acc += partial * sa[e, :m_e, g][:, None] * sb[e, :, g][None, :]             # promotion: both scales
    expected = paddle.to_tensor(acc).astype(paddle.bfloat16).astype(paddle.float32).numpy()
    d = calc_diff(got[e, :m_e], expected) if m_e else 0.0
    print(f"expert {e}: {m_e} rows, calc_diff(provider, numpy loop) = {d:.1e}")
    assert d < 1e-5
print(f"provider {provider.name}: the GEMM reads the scale bytes where sections 5-6 put them")

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
# | GEMM | `backend.ops.group_gemm_masked` | `[E·M, K]` fp8 × `[E, N, K]` fp8 → `[E·M, N]` bf16 | per 128 of K: FP8 product in float32 × both scales (section 7, against a numpy loop) |
#
# Next: `03_correctness` measures what these UE8M0 scales cost in accuracy across the layer.
