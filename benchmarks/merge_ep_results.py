"""Merge the per-size JSON files of benchmarks/bench_ep_gpu.py (one per --tokens) into one result file
with a summary per size:

    python3 benchmarks/merge_ep_results.py OUT.json ep_T4096.json ep_T1024.json [--command "..."]

An existing OUT.json's summary is kept under "history" with its date, so earlier runs stay on record.
"""
import argparse
import datetime
import json
from pathlib import Path


def summarize(run: dict) -> dict:
    ex, t = run["exchange"], run["timing_ms"]
    return {
        "bit_exact_vs_in_process_simulation": {k: v["bit_exact_all_ranks"] for k, v in run["checks"].items()},
        "dispatch_all_to_all_GBps": round(ex["all_to_all_GBps"], 1),
        "plain_nccl_all_to_all_GBps": round(ex["plain_GBps"], 1),
        "dispatch_bandwidth_ratio_vs_plain": round(ex["bandwidth_ratio_ours_vs_plain"], 3),
        "combine_bandwidth_ratio_vs_plain": round(ex["combine_bandwidth_ratio_ours_vs_plain"], 3),
        "layer_2_gpus_ms": round(t["layer_R_gpus"], 3),
        "layer_1_gpu_ms": round(t["layer_1_gpu_all_tokens"], 3),
        "speedup_2_gpus_vs_1": round(t["speedup_R_gpus_vs_1"], 3),
        "experts_only_2_gpus_ms": round(t["experts_only_R_gpus"], 3),
        "dispatch_ms": round(ex["dispatch_ms"], 3),
        "combine_ms": round(ex["combine_ms"], 3),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--command", default=None)
    args = ap.parse_args()
    runs = {f"T{json.loads(Path(p).read_text())['shape']['T_per_rank']}": json.loads(Path(p).read_text())
            for p in args.runs}
    first = next(iter(runs.values()))
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    history = old.get("history", [])
    history = [{"note": history}] if isinstance(history, str) else list(history)
    if "summary" in old:
        history.append({"date": old.get("date"), "note": "earlier run, older kernel code", "summary": old["summary"]})
    result = {
        "card": first["versions"]["card"], "gpu_count": first["versions"]["gpu_count"],
        "world_size": first["versions"]["world_size"], "versions": first["versions"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command or old.get("command"), "ops": first["ops"], "gemm_autotune": first["gemm_autotune"],
        "summary": {k: summarize(v) for k, v in runs.items()}, "runs": runs, "history": history,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    for k, v in result["summary"].items():
        print(k, json.dumps(v))


if __name__ == "__main__":
    main()
