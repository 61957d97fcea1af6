#!/usr/bin/env python3
"""The CuTe DSL masked GEMM's K loop in SASS, without a GPU: compile a config for sm_90a (the DSL's own cubin,
disassembled with Triton's bundled cuobjdump), find the math warpgroup's K loop (the innermost backward branch
around the wgmmas) and count its instructions per K step by opcode; ptxas -v on the PTX (Triton's ptxas, PTX
version lowered to 8.7) gives registers, spills and the wgmma serialization warnings (C7514 / C7515).

    PYTHONPATH=$PWD:/work/main/.venv/lib/python3.11/site-packages /work/wt/cdsl-venv/bin/python \
        benchmarks/sass_cute_gemm.py --configs bn192_cl2,bn128_cl2

(needs nvidia-cutlass-dsl importable and triton findable for its binaries; nothing is run on a device.)
"""
from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))      # backend.ops.cute

WGMMA = "QGMMA"          # fp8 wgmma's SASS opcode on sm_90a
WGMMAS_PER_STEP = 4      # 128-wide K step / k32
_LINE = re.compile(r"^\s+/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)\s*([^;]*);")


def tool_dir() -> pathlib.Path | None:
    """Triton's bundled CUDA binaries (ptxas, cuobjdump), found without importing triton; None if absent."""
    spec = importlib.util.find_spec("triton")
    if spec is None or not spec.submodule_search_locations:
        return None
    d = pathlib.Path(list(spec.submodule_search_locations)[0]) / "backends" / "nvidia" / "bin"
    return d if (d / "cuobjdump").exists() else None


def build(bn: int, cluster_m: int, sa_tma: bool = True, tma_store: bool = True) -> tuple[str, bytes]:
    """(PTX, cubin) of a config as the DSL compiles it for sm_90a (the cubin the GPU would run)."""
    from backend.ops.cute import masked_gemm
    os.environ.setdefault("CUTE_DSL_ARCH", "sm_90a")
    from cutlass.cutlass_dsl import CuTeDSL
    envar = CuTeDSL._get_dsl().envar
    envar.arch = "sm_90a"
    saved = envar.dump_dir
    with tempfile.TemporaryDirectory() as tmp:
        envar.dump_dir = tmp
        try:
            fn = masked_gemm.compiled.__wrapped__(bn, cluster_m, masked_gemm.max_stages(bn), 132, sa_tma,
                                                  tma_store, "--keep-ptx --keep-cubin")
        finally:
            envar.dump_dir = saved
    return fn.artifacts.PTX, fn.artifacts.CUBIN


def disassemble(cubin: bytes, tools: pathlib.Path) -> list[tuple[int, str, str]]:
    """(address, opcode, operands) of every instruction (predicate dropped)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.cubin"
        path.write_bytes(cubin)
        sass = subprocess.run([str(tools / "cuobjdump"), "-sass", str(path)], capture_output=True, text=True,
                              check=True).stdout
    return [(int(m.group(1), 16), m.group(3), m.group(4)) for m in map(_LINE.match, sass.splitlines()) if m]


def k_loop(ins: list[tuple[int, str, str]]) -> dict:
    """The innermost loop (backward BRA) holding wgmmas: its address range, K steps per trip (wgmmas / 4) and
    instructions per K step by opcode (the whole body, branches not followed)."""
    loops = []
    for addr, op, arg in ins:
        target = re.match(r"(0x[0-9a-f]+)", arg)
        if op == "BRA" and target and int(target.group(1), 16) < addr:
            body = [i for i in ins if int(target.group(1), 16) <= i[0] <= addr]
            if any(i[1].startswith(WGMMA) for i in body):
                loops.append(body)
    if not loops:
        raise ValueError("no loop around a wgmma in the SASS")
    body = min(loops, key=len)
    steps = sum(i[1].startswith(WGMMA) for i in body) // WGMMAS_PER_STEP
    ops = collections.Counter(i[1].split(".")[0] for i in body)
    per_step = {op: c / steps for op, c in ops.most_common()}
    other = sum(c for op, c in per_step.items() if op not in ("FFMA", WGMMA))
    return dict(start=body[0][0], end=body[-1][0], steps=steps, total=len(body) / steps, other=other,
                ops=per_step)


def ptxas_info(ptx: str, tools: pathlib.Path) -> dict:
    """Registers, spill bytes and wgmma serialization warnings of ptxas -v (Triton's ptxas, PTX ISA 8.7)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = pathlib.Path(tmp) / "k.ptx"
        path.write_text(re.sub(r"^\.version 8\.\d+", ".version 8.7", ptx, flags=re.M))
        err = subprocess.run([str(tools / "ptxas"), "-arch=sm_90a", "-v", str(path), "-o", str(path) + ".cubin"],
                             capture_output=True, text=True, check=True).stderr
    regs = re.search(r"Used (\d+) registers", err)
    spills = [int(s) for s in re.findall(r"(\d+) bytes spill (?:stores|loads)", err)]
    return dict(registers=int(regs.group(1)) if regs else None, spill_bytes=sum(spills),
                serialization=sorted(set(re.findall(r"C751[45]", err))))


def report(bn: int, cluster_m: int, sa_tma: bool = True, tma_store: bool = True) -> dict:
    tools = tool_dir()
    if tools is None:
        raise RuntimeError("triton (for its ptxas / cuobjdump) not findable on sys.path")
    ptx, cubin = build(bn, cluster_m, sa_tma, tma_store)
    return dict(config=f"bn{bn}_cl{cluster_m}", sa_tma=sa_tma, tma_store=tma_store,
                **k_loop(disassemble(cubin, tools)), **ptxas_info(ptx, tools))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", default="bn192_cl2,bn128_cl2,bn192_cl1,bn128_cl1")
    ap.add_argument("--legacy", action="store_true", help="sa_tma=False, tma_store=False")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for cfg in args.configs.split(","):
        bn, cl = (int(x) for x in re.fullmatch(r"bn(\d+)_cl(\d)", cfg).groups())
        r = report(bn, cl, not args.legacy, not args.legacy)
        if args.json:
            print(json.dumps(r))
            continue
        top = " ".join(f"{op} {c:g}" for op, c in r["ops"].items())
        print(f"{cfg}: K loop 0x{r['start']:x}-0x{r['end']:x}, {r['steps']} step(s)/trip, per step {r['total']:g} "
              f"instructions, {r['other']:g} besides FFMA/{WGMMA}; regs {r['registers']}, spills {r['spill_bytes']} B, "
              f"serialization {r['serialization'] or 'none'}\n  {top}")


if __name__ == "__main__":
    main()
