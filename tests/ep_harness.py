"""Run the MoE layer with expert parallelism over R CPU processes (Paddle, gloo backend).

A test harness, not part of the product: tests/test_ep_distributed.py and `make ep-demo` share it.

    python -m tests.ep_harness --ranks 2 [--tokens 8 --hidden 256 --intermediate 128
        --experts-per-rank 2 --top-k 2 --scenarios random,uneven,ll --timeout 120 --check]

Each rank is a process started with multiprocessing's "spawn" (what paddle.distributed.spawn does,
plus the control this needs: per-rank results, a wall-clock bound and killing stragglers). It joins
a gloo process group on a free port (bound to port 0 first, so parallel runs do not clash), builds
its `FusedMoE` shard (BlackwellGemmFusedMoeMethod, BF16 checkpoint quantized at load) and runs the
scenarios with `PaddleDistributedEPRunner`, printing per rank: tokens sent to each rank, tokens
received, payload and wire bytes, time in collectives and in the whole layer.

Scenarios (`make_case`; every rank builds the same global weights from the seed):
  random   T_s = T - (s % 2) tokens, softmax top-k routing; the first token of the last rank has
           all ids -1 (sent nowhere: its output is zero)
  uneven   every token picks experts 0 and 1 (both on rank 0): rank 0 receives R·T = W rows, expert
           0 receives all of them, every other rank receives nothing
  overflow as uneven with W = R·T - 1: a ValueError on every rank
  ll       decode path (low_latency_dispatch / combine), N = T
  fail     as random, but the expert computation of rank `fail_rank` raises: every rank ends with an
           error naming that rank (EPRemoteError on the others), later scenarios are not run, and
           the scenarios before it are still reported (`run_scenarios`)
  exchange the runner alone: dispatch of fp8 x with FP32 scales (random routing), a partial that
           is a function of the received rows, combine; every received tensor is returned
Bounds: every collective has a watchdog (`timeout_s`); the launcher kills the other ranks
`grace_s` after one exits with an error, and every rank after `timeout_s`.
"""
from __future__ import annotations

import argparse
import os
import pickle
import socket
import sys
import tempfile
import time
import traceback

import numpy as np

SCENARIOS = ("random", "uneven", "overflow", "ll", "fail", "exchange")
DEFAULTS = dict(tokens=8, hidden=256, intermediate=128, experts_per_rank=2, top_k=2, seed=0, fail_rank=1)
INJECTED_FAILURE = "injected failure in the expert computation"
_ACCUMULATED = ("payload_bytes_sent", "payload_bytes_received", "wire_bytes_sent", "collectives", "comm_s")


def free_port() -> int:
    """A TCP port that was free a moment ago (bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------------- scenarios (pure functions of the config)

def make_case(scenario: str, world_size: int, rank: int, cfg: dict) -> dict:
    """Inputs of `rank` for `scenario` -> {x [T_s, H] bf16, topk_weights [T_s, K_top] float32,
    topk_ids [T_s, K_top] int64 global ids, layer: FusedMoE keyword arguments (phase, W, N)}."""
    import paddle

    from moe_ref.moe import make_moe_inputs

    if scenario not in SCENARIOS:
        raise ValueError(f"scenario: expected one of {', '.join(SCENARIOS)}, got {scenario!r}")
    t, h, k = cfg["tokens"], cfg["hidden"], cfg["top_k"]
    e_total = cfg["experts_per_rank"] * world_size
    t_s = t - (rank % 2) if scenario in ("random", "fail", "exchange") else t
    x, weights, ids = make_moe_inputs(t_s, h, e_total, k, seed=cfg["seed"] + 1000 * (1 + rank))
    ids_np = ids.numpy()
    if scenario in ("random", "fail", "exchange") and rank == world_size - 1:
        ids_np[0] = -1
    if scenario in ("uneven", "overflow"):
        ids_np[:] = np.arange(k) % e_total            # experts 0, 1, ...: all on rank 0 when K_top <= E
    layer = dict(moe_phase="prefill", max_tokens_per_rank=t, num_worst_tokens=world_size * t)
    if scenario == "overflow":
        layer["num_worst_tokens"] = world_size * t - 1
    if scenario == "ll":
        layer = dict(moe_phase="decode", num_max_dispatch_tokens_per_rank=t)
    return dict(x=x, topk_weights=weights, topk_ids=paddle.to_tensor(ids_np), layer=layer)


_WEIGHTS = {}


def build_layer(world_size: int, rank: int, cfg: dict, layer_kwargs: dict):
    """This rank's FusedMoE shard (FD_USE_BLACKWELL_GEMM=1, BF16 checkpoint, seeded global weights)."""
    os.environ["FD_USE_BLACKWELL_GEMM"] = "1"
    from backend.moe.layer import FusedMoE
    from backend.quantization import BlockWiseFP8Config
    from moe_ref.moe import make_moe_weights

    e_total = cfg["experts_per_rank"] * world_size
    key = (e_total, cfg["hidden"], cfg["intermediate"], cfg["seed"])
    if key not in _WEIGHTS:
        _WEIGHTS[key] = make_moe_weights(e_total, cfg["hidden"], cfg["intermediate"], seed=cfg["seed"])
    w = _WEIGHTS[key]
    layer = FusedMoE(e_total, cfg["top_k"], cfg["hidden"], cfg["intermediate"],
                     BlockWiseFP8Config(is_checkpoint_bf16=True), ep_size=world_size, ep_rank=rank, **layer_kwargs)
    layer.load_global_weights(w.w_up, w.w_down)
    return layer


def _inject_failure(layer, rank: int) -> None:
    def failing_experts(*args, **kwargs):
        raise RuntimeError(f"{INJECTED_FAILURE} on rank {rank}")
    layer.quant_method._experts = failing_experts


def exchange_partial(recv_x, rank: int):
    """The "exchange" scenario's stand-in for the experts: partial [W, H] bf16 = bf16(float(recv_x) · (rank + 1) / 8)."""
    import paddle
    return (recv_x.astype(paddle.float32) * ((rank + 1) / 8.0)).astype(paddle.bfloat16)


def _run_exchange(runner, case: dict, rank: int) -> dict:
    import paddle

    from moe_ref.quant import per_token_group_quant

    w = case["layer"]["num_worst_tokens"]
    q, scale = per_token_group_quant(case["x"])
    d = runner.dispatch(q, scale, case["topk_ids"], case["topk_weights"], w)
    out = runner.combine(exchange_partial(d.recv_x, rank), d.handle)
    return {"recv_x": d.recv_x.view(paddle.uint8).numpy(), "recv_x_scale": d.recv_x_scale.numpy(),
            "recv_topk_ids": d.recv_topk_ids.numpy(), "recv_topk_weights": d.recv_topk_weights.numpy(),
            "num_recv_tokens": d.num_recv_tokens, "out": out.numpy()}


def _in_step(err, runner) -> bool:
    """An error every rank raised together, after which every rank can go on with the next scenario.
    Not EPRemoteError: the rank it names has failed and is leaving the group."""
    if not hasattr(runner, "report_failure"):           # in-process runners: their errors are per-call
        return isinstance(err, ValueError)
    return isinstance(err, ValueError) and getattr(err, "_ep_collective", False)


def run_scenarios(world_size: int, rank: int, cfg: dict, runner, catch_errors: bool = True) -> dict:
    """Run cfg["scenarios"] on this rank with `runner` -> {scenario: {tokens, out (bf16 bits, uint16)
    or error, layer_s, stats}}.

    With catch_errors an error every rank raised together (a ValueError of the runner's cross-rank
    checks) is recorded and the next scenario runs: the group is still in step. Any other error
    ends the run on every rank: this rank's own error is reported to the others (runner.guard), who
    raise EPRemoteError naming it at their next exchange. Either is re-raised (the final barrier is
    skipped: the failing rank has left the group) with the scenarios run so far attached as
    `err.ep_results` (the failing scenario's entry holds the error; later ones are "skipped"), so that
    the launcher reports the good results next to the error on every rank."""
    layers, results = {}, {}
    for i, scenario in enumerate(cfg["scenarios"]):
        case = make_case(scenario, world_size, rank, cfg)
        layer = _layer_for(scenario, world_size, rank, cfg, case, layers)
        before = dict(getattr(runner, "stats", {}))
        start = time.perf_counter()
        entry = results[scenario] = {"tokens": int(case["x"].shape[0])}
        try:
            with _guard(runner):
                if scenario == "exchange":
                    entry.update(_run_exchange(runner, case, rank))
                else:
                    out = layer(case["x"], topk=(case["topk_weights"], case["topk_ids"]), runner=runner)
                    entry["out"] = out.numpy()
        except Exception as err:  # noqa: BLE001 - recorded, then re-raised unless every rank raised it together
            entry["error"] = f"{type(err).__name__}: {err}"
            if not (catch_errors and _in_step(err, runner)):
                for later in cfg["scenarios"][i + 1:]:
                    results[later] = {"skipped": f"not run: scenario {scenario!r} failed"}
                err.ep_results = results
                raise
        finally:
            entry["layer_s"] = time.perf_counter() - start
            stats = getattr(runner, "stats", None)
            if stats is not None:
                entry["stats"] = {k: (v - before[k] if k in _ACCUMULATED else v) for k, v in stats.items()}
    if hasattr(runner, "barrier"):
        runner.barrier()
    return results


def _layer_for(scenario: str, world_size: int, rank: int, cfg: dict, case: dict, layers: dict):
    """The FusedMoE shard `scenario` runs on (built once per layer configuration; the failing rank of
    "fail" gets its own, with the injected failure); None for "exchange" (the runner alone)."""
    if scenario == "exchange":
        return None
    if scenario == "fail" and rank == cfg["fail_rank"]:
        layer = build_layer(world_size, rank, cfg, case["layer"])
        _inject_failure(layer, rank)
        return layer
    key = tuple(sorted(case["layer"].items()))
    if key not in layers:
        layers[key] = build_layer(world_size, rank, cfg, case["layer"])
    return layers[key]


def simulate(world_size: int, cfg: dict, timeout_s: float = 300.0) -> list[dict]:
    """The same scenarios in one process: `InProcessEPGroup` (threads) instead of processes and
    gloo -> per rank {scenario: entry}, comparable bit for bit with `launch`'s results."""
    from backend.moe.ep_runner import InProcessEPGroup, run_ranks

    group = InProcessEPGroup(world_size, cfg["experts_per_rank"] * world_size, timeout_s=timeout_s)
    return run_ranks(world_size, lambda r: run_scenarios(world_size, r, cfg, group.runner(r)), group=group,
                     timeout_s=timeout_s)


def _guard(runner):
    import contextlib
    return runner.guard() if hasattr(runner, "guard") else contextlib.nullcontext()


def layer_worker(world_size: int, rank: int, cfg: dict) -> dict:
    """Entry of one rank in `launch` (the process group is up)."""
    from backend.moe.ep_distributed import PaddleDistributedEPRunner

    runner = PaddleDistributedEPRunner(num_experts=cfg["experts_per_rank"] * world_size,
                                       timeout_s=cfg.get("collective_timeout_s"))
    return run_scenarios(world_size, rank, cfg, runner, catch_errors=cfg.get("catch_errors", True))


# ---------------------------------------------------------------------- processes

def _rank_main(rank: int, world_size: int, port: int, worker, cfg: dict, out_dir: str) -> None:
    os.environ.update({
        "PADDLE_DISTRI_BACKEND": "gloo", "PADDLE_TRAINER_ID": str(rank), "PADDLE_TRAINERS_NUM": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
        "PADDLE_CURRENT_ENDPOINT": f"127.0.0.1:{cfg['endpoint_ports'][rank]}",
        "PADDLE_TRAINER_ENDPOINTS": ",".join(f"127.0.0.1:{p}" for p in cfg["endpoint_ports"]),
        "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    })
    path = os.path.join(out_dir, f"rank{rank}.pkl")
    try:
        import warnings
        warnings.filterwarnings("ignore")
        import paddle
        import paddle.distributed as dist
        paddle.set_device("cpu")
        dist.init_parallel_env()
        result = {"ok": True, "result": worker(world_size, rank, cfg)}
        code = 0
    except BaseException as err:  # noqa: BLE001 - recorded for the launcher, exit code says it failed
        result = {"ok": False, "error": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc(),
                  "result": getattr(err, "ep_results", None)}
        code = 1
    with open(path + ".tmp", "wb") as f:
        pickle.dump(result, f)
    os.replace(path + ".tmp", path)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)        # skip interpreter teardown: Paddle's gloo atexit hooks can block on dead peers


def launch(world_size: int, cfg: dict, worker=layer_worker, *, timeout_s: float = 120.0,
           grace_s: float = 10.0) -> list[dict]:
    """Run worker(world_size, rank, cfg) in world_size spawned CPU processes joined by gloo.

    -> one dict per rank: {rank, status ("ok" | "error" | "killed" | "timeout"), exitcode, error,
    result, seconds}. When a rank exits with an error, the others get grace_s to end (they should,
    with that rank's error, through the runner's failure report); the rest are killed. After
    timeout_s every rank still running is killed. Nothing outlives this call.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    cfg = dict(cfg, endpoint_ports=[free_port() for _ in range(world_size)])
    port = free_port()
    out_dir = tempfile.mkdtemp(prefix="ep_harness_")
    procs = [ctx.Process(target=_rank_main, args=(r, world_size, port, worker, cfg, out_dir),
                         name=f"ep-rank-{r}", daemon=True) for r in range(world_size)]
    start = time.monotonic()
    quiet = {"GLOG_minloglevel": "2", "GLOG_v": "0"}       # Paddle's C++ log lines, read at its import
    saved = {k: os.environ.get(k) for k in quiet}
    os.environ.update(quiet)
    try:
        for p in procs:
            p.start()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ended, killed = _watch(procs, start, timeout_s, grace_s)
    return _collect(procs, out_dir, ended, killed, start)


def _watch(procs, start: float, timeout_s: float, grace_s: float):
    """Poll the rank processes until all ended, timeout_s passed, or grace_s passed after a first error;
    terminate (then kill) what still runs -> (seconds each rank ran or None, {rank: "timeout" | "killed"})."""
    world_size = len(procs)
    ended = [None] * world_size
    killed = {}
    first_error = None
    try:
        while True:
            now = time.monotonic()
            for r, p in enumerate(procs):
                if ended[r] is None and p.exitcode is not None:
                    ended[r] = now - start
                    if p.exitcode != 0 and first_error is None:
                        first_error = now
            alive = [r for r in range(world_size) if ended[r] is None]
            if not alive:
                break
            reason = None
            if now - start > timeout_s:
                reason = "timeout"
            elif first_error is not None and now - first_error > grace_s:
                reason = "killed"
            if reason:
                for r in alive:
                    killed[r] = reason
                break
            time.sleep(0.05)
    finally:
        for r, p in enumerate(procs):
            if p.is_alive():
                killed.setdefault(r, "killed")
                p.terminate()
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
    return ended, killed


def _collect(procs, out_dir: str, ended: list, killed: dict, start: float) -> list[dict]:
    """Read each rank's pickled result -> one record per rank (see `launch`)."""
    out = []
    for r, p in enumerate(procs):
        path = os.path.join(out_dir, f"rank{r}.pkl")
        rec = {"rank": r, "exitcode": p.exitcode, "seconds": ended[r] if ended[r] is not None else time.monotonic() - start,
               "error": None, "result": None}
        if os.path.exists(path):
            with open(path, "rb") as f:
                data = pickle.load(f)
            rec["result"] = data.get("result")
            rec["error"] = data.get("error")
            rec["traceback"] = data.get("traceback")
            os.remove(path)
        rec["status"] = killed.get(r) or ("ok" if p.exitcode == 0 else "error")
        out.append(rec)
    try:
        os.rmdir(out_dir)
    except OSError:
        pass
    return out


# ---------------------------------------------------------------------- CLI

def _print_report(records: list[dict], cfg: dict, wall: float) -> int:
    """One line per rank and scenario (the scenarios that ran, also on a rank that ended with an
    error), then the rank's error -> exit code 0 if every rank ended ok, else 1."""
    print(f"EP layer over {len(records)} CPU processes (gloo), H={cfg['hidden']} I={cfg['intermediate']} "
          f"E={cfg['experts_per_rank']}/rank K_top={cfg['top_k']} T={cfg['tokens']}/rank; wall {wall:.1f} s")
    rc = 0
    for rec in records:
        for scenario, entry in (rec["result"] or {}).items():
            print(_scenario_line(rec["rank"], scenario, entry))
        if rec["status"] != "ok":
            rc = 1
            print(f"rank {rec['rank']}: {rec['status']} (exit {rec['exitcode']}) after {rec['seconds']:.1f} s: "
                  f"{rec['error']}")
    return rc


def _scenario_line(rank: int, scenario: str, entry: dict) -> str:
    if "skipped" in entry:
        return f"rank {rank} {scenario:8s} {entry['skipped']}"
    st = entry.get("stats", {})
    line = (f"rank {rank} {scenario:8s} T={entry['tokens']:3d} sent/rank={st.get('last_send_counts')} "
            f"recv={st.get('last_recv_count')} payload sent={st.get('payload_bytes_sent', 0)} B "
            f"recv={st.get('payload_bytes_received', 0)} B wire={st.get('wire_bytes_sent', 0)} B "
            f"comm={st.get('comm_s', 0.0) * 1e3:.1f} ms")
    if "layer_s" in entry:
        line += f" layer={entry['layer_s'] * 1e3:.1f} ms"
    if "error" in entry:
        line += f"  -> {entry['error']}"
    return line


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=DEFAULTS["tokens"])
    ap.add_argument("--hidden", type=int, default=DEFAULTS["hidden"])
    ap.add_argument("--intermediate", type=int, default=DEFAULTS["intermediate"])
    ap.add_argument("--experts-per-rank", type=int, default=DEFAULTS["experts_per_rank"])
    ap.add_argument("--top-k", type=int, default=DEFAULTS["top_k"])
    ap.add_argument("--seed", type=int, default=DEFAULTS["seed"])
    ap.add_argument("--scenarios", default="random,uneven,ll",
                    help=f"comma-separated, from {', '.join(SCENARIOS)}")
    ap.add_argument("--fail-rank", type=int, default=DEFAULTS["fail_rank"])
    ap.add_argument("--timeout", type=float, default=120.0, help="wall-clock bound of the whole run, seconds")
    ap.add_argument("--collective-timeout", type=float, default=60.0, help="watchdog bound per collective, seconds")
    ap.add_argument("--check", action="store_true",
                    help="also run the scenarios in-process (InProcessEPGroup) and compare bit for bit")
    a = ap.parse_args(argv)
    scenarios = [s for s in a.scenarios.split(",") if s]
    for s in scenarios:
        if s not in SCENARIOS:
            ap.error(f"--scenarios: unknown {s!r}, expected some of {', '.join(SCENARIOS)}")
    if a.ranks < 2:
        ap.error(f"--ranks: expected >= 2, got {a.ranks}")
    cfg = dict(tokens=a.tokens, hidden=a.hidden, intermediate=a.intermediate, experts_per_rank=a.experts_per_rank,
               top_k=a.top_k, seed=a.seed, fail_rank=a.fail_rank, scenarios=scenarios,
               collective_timeout_s=a.collective_timeout)
    start = time.monotonic()
    records = launch(a.ranks, cfg, timeout_s=a.timeout)
    rc = _print_report(records, cfg, time.monotonic() - start)
    if a.check and rc == 0:
        rc = _check_report(records, cfg, a.ranks)
    return rc


def _check_report(records: list[dict], cfg: dict, world_size: int) -> int:
    """Compare every rank's outputs with the in-process simulation (InProcessEPGroup, same R)."""
    ref = simulate(world_size, dict(cfg, scenarios=[s for s in cfg["scenarios"] if s != "fail"]))
    bad = 0
    for scenario in cfg["scenarios"]:
        if scenario == "fail":
            continue
        same = []
        for rec in records:
            got, want = rec["result"][scenario], ref[rec["rank"]][scenario]
            keys = [k for k in want if k not in ("stats", "layer_s")]
            ok = all(k in got and (np.array_equal(np.asarray(got[k]).view(np.uint8), np.asarray(want[k]).view(np.uint8))
                                   if isinstance(want[k], np.ndarray) else got[k] == want[k]) for k in keys)
            same.append(ok)
            bad += not ok
        print(f"check {scenario:8s}: " + ", ".join(f"rank {r} {'bit-exact' if ok else 'DIFFERS'}"
                                                   for r, ok in enumerate(same)) + " vs the in-process simulation")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
