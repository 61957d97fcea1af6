"""Merge the JSON files of benchmarks/bench_ep_gpu.py (one or more, each with one entry per --tokens value under
"per_T") into one result file with a flat list of records (one per T, overlap and exchange-graphs setting; runs from
before --exchange-graphs: one per T and overlap, exchange_graphs None) and a summary:

    python3 benchmarks/merge_ep_results.py OUT.json ep.json [more.json ...] [--command "..."]

An existing OUT.json's summary is kept under "history" with its date, so earlier runs stay on record.
"""
import argparse
import datetime
import json
from pathlib import Path

RECORD_KEYS = ("T_per_rank", "overlap", "micro_batches", "speedup_2_gpus_vs_1", "layer_2_gpus_ms", "layer_1_gpu_ms",
               "dispatch_ms", "combine_ms", "dispatch_host_ms", "combine_host_ms", "bytes_sent", "bytes_ideal",
               "bit_exact", "speedup_2_gpus_vs_1_graph", "layer_2_gpus_graph_ms", "layer_host_ms",
               "exchange_graphs")


def _round(v):
    return round(v, 4) if isinstance(v, float) else v


def exchange_of(res: dict, rec: dict) -> dict:
    """The exchange numbers measured in rec's exchange mode (runs from before --exchange-graphs: "exchange")."""
    return res.get("exchange_by_graphs", {}).get(rec.get("exchange_graphs"), res["exchange"])


def setting(rec: dict) -> str:
    """A record's setting as the summary's *_by_overlap keys name it: the overlap, "+exchange_graphs" when on."""
    return rec["overlap"] + ("+exchange_graphs" if rec.get("exchange_graphs") == "on" else "")


def records_of(per_t: dict) -> list:
    """One flat record per (T, overlap, exchange graphs), without the timeline (kept under runs)."""
    out = []
    for res in per_t.values():
        for rec in res["records"]:
            ex = exchange_of(res, rec)
            r = {k: _round(rec.get(k)) for k in RECORD_KEYS}
            r["bytes_sent_vs_ideal"] = _round(ex["bytes_sent_vs_ideal"])
            r["dispatch_graph_host_ms"] = _round(res.get("graph", {}).get("dispatch_graph_host_ms"))
            for k in ("dispatch_launches", "combine_launches", "collectives_per_call"):
                r[k] = ex.get(k)
            r["graph_equals_eager"] = res.get("graph", {}).get(f"graph_equals_eager_overlap_{rec['overlap']}")
            out.append(r)
    return out


def summarize(res: dict) -> dict:
    """Scalars of the fastest setting under the names earlier summaries used (speedup_2_gpus_vs_1,
    layer_2_gpus_ms, dispatch_bandwidth_ratio_vs_plain; the exchange numbers of the plain eager exchange when it
    ran), every setting (setting()) under *_by_overlap, the exchange numbers of each mode under exchange_by_graphs."""
    ex = res["exchange"]
    best = min(res["records"], key=lambda r: r["layer_2_gpus_ms"])
    return {
        "bit_exact_vs_in_process_simulation": {k: v["bit_exact_all_ranks"] for k, v in res["checks"].items()},
        "speedup_2_gpus_vs_1": _round(best["speedup_2_gpus_vs_1"]), "layer_2_gpus_ms": _round(best["layer_2_gpus_ms"]),
        "best_overlap": best["overlap"], "best_exchange_graphs": best.get("exchange_graphs"),
        "speedup_by_overlap": {setting(r): _round(r["speedup_2_gpus_vs_1"]) for r in res["records"]},
        "speedup_graph_by_overlap": {setting(r): _round(r.get("speedup_2_gpus_vs_1_graph")) for r in res["records"]},
        "layer_2_gpus_ms_by_overlap": {setting(r): _round(r["layer_2_gpus_ms"]) for r in res["records"]},
        "layer_host_ms_by_overlap": {setting(r): _round(r.get("layer_host_ms")) for r in res["records"]},
        "exchange_by_graphs": {mode: {k: _round(e.get(k)) for k in ("dispatch_ms", "combine_ms", "dispatch_loop_ms",
                                                                     "combine_loop_ms", "dispatch_host_ms",
                                                                     "combine_host_ms", "dispatch_launches")}
                               for mode, e in res.get("exchange_by_graphs", {}).items()},
        "dispatch_bandwidth_ratio_vs_plain": _round(ex["plain_all_to_all_same_bytes_ms"] / ex["dispatch_all_to_all_ms"]),
        "layer_1_gpu_ms": _round(res["layer_1_gpu_ms"]),
        "experts_only_2_gpus_ms": _round(res["experts_only_2_gpus_ms"]),
        **{k: _round(ex[k]) for k in ("dispatch_ms", "combine_ms", "dispatch_loop_ms", "combine_loop_ms",
                                      "dispatch_host_ms", "combine_host_ms", "dispatch_all_to_all_ms",
                                      "plain_all_to_all_same_bytes_ms", "bytes_sent", "bytes_ideal",
                                      "bytes_sent_vs_ideal")},
        "graph": {k: _round(v) for k, v in res.get("graph", {}).items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--command", default=None)
    args = ap.parse_args()
    loaded = [json.loads(Path(p).read_text()) for p in args.runs]
    per_t = {k: v for run in loaded for k, v in run["per_T"].items()}
    first = loaded[0]
    out = Path(args.out)
    old = json.loads(out.read_text()) if out.exists() else {}
    history = old.get("history", [])
    history = [{"note": history}] if isinstance(history, str) else list(history)
    if "summary" in old:
        old_shape = old.get("shape") or next(iter(old.get("runs", {}).values()), {}).get("shape")
        history.append({"date": old.get("date"), "note": "earlier run, older code", "shape": old_shape,
                        "summary": old["summary"]})
    result = {
        "card": first["versions"].get("card"), "gpu_count": first["versions"].get("gpu_count"),
        "world_size": first["versions"]["world_size"], "versions": first["versions"], "shape": first["shape"],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": args.command or old.get("command"), "ops": first["ops"], "gemm_autotune": first["gemm_autotune"],
        "records": records_of(per_t), "summary": {k: summarize(v) for k, v in per_t.items()},
        "ll": [{k: _round(v) for k, v in rec.items()} for run in loaded for rec in run.get("ll", [])],
        "runs": per_t, "history": history,
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    for r in result["records"] + result["ll"]:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
