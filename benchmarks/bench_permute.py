"""The permute at issue 12's shape (W=4096 tokens, top-8 of 32 experts, H=7168, fp8 x) with the launch shape of its
move kernel swept (launch.PERMUTE_SCATTER: programs per token row, warps, dead-row store width), on a GPU:

    python3 benchmarks/bench_permute.py --out OUT/permute_sweep.json

Per scale kind (CUTLASS SF bytes written by the permute, the Blackwell chain's; FP32 MN-major, the Hopper chain's)
and per config: the whole op (graph replay, deferred checks), the move kernel alone (graph replay), and whether
every output byte equals the default config's. In the same run: a 2 GiB device copy (the rate `memory_bound`
ratios use) and a copy of as many bytes as the op moves (bench_gpu.permute_at_issue_shape counts the same bytes).
"""
from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_gpu as B  # noqa: E402 - puts the repository on sys.path
from _common import write_json  # noqa: E402

L, torch = B.L, B.torch


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--splits", default="1,2")
    ap.add_argument("--warps", default="2,4")
    ap.add_argument("--caches", default="none,.cs,.cg", help="row store cache modifiers (none: the default)")
    ap.add_argument("--zblocks", default="0,256,512", help="dead-row store widths, tried with the best split/warps")
    ap.add_argument("--block-s", default="64,32,16,8", help="slots per zeroing / scale program, with the best "
                    "split/warps")
    return ap.parse_args()


def inputs(w: int, h: int = 7168, e: int = 32, k_top: int = 8):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(w, h, device="cuda", generator=gen).to(torch.bfloat16)
    ids = torch.argsort(torch.rand(w, e, device="cuda", generator=gen), dim=1)[:, :k_top].to(torch.int64)
    m_cap = int(torch.bincount(ids.flatten(), minlength=e).max()) + 64
    return x, ids, e, m_cap


def permute_call(kind: str, x, ids, e: int, m: int):
    """(q, s, sf_group, err, op): x quantized for the scale kind, and the whole permute on it as a call (deferred
    checks into err; CUTLASS SF bytes for cutlass_sf, FP32 MN-major scales for fp32)."""
    q, s = L.per_token_quant(x, 128, kind == "cutlass_sf")
    sf_group = 128 if kind == "cutlass_sf" else None
    err = torch.zeros(5, dtype=torch.int64, device="cuda")
    return q, s, sf_group, err, lambda: L.prefill_permute_to_masked_gemm(q, s, ids, e, m, errors=err, sf_group=sf_group)


def measure(kind: str, x, ids, e: int, m: int, cfg: dict, want) -> dict:
    """One config of one scale kind: whole-op and move-only graph ms, bytes equal to `want` (None: the default)."""
    q, s, sf_group, err, op = permute_call(kind, x, ids, e, m)
    L.PERMUTE_SCATTER = dict(cfg)
    px, ps, imap, counts = op()
    got = (px.view(torch.uint8).clone(), ps.clone(), imap.clone())
    imap_, counts_, _, inv = L._permute_index_step(ids, e, m, err, True)
    nbytes = q.numel() + s.numel() * 4 + px.numel() + ps.numel() * ps.element_size() + imap.numel() * 4
    rec = dict(kind=kind, **cfg, W=x.shape[0], M=m, bytes=nbytes, op_ms=B.graph_ms(op),
               written_bytes=px.numel() + ps.numel() * ps.element_size() + imap.numel() * 4,
               move_ms=B.graph_ms(lambda: L._move_rows(q, s, imap_, counts_, inv, e, m, sf_group)),
               index_ms=B.graph_ms(lambda: L._permute_index_step(ids, e, m, err, True)),
               record_clear=not any(err.tolist()))
    rec["equal_to_default"] = None if want is None else all(torch.equal(a, b) for a, b in zip(got, want))
    return rec, got


def other_pdl(kind: str, x, ids, e: int, m: int, cfg: dict, base: dict, want) -> dict:
    """The default config with launch.PERMUTE_PDL flipped (programmatic dependent launch of the slot and move
    kernels), outputs compared with the default's; the eager call timed both ways too (PDL acts differently there)."""
    op = permute_call(kind, x, ids, e, m)[-1]
    eager = lambda: B.bench_ms(op)  # noqa: E731
    default_pdl = L.PERMUTE_PDL
    default_eager = eager()
    L.PERMUTE_PDL = not default_pdl
    try:
        rec, _ = measure(kind, x, ids, e, m, cfg, want)
        rec["eager_ms"] = eager()
    finally:
        L.PERMUTE_PDL = default_pdl
    rec.update(pdl=not default_pdl, default_op_ms=base["op_ms"], default_move_ms=base["move_ms"],
               default_eager_ms=default_eager)
    B.log("PDL", rec["pdl"], {k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
    return rec


def main() -> int:
    a = parse_args()
    default = dict(L.PERMUTE_SCATTER)
    x, ids, e, m = inputs(a.tokens)
    copy = B.copy_ceiling()
    out = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), command="python3 benchmarks/bench_permute.py " + " ".join(sys.argv[1:]),
        default=default, copy_2gib=copy, fill_2gib_ms=B.fill_ms(2 << 30), records=[])
    grid = [dict(default, split=sp, num_warps=nw, store_cache="" if c == "none" else c)
            for sp in map(int, a.splits.split(",")) for nw in map(int, a.warps.split(",")) for c in a.caches.split(",")]
    defaults = {}
    for kind in ("cutlass_sf", "fp32"):
        base, want = measure(kind, x, ids, e, m, default, None)
        defaults[kind] = (base, want)
        base["copy_same_bytes_ms"] = B.copy_same_bytes_ms(base["bytes"])
        base["fill_written_bytes_ms"] = B.fill_ms(base["written_bytes"])
        out["records"].append(base)
        for cfg in grid + [None]:
            if cfg is None:          # the dead-row store width, with the best split and warps of this kind
                best = min((r for r in out["records"] if r["kind"] == kind), key=lambda r: r["move_ms"])
                top = dict(split=best["split"], num_warps=best["num_warps"], zblock=0, store_cache=best["store_cache"],
                           block_s=default["block_s"])
                cfgs = [dict(top, zblock=z) for z in map(int, a.zblocks.split(",")) if z]
                cfgs += [dict(top, block_s=b) for b in map(int, a.block_s.split(",")) if b != default["block_s"]]
            else:
                cfgs = [cfg]
            for c in cfgs:
                rec, _ = measure(kind, x, ids, e, m, c, want)
                out["records"].append(rec)
                B.log({k: round(v, 4) if isinstance(v, float) else v for k, v in rec.items()})
                write_json(pathlib.Path(a.out), out, indent=1, newline=False)
    L.PERMUTE_SCATTER = default
    out["records_other_pdl"] = [other_pdl(kind, x, ids, e, m, default, *defaults[kind]) for kind in defaults]
    m_exact = int(torch.bincount(ids.flatten(), minlength=e).max())       # the fewest dead rows these ids allow
    probe, _ = measure("cutlass_sf", x, ids, e, m_exact, default, None)
    out["dead_rows_probe"] = dict(probe, fill_written_bytes_ms=B.fill_ms(probe["written_bytes"]))
    B.log("M = largest count", out["dead_rows_probe"])
    for r in out["records"]:
        r["ratio_to_copy"] = r["bytes"] / r["op_ms"] / 1e9 / copy["tb_per_s"]
        r["move_ratio_to_copy"] = r["bytes"] / r["move_ms"] / 1e9 / copy["tb_per_s"]
    write_json(pathlib.Path(a.out), out, indent=1, newline=False)
    for kind in ("cutlass_sf", "fp32"):
        best = min((r for r in out["records"] if r["kind"] == kind), key=lambda r: r["op_ms"])
        B.log(kind, "best", {k: best[k] for k in ("split", "num_warps", "zblock", "store_cache", "block_s", "op_ms",
                                                  "move_ms", "ratio_to_copy")})
    return 0 if all(r["equal_to_default"] is not False for r in out["records"] + out["records_other_pdl"]) else 1


if __name__ == "__main__":
    sys.exit(main())
