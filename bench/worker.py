"""One cell (implementation x workload x shape) in its own process: ``python -m bench.worker SPEC RESULT``.

SPEC is a JSON file written by the parent; RESULT is where this process writes its JSON figures. A crash,
a kill (out of memory) or a timeout leaves no RESULT, and the parent records that instead.

Memory method (the figures are "peak extra": above the memory held right after the inputs exist):

* CUDA: ``torch.cuda.max_memory_allocated() - torch.cuda.memory_allocated()`` after the inputs are
  allocated, with the peak statistics reset before the measured steps.
* CPU: the process's resident set from ``/proc/self/status``. A tiny matmul + log_softmax + backward
  first pages in torch's kernels, and the implementation's modules are imported and built, so the
  baseline holds the libraries and the inputs, not their first use. Right before a baseline is read,
  ``gc.collect()`` and glibc's ``malloc_trim(0)`` hand freed heap pages back to the OS, so that the
  baseline is the live memory and not what the allocator kept from earlier work (without the trim,
  a step can reuse pages that are already resident and its peak is under-counted). The kernel's
  peak-RSS mark (VmHWM) is then reset by writing 5 to ``/proc/self/clear_refs`` and read after the
  steps: ``peak extra = VmHWM - baseline``. Allocator caching during the steps can only add to the
  peak, never hide memory. Where clear_refs cannot be written, the lifetime peak
  ``getrusage(RUSAGE_SELF).ru_maxrss`` is used instead and the method field says so.

Gradients are dropped (``.grad = None``) before every step, so the peak extra includes the gradients
that step produces (reported separately as ``grad_bytes``; ``peak_extra - grad_bytes`` is the memory
beyond gradients). ``first_peak_extra_bytes`` covers the warm-up from a baseline taken before it
(first call: torch.compile's work shows there); ``peak_extra_bytes`` covers the timed repeats, from a
baseline re-read after the warm-up (with gradients dropped), so memory an implementation keeps across
steps (compiled code, caches) is reported apart, as ``resident_growth_bytes``. Timing runs with the
default allocator settings; the trims happen outside the timed steps.
"""
from __future__ import annotations

import gc
import json
import os
import resource
import statistics
import sys
import time
import traceback


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise OSError(f"{field} not in /proc/self/status")


def _malloc_trim() -> bool:
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        return True
    except (OSError, AttributeError):
        return False


class CpuMemory:
    def __init__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            _status_kb("VmHWM")
            self.method = "RSS: VmHWM after reset via /proc/self/clear_refs minus VmRSS after inputs"
            self.resettable = True
        except OSError:
            self.method = "RSS: lifetime ru_maxrss minus VmRSS/ru_maxrss after inputs (peak not resettable)"
            self.resettable = False

    def current(self) -> int:
        gc.collect()
        _malloc_trim()
        try:
            return _status_kb("VmRSS")
        except OSError:
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def reset_peak(self) -> None:
        if self.resettable:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak(self) -> int:
        if self.resettable:
            return _status_kb("VmHWM")
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class CudaMemory:
    method = "CUDA: torch.cuda.max_memory_allocated minus memory_allocated after inputs"

    def __init__(self, torch):
        self.torch = torch

    def current(self) -> int:
        gc.collect()
        self.torch.cuda.synchronize()
        return self.torch.cuda.memory_allocated()

    def reset_peak(self) -> None:
        self.torch.cuda.synchronize()
        self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> int:
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated()


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "not enough memory" in text


def run(spec: dict) -> dict:
    import torch

    from .impls import build
    from .workloads import WORKLOADS, Shape, make_inputs

    device = spec["device"]
    dtype = getattr(torch, spec["dtype"])
    workload = WORKLOADS[spec["workload"]]
    shape = Shape(**{k: spec["shape"][k] for k in ("rows", "seq", "hidden", "vocab", "prompt")})
    result = {"status": "failed", "threads": torch.get_num_threads(),
              "device_name": torch.cuda.get_device_name() if device == "cuda" else None}
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    # Page in the kernels every implementation uses, so that the baseline already holds them.
    x = torch.randn(64, 64, device=device, dtype=dtype, requires_grad=True)
    torch.log_softmax((x @ x.T).float(), -1).sum().backward()
    del x
    inp = make_inputs(workload, shape, dtype, device, seed=spec.get("seed", 0))
    step, how = build(spec["impl"], workload, inp, device)
    result["how"] = how
    leaves = [t for t in (inp["hidden"], inp["weight"]) if t.requires_grad]

    def once():
        for t in leaves:
            t.grad = None
        loss = step()
        if loss is not None:
            loss.backward()
        sync()
        return loss

    mem = CudaMemory(torch) if device == "cuda" else CpuMemory()
    result["memory_method"] = mem.method + ("; malloc_trim(0) before each baseline" if device != "cuda" and _malloc_trim() else "")
    first_baseline = mem.current()
    try:
        mem.reset_peak()
        warm_times = []
        for _ in range(max(1, spec["warmup"])):
            t0 = time.perf_counter()
            loss = once()
            warm_times.append(time.perf_counter() - t0)
        result["first_call_s"] = warm_times[0]
        result["first_peak_extra_bytes"] = mem.peak() - first_baseline
        for t in leaves:
            t.grad = None
        loss = None
        baseline = mem.current()
        result["baseline_bytes"] = baseline
        result["resident_growth_bytes"] = baseline - first_baseline
        mem.reset_peak()
        times = []
        for _ in range(spec["repeats"]):
            t0 = time.perf_counter()
            loss = once()
            times.append(time.perf_counter() - t0)
        result["peak_extra_bytes"] = mem.peak() - baseline
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row
        result["status"] = "oom" if _is_oom(exc) else "failed"
        result["reason"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:400]
        result["traceback"] = traceback.format_exc()[-3000:]
        return result
    result.update(
        status="ok",
        loadavg_after=list(os.getloadavg()),
        times_s=times,
        median_s=statistics.median(times),
        min_s=min(times),
        grad_bytes=sum(t.grad.numel() * t.grad.element_size() for t in leaves if t.grad is not None),
        loss=None if loss is None else float(loss.detach().float()),
        warmup_s=warm_times,
    )
    return result


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, result_path = argv
    with open(spec_path) as f:
        spec = json.load(f)
    try:
        result = run(spec)
    except Exception as exc:  # noqa: BLE001
        result = {"status": "oom" if _is_oom(exc) else "failed",
                  "reason": f"{type(exc).__name__}: {exc}"[:400], "traceback": traceback.format_exc()[-3000:]}
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f)
    os.replace(tmp, result_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
