"""The parent side: plan the cells, refuse those that cannot fit, run each in its own subprocess.

Every cell ends as one row whatever happens to its process: ``ok`` with figures, ``skipped`` (not
installed, not runnable on this device, not supported by that library, would not fit in memory), or
``failed`` / ``oom`` / ``timeout`` / ``killed`` with the reason.
"""
from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from .impls import estimate_extra_bytes, static_skip
from .workloads import WORKLOADS, Shape, Workload, input_bytes

_PACKAGE = __package__  # "bench" from a checkout, "prefopt.bench" when installed
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Point:
    """One workload on one shape; ``sweeps`` names the growth curves it belongs to ("tokens", "vocab")."""

    workload: str
    shape: Shape
    sweeps: Tuple[str, ...] = ()
    tag: str = ""

    @property
    def key(self):
        return (self.workload, self.shape)


@dataclass
class Cell:
    point: Point
    impl: str
    result: dict = field(default_factory=dict)


def merge_points(points: List[Point]) -> List[Point]:
    """One point per (workload, shape), keeping the union of their sweeps and the first tag, in order."""
    out: dict = {}
    for p in points:
        if p.key in out:
            q = out[p.key]
            q.sweeps = tuple(dict.fromkeys(q.sweeps + p.sweeps))
            q.tag = q.tag or p.tag
        else:
            out[p.key] = Point(p.workload, p.shape, tuple(p.sweeps), p.tag)
    return list(out.values())


def available_bytes(device: str) -> Optional[int]:
    """Memory the next subprocess can use: free GPU memory, or the OS's available memory."""
    if device == "cuda":
        code = "import torch; print(torch.cuda.mem_get_info()[0])"
        try:
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
            return int(out.stdout.strip().splitlines()[-1])
        except Exception:  # noqa: BLE001
            return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None


def fit_skip(impl: str, workload: Workload, shape: Shape, dtype, avail: Optional[int]) -> Optional[str]:
    """A reason to refuse the cell when its estimated memory exceeds 90% of what is available."""
    if avail is None:
        return None
    need = input_bytes(workload, shape, dtype) + estimate_extra_bytes(impl, workload, shape, dtype)
    if need > 0.9 * avail:
        return (f"does not fit: {impl} on {shape.label()} needs about {need / 2**30:.1f} GiB, "
                f"{avail / 2**30:.1f} GiB available")
    return None


def child_env() -> dict:
    env = dict(os.environ)
    if _PACKAGE == "bench":  # running from a checkout: the child must find the same package
        env["PYTHONPATH"] = _CHECKOUT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def run_cell(cell: Cell, *, device: str, dtype: str, warmup: int, repeats: int, timeout: float, seed: int = 0) -> dict:
    """Run one cell in a fresh interpreter and return its result row (never raises for the cell's own failure)."""
    spec = {"impl": cell.impl, "workload": cell.point.workload, "shape": cell.point.shape.as_dict(),
            "device": device, "dtype": dtype, "warmup": warmup, "repeats": repeats, "seed": seed}
    with tempfile.TemporaryDirectory(prefix="prefopt-bench-") as tmp:
        spec_path, result_path, log_path = (os.path.join(tmp, n) for n in ("spec.json", "result.json", "log.txt"))
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        start = time.perf_counter()
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, "-m", f"{_PACKAGE}.worker", spec_path, result_path],
                                    stdout=log, stderr=subprocess.STDOUT, env=child_env(), start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        wall = time.perf_counter() - start
        with open(log_path, errors="replace") as f:
            log_tail = f.read()[-2000:]
        if rc is None:
            return {"status": "timeout", "reason": f"timed out after {timeout:.0f} s", "wall_s": wall}
        if os.path.exists(result_path):
            with open(result_path) as f:
                res = json.load(f)
            res["wall_s"] = wall
            return res
        if rc < 0 and -rc == signal.SIGKILL:
            reason = "killed by SIGKILL (most likely the out-of-memory killer)"
            status = "oom"
        elif rc < 0:
            reason, status = f"killed by signal {-rc}", "killed"
        else:
            lines = [ln for ln in log_tail.strip().splitlines() if ln.strip()]
            reason, status = f"exited with code {rc}: {lines[-1] if lines else 'no output'}"[:400], "failed"
        return {"status": status, "reason": reason, "wall_s": wall, "log_tail": log_tail}


def plan_cells(points: List[Point], impls: List[str], device: str, dtype, avail: Optional[int]) -> List[Cell]:
    cells = []
    for p in points:
        wl = WORKLOADS[p.workload]
        for name in impls:
            cell = Cell(p, name)
            reason = static_skip(name, wl, device) or fit_skip(name, wl, p.shape, dtype, avail)
            if reason:
                cell.result = {"status": "skipped", "reason": reason}
            cells.append(cell)
    return cells


def run_all(cells: List[Cell], *, device: str, dtype: str, warmup: int, repeats: int, timeout: float,
            progress: Callable[[str], None], rounds: int = 1) -> None:
    """Run every cell not already decided, ``rounds`` times in turn (all cells once, then again, ...).

    On a shared machine the load drifts; interleaved rounds spread that drift over every implementation
    instead of charging it to whichever ran during a busy spell. The figures kept are the median of
    all timed repeats of all rounds and the largest peak memory of any round; every round's own
    figures stay in ``result["rounds"]``. A cell that fails in any round keeps that failure.
    """
    todo = [c for c in cells if not c.result]
    for c in cells:
        if c.result:
            progress(f"skip  {c.point.workload:<16} {c.point.shape.label():<32} {c.impl:<15} {c.result['reason']}")
    per_cell: dict = {id(c): [] for c in todo}
    total = len(todo) * rounds
    k = 0
    for rnd in range(rounds):
        for c in todo:
            if rnd and per_cell[id(c)][-1]["status"] != "ok":
                continue  # a failure is final; later rounds would fail the same way
            k += 1
            head = f"[{k}/{total}] {c.point.workload:<16} {c.point.shape.label():<32} {c.impl:<15}"
            r = run_cell(c, device=device, dtype=dtype, warmup=warmup, repeats=repeats, timeout=timeout)
            per_cell[id(c)].append(r)
            if r["status"] == "ok":
                progress(f"{head} {r['median_s'] * 1e3:9.1f} ms  {r['peak_extra_bytes'] / 2**20:9.1f} MiB extra"
                         f"  ({r['wall_s']:.0f} s)")
            else:
                progress(f"{head} {r['status']}: {r.get('reason', '')}")
    for c in todo:
        c.result = combine_rounds(per_cell[id(c)])


def combine_rounds(results: List[dict]) -> dict:
    """One row from the rounds of a cell (see :func:`run_all`)."""
    if len(results) == 1 or results[-1]["status"] != "ok":
        return results[-1] if len(results) == 1 else {**results[-1], "rounds": results}
    times = [t for r in results for t in r["times_s"]]
    worst = max(results, key=lambda r: r["peak_extra_bytes"])
    return {**worst, "times_s": times, "median_s": statistics.median(times), "min_s": min(times),
            "wall_s": sum(r["wall_s"] for r in results), "rounds": results}
