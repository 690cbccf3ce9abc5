"""Turn the cells' results into the markdown table, the JSON file and the growth-curve plots."""
from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import subprocess
from importlib import metadata
from typing import Dict, List, Optional

from .impls import IMPLS, PEERS
from .runner import Cell

MiB = 2**20
PREFOPT = ("prefopt-torch", "prefopt-triton")


# ---------------------------------------------------------------------------------------------------
# Environment


def _version(dist: str) -> Optional[str]:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _git(*args: str) -> Optional[str]:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def environment(device: str, dtype: str, cells: List[Cell]) -> dict:
    ok = [c.result for c in cells if c.result.get("status") == "ok"]
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "device_name": next((r["device_name"] for r in ok if r.get("device_name")), None) or _cpu_model(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": next((r.get("threads") for r in ok), None),
        "dtype": dtype,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {d: _version(d) for d in ("torch", "prefopt", "liger-kernel", "cut-cross-entropy", "triton")},
        "git_commit": _git("rev-parse", "HEAD"),
        "git_commit_short": _git("rev-parse", "--short", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "git_dirty_paths": [line.split(maxsplit=1)[-1] for line in dirty.splitlines()][:50] if dirty else [],
    }
    try:
        env["loadavg"] = list(os.getloadavg())
    except OSError:
        pass
    return env


# ---------------------------------------------------------------------------------------------------
# Markdown


def _groups(cells: List[Cell]) -> Dict[tuple, List[Cell]]:
    groups: Dict[tuple, List[Cell]] = {}
    for c in cells:
        groups.setdefault(c.point.key, []).append(c)
    return groups


def _best(cells: List[Cell], names, field: str) -> Optional[Cell]:
    ok = [c for c in cells if c.impl in names and c.result.get("status") == "ok"]
    return min(ok, key=lambda c: c.result[field]) if ok else None


def _ratio(a: float, b: Optional[float]) -> str:
    return f"{a / b:.2f}x" if b else "-"


def group_table(cells: List[Cell]) -> List[str]:
    """Rows of one (workload, shape): figures, ratios against naive and against the best peer."""
    by = {c.impl: c for c in cells}
    naive = by.get("naive")
    naive_ok = naive is not None and naive.result.get("status") == "ok"
    peer_t = _best(cells, PEERS, "median_s")
    peer_m = _best(cells, PEERS, "peak_extra_bytes")
    lines = [
        "| implementation | median fwd+bwd ms | min ms | peak extra MiB | beyond grads MiB | time vs naive | memory vs naive "
        "| time vs best peer | memory vs best peer | loss |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for c in cells:
        r = c.result
        if r.get("status") != "ok":
            lines.append(f"| {c.impl} | {r.get('status')}: {_md(r.get('reason', ''))} | | | | | | | | |")
            continue
        t, m = r["median_s"], r["peak_extra_bytes"]
        mem_note = " (buffers preallocated)" if c.impl == "floor" else ""
        cols = [
            c.impl,
            f"{t * 1e3:.1f}",
            f"{r.get('min_s', t) * 1e3:.1f}",
            f"{m / MiB:.1f}{mem_note}",
            f"{(m - r.get('grad_bytes', 0)) / MiB:.1f}",
            _ratio(t, naive.result["median_s"] if naive_ok else None),
            _ratio(m, naive.result["peak_extra_bytes"] if naive_ok else None) if c.impl != "floor" else "-",
            _ratio(t, peer_t.result["median_s"] if peer_t else None),
            _ratio(m, peer_m.result["peak_extra_bytes"] if peer_m else None) if c.impl != "floor" else "-",
            "-" if r.get("loss") is None else f"{r['loss']:.6g}",
        ]
        lines.append("| " + " | ".join(cols) + " |")
    notes = []
    if peer_t:
        notes.append(f"best peer by time: {peer_t.impl}; by memory: {peer_m.impl}")
    notes += targets(cells)
    return lines + [""] + [f"- {n}" for n in notes]


def targets(cells: List[Cell]) -> List[str]:
    """Issue 2's target for prefopt's torch backend and issue 3's for its Triton backend, where measurable."""
    by = {c.impl: c.result for c in cells if c.result.get("status") == "ok"}
    peer_m = _best(cells, PEERS, "peak_extra_bytes")
    out = []
    p = by.get("prefopt-torch")
    if p and peer_m and "naive" in by:
        mem = p["peak_extra_bytes"] / peer_m.result["peak_extra_bytes"]
        tim = p["median_s"] / by["naive"]["median_s"]
        tmin = p.get("min_s", p["median_s"]) / by["naive"].get("min_s", by["naive"]["median_s"])
        out.append(
            f"issue-2 target (prefopt-torch): peak extra {mem:.2f}x the best peer's ({peer_m.impl}), target <= 0.5: "
            f"{'met' if mem <= 0.5 else 'MISSED'}; time {tim:.2f}x naive (median; {tmin:.2f}x by the fastest "
            f"repeats), target <= 1.0: {'met' if tim <= 1.0 else 'MISSED'}"
        )
    if p and "naive" in by:
        import torch

        from .io_model import naive_model, torch_model
        from .workloads import WORKLOADS

        wl, shape = WORKLOADS[cells[0].point.workload], cells[0].point.shape
        fused, plain = torch_model(wl, shape, torch.float32).products(), naive_model(wl, shape, torch.float32).products()
        tim = p["median_s"] / by["naive"]["median_s"]
        out.append(
            f"issue-11 bound (prefopt-torch): time {tim:.2f}x naive, allowed {fused / plain:.2f}x by the matrix "
            f"products ({fused:.0f} against naive's {plain:.0f}): {'met' if tim <= fused / plain else 'MISSED'}"
        )
    p = by.get("prefopt-triton")
    if p and "floor" in by:
        tim = p["median_s"] / by["floor"]["median_s"]
        peers = {n: by[n]["median_s"] for n in PEERS if n in by}
        faster = all(p["median_s"] < t for t in peers.values())
        beyond = (p["peak_extra_bytes"] - p.get("grad_bytes", 0)) / MiB
        out.append(
            f"issue-3 targets (prefopt-triton): time {tim:.2f}x the floor, target <= 1.15: {'met' if tim <= 1.15 else 'MISSED'}; "
            f"faster than {', '.join(peers) or 'no peer measured'}: {'met' if faster and peers else 'MISSED' if peers else '-'}; "
            f"beyond gradients {beyond:.1f} MiB (target < 64 MiB + O(N))"
        )
    return out


def _md(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(cells: List[Cell], env: dict, title: str, conditions: str = "") -> str:
    from .io_model import WHY_ONE_MORE

    lines = [
        f"## {title}",
        "",
        f"{env['device_name']} ({env['device']}, {env['cpu_count']} cores, torch threads {env.get('torch_threads')}), "
        f"{env['dtype']}, torch {env['versions']['torch']}, commit {env.get('git_commit_short')}"
        f"{' (dirty)' if env.get('git_dirty') else ''}, {env['date']}",
        "",
        "Median (and fastest) of the timed repeats of forward+backward; peak extra memory above the inputs, gradients included "
        "(beyond grads: minus the gradients' bytes). Ratios below 1 favour the row." + (f" {conditions}" if conditions else ""),
        "",
        WHY_ONE_MORE,
    ]
    from .workloads import WORKLOADS

    for (workload, shape), group in _groups(cells).items():
        lines += ["", f"### {workload}: {shape.label()}", "", f"_{WORKLOADS[workload].description}._", ""]
        lines += group_table(group)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------------
# JSON and plots


def write_json(path: str, cells: List[Cell], env: dict, config: dict) -> None:
    rows = []
    for c in cells:
        rows.append({"workload": c.point.workload, "shape": c.point.shape.as_dict(), "sweeps": list(c.point.sweeps),
                     "tag": c.point.tag, "impl": c.impl, "impl_description": IMPLS[c.impl].description, **c.result})
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"environment": env, "config": config, "results": rows}, f, indent=1)


def write_plots(out_dir: str, cells: List[Cell], env: dict) -> List[str]:
    """growth_tokens.png and growth_vocab.png: time and peak extra memory of every implementation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    for sweep, xlabel, xof in (("tokens", "scored tokens N", lambda s: s.scored), ("vocab", "vocabulary size V", lambda s: s.vocab)):
        ok = [c for c in cells if sweep in c.point.sweeps and c.result.get("status") == "ok"]
        workloads = sorted({c.point.workload for c in ok})
        if not ok:
            continue
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for wl in workloads:
            for impl in IMPLS:
                pts = sorted((xof(c.point.shape), c.result["median_s"] * 1e3, c.result["peak_extra_bytes"] / MiB)
                             for c in ok if c.impl == impl and c.point.workload == wl)
                if len(pts) < 2:
                    continue
                label = impl if len(workloads) == 1 else f"{wl} {impl}"
                xs = [p[0] for p in pts]
                axes[0].plot(xs, [p[1] for p in pts], marker="o", label=label)
                if impl != "floor":
                    axes[1].plot(xs, [p[2] for p in pts], marker="o", label=label)
        for ax, ylabel in zip(axes, ("median forward+backward (ms)", "peak extra memory (MiB)")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        fig.suptitle(f"{', '.join(workloads)} vs {sweep}: {env['device_name']}, {env['dtype']}, "
                     f"commit {env.get('git_commit_short')}", fontsize=9)
        fig.tight_layout()
        path = os.path.join(out_dir, f"growth_{sweep}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
