"""Host (Python + launch) time of the eager expert chain of one EP rank, per op, on one GPU:

    python3 benchmarks/profile_host.py --out OUT/host_profile.json [--tokens 2048]

The chain is the per-token quant, then bench_ep_gpu.Experts.steps (permute with deferred checks,
unpack_and_convert_scale, GEMM 1, SwiGLU + quant, unpack, GEMM 2, combine; UE8M0 bytes, 32 local experts,
DeepSeek-V3 shapes). A long sleep kernel is
queued first, so every op only enqueues: the time until it returns is its host time. Then cProfile of 20 chains
(cumulative time of the 30 costliest functions) says where that time goes. No GPU time is measured here.
"""
from __future__ import annotations

import argparse
import cProfile
import datetime
import io
import pathlib
import pstats
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import bench_ep_gpu as EP  # noqa: E402 - puts the repository on sys.path
from _common import write_json  # noqa: E402

torch = EP.torch


def stages(ex, x, ids, wts, m: int) -> dict:
    """The per-token quant, then Experts' own steps (Experts.steps: the chain Experts.__call__ runs)."""
    st = {}

    def quant():
        st["x_q"], st["x_scale"] = EP.quantize_act(x, ex.launch)
    return dict(quant=quant, **ex.steps(ids, wts, m, st))


def host_ms_per_op(ops: dict, rounds: int) -> dict:
    """Median host ms of each op over `rounds` chains enqueued behind a sleep kernel (nothing waits on the GPU)."""
    times = {name: [] for name in ops}
    for _ in range(rounds):
        torch.cuda.synchronize()
        torch.cuda._sleep(200_000_000)                  # ~0.1 s of GPU time: the chain below only enqueues
        for name, fn in ops.items():
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    torch.cuda.synchronize()
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens this rank's experts receive")
    a = ap.parse_args()
    L = EP.import_triton_launch()
    dev = torch.device("cuda")
    ex = EP.Experts(0, 32, 7168, 2048, 0, dev, L)
    x, wts, ids = EP.make_inputs(0, a.tokens, 7168, 32, 8, 0, dev)
    m = int(torch.bincount(ids.flatten(), minlength=32).max()) + 64
    ops = stages(ex, x, ids, wts, m)
    for fn in ops.values():                          # compile, tune, fast-launch caches
        fn()
    for fn in ops.values():
        fn()
    per_op = host_ms_per_op(ops, 20)
    prof = cProfile.Profile()
    torch.cuda.synchronize()
    torch.cuda._sleep(1_000_000_000)
    prof.enable()
    for _ in range(20):
        for fn in ops.values():
            fn()
    prof.disable()
    torch.cuda.synchronize()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(30)
    res = dict(card=torch.cuda.get_device_name(), date=datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds"), command="python3 benchmarks/profile_host.py " + " ".join(sys.argv[1:]), tokens=a.tokens,
        M=m, host_ms_per_op=per_op, host_ms_chain=sum(per_op.values()), cprofile_top30=buf.getvalue())
    write_json(pathlib.Path(a.out), res, indent=1, newline=False)
    print({k: round(v, 4) for k, v in per_op.items()}, "chain", round(sum(per_op.values()), 3), "ms")
    print(buf.getvalue()[:6000])
    return 0


if __name__ == "__main__":
    sys.exit(main())
