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
# # 01 · Permute semantics: from router output to the masked layout and back
#
# A Mixture-of-Experts layer sends every token to `K_top` of `E` experts. The expert GEMMs
# want each expert's tokens **together**, so between the router and the first GEMM the
# tokens are *permuted* into a per-expert layout, and after the second GEMM they are
# *depermuted* and summed with the routing weights. This notebook walks through that round
# trip on a tiny example, printed in full:
#
# 1. router output (`topk_ids`, `topk_weights`), SPEC §10;
# 2. the **masked** layout `[E, M, H]` of the Blackwell "ht" prefill path, SPEC §5;
# 3. the **MN-major** storage of the matching scales, SPEC §2;
# 4. the way back: `depermute_prefill_combine`, SPEC §8;
# 5. the **contiguous** layout (DeepGEMM's other grouped GEMM) beside it;
# 6. expert parallelism: simulated DeepEP dispatch with `num_worst_tokens` padding, SPEC §9;
# 7. what upstream FastDeploy (PR #7053) does differently, and how ours fails safely.
#
# Order of each section (as in the Triton tutorials): explain → reference (`moe_ref`) →
# backend (`backend.ops`) → check (`assert`) → draw; the timings are in `04_performance`. All
# logic is imported from the package; this notebook only calls it and prints. SPEC sections
# refer to `shared/SPEC.md`.

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

import matplotlib
import matplotlib.pyplot as plt
from matplotlib.lines import Line2D
from matplotlib.patches import FancyArrowPatch, Rectangle

from moe_ref import ep, layout, routing
from moe_ref.fp8 import TMA_ALIGN, align
from backend import ops
from nbtools import md, show

# %matplotlib inline
np.set_printoptions(linewidth=110)

# %% tags=["parameters"]
NUM_TOKENS = 6        # T, at least 2: tokens on this rank (every token is printed: keep it small)
NUM_EXPERTS = 4       # E, at least 1: local experts
TOP_K = 2             # K_top, 1 to E: experts per token
HIDDEN = 256          # H: any multiple of 128 (S: H / 128 scale groups)
MAX_TOKEN_NUM = None  # M: rows per expert of the masked buffer; None: T (the worst case), else at least the busiest count
EP_RANKS = 2          # R, at least 1, for the simulated expert-parallel section
SEED = 0

# %%
paddle.seed(SEED)
rng = np.random.default_rng(SEED)
S = -(-HIDDEN // 128)
M = NUM_TOKENS if MAX_TOKEN_NUM is None else MAX_TOKEN_NUM     # one expert can get every token: M = T is safe
print(f"T={NUM_TOKENS}  E={NUM_EXPERTS}  K_top={TOP_K}  H={HIDDEN}  S={S}  M={M}")

# %% [markdown]
# ## 1. Router output
#
# The router scores every token against every expert and keeps the `K_top` best
# (`moe_ref.routing.softmax_topk`; DeepSeek-V3's grouped `noaux_tc_topk` returns the same
# two tensors). Columns are in descending weight; ties go to the lowest expert id.

# %%
logits = paddle.to_tensor(rng.normal(size=(NUM_TOKENS, NUM_EXPERTS)).astype(np.float32))
topk_weights, topk_ids = routing.softmax_topk(logits, TOP_K)
print("topk_ids [T, K_top] int64:\n", topk_ids.numpy())
print("topk_weights [T, K_top] float32:\n", np.round(topk_weights.numpy(), 4))

# %%
assert topk_ids.shape == [NUM_TOKENS, TOP_K] and topk_ids.dtype == paddle.int64
np.testing.assert_allclose(topk_weights.numpy().sum(axis=1), 1.0, rtol=1e-6)   # renormalized

# %% [markdown]
# ## 2. The masked layout `[E, M, H]`
#
# **Why this layout.** Blackwell's masked grouped GEMM (`group_gemm_masked`, the cousin of
# DeepGEMM's `m_grouped_fp8_gemm_nt_masked`) gives each expert a fixed slab of `M` rows and
# a count `masked_m[e]` of rows that are real. Everything has a shape known in advance, so
# the whole layer can be captured in a CUDA graph and nothing waits for the host to learn
# how many tokens each expert got. The price is memory (`E·M` rows for `T·K_top` real ones)
# and the rule that rows past `masked_m[e]` are never read.
#
# `prefill_permute_to_masked_gemm(x, scale, topk_ids, E, M)` returns four things
# (SPEC §5): `permute_x [E, M, H]`, `permute_scale` (MN-major, section 3),
# `permuted_indice_map [W, K_top]` (= `e·M + slot`, or -1) and
# `token_nums_per_expert [E, 1]` (= `masked_m`).
#
# To make rows recognizable after the move, token `t`'s row is filled with the value `t+1`
# and its scale for group `g` is `t + 1 + g/10` (a label, not a real scale; 0 means empty).

# %%
x = paddle.to_tensor(np.repeat(np.arange(1, NUM_TOKENS + 1, dtype=np.float32)[:, None], HIDDEN, axis=1)).astype(
    paddle.bfloat16)
scale = paddle.to_tensor(np.arange(1, NUM_TOKENS + 1, dtype=np.float32)[:, None] + np.arange(S, dtype=np.float32) / 10)

ref = layout.prefill_permute_to_masked_gemm(x, scale, topk_ids, num_local_experts=NUM_EXPERTS,
                                            max_token_num=M)
print("permute_x            ", ref.permute_x.shape, str(ref.permute_x.dtype))
print("permute_scale logical", ref.permute_scale.shape, "physical", ref.permute_scale.physical.shape)
print("permuted_indice_map [W, K_top] int32 (e*M + slot):\n", ref.permuted_indice_map.numpy())
print("token_nums_per_expert [E, 1] int32:", ref.token_nums_per_expert.numpy().ravel())

# %% [markdown]
# Decoding the map: `e = idx // M`, `slot = idx % M`. Reading column 0 of `permute_x`
# (the label `t+1`, minus one) shows which token sits in each slot; `.` is an unused row
# (zero, SPEC §5 "ours").

# %%
idx = ref.permuted_indice_map.numpy()
print("expert of (t, k):\n", idx // M)
print("slot of (t, k):\n", idx % M)
token_in_slot = ref.permute_x[:, :, 0].astype(paddle.float32).numpy().astype(int) - 1     # [E, M], -1 = empty
for e in range(NUM_EXPERTS):
    print(f"expert {e}: " + " ".join("." if t < 0 else str(t) for t in token_in_slot[e]))

# %% [markdown]
# The slot order inside an expert is **token-major, then k**: expert e's slots list its
# tokens in increasing `t`. Upstream's kernel takes slots from an atomic counter, so its order
# changes from run to run (section 7).
#
# **Check** every invariant of SPEC §5 on this example:

# %%
counts = ref.token_nums_per_expert.numpy().ravel()
ids_np = topk_ids.numpy()
assert counts.sum() == (ids_np >= 0).sum() == NUM_TOKENS * TOP_K
assert np.array_equal(counts, np.bincount(ids_np.ravel(), minlength=NUM_EXPERTS))
assert np.array_equal(idx // M, ids_np)                       # the map points at the right expert
for t in range(NUM_TOKENS):
    for k in range(TOP_K):
        assert token_in_slot[ids_np[t, k], idx[t, k] % M] == t   # ... and at this token's row
for e in range(NUM_EXPERTS):
    used = token_in_slot[e, :counts[e]]
    assert (used >= 0).all() and (np.diff(used) > 0).all()                 # token-major order
    assert (token_in_slot[e, counts[e]:] == -1).all()                       # rows past the count are zero
print("masked layout: all invariants hold")

# %% [markdown]
# **The core of the permute, in numpy.** The slot of entry `(t, k)` is its rank among the
# entries of its expert, counted in `(t, k)` order. A stable sort by expert id keeps that
# order inside each expert; subtracting each expert's start turns positions into slots. These
# few lines rebuild the reference's map from `topk_ids` alone:

# %%
flat = ids_np.ravel()                                          # entries in (t, k) order
order = np.argsort(flat, kind="stable")                        # grouped by expert, (t, k) order kept
order = order[flat[order] >= 0]                                # -1 entries (no local expert) get no slot
starts = np.concatenate([[0], np.cumsum(np.bincount(flat[order], minlength=NUM_EXPERTS))])
slot = np.full(flat.size, -1)
slot[order] = np.arange(order.size) - starts[flat[order]]      # position minus the expert's first position
my_map = np.where(flat >= 0, flat * M + slot, -1).reshape(ids_np.shape)
print("numpy map == moe_ref map:", np.array_equal(my_map, idx))
assert np.array_equal(my_map, idx)

# %% [markdown]
# **Backend.** The ops contract `backend.ops` runs the same permute on the selected provider
# (the real `blackwell_ops` on SM100, Triton on other GPUs, vectorized Paddle on CPU). Its
# result must equal the reference bit for bit: a permute only moves bytes.

# %%
provider = ops.get_provider()
bx, bscale, bmap, bcounts = provider.prefill_permute_to_masked_gemm(x, scale, topk_ids, NUM_EXPERTS, M)
print("provider:", provider.name)
assert np.array_equal(bx.astype(paddle.float32).numpy(), ref.permute_x.astype(paddle.float32).numpy())
assert np.array_equal(bscale.numpy(), ref.permute_scale.logical_view().numpy())
assert np.array_equal(bmap.numpy(), ref.permuted_indice_map.numpy())
assert np.array_equal(bcounts.numpy(), ref.token_nums_per_expert.numpy())
print("backend permute == reference (x, scale, map, counts)")

# %% [markdown]
# **Picture.** Each token (left) sends one arrow per `k` into a slot of an expert slab
# (right). Line style says which of the token's `K_top` choices the arrow is (legend: solid is
# `k = 0`, the larger weight). Arrows run behind the slabs and end at the left edge of their
# slot. Grey slots are the masked-out rows past `token_nums_per_expert[e]`.

# %%
K_STYLES = ["-", "--", ":", "-."]


def draw_masked(ax, token_in_slot, ids, idx, m, title):
    t_n, k_n = ids.shape
    e_n = token_in_slot.shape[0]
    colors = plt.cm.tab10(np.arange(t_n) % 10)
    for t in range(t_n):
        ax.add_patch(Rectangle((0, t_n - 1 - t), 1, 0.8, color=colors[t], zorder=2))
        ax.text(0.5, t_n - 0.6 - t, f"t{t}", ha="center", va="center", color="white", fontsize=9)
    x0 = 4.0
    for e in range(e_n):
        for s in range(m):
            tok = token_in_slot[e, s]
            xs, ys = x0 + e * 1.6, t_n - 1 - s
            ax.add_patch(Rectangle((xs, ys), 1.2, 0.8, color=colors[tok] if tok >= 0 else "0.88", zorder=2))
            ax.text(xs + 0.6, ys + 0.4, f"t{tok}" if tok >= 0 else "", ha="center", va="center", color="white",
                    fontsize=8)
        ax.text(x0 + e * 1.6 + 0.6, t_n + 0.1, f"e{e}\nm={int((token_in_slot[e] >= 0).sum())}", ha="center",
                fontsize=9)
    for t in range(t_n):
        for k in range(k_n):
            if idx[t, k] < 0:
                continue
            e, s = divmod(int(idx[t, k]), m)
            ax.add_patch(FancyArrowPatch((1.0, t_n - 0.6 - t), (x0 + e * 1.6, t_n - 0.6 - s), arrowstyle="->",
                                         mutation_scale=8, color=colors[t], lw=1, zorder=1,
                                         linestyle=K_STYLES[k % len(K_STYLES)], alpha=0.8))
    ax.legend(handles=[Line2D([], [], color="0.3", ls=K_STYLES[k % len(K_STYLES)], label=f"k = {k}")
                       for k in range(k_n)], loc="upper left", fontsize=7, frameon=False)
    ax.set_xlim(-0.3, x0 + e_n * 1.6)
    ax.set_ylim(min(-0.5, t_n - m - 0.5), t_n + 1.1)
    ax.set_title(title, fontsize=10)
    ax.axis("off")


fig, ax = plt.subplots(figsize=(7.5, 4))
draw_masked(ax, token_in_slot, ids_np, idx, M,
            f"tokens → expert slots, masked layout [E={NUM_EXPERTS}, M={M}, H]")
fig.text(0.01, 0.01, "CPU · notebooks/01_permute_semantics.ipynb (make notebooks)", fontsize=7, color="0.4")
show(fig, f"{NUM_TOKENS} token boxes on the left, one arrow per top-k choice into {NUM_EXPERTS} expert slabs of "
          f"{M} slots each; used slots per expert: {counts.tolist()}, the rest grey.")

# %% [markdown]
# ## 3. MN-major scale storage
#
# The FP8 GEMM reads one scale per row and 128-wide group. The tensor-memory accelerator
# (TMA) loads a tile of **rows** of scales for one group at a time, so the scales are stored
# with the row axis (M, "MN") contiguous: logical `[E, M, S]` with strides
# `(S·align(M,4), 1, align(M,4))`. TMA needs every stride of a global tensor to be a multiple
# of 16 bytes ([CUDA driver API, `cuTensorMapEncodeTiled`](https://docs.nvidia.com/cuda/cuda-driver-api/group__CUDA__TENSOR__MEMORY.html)),
# hence M is padded to a multiple of 4 (4 × 4-byte scales = 16 bytes). DeepGEMM calls this
# "MN-major, TMA-aligned" (`get_mn_major_tma_aligned_tensor`).
#
# `moe_ref` represents it as `MNMajorScale`: the **physical** buffer `[E, S, align(M,4)]` as it
# lies in memory, plus the strided **logical** view.
#
# **That rationale is Hopper's.** On Hopper, DeepGEMM's FP8 GEMM loads these FP32 (or packed
# UE8M0) scales itself with TMA, so their layout is the GEMM's input format. The Blackwell GEMM
# of PR #7053 (`group_gemm_masked`) does not read them: its block-scaled tensor-core MMA takes
# one UE8M0 byte per 32 K-elements in CUTLASS's tiled byte order, which
# `unpack_and_convert_scale` writes from this MN-major tensor (any strides accepted) right
# before each GEMM (notebook 02, section 5). The permute still emits MN-major scales because
# it is the same kernel interface as the Hopper path (SPEC §5).

# %%
ps = ref.permute_scale
m_pad = align(M, TMA_ALIGN)
e_show = int(np.argmax(counts))                  # the busiest expert makes the best picture
print(f"logical {ps.shape}, strides {ps.strides} (elements); physical {list(ps.physical.shape)}; "
      f"align(M={M}, {TMA_ALIGN}) = {m_pad}")
print(f"physical buffer of expert {e_show}, [S, align(M,4)] (label t+1 + g/10, 0 = empty):")
print(ps.physical[e_show].numpy())
print(f"logical view of expert {e_show}, [M, S]:")
print(ps.logical_view()[e_show].numpy())

# %%
assert ps.strides == (S * m_pad, 1, m_pad)
assert list(ps.physical.shape) == [NUM_EXPERTS, S, m_pad]
assert (ps.physical[:, :, M:].numpy() == 0).all()               # TMA padding rows are zero
phys = ps.physical.numpy()
for e in range(NUM_EXPERTS):
    for s_ in range(counts[e]):
        t = token_in_slot[e, s_]
        np.testing.assert_array_equal(phys[e, :, s_], scale.numpy()[t])   # column slot of the buffer = token's scales

# %% [markdown]
# **Picture.** Left: the logical `[M, S]` matrix of that expert as the GEMM indexes it. Right:
# the same numbers in memory order (flat offset = `g · align(M,4) + m`); the hatched cells
# are TMA padding.

# %%
def draw_mn_major(ax_l, ax_r, logical, m, m_pad, s_n):
    ax_l.imshow(np.where(logical > 0, logical, np.nan), cmap="viridis", aspect="auto")
    for r in range(m):
        for g in range(s_n):
            ax_l.text(g, r, f"{logical[r, g]:.1f}", ha="center", va="center", fontsize=8, color="w")
    ax_l.set_xticks(range(s_n), [f"g{g}" for g in range(s_n)])
    ax_l.set_yticks(range(m), [f"slot {r}" for r in range(m)])
    ax_l.set_title("logical [M, S]", fontsize=10)
    flat = np.zeros(s_n * m_pad)
    for g in range(s_n):
        flat[g * m_pad: g * m_pad + m] = logical[:, g]
    ax_r.imshow(np.where(flat > 0, flat, np.nan)[None, :], cmap="viridis", aspect="auto")
    for p in range(s_n * m_pad):
        g, r = divmod(p, m_pad)
        label = f"{flat[p]:.1f}" if r < m else ""
        ax_r.text(p, 0, label, ha="center", va="center", fontsize=7, color="w")
        if r >= m:
            ax_r.add_patch(Rectangle((p - 0.5, -0.5), 1, 1, fill=False, hatch="//", color="0.6"))
    ax_r.set_xticks(range(s_n * m_pad), [str(p) for p in range(s_n * m_pad)], fontsize=7)
    ax_r.set_yticks([])
    ax_r.set_xlabel("flat offset in the physical buffer (elements)")
    ax_r.set_title(f"memory order: g0 rows, then g1 rows (M padded {m}→{m_pad})", fontsize=10)


fig, (ax_l, ax_r) = plt.subplots(1, 2, figsize=(10, 3), gridspec_kw={"width_ratios": [1, 3]})
draw_mn_major(ax_l, ax_r, ps.logical_view()[e_show].numpy(), M, m_pad, S)
fig.text(0.01, 0.01, "CPU · notebooks/01_permute_semantics.ipynb (make notebooks)", fontsize=7, color="0.4")
fig.tight_layout()
show(fig, f"Expert {e_show}'s scales: left the logical [M={M}, S={S}] matrix, right the same values in memory "
          f"order, group by group, each group's {M} rows padded to {m_pad} (hatched).")

# %% [markdown]
# ## 4. The way back: depermute and weighted combine
#
# After the two expert GEMMs, `ffn_out [E, M, H]` holds one row per (token, k). The combine
# gathers token `t`'s rows through the map and sums them with the routing weights in
# float32, rounding to bf16 once (SPEC §8):
# `out[t] = bf16(Σ_k w[t,k] · ffn_out[idx // M, idx % M])`.
#
# With the identity as "expert" (`ffn_out = permute_x`) and weights summing to 1, the round
# trip must give `x` back exactly (the labels are small integers, exact in bf16).

# %%
back = layout.depermute_prefill_combine(ref.permute_x, ref.permuted_indice_map, topk_weights,
                                        num_worst_tokens=NUM_TOKENS)
back_backend = provider.depermute_prefill_combine(ref.permute_x, ref.permuted_indice_map, topk_weights, NUM_TOKENS)
print("column 0 of the round trip:", back[:, 0].astype(paddle.float32).numpy())
np.testing.assert_array_equal(back.astype(paddle.float32).numpy(), x.astype(paddle.float32).numpy())
np.testing.assert_array_equal(back_backend.astype(paddle.float32).numpy(), back.astype(paddle.float32).numpy())
print("permute -> identity expert -> depermute gives x back (reference and backend)")

# %% [markdown]
# ## 5. The contiguous layout beside it
#
# DeepGEMM's other grouped GEMM (`m_grouped_fp8_gemm_nt_contiguous`) lays the experts end to
# end instead: `[Mc, H]` with each expert's segment padded to a multiple of 128 rows (one M
# block of the kernel, so a block never straddles two experts) and an `m_indices [Mc]` vector
# naming each row's expert, `-1` for padding. It needs the counts on the host to size `Mc`
# (no CUDA graph without a worst-case bound) but wastes at most 127 rows per expert, where
# the masked layout wastes `M - masked_m[e]`. Same data, same slot order
# (`moe_ref.layout.permute_to_contiguous`, SPEC §5 last paragraph).

# %%
cont = layout.permute_to_contiguous(x, scale, topk_ids, num_local_experts=NUM_EXPERTS)
m_idx = cont.m_indices.numpy()
offsets = np.concatenate([[0], np.cumsum([align(c, 128) for c in counts])])
print(f"permute_x {cont.permute_x.shape}, m_indices {cont.m_indices.shape}, Mc = {offsets[-1]}")
print(" expert  count  segment rows")
for e in range(NUM_EXPERTS):
    print(f"{e:7d} {counts[e]:6d}  {offsets[e]}..{offsets[e + 1] - 1} (rows {offsets[e]}..{offsets[e] + counts[e] - 1} used)")
print("permuted_indice_map (row in [Mc, H]):\n", cont.permuted_indice_map.numpy())

# %%
cont_tok = cont.permute_x[:, 0].astype(paddle.float32).numpy().astype(int) - 1
for e in range(NUM_EXPERTS):
    seg = slice(offsets[e], offsets[e] + counts[e])
    assert (m_idx[seg] == e).all() and (m_idx[offsets[e] + counts[e]: offsets[e + 1]] == -1).all()
    assert np.array_equal(cont_tok[seg], token_in_slot[e, :counts[e]])     # same tokens, same order as masked
assert np.array_equal(cont.token_nums_per_expert.numpy(), ref.token_nums_per_expert.numpy())
back_c = layout.depermute_contiguous_combine(cont.permute_x, cont.permuted_indice_map, topk_weights, NUM_TOKENS)
np.testing.assert_array_equal(back_c.astype(paddle.float32).numpy(), x.astype(paddle.float32).numpy())
print("contiguous layout: same rows in the same order as the masked one; round trip exact")

# %% [markdown]
# **Picture.** Row occupancy of the two layouts for the same routing: the masked buffer has
# `E·M` rows, the contiguous one `Σ align(count, 128)`. Coloured by expert = a real token row,
# grey = padding. **At this toy size the picture shows the opposite of the production
# trade-off**: the contiguous layout pads every expert to 128 rows, which dwarfs a handful of
# tokens. The table after the figure computes both row counts at a production size.

# %%
expert_cmap = matplotlib.colors.ListedColormap(["0.88"] + [plt.cm.tab10(e % 10) for e in range(NUM_EXPERTS)])
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 2.6))
masked_rows = np.where(token_in_slot >= 0, np.arange(NUM_EXPERTS)[:, None] + 1, 0)
ax1.imshow(masked_rows, cmap=expert_cmap, vmin=-0.5, vmax=NUM_EXPERTS + 0.5, aspect="auto")
ax1.set_yticks(range(NUM_EXPERTS), [f"e{e}" for e in range(NUM_EXPERTS)])
ax1.set_xlabel("slot (0..M-1)")
ax1.set_title(f"masked [E·M = {NUM_EXPERTS * M} rows]", fontsize=10)
ax2.imshow(np.where(m_idx >= 0, m_idx + 1, 0)[None, :], cmap=expert_cmap, aspect="auto", interpolation="nearest",
           vmin=-0.5, vmax=NUM_EXPERTS + 0.5)
for e in range(NUM_EXPERTS):
    ax2.axvline(offsets[e] - 0.5, color="k", lw=0.8)
    ax2.text(offsets[e] + 2, 0, f"e{e}: {counts[e]} rows + {align(counts[e], 128) - counts[e]} pad", fontsize=7,
             va="center", rotation=90)
ax2.set_yticks([])
ax2.set_xlabel("row of [Mc, H]")
ax2.set_title(f"contiguous [Mc = {offsets[-1]} rows], segments padded to 128", fontsize=10)
fig.text(0.01, 0.01, "CPU · notebooks/01_permute_semantics.ipynb (make notebooks)", fontsize=7, color="0.4")
fig.tight_layout()
show(fig, f"Row occupancy for the same routing: masked buffer {NUM_EXPERTS}x{M} = {NUM_EXPERTS * M} rows, "
          f"contiguous buffer {offsets[-1]} rows of which {counts.sum()} hold tokens.")

# %% [markdown]
# **At production size** (the rows only, no tensors): DeepSeek-V3 prefill on 8 ranks, 32 local
# experts, `max_tokens_per_rank = 4096`, `K_top = 8`, so the masked buffer needs
# `M = R · max_tokens_per_rank` rows per expert for the worst case, while a balanced routing gives
# each expert about `R · T · K_top / E_total` rows. Counts drawn from a uniform routing:

# %%
prod = {"E": 32, "R": 8, "T": 4096, "K": 8}
# R·T·K_top entries spread over E·R experts: this rank's E experts receive T·K_top of them on average
prod_counts = np.random.default_rng(SEED).multinomial(prod["T"] * prod["K"], np.full(prod["E"], 1 / prod["E"]))
prod_masked = prod["E"] * prod["R"] * prod["T"]
prod_contig = sum(align(int(c), 128) for c in prod_counts)
toy_masked, toy_contig = NUM_EXPERTS * M, int(offsets[-1])
print(f"{'':22s} {'real rows':>10s} {'masked E·M':>12s} {'contiguous':>11s}")
print(f"{'this toy example':22s} {int(counts.sum()):10d} {toy_masked:12d} {toy_contig:11d}")
print(f"{'production (above)':22s} {int(prod_counts.sum()):10d} {prod_masked:12d} {prod_contig:11d}")
assert prod_contig - prod_counts.sum() < 128 * prod["E"]          # at most 127 padding rows per expert
assert prod_contig < prod_masked                                     # production: contiguous is the smaller one
md(f"At production size the contiguous buffer needs {prod_contig / prod_counts.sum():.3f}x the real rows and the "
   f"masked one {prod_masked / prod_counts.sum():.1f}x: the masked layout buys its fixed shapes (CUDA graphs, no "
   f"host sync) with memory, the reverse of the toy picture above "
   f"({'contiguous larger' if toy_contig > toy_masked else 'contiguous not larger'} at toy size).")

# %% [markdown]
# ## 6. Expert parallelism: dispatch with `num_worst_tokens` padding
#
# With expert parallelism (EP) over `R` ranks, each rank holds `E` of the `E·R` experts
# (global expert `g` lives on rank `g // E` as local id `g % E`). DeepEP's "normal"
# (high-throughput) dispatch sends each token **once** to every rank that holds at least
# one of its experts; the receiver gets the row, its scale row, `recv_topk_ids` with local
# ids for its own experts and -1 for the others, and the unchanged weights (SPEC §9).
#
# How many rows a rank receives depends on the routing, which the host does not know without
# a synchronization. With `num_worst_tokens = W` every rank receives **exactly W rows**: the
# real ones first (ordered by source rank, then source token), then padding rows with all ids
# -1 and zero data. Shapes are fixed, so the step can live in a CUDA graph; this is what the
# Blackwell "ht" path of PR #7053 relies on. `moe_ref.ep.ep_dispatch` simulates all ranks in
# one process. Token `t` of rank `s` carries the label `T·s + t + 1` (exact in bf16 while `R·T <= 256`).

# %%
E_TOTAL = NUM_EXPERTS * EP_RANKS
W = EP_RANKS * NUM_TOKENS                      # worst case: every token of every rank comes here
xs, ids_g, ws = [], [], []
for s in range(EP_RANKS):
    lab = np.full((NUM_TOKENS, HIDDEN), 0, np.float32) + (NUM_TOKENS * s + np.arange(1, NUM_TOKENS + 1))[:, None]
    xs.append(paddle.to_tensor(lab).astype(paddle.bfloat16))
    w_s, i_s = routing.softmax_topk(paddle.to_tensor(rng.normal(size=(NUM_TOKENS, E_TOTAL)).astype(np.float32)), TOP_K)
    ids_g.append(i_s)
    ws.append(w_s)
    print(f"rank {s} global topk_ids:", i_s.numpy().tolist())
recv = ep.ep_dispatch(xs, None, ids_g, ws, num_local_experts=NUM_EXPERTS, num_worst_tokens=W)

# %%
handle = recv[0].handle
for r, d in enumerate(recv):
    src = [f"{int(a)}:{int(b)}" if a >= 0 else "pad" for a, b in
           zip(handle.recv_src_rank[r].numpy(), handle.recv_src_token[r].numpy())]
    print(f"rank {r}: num_recv_tokens={d.num_recv_tokens} of W={W}")
    print("   source rank:token ", src)
    print("   recv_topk_ids     ", d.recv_topk_ids.numpy().tolist())

# %%
for r, d in enumerate(recv):
    n = d.num_recv_tokens
    rid = d.recv_topk_ids.numpy()
    assert (rid[n:] == -1).all() and (d.recv_x[n:].astype(paddle.float32).numpy() == 0).all()   # padding last
    assert ((rid[:n] >= 0).any(axis=1)).all()                                  # every real row has a local expert
    assert (rid[rid >= 0] < NUM_EXPERTS).all()                                 # ... given by its local id
expected = [sum(int((i.numpy() // NUM_EXPERTS == r).any(axis=1).sum()) for i in ids_g) for r in range(EP_RANKS)]
assert [d.num_recv_tokens for d in recv] == expected
print("dispatch: each rank got the tokens it should, padding rows at the end")

# %% [markdown]
# Each rank then runs the layer of sections 2 and 4 on its `W` received rows (masked
# permute with its local ids, experts, weighted depermute), and `ep_combine` sends the
# partial outputs back, summing them per token **without** weights (they were applied in the
# depermute). With the identity expert the whole trip gives back `x` on every source rank,
# up to one bf16 rounding per rank's partial sum.

# %%
partials = []
for r, d in enumerate(recv):
    lay = layout.prefill_permute_to_masked_gemm(d.recv_x, None, d.recv_topk_ids, NUM_EXPERTS, max_token_num=W)
    partials.append(layout.depermute_prefill_combine(lay.permute_x, lay.permuted_indice_map, d.recv_topk_weights, W))
    print(f"rank {r}: token_nums_per_expert {lay.token_nums_per_expert.numpy().ravel().tolist()}")
outs = ep.ep_combine(partials, handle)
for s in range(EP_RANKS):
    print(f"rank {s} combined, column 0:", outs[s][:, 0].astype(paddle.float32).numpy())
    np.testing.assert_allclose(outs[s].astype(paddle.float32).numpy(), xs[s].astype(paddle.float32).numpy(),
                               rtol=2 ** -7)   # two bf16 roundings: the partial and the sum

# %% [markdown]
# **Picture.** The `W` rows each rank receives, coloured by source rank; grey rows are the
# `num_worst_tokens` padding. Every rank's buffer is `W` rows tall whatever it really
# receives: that is the memory cost of fixed shapes.

# %%
fig, axes = plt.subplots(1, EP_RANKS, figsize=(3 * EP_RANKS, 3.2), sharey=True)
for r, ax in enumerate(np.atleast_1d(axes)):
    src_rank = handle.recv_src_rank[r].numpy()
    ax.imshow(np.where(src_rank >= 0, src_rank, np.nan)[:, None], cmap="Set2", vmin=0, vmax=7, aspect="auto")
    ax.set_facecolor("0.88")
    for row, (a, b) in enumerate(zip(src_rank, handle.recv_src_token[r].numpy())):
        ax.text(0, row, f"from rank {a}, t{b}" if a >= 0 else "padding (ids -1)", ha="center", va="center",
                fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"rank {r}: {recv[r].num_recv_tokens} real / W={W}", fontsize=9)
np.atleast_1d(axes)[0].set_ylabel("received row")
fig.text(0.01, 0.005, "CPU · notebooks/01_permute_semantics.ipynb (make notebooks)", fontsize=7, color="0.4")
fig.tight_layout()
show(fig, f"One column per rank, W={W} received rows each, coloured by source rank; real rows per rank "
          f"{[d.num_recv_tokens for d in recv]}, the rest grey padding.")

# %% [markdown]
# More rows than `W` cannot fit a fixed buffer. Upstream sizes `W` so that it never
# happens; ours checks, on every rank, before anything is built. Here `W` is one less than
# the busiest rank receives:

# %%
w_small = max(d.num_recv_tokens for d in recv) - 1
try:
    ep.ep_dispatch(xs, None, ids_g, ws, num_local_experts=NUM_EXPERTS, num_worst_tokens=w_small)
    raise AssertionError("W too small must raise")
except ValueError as err:
    print("ValueError:", err)

# %% [markdown]
# ## 7. What upstream does differently
#
# FastDeploy's kernel behind `call_prefill_permute_to_masked_gemm` (PR #7053) differs from
# the contract of SPEC §5 in three ways. Each is shown here with ours.
#
# ### 7a. Slot order from atomics
#
# Upstream takes `slot = atomicAdd(&count[e], 1)`: the order of tokens inside an expert
# depends on thread scheduling and changes between runs. The GEMM does not care (rows are
# independent) and neither does the combine, which follows the map. But two runs cannot be
# compared row by row, and a bug that mixes up rows can hide. Ours is deterministic
# (token-major, then k). A test of a non-deterministic provider must compare order-free:
# through the map.
#
# Below, the slots inside each expert are rotated by one (an order an atomics run could
# produce, and one in which every expert with two or more rows really moves them), the rows
# are moved accordingly and the map rewritten. Combining through the new map gives the same
# output. That alone would pass for any map built consistently with its rows, so the cell also
# runs the **negative control**: the moved rows with the *old* map, i.e. a row-by-row
# comparison, which must give a different output.

# %%
again = layout.prefill_permute_to_masked_gemm(x, scale, topk_ids, NUM_EXPERTS, M)
assert np.array_equal(again.permuted_indice_map.numpy(), ref.permuted_indice_map.numpy())   # ours: same every run

new_slot = np.full((NUM_EXPERTS, M), -1)
for e in range(NUM_EXPERTS):
    new_slot[e, :counts[e]] = np.roll(np.arange(counts[e]), 1)         # one possible "atomics" order
shuffled_map = np.where(idx >= 0, (idx // M) * M
                        + new_slot[idx // M, idx % M], -1).astype(np.int32)
x_rows = ref.permute_x.astype(paddle.float32).numpy().reshape(NUM_EXPERTS * M, HIDDEN)
shuffled_x = np.zeros_like(x_rows)
shuffled_x[shuffled_map[idx >= 0]] = x_rows[idx[idx >= 0]]
print("an atomics-style map:\n", shuffled_map)
out_shuffled = layout.depermute_prefill_combine(
    paddle.to_tensor(shuffled_x.reshape(NUM_EXPERTS, M, HIDDEN)).astype(paddle.bfloat16),
    paddle.to_tensor(shuffled_map), topk_weights, NUM_TOKENS)
np.testing.assert_array_equal(out_shuffled.astype(paddle.float32).numpy(), back.astype(paddle.float32).numpy())
print("different slot order, same combined output through the new map")
assert (counts >= 2).any(), "negative control needs an expert with two rows: raise TOP_K or NUM_TOKENS"
out_old_map = layout.depermute_prefill_combine(
    paddle.to_tensor(shuffled_x.reshape(NUM_EXPERTS, M, HIDDEN)).astype(paddle.bfloat16),
    ref.permuted_indice_map, topk_weights, NUM_TOKENS)
wrong_tokens = np.nonzero((out_old_map.astype(paddle.float32).numpy() != x.astype(paddle.float32).numpy()).any(axis=1))[0]
assert wrong_tokens.size > 0
print(f"negative control: moved rows read through the old map give wrong rows for tokens {wrong_tokens.tolist()}")

# %% [markdown]
# ### 7b. Padding rows assumed at the end
#
# With EP, the `W = num_worst_tokens` received rows end with padding rows whose ids are all
# -1. Upstream's kernel stops at the **first** all(-1) row, so a padding row anywhere else
# silently drops every token after it. Ours skips -1 entries wherever they are. Here the
# middle row (`GAP_ROW` below) is turned into padding, as if a token had been sent to no
# local expert. What upstream would do is **our arithmetic** from that stopping rule (SPEC §5),
# not a run of upstream's kernel.

# %%
GAP_ROW = NUM_TOKENS // 2
ids_gap = ids_np.copy()
ids_gap[GAP_ROW] = -1
gap = layout.prefill_permute_to_masked_gemm(x, scale, paddle.to_tensor(ids_gap), NUM_EXPERTS, M)
first_pad = int(np.argmax((ids_gap < 0).all(axis=1)))
upstream_seen = (ids_gap[:first_pad] >= 0).sum()
print("topk_ids with a padding row inside:\n", ids_gap)
print("map:\n", gap.permuted_indice_map.numpy())
print(f"ours routes {gap.token_nums_per_expert.numpy().sum()} entries; by its stop-at-first-padding rule upstream "
      f"would stop at row {first_pad} and route {upstream_seen} (our arithmetic), dropping tokens "
      f"{list(range(first_pad + 1, NUM_TOKENS))}")
assert first_pad == GAP_ROW
assert gap.token_nums_per_expert.numpy().sum() == (ids_gap >= 0).sum() == (NUM_TOKENS - 1) * TOP_K
assert (gap.permuted_indice_map.numpy()[GAP_ROW] == -1).all()

# %% [markdown]
# ### 7c. No overflow or range check
#
# Upstream writes row `e·M + slot` without checking `slot < M` or `0 <= e < E`: an expert
# receiving more than `M` rows, or a global id passed where a local one is expected, writes
# into the next expert's slab or out of the buffer. Ours raises a `ValueError` that names the
# argument, the expert and the count, before anything is written; the backend contract
# checks the same on every provider.

# %%
m_small = int(counts.max()) - 1
for name, fn in (("moe_ref.layout", layout.prefill_permute_to_masked_gemm),
                 ("backend.ops   ", provider.prefill_permute_to_masked_gemm)):
    try:
        fn(x, scale, topk_ids, NUM_EXPERTS, m_small)
        raise AssertionError("an overflow must raise")
    except ValueError as err:
        print(f"{name} M={m_small}: ValueError: {err}")

# %%
ids_global = ids_np.copy()
ids_global[NUM_TOKENS - 1, 0] = NUM_EXPERTS + 3           # a global id where a local one belongs
for name, fn in (("moe_ref.layout", layout.prefill_permute_to_masked_gemm),
                 ("backend.ops   ", provider.prefill_permute_to_masked_gemm)):
    try:
        fn(x, scale, paddle.to_tensor(ids_global), NUM_EXPERTS, M)
        raise AssertionError("an out-of-range id must raise")
    except ValueError as err:
        print(f"{name}: ValueError: {err}")

# %% [markdown]
# ## Summary
#
# | step | function | shapes | ours vs upstream |
# |---|---|---|---|
# | route | `moe_ref.routing.softmax_topk` / `noaux_tc_topk` | `[T, E_total]` → `[T, K_top]` ids, weights | ties to the lowest id (stable sort) |
# | permute (masked) | `prefill_permute_to_masked_gemm` | `x [W, H]` → `[E, M, H]`, map `[W, K_top]`, counts `[E, 1]` | deterministic order; padding anywhere; overflow and bad ids raise |
# | scales | `MNMajorScale` | logical `[E, M, S']`, physical `[E, S', align(M, 4)]` | unused rows zero |
# | permute (contiguous) | `permute_to_contiguous` | `[Σ align(count, 128), H]` + `m_indices` | same slot order as masked |
# | EP dispatch | `moe_ref.ep.ep_dispatch` | `W = num_worst_tokens` rows per rank, padding last | more than W rows raises |
# | combine | `depermute_prefill_combine` | `[E, M, H]` → `[W, H]` bf16 | float32 sum in k order; rows with no expert are zero |
#
# Next: `02_scale_conversion` follows the scales from FP32 to the bytes the Blackwell GEMM
# reads.
