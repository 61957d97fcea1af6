"""Where a kernel's warps spend their time, per opcode of its hot loop, from an Nsight Compute source page.

    ncu --section SourceCounters --section WarpStateStats -k regex:NAME -c 1 -o prof python3 ...
    ncu --import prof.ncu-rep --page source --csv --print-source sass > src.csv
    python3 benchmarks/ncu_stall_summary.py src.csv [--hot 0.3]

The hot loop is every instruction executed at least HOT times as often as the most executed one. Printed per opcode:
its share of the loop's warp-stall samples (a sample = one warp seen at that instruction, issuing or stalled, so a
share is the share of the warps' time), how often it runs per execution of the hottest instruction, and its two most
frequent stall reasons. benchmarks/NOTES_gpu.md (issue 11, "the per-step overhead") reads the H200 files
benchmarks/results/gemm_ncu_source_*_h200.csv.gz with it.
"""
from __future__ import annotations

import argparse
import collections
import csv
import gzip
import json
import math
import pathlib
import sys


def read_source_page(path: str) -> tuple[str, list[dict]]:
    """(kernel name, one dict per SASS instruction) of an `ncu --page source --csv` export (plain or .gz)."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    if len(rows) < 3 or rows[0][:1] != ["Kernel Name"]:
        raise ValueError(f"{path}: not an ncu source-page CSV (expected a 'Kernel Name' row, then a header)")
    header = rows[1]
    return rows[0][1], [dict(zip(header, r)) for r in rows[2:]]


def _num(value: str) -> float:
    return float(value.replace(",", "")) if value else 0.0


def opcode(source: str) -> str:
    """SASS opcode of a source line, predicate dropped: '@!P0 BRA 0x..' -> 'BRA'."""
    words = source.split()
    return words[1] if words and words[0].startswith("@") and len(words) > 1 else (words[0] if words else "")


def summarize(instructions: list[dict], hot: float = 0.3) -> list[tuple]:
    """[(opcode, share of the hot loop's samples, executions per hottest execution, top stall reasons)], largest first."""
    executed = [_num(i["Instructions Executed"]) for i in instructions]
    peak = max(executed, default=0.0)
    if peak == 0:
        raise ValueError("no instruction was executed (was the source page exported from a profiled launch?)")
    samples, runs, reasons = collections.Counter(), collections.Counter(), collections.defaultdict(collections.Counter)
    for ins, ex in zip(instructions, executed):
        if ex < hot * peak:
            continue
        op = opcode(ins["Source"])
        samples[op] += _num(ins["Warp Stall Sampling (All Samples)"])
        runs[op] += ex / peak
        for key, value in ins.items():
            if key.startswith("stall_") and "Not Issued" not in key and _num(value):
                reasons[op][key[len("stall_"):]] += _num(value)
    total = sum(samples.values()) or 1.0
    return [(op, n / total, runs[op], [r for r, _ in reasons[op].most_common(2)]) for op, n in samples.most_common()]


def details_metric(path: str, kernel: str, metric: str) -> float:
    """A metric of `ncu --page details` text output (e.g. 'Elapsed Cycles'), from the first profiled launch whose
    header line contains `kernel`; ValueError naming what is missing."""
    inside = False
    for line in open(path, encoding="utf-8"):
        if line.startswith("  ") and not line.startswith("   "):      # a launch header (kernel name, grid, block)
            inside = kernel in line
        elif inside and line.strip().startswith(metric + " "):
            return float(line.split()[-1].replace(",", ""))
    raise ValueError(f"{path}: no '{metric}' for a kernel named like {kernel!r}")


# FP8 dense tensor-core rate of one Hopper SM: 4096 FMA = 8192 FLOP per clock (H100/H200 SXM: 1979 dense TFLOP/s
# at 1.83 GHz over 132 SMs, NVIDIA's datasheet).
SM90_FP8_FLOP_PER_CLOCK = 8192


def k_step_breakdown(manifest_path: str) -> list[dict]:
    """Per kernel of a results manifest (benchmarks/results/gemm_ncu_h200.json): clocks per 128-wide K step of one
    persistent CTA (elapsed cycles / K steps per SM, CTA tile 128 x bn), the math warps' share of it waiting for the
    wgmma (DEPBAR), promoting (FFMA) and on everything else, the tensor-core time of that step (both warpgroups'
    wgmmas at the SM's FP8 rate) and ncu's own tensor-pipe utilization ('Compute (SM) Throughput')."""
    root = pathlib.Path(manifest_path).parent
    doc = json.loads(pathlib.Path(manifest_path).read_text())
    shape, out = doc["shape"], []
    for kern in doc["kernels"]:
        tiles = shape["experts"] * math.ceil(shape["rows_per_expert"] / 128) * math.ceil(shape["n"] / kern["bn"])
        steps = tiles * math.ceil(shape["k"] / 128) / shape["sms"]
        details = str(root / kern["details"])
        clocks = details_metric(details, kern["details_kernel"], "Elapsed Cycles") / steps
        _, instructions = read_source_page(str(root / kern["source_page"]))
        share = {op: sh for op, sh, _, _ in summarize(instructions)}
        wait, ffma = share.get("WARPGROUP.DEPBAR.LE", 0.0), share.get("FFMA", 0.0)
        out.append(dict(name=kern["name"], bn=kern["bn"], clocks_per_step=clocks, wgmma_wait=wait, ffma=ffma,
                        other=1.0 - wait - ffma, tensor_clocks=2 * 64 * kern["bn"] * 128 * 2 / SM90_FP8_FLOP_PER_CLOCK,
                        ncu_tensor=details_metric(details, kern["details_kernel"], "Compute (SM) Throughput") / 100))
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("csv", nargs="+", help="ncu --page source --csv export(s), plain or .gz")
    ap.add_argument("--hot", type=float, default=0.3, help="loop threshold, a fraction of the peak execution count")
    ap.add_argument("--top", type=int, default=12)
    args = ap.parse_args(argv)
    for path in args.csv:
        name, instructions = read_source_page(path)
        print(f"== {name[:90]}  ({path})")
        for op, share, runs, why in summarize(instructions, args.hot)[:args.top]:
            print(f"  {op:34s} {100 * share:5.1f} % of samples  x{runs:7.1f} per loop pass  {', '.join(why)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
