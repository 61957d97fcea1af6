#!/usr/bin/env python3
"""Compile the memory-bound kernels for sm_90a without a GPU (Triton's bundled ptxas and nvdisasm) and print what
limits them: SASS instructions per thread, registers, spills, and the global load / store widths of the PTX.

    PYTHONPATH=$PWD python3 benchmarks/sass_membound.py

Shapes as bench_gpu.py's memory section (GROUP 128, BLOCK_R 8, 4 warps; K_top 8; int arguments that the launcher
passes divisible by 16 marked so, stride 1 of the MN-major scales specialized as the runtime does).
"""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from _common import repo_on_path  # noqa: E402

repo_on_path()
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from backend.ops.triton import kernels as K  # noqa: E402

BIN = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def compile_report(fn, sig: dict, consts: dict, div: tuple, num_warps: int = 4) -> dict:
    names = list(sig)
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(k),): v for k, v in consts.items()},
                    attrs={(names.index(n),): [["tt.divisibility", 16]] for n in div})
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = k.asm["ptx"]
    with tempfile.TemporaryDirectory() as tmp:
        ptx_path, cubin = pathlib.Path(tmp) / "k.ptx", pathlib.Path(tmp) / "k.cubin"
        ptx_path.write_text(ptx)
        info = subprocess.run([str(BIN / "ptxas"), "-arch=sm_90a", "-v", str(ptx_path), "-o", str(cubin)],
                              capture_output=True, text=True).stderr
        sass = subprocess.run([str(BIN / "nvdisasm"), str(cubin)], capture_output=True, text=True).stdout
    ins = [ln for ln in sass.splitlines() if re.match(r"\s+/\*[0-9a-f]{4}\*/\s+[@A-Z]", ln)]
    mem = {}
    for m in re.finditer(r"^\s*(?:@!?%p\d+\s+)?((?:ld|st)\.global[\w:.]*)", ptx, re.M):
        mem[m.group(1)] = mem.get(m.group(1), 0) + 1
    regs = re.search(r"Used (\d+) registers", info)
    spills = re.search(r"(\d+) bytes spill stores", info)
    return dict(sass_instructions=len(ins), registers=int(regs.group(1)) if regs else None,
                spill_bytes=int(spills.group(1)) if spills else None, global_memory_ops=mem)


def main():
    sw = {"up_ptr": "*bf16", "counts_ptr": "*i32", "q_ptr": "*u8", "s_ptr": "*fp32", "bad_ptr": "*i32", "M": "i32",
          "I": "i32", "S_COLS": "i32", "M_PAD": "i32", "stride_ue": "i32", "stride_um": "i32", "amax_floor": "fp32",
          "GROUP": "constexpr", "BLOCK_R": "constexpr", "UE8M0": "constexpr", "COUNT_BAD": "constexpr",
          "EXACT_CAST": "constexpr"}
    for ue in (True, False):
        r = compile_report(K.swiglu_quant_kernel, dict(sw, s_ptr="*i32" if ue else "*fp32"),
                           dict(GROUP=128, BLOCK_R=8, UE8M0=ue, COUNT_BAD=False, EXACT_CAST=False),
                           ("up_ptr", "counts_ptr", "q_ptr", "s_ptr", "bad_ptr", "M", "I", "S_COLS", "M_PAD",
                            "stride_ue", "stride_um"))
        print(f"swiglu_quant_kernel {'ue8m0' if ue else 'fp32'} (32 elements per thread):", r)
    un = {"w_ptr": "*i32", "counts_ptr": "*i32", "out_ptr": "*i32", "MN": "i32", "NUM_GROUPS": "i32",
          "stride_e": "i32", "stride_mn": "i32", "stride_c": "i32", "HAS_COUNTS": "constexpr", "BLOCK_G": "constexpr",
          "REPEAT": "constexpr"}
    print("unpack_sf_kernel (MN-major words):", compile_report(
        K.unpack_sf_kernel, un, dict(HAS_COUNTS=True, BLOCK_G=16, REPEAT=True, stride_mn=1),
        ("w_ptr", "counts_ptr", "out_ptr", "NUM_GROUPS", "stride_e")))
    mv = {"x_ptr": "*i32", "map_ptr": "*i32", "inv_ptr": "*i32", "counts_ptr": "*i32", "px_ptr": "*i32",
          "s_ptr": "*i32", "ps_ptr": "*i32", "W": "i32", "ROW": "i32", "S_COLS": "i32", "M": "i32", "NUM_ROWS": "i32",
          "SF_ROWS": "i32", "SF_GROUPS": "i32", "NUM_BLOCKS": "i32", "stride_x": "i32", "stride_s": "i32",
          "K_TOP": "constexpr", "KP": "constexpr", "HAS_SCALE": "constexpr", "SF_MODE": "constexpr",
          "BLOCK": "constexpr", "BLOCK_S": "constexpr", "BLOCK_SC": "constexpr", "RB": "constexpr",
          "GATHER": "constexpr"}
    for sf_mode, gather in ((0, False), (1, False), (0, True)):
        r = compile_report(K.permute_move_kernel, mv, dict(K_TOP=8, KP=8, HAS_SCALE=True, SF_MODE=sf_mode, BLOCK=2048,
                                                           BLOCK_S=16 if gather else 64, BLOCK_SC=16,
                                                           RB=4 if gather else 8, GATHER=gather),
                           ("x_ptr", "map_ptr", "inv_ptr", "counts_ptr", "px_ptr", "s_ptr", "ps_ptr", "ROW",
                            "stride_x", "SF_ROWS"))
        print(f"permute_move_kernel SF_MODE={sf_mode} {'gather' if gather else 'scatter'}:", r)


if __name__ == "__main__":
    main()
