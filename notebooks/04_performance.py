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
# 4. **GPU results**: measured live when a CUDA GPU and the Triton provider are present,
#    otherwise read from the benchmark JSON files committed in `benchmarks/results/`.
#
# Every figure states the hardware and the command that produced its numbers. Cells that
# print timings, or numbers read from the benchmark files, are tagged `nbval-ignore-output`
# (they change from run to run, or when the benchmarks are re-run); their checks (`assert`)
# still run.

# %%
# Setup: quiet imports, seeded RNGs below.
import contextlib
import io
import json
import logging
import os
import pathlib
import platform
import subprocess
import sys
import time
import warnings

warnings.filterwarnings("ignore")
# Importing Paddle prints advice to stderr when OMP_NUM_THREADS > 1 (`make` sets 2) and warns
# that ccache is missing; neither concerns these notebooks, and stderr must not vary by machine.
with contextlib.redirect_stderr(io.StringIO()):
    import paddle
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

# %matplotlib inline
np.set_printoptions(linewidth=110, precision=4)
os.environ["FD_USE_BLACKWELL_GEMM"] = "1"          # BlockWiseFP8Config picks BlackwellGemmFusedMoeMethod

# %% tags=["parameters"]
HIDDEN = 512                     # H
INTER = 256                      # I (moe_intermediate_size)
NUM_EXPERTS = 8                  # E for the token sweep
TOP_K = 4                        # K_top
TOKENS = [32, 64, 128, 256, 512]
EXPERTS = [4, 8, 16, 32]         # E sweep at TOKENS_FOR_EXPERT_SWEEP tokens
TOKENS_FOR_EXPERT_SWEEP = 128
FILL_M = 512                     # M of the fill sweep (rows per expert of the masked buffer)
FILLS = [0.1, 0.25, 0.5, 1.0]
REPEATS = 3                      # timed runs per point (the fastest counts), after one warm-up
# Memory at a DeepSeek-V3 scale: 256 experts over R = 8 ranks, H = 7168, I = 2048, K_top = 8
MEMORY_SHAPE = {"E": 32, "H": 7168, "I": 2048, "K": 8, "R": 8, "max_tokens_per_rank": 8192}
RESULTS_DIR = "benchmarks/results"  # relative to the repository root
RUN_GPU_LIVE = "auto"            # "auto": live when CUDA + Triton are present; "never": always read the JSON files
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
    fastest run is the one least disturbed by other processes."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.min(times))


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
token_times = {"oracle": [], "reference": [], "backend": []}
for t, (x, tw, ti) in inputs.items():
    token_times["oracle"].append(best_time(lambda: moe.moe_forward_oracle(x, weights.w_up, weights.w_down, tw, ti)))
    token_times["reference"].append(best_time(
        lambda: moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw)))
    token_times["backend"].append(best_time(lambda: layer(x, topk=(tw, ti))))
print(f"{'T':>6s} " + " ".join(f"{k + ' ms':>14s}" for k in token_times) + f" {'backend/ref':>12s}")
for j, t in enumerate(TOKENS):
    print(f"{t:6d} " + " ".join(f"{v[j] * 1e3:14.1f}" for v in token_times.values())
          + f" {token_times['backend'][j] / token_times['reference'][j]:12.2f}")

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
plt.show()

# %% [markdown]
# Time grows linearly with `T` once the fixed per-call costs (argument checks, one
# small GEMM pair per expert, the per-call decode of the FP8 weights in the Paddle provider) are
# amortized; the per-token cost levels off. The backend on CPU costs a small multiple of the
# reference because the provider re-decodes the weights from FP8 + CUTLASS bytes on every
# call, as a GPU kernel would, where the reference caches float32 weights.
#
# ## 2. CPU: time against the number of experts
#
# Same layer shape, `T` fixed, more experts: each expert gets fewer rows, and the per-expert
# costs (one GEMM pair each, weight decode proportional to `E`) take over.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: wall-clock timings differ on every run and machine.
expert_times = {"reference": [], "backend": []}
for e in EXPERTS:
    w_e = moe.make_moe_weights(e, HIDDEN, INTER, seed=SEED)
    qw_e = moe.quantize_moe_weights(w_e.w_up, w_e.w_down, use_ue8m0=True)
    qw_e.dequantized()
    layer_e = make_layer(e, w_e)
    x, tw, ti = moe.make_moe_inputs(TOKENS_FOR_EXPERT_SWEEP, HIDDEN, e, TOP_K, seed=SEED + 1)
    assert calc_diff(layer_e(x, topk=(tw, ti)), moe.moe_forward_fp8(x, None, None, tw, ti, True, quantized_weights=qw_e)) < 1e-5
    expert_times["reference"].append(best_time(lambda: moe.moe_forward_fp8(x, None, None, tw, ti, True,
                                                                             quantized_weights=qw_e)))
    expert_times["backend"].append(best_time(lambda: layer_e(x, topk=(tw, ti))))
print(f"{'E':>4s} {'rows/expert':>12s} " + " ".join(f"{k + ' ms':>14s}" for k in expert_times))
for j, e in enumerate(EXPERTS):
    print(f"{e:4d} {TOKENS_FOR_EXPERT_SWEEP * TOP_K / e:12.0f} " + " ".join(f"{v[j] * 1e3:14.1f}"
                                                                           for v in expert_times.values()))

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
plt.show()

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

# %%
def gemm1_inputs(fill):
    m = FILL_M
    valid = max(1, int(round(fill * m)))
    a_q, a_words = provider.per_token_quant(
        paddle.to_tensor(rng.normal(size=(NUM_EXPERTS * m, HIDDEN)).astype(np.float32)).astype(paddle.bfloat16), 128, True)
    counts = paddle.full([NUM_EXPERTS], valid, dtype=paddle.int32)
    sfa = provider.unpack_and_convert_scale(a_words.reshape([NUM_EXPERTS, m, -1]), counts)
    out = paddle.empty([NUM_EXPERTS * m, 2 * INTER], dtype=paddle.bfloat16)
    return (a_q, layer.up_gate_proj_weight, sfa, layer.up_gate_proj_weight_scale_inv, counts, out, None, m, -1), valid


fill_args = {f: gemm1_inputs(f) for f in FILLS}
for f, (args, valid) in fill_args.items():
    out = provider.group_gemm_masked(*args)
    assert out.shape == [NUM_EXPERTS * FILL_M, 2 * INTER]
print(f"GEMM 1: E={NUM_EXPERTS}, M={FILL_M}, N=2I={2 * INTER}, K=H={HIDDEN}; valid rows per expert:",
      [v for _, v in fill_args.values()])

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: wall-clock timings differ on every run and machine.
fill_times = [best_time(lambda a=args: provider.group_gemm_masked(*a)) for args, _ in fill_args.values()]
print(f"{'fill':>6s} {'valid rows':>11s} {'ms':>8s} {'x 100 %':>8s}")
for f, (_, valid), t in zip(FILLS, fill_args.values(), fill_times):
    print(f"{f * 100:5.0f}% {valid * NUM_EXPERTS:11d} {t * 1e3:8.2f} {t / fill_times[-1]:8.2f}")

# %%
# Loose on purpose (a shared CPU is noisy): 10 % of the rows must cost clearly less than 100 %.
assert fill_times[-1] > 1.5 * fill_times[0], fill_times

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
plt.show()

# %% [markdown]
# ## 4. Memory of the forward buffers
#
# The masked layout has a fixed shape: `M` rows per expert whatever the routing does, with
# `M = R · max_tokens_per_rank` on the prefill EP path (every token of every rank could pick
# the same expert). At DeepSeek-V3 scale on 8 ranks (`E = 32` local experts,
# `max_tokens_per_rank = 8192`, so `M = 65536`, `H = 7168`, `I = 2048`) that is large whoever
# implements it. The difference between ours and upstream is the **memset**: upstream allocates
# `up_gate_proj_out` with zeros on every call (17.2 GB written before the first GEMM); ours
# allocates without filling, because the GEMM writes exactly the valid rows and every later op
# reads only those (SPEC §6, §13).

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
assert abs(mem["upstream"]["zero_filled"] / 1e9 - 17.18) < 0.01                    # SPEC §13: "about 17 GB"

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
plt.show()

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
# ## 5. GPU results
#
# When this notebook runs on a machine with a CUDA GPU and the Triton provider, it runs the
# chain section of `benchmarks/bench_gpu.py` live (the whole ht-prefill chain on one rank,
# DeepSeek-V3 shapes, through the Triton kernels). Otherwise it reads what was committed:
# `benchmarks/results/gpu_*.json` (one file per card, from
# `python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_<card>.json`) and
# `ep_gpu_*.json` (from `benchmarks/bench_ep_gpu.py` under `torchrun`). The cards are Hopper
# (H100/H200): the Triton kernels implement the Blackwell contract but do not use
# Blackwell's block-scaled tensor-core instructions, so these numbers bound what the portable
# path does, not what `blackwell_ops` on a B200 does.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: lists benchmarks/results/, which the benchmark scripts rewrite independently of this notebook.
results_dir = ROOT / RESULTS_DIR


def gpu_live_possible():
    if RUN_GPU_LIVE == "never" or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    try:
        import torch
        import triton  # noqa: F401
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


LIVE = gpu_live_possible()
if LIVE:
    live_path = ROOT / "build" / "gpu_live.json"
    live_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--skip", "gemm,memory", "--out", str(live_path)]
    subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
    gpu_files = [live_path]
    gpu_source = "live: " + " ".join(["python3", "benchmarks/bench_gpu.py", "--skip", "gemm,memory"])
else:
    gpu_files = sorted(results_dir.glob("gpu_*.json"))
    gpu_source = "committed file"
ep_files = sorted(results_dir.glob("ep_gpu_*.json"))
gpu_runs = [(p, json.loads(p.read_text())) for p in gpu_files]
ep_runs = [(p, json.loads(p.read_text())) for p in ep_files]
print("GPU benchmark source:", "live run" if LIVE else "committed JSON files in benchmarks/results/")
for p, run in gpu_runs:
    env = run.get("sections", {}).get("environment", {})
    print(f"  {p.name}: card {env.get('card')}, capability {env.get('capability')}, SMs {env.get('sm_count')}, "
          f"torch {env.get('torch')}, triton {env.get('triton')}, errors {len(run.get('errors', []))}")
for p, doc in ep_runs:
    print(f"  {p.name}: card {doc.get('card') or doc.get('versions', {}).get('card')}, ops {doc.get('ops')}, "
          f"runs: {', '.join(doc['runs']) if 'runs' in doc else 1}")
if not gpu_runs:
    print("  no gpu_*.json yet: run `python3 benchmarks/bench_gpu.py --out benchmarks/results/gpu_<card>.json` on a GPU")


# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/gpu_*.json (rewritten by the benchmark script);
# the correctness flags recorded there are still asserted.
def card_of(run):
    return run.get("sections", {}).get("environment", {}).get("card", "unknown GPU")


def gpu_footer(fig, path, run):
    fig.text(0.01, 0.005, f"{card_of(run)} · {gpu_source} {path.name} · python3 benchmarks/bench_gpu.py "
             f"--out benchmarks/results/{path.name}", fontsize=6.5, color="0.4")


for path, run in gpu_runs:
    sec = run.get("sections", {})
    rows = (sec.get("gemm") or {}).get("rows", [])
    print(f"{path.name} ({card_of(run)}):")
    assert not run.get("errors"), f"{path.name}: the benchmark recorded errors"
    for r in rows:
        assert all(r[k].get("correct", True) for k in r if isinstance(r[k], dict)), (path.name, r["N"], r["K"], r["fill"])
        cells = [f"{kern} {r[kern]['tflops']:6.0f}{'' if r[kern].get('correct') else ' (WRONG)'}"
                 for kern in ("explicit_ue8m0", "explicit_fp32", "dot_scaled_ue8m0")
                 if isinstance(r.get(kern), dict) and "tflops" in r[kern]]
        print(f"  GEMM N={r['N']} K={r['K']} fill {r['fill']!s:>14}: TFLOP/s cuBLAS {r['cublas_tflops']:6.0f} | "
              + " | ".join(cells))
    for recipe in ("ue8m0", "fp32"):
        c = (sec.get("chain") or {}).get(recipe)
        if c:
            print(f"  ht chain ({recipe} scales): {c['ms']:.2f} ms, GEMM share {c['gemm_share']:.2f}, "
                  f"{c.get('speedup_vs_torch_bf16', float('nan')):.2f}x a torch bf16 loop")
    if rows:
        shapes = sorted({(r["N"], r["K"]) for r in rows})
        fig, axes = plt.subplots(1, len(shapes), figsize=(5.5 * len(shapes), 3.6), squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes):
            sel = [r for r in rows if (r["N"], r["K"]) == (n, k) and isinstance(r.get("fill"), int)]
            sel.sort(key=lambda r: r["fill"])
            fills = [r["fill"] for r in sel]
            ax.plot(fills, [r["cublas_tflops"] for r in sel], "k--", label="cuBLASLt blockwise FP8 (dense)")
            for kern in ("explicit_ue8m0", "explicit_fp32", "dot_scaled_ue8m0"):
                ys = [r.get(kern, {}).get("tflops", np.nan) for r in sel]
                ax.plot(fills, ys, "o-", label=kern)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("valid rows per expert")
            ax.set_ylabel("TFLOP/s")
            ax.set_title(f"masked grouped FP8 GEMM, N={n} K={k}", fontsize=10)
            ax.legend(fontsize=7)
        gpu_footer(fig, path, run)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        plt.show()
    mb = sec.get("memory_bound") or {}
    ch = sec.get("chain") or {}
    if mb or ch:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        if mb:
            names = list(mb)
            axes[0].barh(names, [mb[n].get("tb_per_s", np.nan) for n in names])
            copy = (sec.get("copy_ceiling") or {}).get("tb_per_s")
            if copy:
                axes[0].axvline(copy, color="k", ls="--", lw=1, label=f"device copy {copy:.2f} TB/s")
                axes[0].legend(fontsize=7)
            axes[0].set_xlabel("TB/s")
            axes[0].set_title("memory-bound kernels", fontsize=10)
        if ch:
            recipes = [r for r in ("ue8m0", "fp32") if r in ch]
            stages = list(ch[recipes[0]]["stage_ms"]) if recipes else []
            left = np.zeros(len(recipes))
            for st in stages:
                vals = np.array([ch[r]["stage_ms"][st] for r in recipes])
                axes[1].barh(recipes, vals, left=left, label=st)
                left += vals
            if "torch_bf16" in ch:
                axes[1].axvline(ch["torch_bf16"]["ms"], color="k", ls="--", lw=1, label="torch bf16 loop")
            shape = ch.get("shape", {})
            axes[1].set_xlabel("ms")
            axes[1].set_title(f"ht chain, one rank: W={shape.get('W')} H={shape.get('H')} I={shape.get('I')} "
                              f"E={shape.get('E')} K={shape.get('K_top')}", fontsize=9)
            axes[1].set_xlim(0, 1.7 * max(left.max(), ch.get("torch_bf16", {}).get("ms", 0)))
            axes[1].legend(fontsize=7, ncol=2, loc="center right")
        gpu_footer(fig, path, run)
        fig.tight_layout(rect=(0, 0.03, 1, 1))
        plt.show()

# %% [markdown]
# **Expert parallelism on several GPUs** (`ep_gpu_*.json`): the ht layer on `R` GPUs, each with
# `T` tokens and `E_total / R` experts and the DeepEP-normal exchange, against one GPU doing
# all `R·T` tokens with all experts (no exchange); and the dispatch all-to-all's bandwidth
# against a plain NCCL all-to-all of the same bytes. Each run first checks that every rank's
# output equals an in-process simulation of all ranks bit for bit.

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/ep_gpu_*.json (rewritten by the benchmark script);
# the bit-exactness checks recorded there are still asserted.
def ep_runs_of(doc):
    """A file holds one run of bench_ep_gpu.py, or several under "runs" (one per shape) with the command on top."""
    if "runs" in doc:
        return list(doc["runs"].items()), doc.get("command")
    return [(f"T{doc.get('shape', {}).get('T_per_rank')}", doc)], None


for path, doc in ep_runs:
    runs, command = ep_runs_of(doc)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.4))
    card = doc.get("card") or runs[0][1].get("versions", {}).get("card", "unknown GPU")
    r_n = runs[0][1].get("shape", {}).get("R")
    for j, (label, run) in enumerate(runs):
        sh, tm, ex = run.get("shape", {}), run.get("timing_ms", {}), run.get("exchange", {})
        checks = run.get("checks", {})
        assert checks and all(c.get("bit_exact_all_ranks") for c in checks.values()), (path.name, label)
        print(f"{path.name} [{label}] {card} x{sh.get('R')}, T={sh.get('T_per_rank')}/rank: layer "
              f"{tm.get('layer_R_gpus', float('nan')):.2f} ms on {sh.get('R')} GPUs vs "
              f"{tm.get('layer_1_gpu_all_tokens', float('nan')):.2f} ms on one "
              f"({tm.get('speedup_R_gpus_vs_1', float('nan')):.2f}x); dispatch all-to-all at "
              f"{ex.get('bandwidth_ratio_ours_vs_plain', float('nan')):.2f}x the bandwidth of a plain NCCL all-to-all; "
              f"bit-exact vs simulation: {', '.join(checks)}")
        bars = [("1 GPU: all tokens, all experts", tm.get("layer_1_gpu_all_tokens")),
                (f"{sh.get('R')} GPUs: layer", tm.get("layer_R_gpus")),
                (f"{sh.get('R')} GPUs: experts only", tm.get("experts_only_R_gpus"))]
        y = np.arange(len(bars)) + j * (len(bars) + 1)
        ax1.barh(y, [b[1] or 0 for b in bars], color=["0.6", "C0", "C2"])
        for yy, (name, val) in zip(y, bars):
            ax1.text(0, yy, f" T={sh.get('T_per_rank')}: {name}", va="center", fontsize=7)
        bw = [("dispatch (ours)", ex.get("all_to_all_GBps")), ("plain NCCL", ex.get("plain_GBps")),
              ("combine (ours)", ex.get("combine_all_to_all_GBps")), ("plain NCCL", ex.get("combine_plain_GBps"))]
        bw = [(n, v) for n, v in bw if isinstance(v, (int, float))]
        y2 = np.arange(len(bw)) + j * (len(bw) + 1)
        ax2.barh(y2, [v for _, v in bw], color=["C0", "0.6"] * 2)
        for yy, (name, val) in zip(y2, bw):
            ax2.text(0, yy, f" T={sh.get('T_per_rank')}: {name}", va="center", fontsize=7)
    for ax in (ax1, ax2):
        ax.set_yticks([])
        ax.invert_yaxis()
    ax1.set_xlabel("ms")
    ax1.set_title(f"ht layer, H={sh.get('H')} I={sh.get('I')} E={sh.get('E_total')} K_top={sh.get('K_top')}", fontsize=9)
    ax2.set_xlabel("GB/s to the other ranks (rank 0)")
    ax2.set_title("exchange bandwidth", fontsize=9)
    cmd = command or (f"torchrun --nproc_per_node {r_n} benchmarks/bench_ep_gpu.py "
                      f"--out benchmarks/results/{path.name}")
    fig.text(0.01, 0.005, f"{card} x{r_n} · {cmd[:150]}", fontsize=6.5, color="0.4")
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    plt.show()
if not ep_runs:
    print("no ep_gpu_*.json yet: run `NCCL_NVLS_ENABLE=0 torchrun --nproc_per_node 2 benchmarks/bench_ep_gpu.py "
          "--out benchmarks/results/ep_gpu_<card>x2.json` on a multi-GPU host")

# %% [markdown]
# **CPU benchmarks at full size.** `benchmarks/bench_cpu_ref.py` and
# `benchmarks/bench_cpu_backend.py` time the layer at `T = 1024, K_top = 8, E = 16, H = 2048,
# I = 1024` against a float32 matmul of the same FLOPs; their committed results:

# %% tags=["nbval-ignore-output"]
# nbval-ignore-output: numbers read from benchmarks/results/cpu_*.json (rewritten by the benchmark scripts).
for fname in ("cpu_ref.json", "cpu_backend.json"):
    path = results_dir / fname
    if not path.exists():
        print(f"{fname}: not committed yet (run .venv/bin/python benchmarks/{fname.replace('.json', '').replace('cpu_', 'bench_cpu_')}.py)")
        continue
    run = json.loads(path.read_text())
    print(f"{fname}: shape {run.get('shape')}, measured on {run.get('machine', {}).get('cpu')}, "
          f"{run.get('machine', {}).get('threads_used')} threads")
    for row in run.get("results", []) + run.get("layer", []):
        print(f"   {row['name']:58s} {row['median_s']:8.3f} s  {row['ratio_to_matmul_floor']:5.2f}x matmul floor")
    for row in run.get("group_gemm_masked_fill", []):
        print(f"   group_gemm_masked fill {row['fill'] * 100:3.0f}%: {row['median_s']:.3f} s ({row['ratio_to_full']:.2f}x of 100%)")

# %% [markdown]
# ## Summary
#
# | measurement | how | what it shows |
# |---|---|---|
# | time vs T | oracle, reference, backend (Paddle provider), this CPU | linear growth once per-call overheads are amortized; backend = reference bit for bit |
# | time vs E | same, fixed T | per-expert costs (GEMM launches, weight decode) dominate when experts get few rows |
# | fill of M | `group_gemm_masked` at 10 %…100 % valid rows | cost follows the valid rows, not the `E·M` buffer (SPEC §6) |
# | buffer memory | `forward_buffer_bytes`, DeepSeek-V3 on 8 ranks | same allocation as upstream; no 17 GB memset per call |
# | GPU | `benchmarks/bench_gpu.py` (live or committed JSON), card named in each figure | Triton kernels against cuBLASLt and a device copy; the ht chain against a torch bf16 loop |
# | EP on several GPUs | `benchmarks/bench_ep_gpu.py` (committed JSON) | R GPUs against one; the dispatch/combine all-to-all against plain NCCL; bit-exact against the simulation |
