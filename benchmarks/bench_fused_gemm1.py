#!/usr/bin/env python3
"""GEMM 1 + SwiGLU + 1x128 quant of the ht chain: fused (one launch) vs unfused (GEMM 1 -> fused_mask_swiglu_fp8_quant
(-> unpack_and_convert_scale on the UE8M0 recipe)), one card, one run (issue 12).

`fused_vs_unfused()` returns a dict of median ms (triton.testing.do_bench, CUDA events) per recipe and fill at
DeepSeek-V3 shapes (H=7168, I=2048, 32 experts): `unfused_ms` (the chain's three launches, the GEMM kernel by
launch's rules), `gemm1_ms` (GEMM 1 alone, the same kernel), `fused_gluon_ms` / `fused_tl_ms` (the fused op's two
kernels), `speedup` = unfused / best fused, and `equal`: the fused outputs (Gluon and tl) equal the unfused ones
byte for byte in the same run (whole tensors: the fused op writes into zeroed buffers). Torch only.

    python3 benchmarks/bench_fused_gemm1.py [--out fused.json]
    python3 -c "import sys; sys.path.insert(0, 'benchmarks'); import bench_fused_gemm1 as b; print(b.fused_vs_unfused())"
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))   # for _common, also when loaded by file path
from _common import repo_on_path  # noqa: E402

repo_on_path()

H, I, E_NUM = 7168, 2048, 32


def fills(e_num: int = E_NUM) -> dict:
    """name -> (rows per expert list, M): even fills and one uneven (0..384 rows, partial tiles, an empty expert)."""
    uneven = [(37 * e) % 385 for e in range(e_num)]
    return {"256": ([256] * e_num, 256), "1024": ([1024] * e_num, 1024), "uneven": (uneven, 384)}


def _same(x, y) -> bool:
    import torch
    return bool(torch.equal(x.view(torch.uint8), y.view(torch.uint8))) if x.dtype != torch.float32 \
        else bool(torch.equal(x, y))


def one_case(recipe: str, counts: list, m: int, h: int = H, inter: int = I, device: str = "cuda") -> dict:
    """The timings and the equality check of one recipe and fill (see the module docstring)."""
    import torch
    import triton
    from backend.ops.triton import launch as L
    from backend.ops.triton.chain import gemm1_swiglu_quant, random_gemm1, zero_outputs
    a, w, sa, sb, cnt = random_gemm1(counts, m, h, inter, recipe, device)
    e_num = len(counts)
    up = torch.empty(e_num * m, 2 * inter, dtype=torch.bfloat16, device=device)
    want = gemm1_swiglu_quant(a, w, sa, sb, cnt, m, recipe, fused=False, up=up)
    res = dict(rows=sum(counts), m=m)
    bench = dict(unfused=lambda: gemm1_swiglu_quant(a, w, sa, sb, cnt, m, recipe, fused=False, up=up))
    if recipe == "ue8m0":
        bench["gemm1"] = lambda: L.group_gemm_masked(a, w, sa, sb, cnt, up, None, m, sfb_per_block=True)
    else:
        bench["gemm1"] = lambda: L.group_gemm_masked_fp32(a, w, sa, sb, cnt, up, None, m)
    equal = True
    for kernel in ("gluon", "tl"):
        out = zero_outputs(e_num, m, inter, recipe, device)
        got = gemm1_swiglu_quant(a, w, sa, sb, cnt, m, recipe, out=out, kernel=kernel)
        equal &= _same(got[0], want[0]) and _same(got[1], want[1])
        bench[f"fused_{kernel}"] = lambda k=kernel, o=out: gemm1_swiglu_quant(a, w, sa, sb, cnt, m, recipe, out=o,
                                                                               kernel=k)
    for name, fn in bench.items():
        res[f"{name}_ms"] = triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    res["speedup"] = res["unfused_ms"] / min(res["fused_gluon_ms"], res["fused_tl_ms"])
    res["equal"] = equal
    return res


def fused_vs_unfused(recipes=("ue8m0", "fp32"), which=("256", "1024", "uneven"), h: int = H, inter: int = I,
                     e_num: int = E_NUM) -> dict:
    """{"card", "date", "<recipe>/<fill>": one_case(...)} for every recipe and fill named in `which` (fills())."""
    import torch
    out = dict(card=torch.cuda.get_device_name(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    for recipe in recipes:
        for name in which:
            counts, m = fills(e_num)[name]
            out[f"{recipe}/{name}"] = one_case(recipe, counts, m, h, inter)
            torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="write the JSON here too")
    args = ap.parse_args()
    res = fused_vs_unfused()
    text = json.dumps(res, indent=1)
    print(text)
    if args.out:
        pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
