"""What the benchmark scripts share: the repository on sys.path, the machine's description, CPU timing
and writing a JSON result.

Standard library only at import (bench_gpu.py and bench_ep_gpu.py run where Paddle is absent, and
must stay torch-only); `set_paddle_threads` imports Paddle when called, by the CPU scripts.
The scripts import this module as `_common` (their own folder is first on sys.path).
"""
from __future__ import annotations

import json
import os
import pathlib
import platform
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]


def repo_on_path() -> None:
    """Put the repository root first on sys.path, so that moe_ref and backend import from this checkout."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def optional_import(name: str):
    """(module, None), or (None, why) when it does not import (absent, or built for another CUDA): the caller
    reports it and runs the rest."""
    try:
        return __import__(name, fromlist=["_"]), None
    except Exception as exc:
        return None, repr(exc)[:300]


def set_paddle_threads(n: int) -> None:
    """paddle.set_num_threads is not exported in Paddle 3.3; the core binding is."""
    import paddle
    setter = getattr(paddle, "set_num_threads", None) or paddle.base.core.set_num_threads
    setter(n)


def timed_interleaved(fns: dict, repeats: int) -> dict[str, list[float]]:
    """Time each callable `repeats` times, round-robin: on a machine shared with other jobs every
    candidate then sees the same background load, so per-round ratios stay meaningful."""
    for fn in fns.values():
        fn()                                         # warm-up: allocator, MKL/oneDNN kernels
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def timed(fn, repeats: int) -> list[float]:
    """One warm-up call, then `repeats` timed calls (seconds)."""
    return timed_interleaved({"fn": fn}, repeats)["fn"]


def cpu_machine_info(threads: int, **versions) -> dict:
    """The CPU, cores, threads used, platform and Python, then `versions` (in the order given), then the
    load average at start (the machine may be shared)."""
    cpu = platform.processor()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "threads_used": threads,
            "platform": platform.platform(), "python": platform.python_version(), **versions,
            "load_average_at_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}


def write_json(path: pathlib.Path, payload, *, indent: int = 2, newline: bool = True, default=None) -> None:
    """Write `payload` as JSON to `path` (parent folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=indent, default=default) + ("\n" if newline else ""))
