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
# # 00 · An FP8 primer: e4m3, block scales, power-of-two scales, and `calc_diff`
#
# The other notebooks assume five things; this one shows them, each computed with the
# reference package `moe_ref` and checked with `assert`:
#
# 1. **e4m3**, the 8-bit float the expert GEMMs read: its bits, its 253 finite values, the top
#    value 448, the subnormals, and what "3 mantissa bits" costs (SPEC §1);
# 2. **why block scales**: one scale per 128 values keeps every block in e4m3's range (SPEC §3);
# 3. **FP32 vs UE8M0 scales** and the three rules that round a scale to a power of two
#    (FLOOR, RCEIL, truncation), side by side (SPEC §2);
# 4. the **amax floor** (DeepGEMM's 1e-4 against FastDeploy's 1e-10) and FastDeploy's **5e-7
#    bias** inside the `log2` (SPEC §3), on the inputs where they change something;
# 5. **`calc_diff`**, the error metric of every check (SPEC §12), in terms a reader can picture.

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
# font cache) out of the outputs. Warnings still show.
logging.getLogger("matplotlib").setLevel(logging.WARNING)

import numpy as np

import matplotlib.pyplot as plt

from moe_ref import fp8, quant
from moe_ref.constants import (DEEPGEMM_AMAX_FLOOR, E4M3_MAX, E4M3_MIN_SUBNORMAL, FASTDEPLOY_AMAX_FLOOR,
                               FASTDEPLOY_LOG2_BIAS)
from moe_ref.metrics import calc_diff
from nbtools import md, show

# %matplotlib inline
np.set_printoptions(linewidth=110)

# %% tags=["parameters"]
SCALE_DEMO_GROUPS = 6           # 2 or more: 128-wide groups in the block-scale demo, magnitudes 10^0 .. 10^-(groups-1)
                                # (from 6 on, the smallest group falls below e4m3's reach under one tensor-wide scale)
NOISE_LEVELS = [1e-3, 1e-2, 0.03, 0.0632, 0.1, 0.3]   # relative RMS errors for the calc_diff demo, each in (0, 1)
SEED = 0

# %%
paddle.seed(SEED)
rng = np.random.default_rng(SEED)
FOOTER = "CPU · notebooks/00_fp8_primer.ipynb (make notebooks)"


def footer(fig):
    fig.text(0.01, 0.005, FOOTER, fontsize=7, color="0.4")

# %% [markdown]
# ## 1. e4m3: bits, grid, 448, subnormals
#
# An e4m3 byte is `s eeee mmm`: 1 sign bit, 4 exponent bits (bias 7), 3 mantissa bits. The
# "fn" variant used by every FP8 GEMM (`float8_e4m3fn`, OCP FP8) has **no infinities** and one
# NaN pattern per sign (`s 1111 111`), which frees `s 1111 000`..`s 1111 110` for finite values:
# the largest is `0 1111 110` = `2^(15-7) · 1.75` = **448**. With exponent field 0 the value is
# **subnormal**: `2^(1-7) · 0.mmm`, evenly spaced steps of `2^-9` below the smallest normal
# `2^-6`. The decoding rule, in the four lines it takes, checked against Paddle's own cast for
# all 256 bytes (through `moe_ref.fp8.e4m3_to_float32`):

# %%
def decode_e4m3(byte):
    sign, exp, man = (byte >> 7) & 1, (byte >> 3) & 0xF, byte & 0x7
    if exp == 0xF and man == 0x7:
        return float("nan")
    mag = 2.0 ** (exp - 7) * (1 + man / 8) if exp else 2.0 ** -6 * (man / 8)   # normal | subnormal
    return -mag if sign else mag


codes = np.arange(256, dtype=np.uint8)
grid_all = fp8.e4m3_to_float32(paddle.to_tensor(codes).view(paddle.float8_e4m3fn)).numpy()
mine = np.array([decode_e4m3(int(b)) for b in codes], dtype=np.float32)
assert np.array_equal(np.isnan(mine), np.isnan(grid_all))
np.testing.assert_array_equal(mine[~np.isnan(mine)], grid_all[~np.isnan(grid_all)])
finite = grid_all[np.isfinite(grid_all)]
pos = np.unique(finite[finite > 0])
normal, subnormal = pos[pos >= 2.0 ** -6], pos[pos < 2.0 ** -6]
print(f"finite values {np.unique(finite).size} (with one zero; -0 and +0 both exist), NaN codes "
      f"{int(np.isnan(grid_all).sum())} (0x7F, 0xFF)")
print(f"positive: {pos.size} = {normal.size} normal in [2^-6, 448] + {subnormal.size} subnormal in "
      f"[2^-9, 7·2^-9]")
print(f"largest {pos.max()} (byte 0x{int(np.nonzero(grid_all == pos.max())[0][0]):02X}); smallest normal "
      f"{normal.min()} = 2^{np.log2(normal.min()):.0f}; smallest subnormal {pos.min()} = 2^{np.log2(pos.min()):.0f}")
assert pos.max() == E4M3_MAX and pos.min() == E4M3_MIN_SUBNORMAL
assert np.unique(finite).size == 253 and pos.size == 126 and subnormal.size == 7

# %% [markdown]
# **Range vs precision.** The values double every 8 steps: inside each octave `[2^k, 2^(k+1))`
# there are 8 evenly spaced values, so the step is `2^k / 8` and the gap to the next value is
# 1/15 to 1/8 (6.7 % to 12.5 %) of a value. Round to nearest halves that: **at most 6.25 %
# relative error** for any value in the normal range. The range spans `448 / 2^-9` ≈ 2^17.8 from the smallest
# subnormal to the top, but in the subnormal range the step stays `2^-9`, so the relative error
# grows as values shrink: 100 % at the smallest subnormal. The figure shows both.

# %%
rel_gap = np.diff(pos) / pos[:-1]
v_n = pos[:-1][pos[:-1] >= 2.0 ** -6]
mantissa = np.round((v_n / 2.0 ** np.floor(np.log2(v_n)) - 1) * 8)          # 0..7
assert np.allclose(rel_gap[pos[:-1] >= 2.0 ** -6], 1 / (8 + mantissa))     # gap 2^k/8 over 2^k(1 + m/8)
assert rel_gap[pos[:-1] >= 2.0 ** -6].max() == 0.125 and np.isclose(rel_gap[pos[:-1] >= 2.0 ** -6].min(), 1 / 15)
print(f"relative gap to the next value: normal range {rel_gap[pos[:-1] >= 2.0 ** -6].min():.4f} .. "
      f"{rel_gap[pos[:-1] >= 2.0 ** -6].max():.4f}, subnormal range up to {rel_gap.max():.2f}")
print(f"range: 448 / 2^-9 = {E4M3_MAX / E4M3_MIN_SUBNORMAL:.0f} = 2^{np.log2(E4M3_MAX / E4M3_MIN_SUBNORMAL):.2f}")

fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(9, 4.2), sharex=True, gridspec_kw={"height_ratios": [1, 2]})
ax1.vlines(normal, 0, 1, color="C0", lw=0.8, label=f"{normal.size} normal values")
ax1.vlines(subnormal, 0, 1, color="C3", lw=0.8, label=f"{subnormal.size} subnormal values")
ax1.set_yticks([])
ax1.set_xscale("log", base=2)
ax1.set_title("the positive e4m3 (fn) values on a log axis: 8 per octave, 448 at the top", fontsize=10)
ax1.legend(fontsize=7, loc="upper left", ncol=2)
ax2.step(pos[:-1], rel_gap * 100, where="post", color="k")
ax2.axvspan(pos.min(), 2.0 ** -6, color="C3", alpha=0.12, label="subnormal range")
ax2.axhline(6.25, color="C0", ls=":", label="6.25 %: largest rounding error in the normal range")
ax2.set_yscale("log")
ax2.set_xlabel("value (log2 axis)")
ax2.set_ylabel("gap to next value, %")
ax2.legend(fontsize=7)
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, f"Top: the {pos.size} positive e4m3 values as ticks on a log2 axis, from 2^-9 to 448, subnormals in red. "
          f"Bottom: the relative gap to the next value, 6.7 to 12.5 % in the normal range, rising to 100 % at the "
          f"smallest subnormal.")

# %% [markdown]
# **Casting.** `moe_ref.fp8.cast_to_e4m3` rounds to the nearest value (ties to even) and, as the
# project's rule, **clamps to ±448 first** (SPEC §1): frameworks disagree about values beyond
# 448, and PyTorch's classic cast makes anything above 464 a NaN.

# %%
probe = np.array([0.0, 0.001, 0.00293, 1.0, 1.0624, 1.0626, 3.3, 447.0, 460.0, 1e6, -500.0], np.float32)
cast = fp8.e4m3_to_float32(fp8.cast_to_e4m3(paddle.to_tensor(probe))).numpy()
for a, b in zip(probe, cast):
    print(f"{a:>12g} -> {b:>10g}" + ("   (clamped)" if abs(a) > E4M3_MAX else ""))
assert cast[probe == 1e6][0] == 448 and cast[probe == -500][0] == -448 and cast[probe == 1.0624][0] == 1.0

# %% [markdown]
# ## 2. Why block scales
#
# e4m3 has about 18 octaves of range and 3 bits of precision. A real tensor spans more than
# that, and what matters is that each value keeps its **relative** precision. A scale `s`
# maps a block onto the grid (`q = e4m3(x / s)`, `x ≈ q · s`); with `s = amax / 448` the
# block's largest value lands on 448 and the rest of the block keeps e4m3's relative precision
# as long as it stays above the subnormal range. One scale for a whole tensor works only if
# every part of it has a similar magnitude. Below, `SCALE_DEMO_GROUPS` groups of 128 values
# whose magnitudes fall by 10x per group are quantized with one scale for the tensor, and with
# one scale per group of 128 (`moe_ref.quant.per_token_group_quant`, SPEC §3).

# %%
mags = 10.0 ** -np.arange(SCALE_DEMO_GROUPS)
xg = (rng.normal(size=(SCALE_DEMO_GROUPS, 128)) * mags[:, None]).astype(np.float32)
x_row = paddle.to_tensor(xg.reshape(1, -1))
s_tensor = np.float32(np.abs(xg).max() / E4M3_MAX)
deq_tensor = fp8.e4m3_to_float32(fp8.cast_to_e4m3(paddle.to_tensor(xg / s_tensor))).numpy() * s_tensor
q_g, s_g = quant.per_token_group_quant(x_row, use_ue8m0=False)
deq_group = quant.dequant_per_token_group(q_g, s_g).numpy().reshape(SCALE_DEMO_GROUPS, 128)
rel_err = {name: np.sqrt(((d - xg) ** 2).sum(axis=1) / (xg ** 2).sum(axis=1))
           for name, d in (("one scale per tensor", deq_tensor), ("one scale per 128 values", deq_group))}
print(f"{SCALE_DEMO_GROUPS} groups of 128 values, magnitude 10^0 .. 10^-{SCALE_DEMO_GROUPS - 1}; "
      f"relative RMS error per group:")
print(f"{'group':>5s} {'magnitude':>10s} " + " ".join(f"{k:>26s}" for k in rel_err))
for g in range(SCALE_DEMO_GROUPS):
    print(f"{g:5d} {mags[g]:10.0e} " + " ".join(f"{v[g]:26.3%}" for v in rel_err.values()))
assert (rel_err["one scale per 128 values"] < 0.05).all()               # every group keeps ~5 bits
# A group falls out of e4m3's normal range under the tensor-wide scale once its values drop below 2^-6 / 448 of
# the tensor's amax (about 3.5e-5): the 10^-5 group, i.e. from SCALE_DEMO_GROUPS = 6 on.
if mags[-1] < 2.0 ** -6 / E4M3_MAX:
    assert rel_err["one scale per tensor"][-1] > 10 * rel_err["one scale per 128 values"][-1]
md(f"With one scale for the tensor, the smallest group (10^-{SCALE_DEMO_GROUPS - 1}) comes back with "
   f"{rel_err['one scale per tensor'][-1]:.1%} relative error"
   + (": its values sit in e4m3's subnormal range or round to zero." if mags[-1] < 2.0 ** -6 / E4M3_MAX else
      " (still in e4m3's normal range: add groups to push it below 2^-6 / 448 of the tensor's amax).")
   + f" With one scale per 128 values every group stays at or below {rel_err['one scale per 128 values'].max():.1%}. "
   f"That is the 1x128 recipe for activations; weights get one scale per 128x128 block.")

# %% [markdown]
# ## 3. FP32 vs UE8M0 scales, and the three power-of-two rules
#
# Hopper's DeepGEMM takes FP32 scales, `s = amax / 448`, so the block's largest value lands
# exactly on 448. Blackwell's block-scaled MMA takes a **UE8M0** byte per 32 values: an 8-bit
# exponent, `2^(e-127)`, nothing else (SPEC §2). The scale must be a power of two, and how it
# is rounded decides where the block's largest value lands:
#
# | rule | scale from `amax` | used by | `amax / s` |
# |---|---|---|---|
# | FP32 | `amax / 448` | Hopper recipes | exactly 448 |
# | **RCEIL** (round up) | `2^ceil(log2(amax / 448))` | cuBLAS / NVIDIA's MXFP8 recipes, DeepGEMM's `ceil_to_ue8m0`, ours | (224, 448] |
# | **FLOOR** | `2^(floor(log2 amax) − 8)` | the OCP MX v1.0 spec's reference conversion | [256, 512), clamped above 448 |
# | **truncation** | `2^floor(log2(amax / 448))` (`bits >> 23` of the FP32 scale) | a bug (notebook 02) | [448, 896), clamped above 448 |
#
# The names are the field's: torchao's `ScaleCalculationMode` (`torchao/prototype/mx_formats/config.py`)
# calls the OCP rule FLOOR and the round-up rule RCEIL, pointing for the latter to the cuBLAS
# documentation ("Computing scaling and conversion factors for FP8 with UE8M0 scales",
# https://docs.nvidia.com/cuda/cublas/index.html#d-block-quantization); it also has CEIL and
# EVEN variants, not used by this project. "Truncation" is not a mode anyone chooses.
#
# The figure sweeps `amax` over two octaves and plots where the largest value lands under
# each rule.

# %%
amax_sweep = np.float32(448.0) * np.float32(2.0) ** np.linspace(-3, -1, 401, dtype=np.float32)
s_rules = {
    "FP32": amax_sweep / np.float32(E4M3_MAX),
    "RCEIL (ours)": fp8.ceil_to_ue8m0(paddle.to_tensor(amax_sweep / np.float32(E4M3_MAX))).numpy(),
    "FLOOR (OCP MX)": np.float32(2.0) ** (np.floor(np.log2(amax_sweep)) - 8),
    "truncation (bug)": np.float32(2.0) ** np.floor(np.log2(amax_sweep / np.float32(E4M3_MAX))),
}
landing = {k: amax_sweep / v for k, v in s_rules.items()}
for k, v in landing.items():
    clamped = (v > E4M3_MAX * (1 + 1e-6)).mean()                     # 1e-6: float32 rounding of amax / s
    print(f"{k:18s} amax / s in [{v.min():6.1f}, {v.max():6.1f}]   clamped (above 448): {clamped:5.1%}")
assert np.allclose(landing["FP32"], E4M3_MAX)
assert landing["RCEIL (ours)"].min() > 224 and landing["RCEIL (ours)"].max() <= 448
assert landing["FLOOR (OCP MX)"].min() >= 256 and landing["FLOOR (OCP MX)"].max() < 512
assert landing["truncation (bug)"].min() >= 448 and landing["truncation (bug)"].max() < 896

fig, ax = plt.subplots(figsize=(8, 3.6))
for (k, v), ls in zip(landing.items(), ("-", "-", "--", ":")):
    ax.plot(amax_sweep, v, ls, lw=2, label=k)
ax.axhspan(E4M3_MAX, 900, color="C3", alpha=0.1, label="beyond 448: clamped")
ax.set_xscale("log", base=2)
ax.set_xlabel("block amax (log2 axis)")
ax.set_ylabel("amax / s: where the largest value lands")
ax.set_ylim(200, 900)
ax.set_title("rounding a scale to a power of two: three rules against FP32", fontsize=10)
ax.legend(fontsize=7, ncol=2)
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, "Where a block's largest value lands (amax / s) as amax sweeps two octaves: 448 flat for FP32 scales, "
          "a sawtooth between 224 and 448 for RCEIL, between 256 and 512 for FLOOR, between 448 and 896 for "
          "truncation, the part above 448 shaded as clamped.")

# %% [markdown]
# RCEIL never clamps and costs at most one bit of the top octave; FLOOR keeps values higher but
# clamps the ones landing in (448, 512); truncation clamps up to half the range. Notebook 02
# measures the error each rule gives on real groups, and notebook 03 what UE8M0 scales cost a
# whole layer.
#
# ## 4. The amax floor, and FastDeploy's 5e-7 bias
#
# **Why a floor.** A group of zeros has `amax = 0`, so `s = 0` and `x / s` is NaN. Every
# implementation floors `amax` first: DeepGEMM at `1e-4`, FastDeploy's kernels at `1e-10`
# (SPEC §3; ours: a parameter, default 1e-4). The floor also decides what happens to a group
# whose values are all **tiny**: with `amax` below the floor the scale is `floor / 448`, too
# large for them, so the group's largest value lands at `448 · amax / floor` instead of 448.
# That costs nothing while it stays in e4m3's normal range (above `2^-6`), i.e. down to
# `amax = floor · 2^-6 / 448`; below that the values turn subnormal, and below
# `floor · 2^-10 / 448` they all round to zero. Groups of values spread evenly from `-amax` to
# `amax`, quantized with each floor by `moe_ref.quant.per_token_group_quant`:

# %%
tiny_amax = np.array([0.0, 1e-12, 1e-10, 1e-9, 1e-8, 1e-6, 1e-4, 1e-2], np.float32)
pattern = np.linspace(-1, 1, 128, dtype=np.float32)                       # values from -amax to amax
xt = paddle.to_tensor(tiny_amax[:, None] * pattern[None, :])
floor_rows = {}
for name, floor in (("DeepGEMM 1e-4", DEEPGEMM_AMAX_FLOOR), ("FastDeploy 1e-10", FASTDEPLOY_AMAX_FLOOR)):
    q, s = quant.per_token_group_quant(xt, amax_floor=floor)
    deq = quant.dequant_per_token_group(q, s).numpy().astype(np.float64)
    ref_x = xt.numpy().astype(np.float64)
    energy = (ref_x ** 2).sum(axis=1)
    err = np.sqrt(((deq - ref_x) ** 2).sum(axis=1) / np.where(energy > 0, energy, 1.0))   # 0 for the zero group
    floor_rows[name] = (s.numpy().ravel(), err, np.isfinite(deq).all())
print(f"{'group amax':>10s} " + " ".join(f"{k + ': scale':>24s} {'rel. error':>10s}" for k in floor_rows))
for j, a in enumerate(tiny_amax):
    print(f"{a:10.0e} " + " ".join(f"{v[0][j]:24.3e} {v[1][j]:10.2%}" for v in floor_rows.values()))
assert all(v[2] for v in floor_rows.values())                             # no NaN, even for the zero group
dg, fd = floor_rows["DeepGEMM 1e-4"][1], floor_rows["FastDeploy 1e-10"][1]
lossless_dg = DEEPGEMM_AMAX_FLOOR * 2.0 ** -6 / E4M3_MAX                  # below: the largest value turns subnormal
zero_dg = DEEPGEMM_AMAX_FLOOR * 2.0 ** -10 / E4M3_MAX                     # below: everything rounds to zero
assert (dg[tiny_amax >= 10 * lossless_dg] < 0.05).all() and dg[tiny_amax == np.float32(1e-9)][0] > 0.1
assert dg[tiny_amax == np.float32(1e-12)][0] == 1.0
assert (fd[tiny_amax > 0] < 0.05).all()                                   # 1e-10 floor: lossless down to ~3.5e-15
md(f"DeepGEMM's floor keeps full precision down to `amax ≈ 1e-4 · 2^-6 / 448 = {lossless_dg:.1e}`; at amax 1e-9 the "
   f"relative error is already {dg[tiny_amax == np.float32(1e-9)][0]:.0%}, and below `{zero_dg:.1e}` every value "
   f"rounds to zero (at 1e-12: {dg[tiny_amax == np.float32(1e-12)][0]:.0%}). FastDeploy's 1e-10 floor moves those "
   f"limits down by six orders of magnitude ({fd[tiny_amax == np.float32(1e-12)][0]:.1%} at 1e-12). Both give "
   f"finite scales for an all-zero group. A bf16 activation group whose largest value is below 1e-8 contributes "
   f"nothing measurable to a GEMM, which is why either floor works in practice; the backend's SwiGLU requant uses "
   f"1e-10 as FastDeploy does (SPEC §7).")

# %% [markdown]
# **The 5e-7 bias.** FastDeploy's `per_token_quant` computes its UE8M0 scale as
# `2^ceil(log2(s + 5e-7))` with `s = amax / 448` (its fused SwiGLU quant does not add it).
# `moe_ref` reproduces it with `fd_log2_bias=True`. The bias is invisible for most scales,
# but changes two kinds:
#
# - a scale that is **exactly a power of two** (`amax = 448 · 2^k`): `s + 5e-7` is just above
#   it, so the scale **doubles** and the block uses only half of e4m3's top octave;
# - a **small** scale (`s` near or below 5e-7, i.e. `amax` below about `448 · 5e-7 ≈ 2e-4`): the bias
#   dominates and the scale cannot drop below `2^-20`, a second floor.
#
# For `s` above `5e-7 · 2^24 ≈ 8.4` the addition rounds away in float32 and nothing changes.

# %%
bias_amax = np.array([448 * 2.0 ** -3, 448 * 2.0 ** -3 * 1.001, 448 * 2.0 ** -10, 1e-3, 1e-5, 1e-7, 448 * 16.0],
                     np.float32)
xb = paddle.to_tensor(bias_amax[:, None] * pattern[None, :])
_, s_ours = quant.per_token_group_quant(xb, use_ue8m0=True, amax_floor=FASTDEPLOY_AMAX_FLOOR)
_, s_fd = quant.per_token_group_quant(xb, use_ue8m0=True, amax_floor=FASTDEPLOY_AMAX_FLOOR, fd_log2_bias=True)
s_ours, s_fd = s_ours.numpy().ravel(), s_fd.numpy().ravel()
print(f"{'amax':>12s} {'s = amax/448':>13s} {'RCEIL (ours)':>13s} {'FastDeploy':>11s}  effect")
for a, so, sf in zip(bias_amax, s_ours, s_fd):
    effect = "same" if so == sf else f"x{sf / so:g}"
    print(f"{a:12.4e} {a / 448:13.4e} {so:13.4e} {sf:11.4e}  {effect}")
assert s_fd[0] == 2 * s_ours[0]                                    # exact power of two: doubled
assert s_fd[1] == s_ours[1]                                        # just above it: same
assert s_fd[bias_amax == np.float32(1e-7)][0] == 2.0 ** -20 > s_ours[bias_amax == np.float32(1e-7)][0]   # second floor
assert s_fd[-1] == s_ours[-1]                                      # large scale: the bias rounds away
print(f"FastDeploy's smallest UE8M0 scale: 2^ceil(log2(5e-7)) = 2^{np.ceil(np.log2(FASTDEPLOY_LOG2_BIAS)):.0f}")

# %% [markdown]
# ## 5. What `calc_diff` means
#
# Every check in these notebooks uses DeepGEMM's metric (SPEC §12):
#
#     calc_diff(x, y) = 1 − 2·Σ x·y / (Σ x² + Σ y²)  =  Σ (x − y)² / (Σ x² + Σ y²)
#
# (the two forms are the same algebra). It is 0 for equal tensors, it does not depend on the
# overall scale of the data, and for `y = x + e` with a small error `e` the denominator is about
# `2 Σ x²`, so
#
#     calc_diff ≈ ½ · (relative RMS error)²,   relative RMS error = sqrt(Σ e² / Σ x²).
#
# So `calc_diff = 1e-3` (DeepGEMM's bound for one FP8 GEMM) means a relative RMS error of about
# 4.5 %, `2e-3` about 6.3 %, and `1e-5` about 0.45 %. Below: random data with added noise at
# `NOISE_LEVELS` relative RMS, `calc_diff` against that rule, plus one error that is not noise
# (every value 10 % too small, as a broken scale pairing gives).

# %%
xc = rng.normal(size=100_000).astype(np.float64)
rows = []
for level in NOISE_LEVELS:
    noise = rng.normal(size=xc.size)
    y = xc + noise * level * np.sqrt((xc ** 2).sum() / (noise ** 2).sum())   # relative RMS exactly `level`
    d = calc_diff(paddle.to_tensor(xc), paddle.to_tensor(y))
    assert abs(d - ((xc - y) ** 2).sum() / ((xc ** 2).sum() + (y ** 2).sum())) < 1e-12   # the second form
    rows.append((level, d, level ** 2 / 2))
print(f"{'relative RMS':>12s} {'calc_diff':>10s} {'rms^2 / 2':>10s} {'ratio':>6s}")
for level, d, approx in rows:
    print(f"{level:12.2%} {d:10.3e} {approx:10.3e} {d / approx:6.3f}")
assert all(abs(d / approx - 1) < 0.1 for level, d, approx in rows if level <= 0.1)   # the rule, within 10 %
shrunk = calc_diff(paddle.to_tensor(xc), paddle.to_tensor(0.9 * xc))
print(f"y = 0.9·x (a 10 % scale error): calc_diff {shrunk:.3e} = 0.1² / (1 + 0.81) = {0.01 / 1.81:.3e}")
assert abs(shrunk - 0.01 / 1.81) < 1e-12

fig, ax = plt.subplots(figsize=(6.5, 3.4))
lv = np.array([r[0] for r in rows])
ax.loglog(lv * 100, [r[1] for r in rows], "o", label="calc_diff measured")
fine = np.logspace(np.log10(lv.min()), np.log10(lv.max()), 50)
ax.loglog(fine * 100, fine ** 2 / 2, "k:", label="½ · (relative RMS)²")
for bound, name in ((1e-3, "1e-3: one FP8 GEMM"), (5e-3, "5e-3: the FP8 layer"), (1e-5, "1e-5: backend vs reference")):
    ax.axhline(bound, color="0.6", lw=0.8)
    ax.text(fine[0] * 100, bound * 1.15, f"{name} ↔ {np.sqrt(2 * bound):.2%}", fontsize=7, color="0.3")
ax.set_xlabel("relative RMS error, %")
ax.set_ylabel("calc_diff")
ax.set_title("calc_diff is half the squared relative RMS error", fontsize=10)
ax.legend(fontsize=7, loc="lower right")
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, "Log-log plot of calc_diff against relative RMS error: measured points on the line rms squared over two; "
          "horizontal lines at the bounds 1e-5, 1e-3 and 5e-3 labelled with the relative RMS each means "
          f"({np.sqrt(2e-5):.2%}, {np.sqrt(2e-3):.1%}, {np.sqrt(1e-2):.0%}).")

# %% [markdown]
# ## Summary
#
# | idea | in one line | where it matters |
# |---|---|---|
# | e4m3 | 253 finite values, top 448, 8 per octave (≤ 6.25 % rounding error), subnormals below 2^-6 | every FP8 tensor of the layer |
# | block scales | one scale per 1x128 (activations) or 128x128 (weights) keeps each block on the grid | `moe_ref.quant`, notebook 02 |
# | UE8M0 | a scale that is a power of two; RCEIL (ours), FLOOR (OCP), truncation (the bug) | notebooks 02, 03 |
# | amax floor, 5e-7 bias | only tiny groups and exact powers of two notice them | `per_token_group_quant(amax_floor=, fd_log2_bias=)` |
# | `calc_diff` | ½ · (relative RMS error)²: 1e-3 ≈ 4.5 %, 1e-5 ≈ 0.45 % | every check in notebooks 01-04 |
#
# Next: `01_permute_semantics` moves these FP8 rows to their experts.
