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
# # 04 · Performance: how the cost grows, what the buffers weigh, what the GPU does
#
# **Nothing in this notebook was measured on Blackwell.** The CPU sections run here; the GPU
# numbers (section 5) come from NVIDIA H200 cards (Hopper, SM90), where the Triton kernels
# implement the Blackwell contract without Blackwell's block-scaled tensor-core instructions.
# They bound what the portable path does, not what `blackwell_ops` does on a B200.
#
# Four measurements, each next to a baseline:
#
# 1. **CPU timings** of the oracle, the reference FP8 layer (`moe_ref`) and the backend
#    (`FusedMoE` + `BlackwellGemmFusedMoeMethod`, Paddle provider), and how they grow with the
#    number of tokens `T` and experts `E`. On a CPU these numbers say how the work *scales*,
#    not how fast a GPU is: the Paddle provider emulates the Blackwell kernels with float32
#    math (it decodes the CUTLASS scale bytes and the FP8 weights on every call).
# 2. **Fill of M**: the masked GEMM must cost what its *valid* rows cost, not what the
#    `E·M` buffer would (SPEC §6).
# 3. **Memory** of the forward buffers at a DeepSeek-V3 scale, ours against upstream's sizing
#    (PR #7053 zero-fills an `E·M·2I` bf16 buffer on every call, SPEC §13), computed by
#    `backend.moe.blackwell_method.forward_buffer_bytes`.
# 4. **GPU results** read from the benchmark JSON files committed in `benchmarks/results/`
#    (or, with `RUN_GPU_LIVE = True` on a CUDA machine, from a fresh run of the benchmark).
#
# Every figure states the hardware and the command that produced its numbers (GPU figures also
# the card and the date). Cells that print timings, or numbers read from the benchmark files,
# are tagged `nbval-ignore-output` (they change from run to run, or when the benchmarks are
# re-run); their checks (`assert`) still run. Times are shown, never asserted: the checks are
# on the work done (rows written, bytes), which a timing only illustrates.

# %%
# Setup. Importing Paddle emits two known notices that say nothing about these notebooks:
# "No ccache found" (a UserWarning, filtered where it arises, in moe_ref/_paddle.py) and, when
# OMP_NUM_THREADS > 1 (`make` sets 2), advice about OMP_NUM_THREADS printed to stderr. Exactly
# those advice lines are dropped here; any other warning or stderr line of the import shows.
import contextlib
import io
import logging
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

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

from moe_ref import moe
from moe_ref.metrics import calc_diff
from backend import ops
from backend.moe.blackwell_method import forward_buffer_bytes
from backend.moe.layer import FusedMoE
from backend.quantization import BlockWiseFP8Config
from nbtools import md, show

# %matplotlib inline
np.set_printoptions(linewidth=110, precision=4)
os.environ["FD_USE_BLACKWELL_GEMM"] = "1"          # BlockWiseFP8Config picks BlackwellGemmFusedMoeMethod

# %% tags=["parameters"]
HIDDEN = 512                     # H: a multiple of 128
INTER = 256                      # I (moe_intermediate_size): a multiple of 128
NUM_EXPERTS = 8                  # E for the token sweep and the fill sweep
TOP_K = 4                        # K_top: at most every E used below
TOKENS = [32, 64, 128, 256, 512]  # T sweep: two or more values, increasing
EXPERTS = [4, 8, 16, 32]         # E sweep at TOKENS_FOR_EXPERT_SWEEP tokens: two or more values, increasing
TOKENS_FOR_EXPERT_SWEEP = 128
FILL_M = 512                     # M of the fill sweep (rows per expert of the masked buffer)
FILLS = [0.1, 0.25, 0.5, 1.0]    # two or more fractions of M in (0, 1], increasing
REPEATS = 3                      # timed runs per point after one warm-up (min and median shown)
# Memory at a DeepSeek-V3 scale: 256 experts over 8 ranks (E 32 each), H 7168, I 2048, K_top 8
MEMORY_SHAPE = {"E": 32, "H": 7168, "I": 2048, "K": 8, "R": 8, "max_tokens_per_rank": 8192}
RESULTS_DIR = "benchmarks/results"  # relative to the repository root
RUN_GPU_LIVE = False             # True: run benchmarks/bench_gpu.py here (needs CUDA + Triton) instead of reading gpu_*.json
SEED = 0

# %%
paddle.seed(SEED)
rng = np.random.default_rng(SEED)
ROOT = next(p for p in [pathlib.Path.cwd(), *pathlib.Path.cwd().parents] if (p / "pyproject.toml").exists())


def cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


HOST = (f"{cpu_model()}, {os.cpu_count()} logical cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}, "
        f"paddle {paddle.__version__}")
FOOTER = f"{HOST} · notebooks/04_performance.ipynb (make notebooks)"
print("host:", HOST)
provider = ops.get_provider("paddle")
print("CPU provider:", provider.name)


def best_time(fn, repeats=REPEATS):
    """Fastest wall time (s) of fn() over `repeats` runs after one warm-up: on a shared CPU the
    fastest run is the one least disturbed by other processes. Every ratio below uses it."""
    return timings(fn, repeats)["min"]


def timings(fn, repeats=REPEATS):
    """{"min", "median", "max"} wall time (s) of fn() over `repeats` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return {"min": float(np.min(times)), "median": float(np.median(times)), "max": float(np.max(times))}


def make_layer(num_experts, weights):
    layer = FusedMoE(num_experts, TOP_K, HIDDEN, INTER, BlockWiseFP8Config(is_checkpoint_bf16=True))
    layer.load_weights(weights.w_up, weights.w_down)
    return layer


def footer(fig, text=FOOTER):
    fig.text(0.01, 0.005, text, fontsize=6.5, color="0.4")

# %% [markdown]
# ## 1. CPU: time against the number of tokens
#
# One layer, `E = NUM_EXPERTS`, `K_top = TOP_K`, weights quantized once beforehand (as a
# server does at load time). Three implementations:
#
# - **oracle**: float32 on unquantized weights, one matmul pair per expert (the floor for
#   anything built on float32 GEMMs);
# - **reference**: the FP8 path with UE8M0 scales, `moe_forward_fp8` (weights dequantized once
#   and cached);
# - **backend**: `FusedMoE.forward` on the TP path through the Paddle provider: quantize,
#   permute, CUTLASS-scale conversion, two masked GEMMs, SwiGLU + quant, combine.
#
# First the check that the backend computes the same thing as the reference at every size,
# then the timings.

# %%
weights = moe.make_moe_weights(NUM_EXPERTS, HIDDEN, INTER, seed=SEED)
qw = moe.quantize_moe_weights(weights.w_up, weights.w_down, use_ue8m0=True)
qw.dequantized()
layer = make_layer(NUM_EXPERTS, weights)
inputs = {t: moe.make_moe_inputs(t, HIDDEN, NUM_EXPERTS, TOP_K, seed=SEED + 1) for t in TOKENS}
for t in (TOKENS[0], TOKENS[-1]):
    x, tw, ti = inputs[t]
    d = calc_diff(layer(x, topk=(tw, ti)), moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw))
    assert d < 1e-5, (t, d)
print(f"backend == reference (calc_diff < 1e-5) at T = {TOKENS[0]} and {TOKENS[-1]}")

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: wall-clock timings differ on every run and machine.
token_stats = {"oracle": [], "reference": [], "backend": []}
for t, (x, tw, ti) in inputs.items():
    token_stats["oracle"].append(timings(lambda: moe.moe_forward_oracle(x, weights.w_up, weights.w_down, tw, ti)))
    token_stats["reference"].append(timings(
        lambda: moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw)))
    token_stats["backend"].append(timings(lambda: layer(x, topk=(tw, ti))))
token_times = {k: [st["min"] for st in v] for k, v in token_stats.items()}
print(f"fastest of {REPEATS} runs (ms); in brackets the spread (max - min) / min over the runs")
print(f"{'T':>6s} " + " ".join(f"{k + ' ms':>20s}" for k in token_times) + f" {'backend/ref':>12s}")
for j, t in enumerate(TOKENS):
    print(f"{t:6d} " + " ".join(f"{v[j]['min'] * 1e3:12.1f} ({(v[j]['max'] - v[j]['min']) / v[j]['min']:5.0%})"
                                 for v in token_stats.values())
          + f" {token_times['backend'][j] / token_times['reference'][j]:12.2f}")
ratio_t = np.array(token_times["backend"]) / np.array(token_times["reference"])
md(f"Time grows with `T` while the per-token cost falls as the fixed per-call costs (argument checks, one GEMM "
   f"pair per expert, the Paddle provider's per-call decode of the FP8 weights) are amortized. This run: the "
   f"backend took {ratio_t.min():.2f}x to {ratio_t.max():.2f}x the reference's time (fastest runs). The backend "
   f"re-decodes the weights from FP8 + CUTLASS bytes on every call, as a GPU kernel would, where the reference "
   f"caches float32 weights; it also runs SwiGLU + quant once over all valid rows. Run-to-run spread on this "
   f"shared machine reached {max((st['max'] - st['min']) / st['min'] for v in token_stats.values() for st in v):.0%}, "
   f"so ratios near 1 are not a ranking.")

# %%
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
for name, times in token_times.items():
    ax1.loglog(TOKENS, np.array(times) * 1e3, "o-", label=name)
    ax2.semilogx(TOKENS, np.array(times) * 1e6 / np.array(TOKENS), "o-", label=name)
for ax in (ax1, ax2):
    ax.set_xticks(TOKENS, [str(t) for t in TOKENS])
    ax.minorticks_off()
ax1.set_xlabel("tokens T")
ax1.set_ylabel("ms per layer")
ax1.set_title(f"time vs T (E={NUM_EXPERTS}, K_top={TOP_K}, H={HIDDEN}, I={INTER})", fontsize=10)
ax2.set_xlabel("tokens T")
ax2.set_ylabel("µs per token")
ax2.set_title("cost per token: fixed overheads fade as T grows", fontsize=10)
ax1.legend(fontsize=8)
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, f"Left: ms per layer against T = {TOKENS} on log axes for the oracle, the reference and the backend. "
          f"Right: microseconds per token against T, falling as fixed costs are amortized. CPU: {HOST}.")

# %% [markdown]
# ## 2. CPU: time against the number of experts
#
# Same layer shape, `T` fixed, more experts: each expert gets fewer rows, and the per-expert
# costs (one GEMM pair each, weight decode proportional to `E`) take over.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: wall-clock timings differ on every run and machine.
expert_times = {"reference": [], "backend": []}
expert_spread = []                                  # (max - min) / min over the REPEATS runs of each point
active_experts = []
for e in EXPERTS:
    w_e = moe.make_moe_weights(e, HIDDEN, INTER, seed=SEED)
    qw_e = moe.quantize_moe_weights(w_e.w_up, w_e.w_down, use_ue8m0=True)
    qw_e.dequantized()
    layer_e = make_layer(e, w_e)
    x, tw, ti = moe.make_moe_inputs(TOKENS_FOR_EXPERT_SWEEP, HIDDEN, e, TOP_K, seed=SEED + 1)
    active_experts.append(int((np.bincount(ti.numpy().ravel(), minlength=e) > 0).sum()))
    assert calc_diff(layer_e(x, topk=(tw, ti)), moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw_e)) < 1e-5
    for name, fn in (("reference", lambda: moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw_e)),
                     ("backend", lambda: layer_e(x, topk=(tw, ti)))):
        st = timings(fn)
        expert_times[name].append(st["min"])
        expert_spread.append((st["max"] - st["min"]) / st["min"])
print(f"{'E':>4s} {'rows/expert':>12s} {'active':>7s} " + " ".join(f"{k + ' ms':>14s}" for k in expert_times)
      + f" {'backend/ref':>12s}")
for j, e in enumerate(EXPERTS):
    print(f"{e:4d} {TOKENS_FOR_EXPERT_SWEEP * TOP_K / e:12.0f} {active_experts[j]:7d} "
          + " ".join(f"{v[j] * 1e3:14.1f}" for v in expert_times.values())
          + f" {expert_times['backend'][j] / expert_times['reference'][j]:12.2f}")
growth = {k: v[-1] / v[0] for k, v in expert_times.items()}
steps = {k: np.array(v[1:]) / np.array(v[:-1]) for k, v in expert_times.items()}
j_max = int(np.argmax(steps["reference"] + steps["backend"]))
md(f"From E = {EXPERTS[0]} to E = {EXPERTS[-1]} ({EXPERTS[-1] / EXPERTS[0]:g}x the experts, the same rows and FLOPs in "
   f"total) the reference's time grew {growth['reference']:.2f}x and the backend's {growth['backend']:.2f}x: both run "
   f"one GEMM pair (and, in the backend, one weight decode) per active expert, so per-expert fixed costs grow with E "
   f"while the work per expert shrinks. The steepest step in this run is from E = {EXPERTS[j_max]} to "
   f"E = {EXPERTS[j_max + 1]} (reference {steps['reference'][j_max]:.2f}x, backend {steps['backend'][j_max]:.2f}x). "
   f"Repeated runs of the same point differed by up to {max(expert_spread):.0%} in this run (on a shared machine whole "
   f"runs of the sweep vary more: re-run the cell to see); a step or a gap between the two curves within that spread "
   f"is not a finding. Neither is a property of the GPU kernels.")

# %%
fig, ax = plt.subplots(figsize=(6, 3.4))
for name, times in expert_times.items():
    ax.plot(EXPERTS, np.array(times) * 1e3, "o-", label=name)
ax.set_xscale("log", base=2)
ax.set_xticks(EXPERTS, [str(e) for e in EXPERTS])
ax.minorticks_off()
ax.set_xlabel("experts E (same T·K_top rows in total)")
ax.set_ylabel("ms per layer")
ax.set_title(f"time vs E (T={TOKENS_FOR_EXPERT_SWEEP}, K_top={TOP_K})", fontsize=10)
ax.legend(fontsize=8)
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, f"ms per layer against the number of experts E = {EXPERTS} at T = {TOKENS_FOR_EXPERT_SWEEP}, reference "
          f"and backend. CPU: {HOST}.")

# %% [markdown]
# ## 3. Fill of M: work follows the valid rows
#
# `group_gemm_masked` gets an `[E·M, K]` buffer and `masked_m[e]` valid rows per expert.
# Upstream sizes M for the worst case (`R · max_tokens_per_rank`) while a typical call fills a
# fraction of it, so a kernel whose cost followed M would waste most of its time. Here GEMM 1
# runs on `M = FILL_M` rows per expert with 10 % to 100 % of them valid; operands come from
# the public ops (`per_token_quant`, `unpack_and_convert_scale`) and the layer's converted
# weights (`up_gate_proj_weight`, `up_gate_proj_weight_scale_inv`). On CPU the Paddle provider
# also has a fixed part per call, independent of the rows: it decodes the FP8 weights and their
# CUTLASS scale bytes to float32 (a GPU kernel does that inside the tensor-core pipeline).
#
# What is checked is the **work**, not the time: the output buffer is filled with a sentinel
# before the call, and afterwards exactly the valid rows of every expert must have been
# written and every other row must still hold the sentinel. The timing only illustrates it.

# %%
def gemm1_inputs(fill):
    m = FILL_M
    valid = max(1, int(round(fill * m)))
    a_q, a_words = provider.per_token_quant(
        paddle.to_tensor(rng.normal(size=(NUM_EXPERTS * m, HIDDEN)).astype(np.float32)).astype(paddle.bfloat16), 128, True)
    counts = paddle.full([NUM_EXPERTS], valid, dtype=paddle.int32)
    sfa = provider.unpack_and_convert_scale(a_words.reshape([NUM_EXPERTS, m, -1]), counts)
    out = paddle.full([NUM_EXPERTS * m, 2 * INTER], SENTINEL, dtype=paddle.bfloat16)
    return (a_q, layer.up_gate_proj_weight, sfa, layer.up_gate_proj_weight_scale_inv, counts, out, None, m, -1), valid


SENTINEL = 1e30                                    # no GEMM output of this data comes near it
sentinel_bf16 = float(paddle.to_tensor([SENTINEL]).astype(paddle.bfloat16).astype(paddle.float32)[0])
fill_args = {f: gemm1_inputs(f) for f in FILLS}
print(f"GEMM 1: E={NUM_EXPERTS}, M={FILL_M}, N=2I={2 * INTER}, K=H={HIDDEN}")
print(f"{'fill':>6s} {'valid rows/expert':>18s} {'rows written':>13s} {'rows untouched':>15s}")
for f, (args, valid) in fill_args.items():
    out = provider.group_gemm_masked(*args).astype(paddle.float32).numpy().reshape(NUM_EXPERTS, FILL_M, -1)
    written = ~(out == sentinel_bf16).all(axis=-1)                        # [E, M]: row holds GEMM output
    assert (written[:, :valid].all() and not written[:, valid:].any()), (f, valid)
    print(f"{f * 100:5.0f}% {valid:18d} {int(written.sum()):13d} {int((~written).sum()):15d}")

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: wall-clock timings differ on every run and machine.
fill_times = [best_time(lambda a=args: provider.group_gemm_masked(*a)) for args, _ in fill_args.values()]
print(f"{'fill':>6s} {'valid rows':>11s} {'ms':>8s} {'x 100 %':>8s}")
for f, (_, valid), t in zip(FILLS, fill_args.values(), fill_times):
    print(f"{f * 100:5.0f}% {valid * NUM_EXPERTS:11d} {t * 1e3:8.2f} {t / fill_times[-1]:8.2f}")

# %%
fig, ax = plt.subplots(figsize=(6, 3.4))
ax.plot(np.array(FILLS) * 100, np.array(fill_times) * 1e3, "o-", label="group_gemm_masked (paddle provider)")
fixed = max(0.0, (fill_times[0] * FILLS[-1] - fill_times[-1] * FILLS[0]) / (FILLS[-1] - FILLS[0]))   # line through 10 % and 100 %
ax.plot([0] + [f * 100 for f in FILLS], [fixed * 1e3] + [(fixed + f * (fill_times[-1] - fixed)) * 1e3 for f in FILLS],
        "k:", label="fixed part + proportional to valid rows")
ax.axhline(fill_times[-1] * 1e3, color="C3", ls="--", lw=1, label="if cost followed M (every row)")
ax.set_xlabel("valid rows per expert, % of M")
ax.set_ylabel("ms")
ax.set_ylim(bottom=0)
ax.set_title(f"masked GEMM 1: E={NUM_EXPERTS}, M={FILL_M}, N={2 * INTER}, K={HIDDEN}", fontsize=10)
ax.legend(fontsize=8)
footer(fig)
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, f"ms of one masked GEMM against the valid rows per expert ({[round(f * 100) for f in FILLS]} % of M = "
          f"{FILL_M}), with a fixed-plus-proportional line and, dashed, the time of the full buffer. CPU: {HOST}.")

# %% [markdown]
# ## 4. Memory of the forward buffers
#
# The masked layout has a fixed shape: `M` rows per expert whatever the routing does, with
# `M = R · max_tokens_per_rank` on the prefill EP path (every token of every rank could pick
# the same expert). At DeepSeek-V3 scale on 8 ranks (`E = 32` local experts,
# `max_tokens_per_rank = 8192`, so `M = 65536`, `H = 7168`, `I = 2048`) that is large whoever
# implements it. The difference between ours and upstream is the **memset**: upstream allocates
# `up_gate_proj_out` with zeros on every call (its size is computed below); ours allocates
# without filling, because the GEMM writes exactly the valid rows and every later op reads
# only those (SPEC §6, §13).

# %%
ms = MEMORY_SHAPE
m_rows = ms["R"] * ms["max_tokens_per_rank"]
w_rows = m_rows                                    # num_worst_tokens: the default worst case
valid = ms["max_tokens_per_rank"] * ms["K"]         # rows the GEMMs really fill when routing is balanced
mem = forward_buffer_bytes(ms["E"], m_rows, ms["H"], ms["I"], num_worst_tokens=w_rows, top_k=ms["K"],
                           valid_rows=valid)
print(f"E={ms['E']} M={m_rows} H={ms['H']} I={ms['I']} W={w_rows} K_top={ms['K']}")
print(f"{'buffer':52s} {'ours GB':>9s} {'upstream GB':>12s}")
for key in mem["ours"]:
    if key in ("total", "zero_filled"):
        continue
    print(f"{key:52s} {mem['ours'][key] / 1e9:9.3f} {mem['upstream'][key] / 1e9:12.3f}")
print(f"{'total allocated':52s} {mem['ours']['total'] / 1e9:9.3f} {mem['upstream']['total'] / 1e9:12.3f}")
print(f"{'zero-filled on every call':52s} {mem['ours']['zero_filled'] / 1e9:9.3f} {mem['upstream']['zero_filled'] / 1e9:12.3f}")
print(f"bytes the two GEMMs actually write at {valid} valid rows (balanced routing): "
      f"{mem['gemm_written_valid_rows'] / 1e9:.2f} GB")

# %%
assert mem["ours"]["zero_filled"] == 0
assert mem["upstream"]["zero_filled"] == ms["E"] * m_rows * 2 * ms["I"] * 2        # E·M·2I bf16
by_name = {k.split(" ")[0]: v for k, v in mem["ours"].items()}
assert by_name["permute_x"] == ms["E"] * m_rows * ms["H"]                             # E·M·H fp8, 1 byte each
assert by_name["up_gate_proj_out"] == ms["E"] * m_rows * 2 * ms["I"] * 2              # E·M·2I bf16
assert by_name["act"] == ms["E"] * m_rows * ms["I"]                                   # E·M·I fp8
assert by_name["ffn_out"] == ms["E"] * m_rows * ms["H"] * 2                           # E·M·H bf16
assert mem["ours"]["total"] == mem["upstream"]["total"]                               # same allocation as upstream
md(f"At this shape (`E={ms['E']}`, `M = R · max_tokens_per_rank = {m_rows}`, `I={ms['I']}`) upstream zero-fills "
   f"{mem['upstream']['zero_filled'] / 1e9:.2f} GB (`E·M·2I` bf16) on every call, while the two GEMMs write "
   f"{mem['gemm_written_valid_rows'] / 1e9:.2f} GB at {valid} valid rows; both allocate "
   f"{mem['ours']['total'] / 1e9:.1f} GB in total.")

# %% [markdown]
# How the fixed buffers grow with `max_tokens_per_rank` next to what a balanced routing really
# writes: the gap is the price of fixed shapes (CUDA graphs, no host sync), and the memset is
# the part of it that costs time on every call.

# %%
tokens_per_rank = np.array([512, 1024, 2048, 4096, 8192, 16384])
alloc, memset, written = [], [], []
for tpr in tokens_per_rank:
    b = forward_buffer_bytes(ms["E"], ms["R"] * int(tpr), ms["H"], ms["I"], num_worst_tokens=ms["R"] * int(tpr),
                             top_k=ms["K"], valid_rows=int(tpr) * ms["K"])
    alloc.append(b["ours"]["total"])
    memset.append(b["upstream"]["zero_filled"])
    written.append(b["gemm_written_valid_rows"])
fig, ax = plt.subplots(figsize=(7, 3.6))
ax.loglog(tokens_per_rank, np.array(alloc) / 1e9, "o-", label="allocated, ours = upstream")
ax.loglog(tokens_per_rank, np.array(memset) / 1e9, "s--", label="zero-filled every call, upstream (ours: 0)")
ax.loglog(tokens_per_rank, np.array(written) / 1e9, "^-", label="written by the GEMMs, balanced routing")
ax.set_xlabel("max_tokens_per_rank (M = R · that)")
ax.set_ylabel("GB per layer call")
ax.set_title(f"forward buffers, E={ms['E']} local experts, R={ms['R']}, H={ms['H']}, I={ms['I']}, K_top={ms['K']}",
             fontsize=9)
ax.legend(fontsize=8)
footer(fig, "computed (no hardware): backend.moe.blackwell_method.forward_buffer_bytes · notebooks/04_performance.ipynb")
fig.tight_layout(rect=(0, 0.03, 1, 1))
show(fig, f"GB per layer call against max_tokens_per_rank {tokens_per_rank.tolist()} on log axes: allocated (ours = "
          f"upstream), zero-filled by upstream on every call, and written by the GEMMs under balanced routing. "
          f"Computed, no hardware.")

# %% [markdown]
# The weights carry their scales in three formats (see the `BlackwellGemmFusedMoeMethod`
# docstring): FP32 128x128 blocks (for fallbacks), per-row packed UE8M0 words (DeepGEMM on
# SM100) and CUTLASS scale bytes (`group_gemm_masked`). Their size next to the FP8 weights, for
# the layer of section 1:

# %%
print(f"{'attribute':34s} {'shape':>16s} {'dtype':>14s} {'bytes':>10s} {'% of FP8 weight':>16s}")
for proj in ("up_gate_proj", "down_proj"):
    wt = getattr(layer, f"{proj}_weight")
    w_bytes = int(np.prod(wt.shape))
    for suffix in ("_weight", "_weight_scale_fp32", "_weight_scale_ue8m0", "_weight_scale_inv"):
        t = getattr(layer, proj + suffix)
        nbytes = int(np.prod(t.shape)) * t.element_size()
        print(f"{proj + suffix:34s} {str(list(t.shape)):>16s} {str(t.dtype).replace('paddle.', ''):>14s} "
              f"{nbytes:10d} {100 * nbytes / w_bytes:15.2f}%")

# %% [markdown]
# ## 5. GPU results (NVIDIA H200, Hopper: not Blackwell)
#
# Read from `benchmarks/results/`: `gpu_<card>.json` from
# `python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_<card>.json` (one card) and
# `ep_gpu_<card>x<R>.json` from `benchmarks/bench_ep_gpu.py` under `torchrun` (several cards).
# With `RUN_GPU_LIVE = True` the first is produced here, all sections, into `build/gpu_live.json`.
# The only cards measured are H200s. Every figure names the card and the date recorded in
# the JSON (or says that none was recorded).
#
# **The kernels compared** (all compute the masked grouped FP8 GEMM of SPEC §6 on the valid
# rows only; the Triton ones are `backend/ops/triton`):
#
# | name | what it is |
# |---|---|
# | `explicit_ue8m0` | `launch.group_gemm_masked`, Blackwell recipe: reads the CUTLASS UE8M0 scale bytes; per 128-wide K block one FP8 tensor-core MMA (`wgmma` on e4m3, SASS `QGMMA`) into a float32 partial, multiplied by the two scales and added to the accumulator ("explicit" promotion, as DeepGEMM does on Hopper). On SM90 it runs the warp-specialized Gluon kernel (`gluon_gemm.py`: a TMA producer warp, two math warpgroups promoting while the other's MMA runs), elsewhere the `tl` kernel `group_gemm_masked_kernel` |
# | `explicit_fp32` | `launch.group_gemm_masked_fp32`: FP32 1x128 / 128x128 scales (the Hopper recipe). On SM90 it runs the CuTe DSL kernel (`backend/ops/cute`, DeepGEMM's structure: 128 x 192 tiles, the weight tile multicast to 2-CTA clusters) from 256 rows per expert when the optional DSL imports, else the Gluon kernel (its A scales loaded into shared memory by the TMA); the record's `kernel` names which ran |
# | `explicit_fp32_tl` | the `tl` kernel with FP32 scales, forced (the CPU-testable twin; one warpgroup does MMA and promotion) |
# | `dot_scaled_ue8m0` | `group_gemm_masked_dot_scaled_kernel`: the K loop written with Triton's `tl.dot_scaled` (one UE8M0 byte per 32 K), the op that maps to Blackwell's block-scaled MMA (`tcgen05.mma ... block_scale`). SM90 has no such instruction, so Triton emulates it: the compiled-kernel report below counts its MMAs |
# | cuBLAS | cuBLASLt blockwise FP8 (`torch._scaled_mm` with 1x128 x 128x128 FP32 scales) on one dense GEMM with the same FLOPs: a dense upper reference, not a grouped kernel |
# | DeepGEMM | `m_grouped_fp8_gemm_nt_masked`, shown when the JSON holds a `gemm_vs_peers` list |

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: reads benchmarks/results/, which the benchmark scripts rewrite independently of this notebook.
results_dir = ROOT / RESULTS_DIR
NO_DATE = "date not recorded in the JSON"
if RUN_GPU_LIVE:
    import torch                                    # raises here when torch is missing: asked for, not skipped
    if not torch.cuda.is_available():
        raise RuntimeError("RUN_GPU_LIVE=True: expected a CUDA device visible to torch, found none")
    live_path = ROOT / "build" / "gpu_live.json"
    live_path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--out", str(live_path)],
                   check=True, capture_output=True, text=True, cwd=ROOT)
    gpu_files, gpu_source = [live_path], "live run"
else:
    gpu_files, gpu_source = sorted(results_dir.glob("gpu_*.json")), "committed file"
gpu_runs = [(p, json.loads(p.read_text())) for p in gpu_files]
ep_runs = [(p, json.loads(p.read_text())) for p in sorted(results_dir.glob("ep_gpu_*.json"))]


def env_of(run):
    return run.get("sections", {}).get("environment", {})


def card_of(run):
    return run.get("card") or env_of(run).get("card") or run.get("versions", {}).get("card") or "unknown GPU"


def date_of(run):
    return run.get("date") or env_of(run).get("date") or NO_DATE


def gpu_footer(fig, path, run, command=None):
    cmd = command or f"python3 benchmarks/bench_gpu.py --out benchmarks/results/{path.name}"
    fig.text(0.01, 0.005, f"{card_of(run)} · {date_of(run)} · {gpu_source} {path.name} · {cmd[:140]}",
             fontsize=6.5, color="0.4")


print("GPU results:", gpu_source)
for p, run in gpu_runs:
    env = env_of(run)
    print(f"  {p.name}: {card_of(run)}, capability {env.get('capability')}, {env.get('sm_count')} SMs, "
          f"torch {env.get('torch')}, triton {env.get('triton')}, {date_of(run)}, errors {len(run.get('errors', []))}")
    assert not run.get("errors"), f"{p.name}: the benchmark recorded errors"
    assert str(env.get("capability", "")).split(".")[0] != "10", f"{p.name}: a Blackwell run: update the text above"
for p, doc in ep_runs:
    print(f"  {p.name}: {card_of(doc)} x{doc.get('gpu_count')}, ops {doc.get('ops')}, {date_of(doc)}, "
          f"runs {', '.join(doc.get('runs', {})) or 1}")
if not gpu_runs:
    print("  no gpu_*.json: run `python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_<card>.json` on a GPU")

# %% [markdown]
# ### 5a. How fast is the masked grouped GEMM, against cuBLAS (and DeepGEMM)?
#
# TFLOP/s counted on the valid rows, DeepSeek-V3's two expert GEMMs (N=4096/K=7168 up,
# N=7168/K=2048 down), E = 32 local experts, the same number of valid rows per expert
# ("fill"), or uneven counts from 0 to the stated maximum. Every kernel's output was checked
# against a torch reference in the same run (`correct`, asserted here).

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gpu_*.json; the correctness flags are asserted.
KERNELS = ("explicit_ue8m0", "explicit_fp32", "dot_scaled_ue8m0")
for path, run in gpu_runs:
    rows = (run.get("sections", {}).get("gemm") or {}).get("rows", [])
    if not rows:
        print(f"{path.name}: no GEMM section")
        continue
    for r in rows:
        assert all(r[k].get("correct") for k in KERNELS if isinstance(r.get(k), dict)), (path.name, r["N"], r["K"], r["fill"])
    print(f"{path.name} ({card_of(run)}, {date_of(run)}): TFLOP/s, and explicit_ue8m0 / cuBLAS")
    print(f"{'N':>5s} {'K':>5s} {'rows/expert':>14s} {'cuBLAS':>7s} " + " ".join(f"{k:>16s}" for k in KERNELS)
          + f" {'ue8m0/cuBLAS':>13s}")
    for r in sorted(rows, key=lambda r: (r["N"], isinstance(r["fill"], str), r["fill"] if isinstance(r["fill"], int) else 0)):
        print(f"{r['N']:5d} {r['K']:5d} {r['fill']!s:>14s} {r['cublas_tflops']:7.0f} "
              + " ".join(f"{r[k]['tflops']:16.0f}" for k in KERNELS) + f" {r['explicit_ue8m0']['vs_cublas']:13.2f}")
    even = [r for r in rows if isinstance(r["fill"], int)]
    best = max(even, key=lambda r: r["explicit_ue8m0"]["vs_cublas"])
    slow = [r["explicit_ue8m0"]["tflops"] / r["dot_scaled_ue8m0"]["tflops"] for r in rows]
    compiled = run.get("sections", {}).get("compiled") or []
    mma = {}
    for c in compiled:
        m = mma.setdefault(c["kernel"], {"QGMMA": 0, "HGMMA": 0})
        for op in m:
            m[op] += c.get(op) or 0
    md(f"**{card_of(run)}** ({date_of(run)}). `explicit_ue8m0` reaches {min(r['explicit_ue8m0']['vs_cublas'] for r in even):.2f}x "
       f"to {best['explicit_ue8m0']['vs_cublas']:.2f}x cuBLAS's dense TFLOP/s (best at N={best['N']}, "
       f"{best['fill']} rows per expert); the gap is largest at few rows per expert, where a grouped kernel has "
       f"little work per launch. `dot_scaled_ue8m0` is {min(slow):.1f}x to {max(slow):.1f}x slower than "
       f"`explicit_ue8m0`. "
       + (f"The compiled-kernel report explains why: summed over its compiled variants `group_gemm_masked_kernel` "
          f"issues {mma.get('group_gemm_masked_kernel', {}).get('QGMMA', 0)} FP8 MMAs (`QGMMA`) and "
          f"{mma.get('group_gemm_masked_kernel', {}).get('HGMMA', 0)} bf16 ones (`HGMMA`), the `dot_scaled` kernel "
          f"{mma.get('group_gemm_masked_dot_scaled_kernel', {}).get('QGMMA', 0)} FP8 and "
          f"{mma.get('group_gemm_masked_dot_scaled_kernel', {}).get('HGMMA', 0)} bf16: on SM90 Triton upcasts the "
          f"FP8 operands to bf16 and applies the scales in registers before a bf16 MMA, which is an emulation. "
          f"On Blackwell `tl.dot_scaled` is the native path; it was not measured here." if mma else
          "The JSON has no compiled-kernel report to say which MMA instructions each kernel used."))
    shapes = sorted({(r["N"], r["K"]) for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.6), squeeze=False)
    for ax, (n, k) in zip(axes[0], shapes):
        sel = sorted((r for r in even if (r["N"], r["K"]) == (n, k)), key=lambda r: r["fill"])
        fills = [r["fill"] for r in sel]
        ax.plot(fills, [r["cublas_tflops"] for r in sel], "k--", label="cuBLAS blockwise FP8 (dense)")
        for kern in KERNELS:
            ax.plot(fills, [r[kern]["tflops"] for r in sel], "o-", label=kern)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("valid rows per expert (E = 32)")
        ax.set_ylabel("TFLOP/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"masked grouped FP8 GEMM, N={n} K={k}", fontsize=10)
        ax.legend(fontsize=7)
    gpu_footer(fig, path, run)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    show(fig, f"TFLOP/s against valid rows per expert on {card_of(run)} for two GEMM shapes: cuBLAS dense on top, "
              f"explicit_ue8m0 and explicit_fp32 below it, dot_scaled_ue8m0 near the bottom. Date: {date_of(run)}.")

# %% [markdown]
# **Against DeepGEMM and cuBLAS in the same run.** When the GPU benchmark records a
# `gemm_vs_peers` list (records with `n, k, experts, rows_per_expert, ours_tflops,
# deepgemm_tflops, cublas_tflops, kernel`), it is shown here; DeepGEMM's masked grouped GEMM is
# the peer a serving engine would use on Hopper.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gpu_*.json.
PEER_KEYS = ("n", "k", "experts", "rows_per_expert", "ours_tflops", "deepgemm_tflops", "cublas_tflops", "kernel")
for path, run in gpu_runs:
    peers = run.get("gemm_vs_peers") or run.get("sections", {}).get("gemm_vs_peers")
    if not peers:
        print(f"{path.name}: no gemm_vs_peers list in this JSON yet (DeepGEMM not measured in this file)")
        continue
    missing = [k for k in PEER_KEYS if any(k not in rec for rec in peers)]
    assert not missing, f"{path.name}: gemm_vs_peers records lack {missing}"
    print(f"{path.name} ({card_of(run)}, {date_of(run)})")
    print(f"{'n':>5s} {'k':>5s} {'E':>3s} {'rows/expert':>11s} {'ours':>7s} {'DeepGEMM':>9s} {'cuBLAS':>7s} "
          f"{'ours/DeepGEMM':>14s} {'paired':>7s}  kernel")
    num = lambda v: float(v) if isinstance(v, (int, float)) and v > 0 else float("nan")   # noqa: E731 - None: not run
    for rec in peers:
        print(f"{rec['n']:5d} {rec['k']:5d} {rec['experts']:3d} {rec['rows_per_expert']!s:>11s} "
              f"{num(rec['ours_tflops']):7.0f} {num(rec['deepgemm_tflops']):9.0f} {num(rec['cublas_tflops']):7.0f} "
              f"{num(rec['ours_tflops']) / num(rec['deepgemm_tflops']):14.2f} "
              f"{num(rec.get('ours_vs_deepgemm_paired')):7.2f}  {rec['kernel']}")
    vs_dg = np.array([num(r["ours_tflops"]) / num(r["deepgemm_tflops"]) for r in peers])
    vs_cb = np.array([num(r["ours_tflops"]) / num(r["cublas_tflops"]) for r in peers])
    if np.isfinite(vs_dg).any():
        md(f"**{card_of(run)}** ({date_of(run)}), same run: ours at {np.nanmin(vs_dg):.2f}x to {np.nanmax(vs_dg):.2f}x "
           f"DeepGEMM's TFLOP/s and {np.nanmin(vs_cb):.2f}x to {np.nanmax(vs_cb):.2f}x cuBLAS's over "
           f"{len(peers)} shapes.")
    paired = np.array([num(r.get("ours_vs_deepgemm_paired")) for r in peers])
    if np.isfinite(paired).any():
        md(f"Timed in rounds, ours and DeepGEMM back to back (`paired`: the median ratio, which a drift of the card's "
           f"clock moves much less): {np.nanmin(paired):.2f}x to {np.nanmax(paired):.2f}x.")
    labels = [f"n={r['n']} k={r['k']}\n{r['rows_per_expert']} rows" for r in peers]
    xs_ = np.arange(len(peers))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(peers)), 3.6))
    for j, (key, name) in enumerate((("ours_tflops", "ours"), ("deepgemm_tflops", "DeepGEMM"), ("cublas_tflops", "cuBLAS"))):
        ax.bar(xs_ + (j - 1) * 0.27, [num(r[key]) for r in peers], 0.27, label=name)
    ax.set_xticks(xs_, labels, fontsize=7)
    ax.set_ylabel("TFLOP/s")
    ax.set_title("masked grouped FP8 GEMM: ours vs DeepGEMM vs cuBLAS, same run", fontsize=10)
    ax.legend(fontsize=7)
    gpu_footer(fig, path, run)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    show(fig, f"Grouped bars of TFLOP/s for ours, DeepGEMM and cuBLAS at {len(peers)} shapes on {card_of(run)}, "
              f"{date_of(run)}.")

# %% [markdown]
# **The same GEMM in the CUTLASS Python DSL.** Two things DeepGEMM does cannot be written in Gluon (Triton 3.6):
# TMA multicast of the weight tile to the two CTAs of a cluster, and one `m64n192` wgmma per warpgroup (Gluon tiles
# must be powers of two). `backend/ops/cute/` is our masked GEMM written in the CuTe DSL with both, and what the
# FP32 launcher runs on SM90 from 256 rows per expert (the table above: `cute_fp32`);
# `benchmarks/bench_cute_gemm.py` times its configurations (`bn` = tile columns, `cl2` = 2-CTA clusters with
# multicast, `_v1` = its first version, before the A scales and the output went through the TMA, `_pr` = the sub-tile
# that holds an expert's last rows stored from registers, as before it was staged in shared memory) beside the Gluon
# kernel on the same inputs, and checks that their outputs are bitwise equal (asserted below).
#
# Two things decide how it does on few rows and uneven fills. *Which CTAs pair up*: a cluster's two CTAs share the
# weight tile only when they work on two 128-row tiles of the same expert; an expert with one such tile (128 rows), or
# an odd count, pairs its last tile's two CTAs along N instead (different weight tiles, each loaded whole), as
# DeepGEMM's scheduler does, so no CTA idles (`walk.cluster_block`, tested on every block in
# `tests/test_cute_gemm.py`). *How the last rows are written*: rows past `masked_m` must stay untouched, so the
# sub-tile holding an expert's last rows cannot go out by one TMA store; it is staged in shared memory and written
# 16 bytes per thread, rows below the count only.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: a figure (its PNG bytes depend on the matplotlib build); the walk itself is asserted here.
import matplotlib.colors

from backend.ops.cute.walk import cluster_block, expert_units

M_TILES, N_TILES = 3, 6                  # one expert: 257-384 rows, N = 1152 at 192 columns per tile
owner = np.full((M_TILES, N_TILES), -1)
multicast = np.zeros((M_TILES, N_TILES), bool)
for u in range(expert_units(M_TILES, N_TILES, 2)):
    for rank in (0, 1):
        mt, nt, mc = cluster_block(u, M_TILES, N_TILES, rank, 2, lambda c, a, b: a if c else b, max)
        if nt < N_TILES:
            assert owner[mt, nt] == -1, "a block computed twice"
            owner[mt, nt], multicast[mt, nt] = u, mc
assert (owner >= 0).all(), "a block never computed"
fig, ax = plt.subplots(figsize=(6.4, 2.3))
ax.imshow(multicast, cmap=matplotlib.colors.ListedColormap(["#fdbf6f", "#a6cee3"]), vmin=0, vmax=1, aspect="auto")
for (i, j), u in np.ndenumerate(owner):
    ax.text(j, i, f"tile {u}", ha="center", va="center", fontsize=8)
ax.set_xticks(range(N_TILES), [f"n{j}" for j in range(N_TILES)], fontsize=8)
ax.set_yticks(range(M_TILES), [f"m{i}" for i in range(M_TILES)], fontsize=8)
ax.set_title("one expert's blocks on 2-CTA clusters: blue = the pair shares B (multicast), orange = paired along N",
             fontsize=8)
fig.tight_layout()
show(fig, f"A grid of {M_TILES} m-tiles by {N_TILES} n-tiles, each block labelled with the cluster tile that "
          f"computes it: m-tiles 0 and 1 share each n-tile's weight tile (multicast), the odd last m-tile's blocks "
          f"go two n-tiles per cluster tile without multicast.")
md(f"{expert_units(M_TILES, N_TILES, 2)} cluster tiles cover the expert's {M_TILES * N_TILES} blocks, none twice, no "
   f"CTA idle; {int(multicast.sum())} blocks get their weight tile by multicast.")

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/cute_gemm_*.json.
for path in sorted(results_dir.glob("cute_gemm_*.json")):
    doc = json.loads(path.read_text())
    recs = doc.get("cute_gemm") or []
    names = [k for k in (recs[0] if recs else {}) if k.startswith("cute_")]
    assert all(r[k]["correct"] and r[k]["bitwise_equal_share_vs_gluon"] == 1.0 for r in recs for k in names), path.name
    print(f"{path.name} ({card_of(doc)}, {date_of(doc)}): TFLOP/s, ratio to the Gluon kernel in brackets")
    print(f"{'n':>5s} {'k':>5s} {'rows':>5s} {'gluon':>6s} " + " ".join(f"{k[5:]:>19s}" for k in names))
    for r in recs:
        print(f"{r['n']:5d} {r['k']:5d} {r['rows_per_expert']!s:>5s} {r['gluon']['tflops']:6.0f} "
              + " ".join(f"{r[k]['tflops']:12.0f} ({r[k]['vs_gluon']:.2f})" for k in names))
    ratios = [r[k]["vs_gluon"] for r in recs for k in names]
    if ratios:
        md(f"The CuTe kernel runs at {min(ratios):.2f}x to {max(ratios):.2f}x the Gluon kernel's speed with outputs "
           f"bitwise equal ({card_of(doc)}, {date_of(doc)}).")
    paired = {}
    for r in recs:
        for k in names:
            if "vs_deepgemm_paired" in r[k]:
                fill = r["rows_per_expert"]
                group = "uneven fills" if isinstance(fill, str) else ("64-128 rows" if fill <= 128 else "256+ rows")
                paired.setdefault((k[5:], group), []).append(r[k]["vs_deepgemm_paired"])
    if paired:
        md("Paired with DeepGEMM (each round times both back to back), per config: " + "; ".join(
            f"`{cfg}` {min(v):.2f}-{max(v):.2f}x at {group}" for (cfg, group), v in sorted(paired.items()))
           + f" ({card_of(doc)}, {date_of(doc)}).")
        gl = {}
        for r in recs:
            if "vs_deepgemm_paired" in r["gluon"]:
                fill = r["rows_per_expert"]
                group = "uneven fills" if isinstance(fill, str) else ("64-128 rows" if fill <= 128 else "256+ rows")
                gl.setdefault(group, []).append(r["gluon"]["vs_deepgemm_paired"])
        if gl:
            md("The Gluon kernel in the same run: " + "; ".join(
                f"{min(v):.2f}-{max(v):.2f}x at {group}" for group, v in sorted(gl.items())) + ".")

# %% [markdown]
# **Where a K step's time goes.** Each kernel above runs the same loop per 128-wide K step: wait for the stage's
# tiles, issue the wgmmas, wait for them (`WARPGROUP.DEPBAR`), promote the fp32 partial sum with one FFMA per value,
# release the stage. Nsight Compute samples where the math warps are at each moment; `benchmarks/ncu_stall_summary.py`
# turns those samples (committed as `benchmarks/results/gemm_ncu_*`) into shares of the step, and the profile's
# elapsed cycles divided by the K steps a CTA runs give the step's length. The dashed line is the tensor-core work of
# the step (both warpgroups' wgmmas at the SM's FP8 rate): the rest of the bar is time the tensor core waits for the
# warpgroups. The ratio of the two is checked against ncu's own tensor-pipe utilization.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gemm_ncu_h200.json and the files it names.
sys.path.insert(0, str(ROOT / "benchmarks"))
import ncu_stall_summary  # noqa: E402

ncu_manifest = results_dir / "gemm_ncu_h200.json"
if ncu_manifest.exists():
    ncu_doc = json.loads(ncu_manifest.read_text())
    steps = ncu_stall_summary.k_step_breakdown(str(ncu_manifest))
    print(f"{'kernel':45s} {'clocks/step':>11s} {'wgmma wait':>10s} {'FFMA':>6s} {'other':>6s} {'tensor busy':>11s} {'ncu':>5s}")
    for r in steps:
        busy = r["tensor_clocks"] / r["clocks_per_step"]
        assert abs(busy - r["ncu_tensor"]) < 0.03, r          # the step model agrees with ncu's tensor pipe
        print(f"{r['name']:45s} {r['clocks_per_step']:11.0f} {r['wgmma_wait']:10.0%} {r['ffma']:6.0%} "
              f"{r['other']:6.0%} {busy:11.0%} {r['ncu_tensor']:5.0%}")
    fig, ax = plt.subplots(figsize=(7.5, 2.8))
    for i, r in enumerate(steps):
        left = 0.0
        for key, label, color in (("wgmma_wait", "waiting for the wgmma", "tab:blue"),
                                  ("ffma", "promotion (FFMA)", "tab:orange"), ("other", "everything else", "tab:gray")):
            width = r[key] * r["clocks_per_step"]
            ax.barh(i, width, left=left, color=color, label=label if i == 0 else None)
            left += width
        ax.plot([r["tensor_clocks"]] * 2, [i - 0.4, i + 0.4], "k--", lw=1, label="tensor-core work" if i == 0 else None)
    ax.set_yticks(range(len(steps)), [r["name"] for r in steps], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("clocks per 128-wide K step of one CTA (math warps' time)")
    sh = ncu_doc["shape"]
    ax.set_title(f"N={sh['n']} K={sh['k']}, {sh['rows_per_expert']} rows x {sh['experts']} experts", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.text(0.01, 0.005, f"{ncu_doc['card']} · {ncu_doc['date'][:10]} · Nsight Compute, clocks locked · "
             f"benchmarks/results/{ncu_manifest.name}", fontsize=6.5, color="0.4")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    show(fig, "Stacked horizontal bars: clocks per K step split into waiting for the wgmma, promotion FFMAs and "
              "everything else, for ours, DeepGEMM and the CuTe kernel, with the tensor-core work marked.")
    ours, dg = steps[0], steps[1]
    md(f"DeepGEMM's step is {dg['clocks_per_step']:.0f} clocks for {dg['tensor_clocks']:.0f} of tensor-core work, "
       f"ours {ours['clocks_per_step']:.0f} for {ours['tensor_clocks']:.0f}. Outside the wgmma and the promotion ours "
       f"spends {ours['other'] * ours['clocks_per_step']:.0f} clocks per step and DeepGEMM "
       f"{dg['other'] * dg['clocks_per_step']:.0f} (waits for data, wgmma issue, scale reads, barriers, bookkeeping); "
       f"DeepGEMM's 64 x 192 wgmma also does 1.5x the work per step, so that time weighs less. Gluon cannot express "
       f"that wgmma (its tiles are powers of two) and a 64 x 256 one does not fit the registers; the CuTe kernel has "
       f"it, but in this profile (taken before its per-step weight-scale loads were moved out of the K loop, the "
       f"change measured in the cell above) spent {steps[2]['other'] * steps[2]['clocks_per_step']:.0f} clocks per "
       f"step on the rest ({ncu_doc['card']}, {ncu_doc['date'][:10]}).")
else:
    print(f"{ncu_manifest.name}: not in {results_dir}")

# %% [markdown]
# ### 5b. Where does the time of the whole layer go?
#
# The ht-prefill chain on one rank (quantize → permute → GEMM 1 → SwiGLU + quant → GEMM 2 →
# combine) through the Triton ops at DeepSeek-V3 shapes, each stage timed, against a plain torch
# bf16 loop over the experts (same routing). Beside it the memory-bound kernels, as bytes moved
# per second against a device-to-device copy (the ceiling for a kernel that only moves bytes).

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gpu_*.json.
for path, run in gpu_runs:
    sec = run.get("sections", {})
    ch, mb = sec.get("chain") or {}, sec.get("memory_bound") or {}
    copy = (sec.get("copy_ceiling") or {}).get("tb_per_s")
    if not ch:
        print(f"{path.name}: no chain section")
        continue
    recipes = [r for r in ("ue8m0", "fp32") if r in ch]
    stages = list(ch[recipes[0]]["stage_ms"])
    assert all(not ch[r].get("nan") for r in recipes), f"{path.name}: NaN in the chain output"
    shape = ch.get("shape", {})
    print(f"{path.name} ({card_of(run)}, {date_of(run)}): W={shape.get('W')} H={shape.get('H')} I={shape.get('I')} "
          f"E={shape.get('E')} K_top={shape.get('K_top')}")
    print(f"{'stage':10s} " + " ".join(f"{r + ' ms':>10s} {'share':>6s}" for r in recipes))
    for st in stages:
        print(f"{st:10s} " + " ".join(f"{ch[r]['stage_ms'][st]:10.3f} {ch[r]['stage_ms'][st] / ch[r]['ms']:6.0%}"
                                      for r in recipes))
    print(f"{'chain':10s} " + " ".join(f"{ch[r]['ms']:10.3f} {'':6s}" for r in recipes)
          + (f"   torch bf16 loop: {ch['torch_bf16']['ms']:.3f} ms" if "torch_bf16" in ch else ""))
    print(f"\n{'memory-bound kernel':26s} {'TB/s':>6s} {'x copy':>7s}" + (f"   (copy: {copy:.2f} TB/s)" if copy else ""))
    for name, v in mb.items():
        print(f"{name:26s} {v.get('tb_per_s', float('nan')):6.2f} {v.get('vs_copy', float('nan')):7.2f}")
    u = ch["ue8m0"]
    gemm_ms = u["stage_ms"]["gemm1"] + u["stage_ms"]["gemm2"]
    md(f"**{card_of(run)}** ({date_of(run)}). The UE8M0 chain takes {u['ms']:.2f} ms, of which the two GEMMs "
       f"{gemm_ms:.2f} ms ({gemm_ms / u['ms']:.0%}): the GEMM is where the remaining time is. "
       + (f"The torch bf16 loop takes {ch['torch_bf16']['ms']:.2f} ms ({ch['torch_bf16']['ms'] / u['ms']:.2f}x the "
          f"chain). " if "torch_bf16" in ch else "")
       + (f"The memory-bound kernels reach {min(v['vs_copy'] for v in mb.values()):.2f}x to "
          f"{max(v['vs_copy'] for v in mb.values()):.2f}x the copy bandwidth." if mb else ""))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.6))
    left = np.zeros(len(recipes))
    for st in stages:
        vals = np.array([ch[r]["stage_ms"][st] for r in recipes])
        ax1.barh(recipes, vals, left=left, label=st)
        left += vals
    if "torch_bf16" in ch:
        ax1.axvline(ch["torch_bf16"]["ms"], color="k", ls="--", lw=1, label="torch bf16 loop")
    ax1.set_xlabel("ms")
    ax1.set_xlim(0, 1.7 * max(left.max(), ch.get("torch_bf16", {}).get("ms", 0)))
    ax1.set_title(f"ht chain, one rank: W={shape.get('W')} H={shape.get('H')} I={shape.get('I')} E={shape.get('E')}",
                  fontsize=9)
    ax1.legend(fontsize=7, ncol=2, loc="center right")
    if mb:
        names = list(mb)
        ax2.barh(names, [mb[n].get("tb_per_s", np.nan) for n in names])
        if copy:
            ax2.axvline(copy, color="k", ls="--", lw=1, label=f"device copy {copy:.2f} TB/s")
            ax2.legend(fontsize=7)
        ax2.tick_params(axis="y", labelsize=7)
        ax2.set_xlabel("TB/s")
        ax2.set_title("memory-bound kernels", fontsize=10)
    gpu_footer(fig, path, run)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    show(fig, f"Left: stacked stage times of the ht chain per scale recipe on {card_of(run)}, GEMM 1 the largest, with "
              f"the torch bf16 loop as a dashed line. Right: TB/s of the memory-bound kernels against the device copy. "
              f"Date: {date_of(run)}.")

# %% [markdown]
# **The whole layer against DeepGEMM's two GEMMs (issue 12).** The JSON's top-level `chain` records (one per
# number of tokens W; `benchmarks/bench_gpu.py`, section `chain_layer`) time the ht layer with the FP32 recipe and
# our GEMMs, per stage (GPU time from CUDA events between the stages of back-to-back runs), and DeepGEMM's two
# masked GEMMs alone on the same routed rows: the time no layer built on those GEMMs can beat. Left bar of each
# pair: ours, stacked by stage; right bar: DeepGEMM's two GEMMs; the tick marks 1.2x that lower bound (the issue's
# target for the whole layer). A JSON from before those records falls back to the W=4096 chain of the section above
# (FP32 recipe) and DeepGEMM's times in `gemm_vs_peers` at the same rows per expert, and says so.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gpu_*.json.
STAGE_ORDER = ("quant", "permute", "gemm1", "swiglu", "gemm2", "combine")


def write_ceiling_text(wc_path, mb_list):
    """What limits the permute, computed from benchmarks/bench_write_ceiling.py's JSON of the same card (when
    committed): the fill against the copy, the permute's row writes without reading x against a fill of the same
    bytes, and what reading x costs them; beside the permute's own ratio to the fill of its written bytes."""
    if not wc_path.exists():
        return ""
    wc = json.loads(wc_path.read_text())
    fill_vs_copy = [r["writes"]["torch_fill"]["vs_copy_rate"] for r in wc["sizes"].values()]
    p = wc["permute_patterns"]
    const = [v["ms"] for k, v in p.items() if k.startswith("scatter_const_")]
    with_x = [v["ms"] for k, v in p.items() if k.startswith("scatter_x_s")]
    x_mb = p["W"] * p["bytes_written"] / p["pairs"] / 1e6
    perm = [v["ratio_to_fill_written_bytes"] for v in mb_list
            if v["op"].startswith("prefill_permute_w") and "gather" not in v["op"] and v.get("ratio_to_fill_written_bytes")]
    return (f"In `{wc_path.name}` ({date_of(wc)}): writing alone runs at {min(fill_vs_copy):.2f}-{max(fill_vs_copy):.2f}x "
            f"the copy's rate; the permute's token rows written without reading x at {p['fill_ms'] / max(const):.2f}-"
            f"{p['fill_ms'] / min(const):.2f}x a fill of the same bytes, and reading its {x_mb:.1f} MB of x costs them "
            f"{(min(with_x) - max(const)) * 1e3:.0f}-{(max(with_x) - min(const)) * 1e3:.0f} us"
            + (f"; the whole permute runs at {min(perm):.2f}-{max(perm):.2f}x the fill of its written bytes" if perm
               else "")
            + ". The ways of issuing the reads that were tried, none of which hid them: `benchmarks/NOTES_gpu.md`.")


def chain_breakdown(run):
    """([(W, ours ms per stage, DeepGEMM ms per GEMM, chain record or None)], source): the `chain` records, else the
    W=4096 FP32 chain of sections.chain with DeepGEMM's gemm_vs_peers times at its rows per expert."""
    recs = [r for r in run.get("chain") or [] if isinstance(r.get("per_op_ms"), dict)]
    if recs:
        return [(r["tokens"], r["per_op_ms"], r.get("deepgemm_gemms_per_op_ms") or {}, r) for r in recs], "records"
    ch = run.get("sections", {}).get("chain") or {}
    if "fp32" not in ch or "shape" not in ch:
        return [], None
    sh = ch["shape"]
    gemms = {(2 * sh["I"], sh["H"]): "gemm1", (sh["H"], sh["I"]): "gemm2"}
    dg = {gemms[(p["n"], p["k"])]: p["deepgemm_ms"] for p in run.get("gemm_vs_peers") or []
          if (p.get("n"), p.get("k")) in gemms and p.get("rows_per_expert") == sh["W"] * sh["K_top"] // sh["E"]
          and p.get("deepgemm_ms")}
    return [(sh["W"], ch["fp32"]["stage_ms"], dg, None)], "fallback"


for path, run in gpu_runs:
    rows_, source = chain_breakdown(run)
    if not rows_:
        print(f"{path.name}: no chain records and no FP32 chain section")
        continue
    for w_, ops_, dg_, rec in rows_:
        assert rec is None or not rec.get("nan"), f"{path.name}: NaN in the chain output at W={w_}"
        assert rec is None or rec.get("graph_equal") in (True, None), f"{path.name}: graph replay differs at W={w_}"
    print(f"{path.name} ({card_of(run)}, {date_of(run)}), source: {source}")
    print(f"{'W':>6s} " + " ".join(f"{st:>8s}" for st in STAGE_ORDER) + f" {'ours':>8s} {'DG GEMMs':>9s} {'ratio':>6s}"
          + f" {'glue+DG':>8s} {'graph':>6s}")
    text = []
    for w_, ops_, dg_, rec in rows_:
        ours_ = sum(ops_.values())
        dg_sum = sum(dg_.values()) if len(dg_) == 2 else float("nan")
        dg_ms = rec.get("deepgemm_gemms_ms", dg_sum) if rec else dg_sum
        whole = rec.get("ours_ms", ours_) if rec else ours_
        print(f"{w_:6d} " + " ".join(f"{ops_.get(st, float('nan')):8.3f}" for st in STAGE_ORDER)
              + f" {whole:8.3f} {dg_ms:9.3f} {whole / dg_ms:6.2f}"
              + f" {(rec or {}).get('ours_glue_deepgemm_gemms_ms', float('nan')):8.3f}"
              + f" {str((rec or {}).get('graph_equal', '-')):>6s}")
        glue = sum(v for k, v in ops_.items() if not k.startswith("gemm"))
        text.append(f"W={w_}: ours {whole:.2f} ms, {whole / dg_ms:.2f}x DeepGEMM's two GEMMs ({dg_ms:.2f} ms); the "
                    f"stages other than the GEMMs take {glue:.2f} ms ({glue / ours_:.0%} of the stage sum), our GEMMs "
                    f"{ours_ - glue:.2f} ms against DeepGEMM's {dg_sum:.2f} ms"
                    + (f"; our stages with DeepGEMM's GEMMs in place of ours {rec['ours_glue_deepgemm_gemms_ms']:.2f} ms, "
                       f"{rec['ours_glue_deepgemm_gemms_ms'] / dg_ms:.2f}x" if rec and "ours_glue_deepgemm_gemms_ms" in rec
                       else ""))
    md(f"**{card_of(run)}** ({date_of(run)}). " + "; ".join(text) + ". "
       + ("Ours = one CUDA-graph replay of the whole layer where captured (`ours_timing` in the record); the stage "
          "times are GPU times inside back-to-back runs, so they add up to about one run."
          if source == "records" else
          "This JSON predates the `chain` records: ours is the FP32 chain's eager stage times of the section above, "
          "DeepGEMM's the `gemm_vs_peers` times at the same rows per expert on its own inputs (not the same routed "
          "rows), so the ratio is an estimate."))
    fig, ax = plt.subplots(figsize=(max(6, 2.2 * len(rows_)), 3.8))
    for j, (w_, ops_, dg_, rec) in enumerate(rows_):
        bottom = 0.0
        for c, st in enumerate(STAGE_ORDER):
            ax.bar(3 * j, ops_.get(st, 0.0), 0.9, bottom=bottom, color=f"C{c}", label=st if j == 0 else None)
            bottom += ops_.get(st, 0.0)
        bottom = 0.0
        for st in ("gemm1", "gemm2"):
            c = STAGE_ORDER.index(st)
            ax.bar(3 * j + 1, dg_.get(st, np.nan), 0.9, bottom=bottom, color=f"C{c}", hatch="//", edgecolor="w",
                   label=f"DeepGEMM {st}" if j == 0 else None)
            bottom += dg_.get(st, 0.0)
        if len(dg_) == 2:
            ax.hlines(1.2 * sum(dg_.values()), 3 * j + 0.5, 3 * j + 1.5, colors="k", lw=1.5,
                      label="1.2x DeepGEMM GEMMs" if j == 0 else None)
    ax.set_xticks([3 * j + 0.5 for j in range(len(rows_))], [f"W={r[0]}\nours | DeepGEMM" for r in rows_], fontsize=8)
    ax.set_ylabel("ms")
    ax.set_title("ht layer by stage (FP32 recipe) vs DeepGEMM's two masked GEMMs alone", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    gpu_footer(fig, path, run)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    show(fig, f"Stacked bars per number of tokens on {card_of(run)}: our ht layer by stage next to DeepGEMM's two "
              f"GEMMs alone, with a tick at 1.2x the latter. Source: {source}. Date: {date_of(run)}.")
    mb_list, mb_from = run.get("memory_bound"), f"{path.name} ({date_of(run)})"
    newer = results_dir / path.name.replace("gpu_", "membound_", 1)    # a later memory-only run of the same card
    if not RUN_GPU_LIVE and newer.exists():
        later = json.loads(newer.read_text())
        if later.get("memory_bound") and str(later.get("date", "")) > str(run.get("date", "")):
            mb_list, mb_from = later["memory_bound"], f"{newer.name} ({date_of(later)}, a later memory-only run)"
    if mb_list:
        print(f"\nmemory-bound ops from {mb_from}")
        print(f"{'memory-bound op':34s} {'x copy':>7s} {'timing':>7s} {'eager x copy':>13s} "
              f"{'x copy, same bytes':>19s} {'x fill, written bytes':>22s}")
        for v in mb_list:
            same, fill = v.get("ratio_to_copy_same_bytes"), v.get("ratio_to_fill_written_bytes")
            print(f"{v['op']:34s} {v['ratio_to_copy']:7.2f} {v['timing']:>7s} {v.get('ratio_to_copy_eager') or 0:13.2f} "
                  f"{'' if same is None else f'{same:.2f}':>19s} {'' if fill is None else f'{fill:.2f}':>22s}")
        md("Three ceilings: `x copy` against a 2 GiB device copy (its read + written bytes per second); `x copy, same "
           "bytes` against a copy of as many bytes as the op moves (small ops cannot reach the large copy's rate); `x "
           "fill, written bytes` against a device fill (int32 words) of the bytes the op writes. Runs before "
           "2026-12-01 timed a byte fill there, which stores 4 bytes per thread: their fill column reads high. "
           + write_ceiling_text(results_dir / path.name.replace("gpu_", "write_ceiling_", 1), mb_list))


# %% [markdown]
# ### 5c. Does the layer scale over GPUs (expert parallelism)?
#
# `ep_gpu_*.json`: the ht layer on `R` GPUs, each with `T` tokens and `E_total / R` experts and
# the DeepEP-normal exchange, against one GPU doing all `R·T` tokens with all experts (no
# exchange); the dispatch and combine all-to-alls against a plain NCCL all-to-all of the same
# bytes. Every run first checks that each rank's output equals an in-process simulation of all
# ranks bit for bit (asserted). Earlier runs kept in the file's `history` are shown beside the
# current one: they are the only view of run-to-run variance the file gives.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/ep_gpu_*.json; the bit-exactness checks are asserted.
def ep_summaries(doc):
    """[(label, summary dict)] of the current run and of every earlier run with numbers in `history`."""
    out = [("current" + (f", {doc['date'][:10]}" if doc.get("date") else ""), doc.get("summary", {}))]
    for j, h in enumerate(doc.get("history", [])):
        if h.get("summary"):
            out.append((f"earlier #{j}" + (f", {h['date'][:10]}" if h.get("date") else ", no date") + f": {h.get('note', '')}",
                        h["summary"]))
    return out


for path, doc in ep_runs:
    r_n = doc.get("gpu_count") or doc.get("world_size")
    for label, run in doc.get("runs", {}).items():
        checks = run.get("checks", {})
        assert checks and all(c.get("bit_exact_all_ranks") for c in checks.values()), (path.name, label)
    summaries = ep_summaries(doc)
    print(f"{path.name}: {card_of(doc)} x{r_n}, {date_of(doc)}; command: {doc.get('command', '')[:120]}")
    print(f"{'run':56s} {'T/rank':>7s} {'1 GPU ms':>9s} {f'{r_n} GPUs ms':>10s} {'speedup':>8s} {'experts':>8s} "
          f"{'dispatch':>9s} {'combine':>8s} {'disp/NCCL':>10s}")
    for which, summ in summaries:
        for tlabel, v in summ.items():
            print(f"{which[:56]:56s} {tlabel[1:]:>7s} {v['layer_1_gpu_ms']:9.2f} {v['layer_2_gpus_ms']:10.2f} "
                  f"{v['speedup_2_gpus_vs_1']:8.2f} {v['experts_only_2_gpus_ms']:8.2f} {v['dispatch_ms']:9.2f} "
                  f"{v['combine_ms']:8.2f} {v['dispatch_bandwidth_ratio_vs_plain']:10.2f}")
    for note in (h["note"] for h in doc.get("history", []) if not h.get("summary") and h.get("note")):
        print("note:", note)
    cur = summaries[0][1]
    slow = {t: v for t, v in cur.items() if v["speedup_2_gpus_vs_1"] < 1}
    text = []
    for t, v in slow.items():
        saved = v["layer_1_gpu_ms"] - v["experts_only_2_gpus_ms"]
        text.append(f"At T={t[1:]} per rank the {r_n} GPUs are slower than one ({v['layer_2_gpus_ms']:.2f} ms against "
                    f"{v['layer_1_gpu_ms']:.2f} ms): splitting the experts saves at most {saved:.2f} ms of expert "
                    f"work (one GPU's whole layer minus the {r_n}-GPU expert part) while dispatch and combine cost "
                    f"{v['dispatch_ms'] + v['combine_ms']:.2f} ms at {v['dispatch_bandwidth_ratio_vs_plain']:.2f}x a "
                    f"plain NCCL all-to-all's bandwidth. At this size the exchange costs more than the expert work it "
                    f"splits; the all-to-all already runs at NCCL's own speed, so only fewer bytes or overlap could help.")
    fast = {t: v for t, v in cur.items() if v["speedup_2_gpus_vs_1"] >= 1}
    for t, v in fast.items():
        text.append(f"At T={t[1:]} per rank {r_n} GPUs are {v['speedup_2_gpus_vs_1']:.2f}x one GPU.")
    if len(summaries) > 1:
        spread = {t: [s[t]["speedup_2_gpus_vs_1"] for _, s in summaries if t in s] for t in cur}
        text.append("Across the runs in the file the speedup varied: " + "; ".join(
            f"T={t[1:]}: {min(v):.2f}x to {max(v):.2f}x" for t, v in spread.items())
            + " (the earlier runs also ran older code, so this mixes code changes with run-to-run variance).")
    md(f"**{card_of(doc)} x{r_n}** ({date_of(doc)}). " + " ".join(text))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    tl = list(cur)
    xs_ = np.arange(len(tl))
    for j, (key, name, color) in enumerate((("layer_1_gpu_ms", "1 GPU, all tokens", "0.6"),
                                            ("layer_2_gpus_ms", f"{r_n} GPUs, layer", "C0"),
                                            ("experts_only_2_gpus_ms", f"{r_n} GPUs, experts only", "C2"))):
        ax1.bar(xs_ + (j - 1) * 0.27, [cur[t][key] for t in tl], 0.27, color=color, label=name)
    ax1.set_xticks(xs_, [f"T={t[1:]}/rank" for t in tl])
    ax1.set_ylabel("ms")
    ax1.set_title("ht layer: one GPU vs R GPUs", fontsize=9)
    ax1.legend(fontsize=7)
    for j, (which, summ) in enumerate(summaries):
        ax2.plot([f"T={t[1:]}" for t in summ], [summ[t]["speedup_2_gpus_vs_1"] for t in summ], "o-" if j == 0 else "s:",
                 label=which[:40])
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel(f"speedup, {r_n} GPUs vs 1")
    ax2.set_title("speedup per run recorded in the file", fontsize=9)
    ax2.legend(fontsize=6)
    gpu_footer(fig, path, doc, doc.get("command"))
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    show(fig, f"Left: ms of the layer on one GPU, on {r_n} GPUs, and of the experts alone on {r_n} GPUs, per tokens per "
              f"rank, {card_of(doc)}. Right: the {r_n}-GPU speedup of the current and earlier runs. Date: {date_of(doc)}.")
if not ep_runs:
    print("no ep_gpu_*.json yet: run `NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py "
          "--out benchmarks/results/ep_gpu_<card>x2.json` on a multi-GPU host")

# %% [markdown]
# **Eager launches against a CUDA graph, and where each stream's time goes.** The dispatch and combine are
# built on the device (`backend/ops/triton/ep_exchange.py`: one index kernel, pack and unpack kernels,
# receive buffers of a fixed `R·T` rows, so nothing is read back to the host). Eagerly each call still pays
# the host time of its launches; replayed from a CUDA graph it does not. The table puts both speedups side by
# side with the host time per call and the bytes sent against DeepEP's ideal (a token once per other rank
# hosting one of its experts, one reduced row back). The timeline is one eager layer call on rank 0, per
# stream (CUDA events), without and with the two-micro-batch overlap.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/ep_gpu_*.json.
for path, doc in ep_runs:
    recs = [r for run in doc.get("runs", {}).values() for r in run.get("records", [])]
    if not recs or "speedup_2_gpus_vs_1_graph" not in recs[0]:
        print(f"{path.name}: no graph / host-time records (an older run)")
        continue
    print(f"{path.name}: {card_of(doc)}, {date_of(doc)}")
    print(f"{'T/rank':>7s} {'overlap':>8s} {'eager x':>8s} {'graph x':>8s} {'disp host ms':>13s} {'comb host ms':>13s} "
          f"{'layer host ms':>14s} {'bytes/ideal':>12s}")
    for r in recs:
        print(f"{r['T_per_rank']:7d} {r['overlap']:>8s} {r['speedup_2_gpus_vs_1']:8.2f} {r['speedup_2_gpus_vs_1_graph']:8.2f} "
              f"{r['dispatch_host_ms']:13.3f} {r['combine_host_ms']:13.3f} {r['layer_host_ms']:14.2f} "
              f"{r['bytes_sent'] / r['bytes_ideal']:12.4f}")
    best = {}
    for r in recs:
        key = r["T_per_rank"]
        if key not in best or r["speedup_2_gpus_vs_1_graph"] > best[key]["speedup_2_gpus_vs_1_graph"]:
            best[key] = r
    md("Best per tokens per rank: " + "; ".join(
        f"T={t}: {r['speedup_2_gpus_vs_1_graph']:.2f}x one GPU from a CUDA graph (overlap {r['overlap']}), "
        f"{r['speedup_2_gpus_vs_1']:.2f}x eager, where each layer call spends {r['layer_host_ms']:.2f} ms on the "
        f"host" for t, r in sorted(best.items(), reverse=True)) + ". Two micro-batches "
        + ("helped" if any(r["overlap"] == "on" for r in best.values()) else "did not help") + " here.")
    timed = [r for r in recs if r.get("timeline_rank0") and r["T_per_rank"] == max(best)]
    if not timed:
        continue
    fig, axes = plt.subplots(len(timed), 1, figsize=(11, 1.3 + 1.1 * len(timed)), squeeze=False)
    colors = {"pack": "C1", "dispatch": "C0", "experts": "C2", "combine": "C3", "reduce": "C4"}
    for ax, r in zip(axes[:, 0], timed):
        streams = sorted({span["stream"] for span in r["timeline_rank0"]})
        for span in r["timeline_rank0"]:
            kind = span["op"].rstrip("0123456789")
            ax.barh(streams.index(span["stream"]), span["end_ms"] - span["start_ms"], left=span["start_ms"],
                    color=colors.get(kind, "0.5"), edgecolor="k", lw=0.4)
            ax.text((span["start_ms"] + span["end_ms"]) / 2, streams.index(span["stream"]), span["op"],
                    ha="center", va="center", fontsize=6)
        ax.set_yticks(range(len(streams)), streams)
        ax.set_title(f"T={r['T_per_rank']} per rank, overlap {r['overlap']} ({r.get('micro_batches', 1)} micro-batch"
                     f"{'es' if r.get('micro_batches', 1) > 1 else ''})", fontsize=8)
    axes[-1, 0].set_xlabel("ms from the start of the call (rank 0, eager)")
    gpu_footer(fig, path, doc, doc.get("command"))
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    show(fig, f"Per-stream timeline of one eager EP layer call on rank 0 at T={max(best)} tokens per rank, without and "
              f"with two micro-batches: pack (index and pack kernels on the device), dispatch and combine "
              f"(NCCL all-to-all on the comm stream), experts (the FP8 chain), reduce. {card_of(doc)}, {date_of(doc)}.")

# %% [markdown]
# **Eager, with the exchange replaying its own graphs.** `DeviceExchange(graphs=True)`: the dispatch and combine
# copy their inputs into static buffers and replay CUDA graphs the exchange captured at its first call, while the
# rest of the layer stays eager (`ep_graphs_*.json`, `bench_ep_gpu.py --exchange-graphs off,on`).

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/ep_graphs_*.json; the bit-exactness checks are asserted.
for path in sorted(results_dir.glob("ep_graphs_*.json")):
    doc = json.loads(path.read_text())
    recs = [r for run in doc.get("runs", {}).values() for r in run.get("records", []) if r["overlap"] == "off"]
    assert recs and all(all(r["bit_exact"].values()) for r in recs), path.name
    print(f"{path.name}: {card_of(doc)}, {date_of(doc)} (overlap off)")
    print(f"{'T/rank':>7s} {'exchange graphs':>16s} {'eager x':>8s} {'graph x':>8s} {'layer host ms':>14s} "
          f"{'disp host ms':>13s} {'comb host ms':>13s}")
    for r in recs:
        print(f"{r['T_per_rank']:7d} {str(r.get('exchange_graphs')):>16s} {r['speedup_2_gpus_vs_1']:8.2f} "
              f"{r['speedup_2_gpus_vs_1_graph']:8.2f} {r['layer_host_ms']:14.2f} "
              f"{r['dispatch_host_ms']:13.3f} {r['combine_host_ms']:13.3f}")
    on = {r["T_per_rank"]: r for r in recs if r.get("exchange_graphs") == "on"}
    off = {r["T_per_rank"]: r for r in recs if r.get("exchange_graphs") == "off"}
    md("The exchange's own graphs cut the host time per dispatch: " + "; ".join(
        f"T={t}: {off[t]['dispatch_host_ms']:.3f} -> {on[t]['dispatch_host_ms']:.3f} ms, eager layer "
        f"{off[t]['speedup_2_gpus_vs_1']:.2f}x -> {on[t]['speedup_2_gpus_vs_1']:.2f}x one GPU, whole layer from a "
        f"CUDA graph {on[t]['speedup_2_gpus_vs_1_graph']:.2f}x" for t in sorted(on, reverse=True) if t in off)
       + f". The eager ratio follows the host time of the whole eager layer (column `layer host ms`: Python launches "
         f"of every op, which vary by tenths of a millisecond between runs on this machine), not the exchange alone; "
         f"the graph ratio does not. {card_of(doc)} x2, {date_of(doc)}.")

# %% [markdown]
# **The low-latency (decode) path.** `ll` records: DeepEP's low-latency semantics (a fixed buffer of `N` rows per
# rank pair, one row per (token, expert) back), every rank checked bit for bit against an in-process simulation
# (asserted), eager and from a CUDA graph.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/ep_gpu_*.json; the bit-exactness checks are asserted.
for path, doc in ep_runs:
    for r in doc.get("ll", []):
        assert r["bit_exact"], (path.name, r["N"])
        print(f"{path.name}: N={r['N']} tokens per rank: dispatch {r['dispatch_ms']:.3f} ms eager / "
              f"{r.get('dispatch_graph_ms', float('nan')):.3f} ms graph, combine {r['combine_ms']:.3f} / "
              f"{r.get('combine_graph_ms', float('nan')):.3f} ms, layer {r['layer_ms']:.3f} / "
              f"{r.get('layer_graph_ms', float('nan')):.3f} ms; host per dispatch {r['dispatch_host_ms']:.3f} ms; "
              f"bytes {r['bytes_sent_vs_ideal']:.2f}x the ideal (fixed-size buffers send their padding)")

# %% [markdown]
# **CPU benchmarks at full size.** `benchmarks/bench_cpu_ref.py` and
# `benchmarks/bench_cpu_backend.py` time the layer at the shape recorded in each file against a
# float32 matmul of the same FLOPs. Every ratio printed here is recomputed from the medians
# printed beside it.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/cpu_*.json (rewritten by the benchmark scripts).
for fname in ("cpu_ref.json", "cpu_backend.json"):
    path = results_dir / fname
    if not path.exists():
        print(f"{fname}: not committed yet (run benchmarks/{fname.replace('cpu_', 'bench_cpu_').replace('.json', '.py')})")
        continue
    run = json.loads(path.read_text())
    rows = run.get("results", []) + run.get("layer", [])
    floor = rows[0]["median_s"] if rows else float("nan")
    print(f"{fname}: shape {run.get('shape')}, {run.get('machine', {}).get('cpu')}, "
          f"{run.get('machine', {}).get('threads_used')} threads, {run.get('date_utc', NO_DATE)}")
    print(f"   {'':58s} {'median':>8s}  {'median / first row':>18s}")
    for row in rows:
        print(f"   {row['name']:58s} {row['median_s']:7.3f} s  {row['median_s'] / floor:17.2f}x")
    fills = run.get("group_gemm_masked_fill", [])
    full = [r for r in fills if r["fill"] == 1.0]
    for row in fills:
        print(f"   group_gemm_masked fill {row['fill'] * 100:3.0f}%: median {row['median_s']:.3f} s"
              + (f" ({row['median_s'] / full[0]['median_s']:.2f}x of 100 %)" if full else ""))

# %% [markdown]
# ## Summary
#
# | question | how | what it shows |
# |---|---|---|
# | time vs T | oracle, reference, backend (Paddle provider), this CPU | growth with T once per-call overheads are amortized; backend = reference (asserted) |
# | time vs E | same, fixed T | per-expert costs take over when experts get few rows |
# | fill of M | `group_gemm_masked` at the `FILLS` fractions of M | exactly the valid rows are written (asserted); time follows them, not the `E·M` buffer (SPEC §6) |
# | buffer memory | `forward_buffer_bytes` at `MEMORY_SHAPE` | same allocation as upstream; no `E·M·2I` memset per call |
# | GEMM on a GPU (5a) | `benchmarks/bench_gpu.py`, H200 | Triton kernels against cuBLAS (and DeepGEMM when recorded); `dot_scaled` emulated on SM90 |
# | layer on a GPU (5b) | same | where the chain's time goes; memory-bound kernels against a device copy |
# | EP over GPUs (5c) | `benchmarks/bench_ep_gpu.py`, 2x H200 | R GPUs against one, per run recorded; bit-exact against the simulation |
#
# Not measured anywhere in this notebook: Blackwell (B200/GB200), `blackwell_ops`, DeepEP.
