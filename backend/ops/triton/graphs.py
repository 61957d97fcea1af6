"""CUDA-graph capture of a callable, the way torch asks for it: one eager run on a side stream first (Triton
compilation, NCCL's lazy communicator setup, workspace allocation, a GEMM's tile choice), then the capture.

The capture uses capture_error_mode="thread_local": NCCL's watchdog thread keeps polling while a collective is
being captured, which the default ("global") mode would report as an error. Imports torch only.
"""
from __future__ import annotations

import torch


def capture_graph(fn, device=None):
    """fn() (no arguments; it reads and writes tensors it closes over) -> (torch.cuda.CUDAGraph, what the captured
    call returned). graph.replay() reruns fn's kernels on the same memory: the returned tensors are overwritten."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    torch.cuda.synchronize(device)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, capture_error_mode="thread_local"):
        out = fn()
    return graph, out


class Rerun:
    """An eager stand-in for a captured CUDA graph (CPU runs: the benchmark's dry run, tests): replay() calls fn
    again and writes what it returns into the tensors the capture returned, as a graph's replay rewrites them."""

    def __init__(self, fn, out):
        self.fn, self.out = fn, out

    def replay(self) -> None:
        new = self.fn()
        pairs = zip(self.out, new) if isinstance(self.out, tuple) else [(self.out, new)]
        for old, now in pairs:
            if isinstance(old, torch.Tensor) and old is not now:
                old.copy_(now)


def rerun_capture(fn, device=None):
    """capture_graph's contract without CUDA: fn run once (the warm-up), once more for the outputs -> (Rerun, out)."""
    fn()
    out = fn()
    return Rerun(fn, out), out
