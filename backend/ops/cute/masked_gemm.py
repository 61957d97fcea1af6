"""Masked grouped FP8 GEMM for SM90 in the CuTe DSL, with TMA multicast of B over 2-CTA clusters (issue 11).

The contract and numerics of launch.group_gemm_masked_fp32 (the Hopper recipe): a [E·M, K] e4m3, b [E, N, K]
e4m3, a_scale fp32 logical [E, M, K/128] (any strides; MN-major as prefill_permute_to_masked_gemm returns it),
b_scale fp32 [E, ceil(N/128), K/128], masked_m [E] int32 read on the device (no host synchronization: CUDA
graph safe), out [E·M, N] bf16 written for rows < masked_m[e] only. Per 128-wide K step an fp32 wgmma partial,
promoted `final = fma(partial, sa[row] · sb, final)` (DeepGEMM's recipe, the Gluon kernel's).

The kernel (_sm90_masked.MaskedGemmSm90) imports cutlass, so it is loaded on first use. Configs:
bn (128 | 192 columns per CTA tile), cluster_m (1: no multicast; 2: two CTAs on two m-tiles of one
(expert, n-tile), B multicast, or on two n-tiles of an expert's odd last m-tile: walk.cluster_block), stages (smem
ring depth; default: the most that fit), sa_tma (A scales by TMA into shared memory with each stage; needs
MN-major scales, else the per-thread global loads are used), tma_store (full 64-row sub-tiles stored by TMA),
partial_smem (with tma_store: the partial sub-tile staged in shared memory and stored 16 bytes a thread, else
4-byte stores from registers). compile_only() builds the cubin for sm_90a without a
GPU (CUTE_DSL_ARCH), which is how the CPU machine checks it.
"""
from __future__ import annotations

import collections
import functools
import os
import tempfile
import threading
import warnings

BLOCK_K = 128
SMEM_BYTES = 227 * 1024 - 2048       # H100/H200 opt-in shared memory per CTA, less barriers and alignment


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when this process can run the kernel (cutlass importable, an SM90 CUDA device), else why not
    (asked once per process: the launcher checks it on every call)."""
    try:
        import cutlass  # noqa: F401
    except ImportError as exc:
        return f"nvidia-cutlass-dsl not importable: {exc!r}"
    import torch
    if not torch.cuda.is_available():
        return "no CUDA device"
    cap = torch.cuda.get_device_capability()
    if cap[0] != 9:
        return f"needs an SM90 (Hopper) GPU, this one is sm_{cap[0]}{cap[1]}"
    return None


def available() -> bool:
    return unavailable_reason() is None


SB_RESERVED_K = 32768     # K whose weight scales max_stages keeps room for (sb_tiles below: what is left)


def _stage_bytes(bn: int) -> int:
    return (128 + bn) * BLOCK_K + 128 * 4          # A 128 x 128 + B bn x 128 fp8, 128 fp32 A scales


def _fixed_bytes(bn: int) -> int:
    """Shared memory besides the ring: the two warpgroups' bf16 output tiles (64 x (bn + 8) each, the larger of
    the two epilogues)."""
    return 2 * 64 * (bn + 8) * 2


def _sb_bytes_per_tile(bn: int) -> int:
    """Per K step, the weight scales of a tile's column blocks (bn / 128 rounded up) for each math warpgroup."""
    return 2 * -(-bn // 128) * 4


def max_stages(bn: int) -> int:
    """Ring depth that fits shared memory besides the output tiles and the weight scales of K = SB_RESERVED_K:
    5 at bn = 128, 4 at 192."""
    free = SMEM_BYTES - _fixed_bytes(bn) - SB_RESERVED_K // BLOCK_K * _sb_bytes_per_tile(bn)
    return min(8, free // _stage_bytes(bn))


def sb_tiles(bn: int, stages: int) -> int:
    """K steps (K / 128) whose weight scales fit the shared memory the ring and output tiles leave (each math
    warpgroup keeps its tile's, all K steps): the largest K the config takes is 128 x this."""
    return (SMEM_BYTES - _fixed_bytes(bn) - stages * _stage_bytes(bn)) // _sb_bytes_per_tile(bn) // 2 * 2


def _check_config(bn: int, cluster_m: int, stages: int, num_ctas: int):
    if bn not in (128, 192):
        raise ValueError(f"bn: 128 or 192 columns per CTA tile, got {bn}")
    if cluster_m not in (1, 2):
        raise ValueError(f"cluster_m: 1 (no multicast) or 2 (B multicast), got {cluster_m}")
    if not 2 <= stages <= max_stages(bn):
        raise ValueError(f"stages: 2..{max_stages(bn)} fit shared memory at bn={bn}, got {stages}")
    if num_ctas < cluster_m or num_ctas % cluster_m:
        raise ValueError(f"num_ctas: a positive multiple of cluster_m={cluster_m}, got {num_ctas}")


def _fake_args(cutlass, cute, sa_tma: bool):
    """Placeholder pointers / sizes of the kernel's signature (cute.compile traces types, not values)."""
    from cutlass.cute.runtime import make_ptr
    gmem = cute.AddressSpace.gmem
    ptrs = [make_ptr(t, 0, gmem, assumed_align=al) for t, al in
            ((cutlass.Float8E4M3FN, 16), (cutlass.Float8E4M3FN, 16), (cutlass.Float32, 16 if sa_tma else 4),
                                   (cutlass.Float32, 4),
             (cutlass.Int32, 4), (cutlass.BFloat16, 16))]
    i32 = cutlass.Int32(0)
    return (*ptrs, i32, i32, i32, i32, (i32, i32, i32), (i32, i32, i32))


@functools.lru_cache(maxsize=None)
def compiled(bn: int, cluster_m: int, stages: int, num_ctas: int, sa_tma: bool = True, tma_store: bool = True,
             options: str = "", partial_smem: bool = True):
    """The kernel compiled for this config (cute.compile; for the machine's GPU, or CUTE_DSL_ARCH)."""
    _check_config(bn, cluster_m, stages, num_ctas)
    import cuda.bindings.driver as cuda
    import cutlass
    import cutlass.cute as cute
    from ._sm90_masked import MaskedGemmSm90
    kernel = MaskedGemmSm90(bn, cluster_m, stages, num_ctas, sa_tma, tma_store, sb_tiles(bn, stages), partial_smem)
    return cute.compile(kernel, *_fake_args(cutlass, cute, sa_tma), cuda.CUstream(0), options=options)


def compile_only(bn: int = 128, cluster_m: int = 2, stages: int | None = None, num_ctas: int = 132,
                 keep_ptx: bool = False, sa_tma: bool = True, tma_store: bool = True, partial_smem: bool = True):
    """Compile for sm_90a without a GPU: the CPU machine's check (the DSL traces and runs ptxas, no device).
    keep_ptx: also keep the PTX text (compiled.artifacts.PTX; the DSL writes a copy into a temporary folder).
    Returns the compiled function. The DSL reads its target from CUTE_DSL_ARCH when cutlass is first
    imported; set here on the DSL object as well, for a process that imported it already."""
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    from cutlass.cutlass_dsl import CuTeDSL
    envar = CuTeDSL._get_dsl().envar
    envar.arch = "sm_90a"
    args = (bn, cluster_m, stages or max_stages(bn), num_ctas, sa_tma, tma_store)
    if not keep_ptx:
        return compiled.__wrapped__(*args, partial_smem=partial_smem)
    saved = envar.dump_dir
    with tempfile.TemporaryDirectory() as tmp:
        envar.dump_dir = tmp
        try:
            return compiled.__wrapped__(*args, "--keep-ptx", partial_smem=partial_smem)
        finally:
            envar.dump_dir = saved


def pick_config(expected_m: int, n: int) -> dict:
    """Default config: DeepGEMM's choice for these shapes (128 x 192 tiles, B multicast over 2-CTA clusters
    from 128 rows on, when N's tile count is even); a starting point for bench_cute_gemm.py to measure."""
    bn = 192 if n >= 2048 else 128
    cluster_m = 2 if expected_m >= 128 else 1
    return dict(bn=bn, cluster_m=cluster_m, stages=max_stages(bn), sa_tma=True, tma_store=True, partial_smem=True)


def fits(expected_m: int, n: int, k: int) -> bool:
    """Whether the default config for this rows hint takes an [N, K] weight: K a multiple of 128 whose weight
    scales fit shared memory (_check_k), N a multiple of 8 (what group_gemm_masked_fp32 would reject)."""
    cfg = pick_config(expected_m, n)
    return k % BLOCK_K == 0 and n % 8 == 0 and k <= sb_tiles(cfg["bn"], cfg["stages"]) * BLOCK_K


def _resolve_config(expected_m: int, n: int, config: dict | None) -> dict:
    """pick_config() overridden by config; stages default to the most that fit the final bn (not pick_config's)."""
    cfg = dict(pick_config(expected_m, n), **(config or {}))
    if "stages" not in (config or {}):
        cfg["stages"] = max_stages(cfg["bn"])
    return cfg


def _sa_tma_ok(a_scale) -> bool:
    """The A scales' TMA needs them MN-major ([E, M, K/128] view with M's stride 1) with 16-byte aligned strides
    and base (prefill_permute_to_masked_gemm's layout)."""
    se, sm, sk = a_scale.stride()
    return sm == 1 and se % 4 == 0 and sk % 4 == 0 and a_scale.shape[1] % 4 == 0 and a_scale.data_ptr() % 16 == 0


@functools.lru_cache(maxsize=None)
def _grid_ctas(device_index: int, cluster_m: int) -> int:
    """CTAs of the persistent grid: one per SM, as many whole clusters as can be resident at once (the
    driver's occupancy answer for this cluster size; GPCs need not split into pairs evenly)."""
    import torch
    from cutlass.utils import HardwareInfo
    sms = torch.cuda.get_device_properties(device_index).multi_processor_count
    try:
        clusters = HardwareInfo(device_index).get_max_active_clusters(cluster_m)
    except Exception as exc:     # an occupancy query, not needed for correct results: one CTA per SM then
        warnings.warn(f"cute masked_gemm: max active clusters unknown ({exc!r}), assuming {sms // cluster_m}")
        clusters = sms // cluster_m
    return min(sms // cluster_m, clusters) * cluster_m


def _args(a, b, a_scale, b_scale, masked_m, out, m: int, sa_tma: bool):
    """Kernel arguments from torch tensors (pointers, sizes, scale strides in elements)."""
    import cutlass
    import cutlass.cute as cute
    from cutlass.cute.runtime import make_ptr
    gmem = cute.AddressSpace.gmem
    e_num, n, k = b.shape
    i32 = cutlass.Int32
    sa_se, sa_sm, sa_sk = a_scale.stride()
    sb_se, sb_sn, sb_sk = b_scale.stride()
    return (make_ptr(cutlass.Float8E4M3FN, a.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Float8E4M3FN, b.data_ptr(), gmem, assumed_align=16),
            make_ptr(cutlass.Float32, a_scale.data_ptr(), gmem, assumed_align=16 if sa_tma else 4),
            make_ptr(cutlass.Float32, b_scale.data_ptr(), gmem, assumed_align=4),
            make_ptr(cutlass.Int32, masked_m.data_ptr(), gmem, assumed_align=4),
            make_ptr(cutlass.BFloat16, out.data_ptr(), gmem, assumed_align=16),
            i32(e_num), i32(m), i32(n), i32(k), (i32(sa_sm), i32(sa_sk), i32(sa_se)),
            (i32(sb_sn), i32(sb_sk), i32(sb_se)))


def _check_k(k: int, bn: int, stages: int):
    """K must leave room for its weight scales in shared memory (sb_tiles) at this config."""
    most = sb_tiles(bn, stages) * BLOCK_K
    if k > most:
        raise ValueError(f"K: at most {most} (the weight scales of every K step kept in shared memory beside "
                         f"{stages} stages at bn={bn}), got {k}")


def _checked(a, b, a_scale, b_scale, masked_m, out, m: int):
    """The arguments as the kernel needs them (contiguous a / b / out, int32 counts), or ValueError naming one."""
    import torch
    e_num, n, k = b.shape
    if k % BLOCK_K:
        raise ValueError(f"K: a multiple of {BLOCK_K} (one scale per K step), got {k}")
    if n % 8:
        raise ValueError(f"N: a multiple of 8 (16-byte output rows), got {n}")
    if a.shape != (e_num * m, k):
        raise ValueError(f"a: expected [E·M, K] = [{e_num * m}, {k}], got {list(a.shape)}")
    if tuple(a_scale.shape) != (e_num, m, k // BLOCK_K) or a_scale.dtype != torch.float32:
        raise ValueError(f"a_scale: expected fp32 [{e_num}, {m}, {k // BLOCK_K}], got {a_scale.dtype} "
                         f"{list(a_scale.shape)}")
    if tuple(b_scale.shape) != (e_num, -(-n // 128), k // BLOCK_K) or b_scale.dtype != torch.float32:
        raise ValueError(f"b_scale: expected fp32 [{e_num}, {-(-n // 128)}, {k // BLOCK_K}], got {b_scale.dtype} "
                         f"{list(b_scale.shape)}")
    if out.shape != (e_num * m, n) or out.dtype != torch.bfloat16 or not out.is_contiguous():
        raise ValueError(f"out: expected contiguous bf16 [{e_num * m}, {n}], got {out.dtype} {list(out.shape)}")
    counts = masked_m.reshape(-1)
    counts = counts if counts.dtype == torch.int32 and counts.is_contiguous() else counts.to(torch.int32).contiguous()
    return a.contiguous(), b.contiguous(), counts


def group_gemm_masked_fp32(a, b, a_scale, b_scale, masked_m, out, max_m_per_expert: int | None = None,
                           expected_m: int | None = None, config: dict | None = None, sm_count: int = -1):
    """As launch.group_gemm_masked_fp32 (no bias): writes out's rows < masked_m[e], returns out. config: keys of
    a pick_config() dict (bn, cluster_m, stages, sa_tma, tma_store, partial_smem) that override it; sm_count: CTAs
    of the persistent grid (-1: every SM)."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"cute masked_gemm: {reason}")
    import cuda.bindings.driver as cuda
    import torch
    e_num = b.shape[0]
    m = int(max_m_per_expert) if max_m_per_expert is not None else a.shape[0] // e_num
    a_scale = a_scale.view(e_num, m, -1) if a_scale.dim() == 2 else a_scale
    a, b, counts = _checked(a, b, a_scale, b_scale, masked_m, out, m)
    cfg = _resolve_config(int(expected_m if expected_m is not None else m), b.shape[1], config)
    sa_tma = bool(cfg["sa_tma"]) and _sa_tma_ok(a_scale)
    ctas = _grid_ctas(a.device.index if a.device.index is not None else torch.cuda.current_device(),
                      cfg["cluster_m"])
    if sm_count > 0:
        ctas = max(cfg["cluster_m"], min(ctas, sm_count - sm_count % cfg["cluster_m"]))
    _check_k(b.shape[2], cfg["bn"], cfg["stages"])
    fn = compiled(cfg["bn"], cfg["cluster_m"], cfg["stages"], ctas, sa_tma, bool(cfg["tma_store"]),
                  partial_smem=bool(cfg["partial_smem"]))
    stream = torch.cuda.current_stream().cuda_stream
    key = (id(fn), stream, m, *(t.data_ptr() for t in (a, b, a_scale, b_scale, counts, out)), *b.shape,
           *a_scale.stride(), *b_scale.stride())
    _launch(fn, key, lambda: (*_args(a, b, a_scale, b_scale, counts, out, m, sa_tma), cuda.CUstream(stream)))
    return out


LAUNCH_CACHE_SIZE = 64      # argument sets kept per process (a serving loop reuses a few static buffers)
_LAUNCHES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_LAUNCHES_LOCK = threading.Lock()       # launches from several threads (in-process EP ranks) share the cache


def _launch(fn, key: tuple, make_args) -> None:
    """fn(*make_args()) with the DSL's marshalling of the arguments (pointer objects, ctypes conversion: most of
    the ~0.2 ms of host time a plain call costs) done once per key: the launch depends only on the pointers, sizes,
    strides and stream in `key`, so the marshalled arguments are kept (with the objects they point into) for the
    LAUNCH_CACHE_SIZE most recent keys and handed to the compiled program directly. A DSL without that entry point
    (generate_execution_args / run_compiled_program) gets the plain call."""
    with _LAUNCHES_LOCK:
        hit = _LAUNCHES.get(key)
        if hit is not None:
            _LAUNCHES.move_to_end(key)
    if hit is None:
        args = make_args()
        marshal = getattr(getattr(fn, "execution_args", None), "generate_execution_args", None)
        if marshal is None or not hasattr(fn, "run_compiled_program"):
            fn(*args)
            return
        exe_args, adapted = marshal(args, {})
        hit = (exe_args, adapted, args)
        with _LAUNCHES_LOCK:
            _LAUNCHES[key] = hit
            while len(_LAUNCHES) > LAUNCH_CACHE_SIZE:
                _LAUNCHES.popitem(last=False)
    fn.run_compiled_program(hit[0])
