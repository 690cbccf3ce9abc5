"""Timing of one call, every sample kept: the first contact's measurements (CUDA events on a GPU).

``triton.testing.do_bench`` sizes its repeats from a time budget, so a 30-110 ms call gets 1-3 samples
with its defaults, and its argument names differ across Triton versions; this loop takes a fixed
number of samples instead, each between its own pair of CUDA events, with the L2 cache flushed (a
write larger than L2) before each, and keeps the first call (compilation included) apart.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

#: At least this many timed samples per measurement.
MIN_SAMPLES = 20
L2_FLUSH_BYTES = 256 * 2**20  # above the L2 of every current GPU (H100 50 MiB, H200 60 MiB, B200 126 MiB)


def measure(fn: Callable[[], object], device: torch.device, *, samples: int = MIN_SAMPLES, warmup: int = 2) -> dict:
    """``fn`` once (the first call, compilation included), ``warmup`` times more, then ``samples`` timed
    calls. Returns milliseconds: ``first_call_ms``, every sample in order, their minimum and median."""
    if samples < MIN_SAMPLES:
        raise ValueError(f"samples: expected at least {MIN_SAMPLES}, got {samples}")
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    start = time.perf_counter()
    fn()
    sync()
    first_ms = (time.perf_counter() - start) * 1e3
    for _ in range(warmup):
        fn()
    sync()
    if cuda:
        flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device=device)
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(samples)]
        for begin, end in events:
            flush.zero_()
            begin.record()
            fn()
            end.record()
        sync()
        times = [begin.elapsed_time(end) for begin, end in events]
    else:
        times = []
        for _ in range(samples):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {"first_call_ms": first_ms, "samples_ms": times, "min_ms": min(times),
            "median_ms": statistics.median(times), "samples": len(times), "clock": "cuda events" if cuda else "perf_counter"}
