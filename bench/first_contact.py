"""``python -m bench --preset gpu-first-contact --out DIR``: the first run of the Triton path on a GPU.

Runs from a plain checkout with nothing installed: ``python -m bench`` from the checkout's root imports
the checkout's ``prefopt`` (and ``prefopt.kernels``, mapped to ``kernels/``); the environment section
records which files were imported. Peers that are not installed (Liger, Cut Cross-Entropy, TRL) are
skipped with one line each. Hard deadline for the whole run: 5 minutes (``--deadline``); a section
that would pass it (by its estimate, :data:`ESTIMATE_S`) is skipped with one line, rows inside the
long sections are too (and past twice their section's estimate, so that a slow section leaves the later
ones their time), and a watchdog ends the process at the deadline, so a second try fits a 15-minute GPU
lease. Each section is written to ``OUT/first_contact.json`` and ``OUT/first_contact.md`` as it
ends (a crash or the watchdog keeps what came before):

1. ``environment``: device, versions, commit, date, where ``prefopt`` and its kernels were imported
   from, what the launcher detected (``addmm``'s ``out_dtype``, TF32), which peers are installed.
2. ``ceilings``: cuBLAS on a large bf16 product and a device-to-device copy: the peak and the
   bandwidth the model's efficiencies are relative to.
3. ``gate_self_test``: the correctness gate (bench/gate.py) on the clean kernels, then on planted
   defects (a dropped last vocabulary tile, a lost split), which it must fail.
4. ``correctness``: every variant against the float64 oracle, values and gradients, at shapes that span
   several splits and chunks with ragged ends, outputs poisoned before each run.
5. ``kernels``: each kernel alone at N=16384, H=4096, V=128256 (bf16; policy forward, reference-head
   forward, frozen forward and its moments products, logit gradient plain and with the KL's reference
   tile, the whole trainable backward, a cuBLAS chunk product), at least 20 samples each (bench/timing.py)
   with the first call kept; on a GPU it writes ``OUT/device_model.json``, the measured efficiencies that
   replace the launch model's defaults (``python -m bench --preset gpu --io-model --device-model FILE``).
6. ``op``: the op's forward + backward: trainable, trainable with reference head and KL, frozen head with
   the shortcut on, off and as ``"auto"`` decides, beside the launch model's predictions.
7. ``aot_compile``: registers, spills and shared memory of every kernel variant compiled by the Triton
   that is installed (bench/aot_compile.py); it needs no GPU, so it runs in its own process from the start.
8. ``profile``: torch.profiler's split of one trainable forward + backward by kernel.
9. ``end_to_end``: the bench's cells (dpo-ref and dpo-frozen at N=16384, V=128256) for prefopt-triton,
   the floor and the installed peers, with the IO model's predictions and both floors beside them.

Without CUDA (the CI dry run, with ``TRITON_INTERPRET=1``) the same code runs on the CPU at small
shapes, under the interpreter; the AOT section compiles one variant; what only a GPU can give (the
ceilings, the device model, the end-to-end cells) says it was skipped. A dry run's timings measure the
interpreter and nothing else.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import importlib.util
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from . import gate
from .timing import MIN_SAMPLES, measure

DEADLINE_S = 300.0
#: Expected seconds per section on an H100-class GPU, for the deadline check (the dry run takes less).
ESTIMATE_S = {"ceilings": 10, "gate_self_test": 25, "correctness": 80, "kernels": 60, "op": 30, "aot_compile": 5,
              "profile": 10, "end_to_end": 60}
ROW_ESTIMATE_S = {"cuda": 8.0, "dry run": 2.0}  # one measurement (or one gate run) inside a section
#: (tokens, hidden size, vocabulary) of the timing sections: the issue's shape on a GPU, a small one in the dry run.
TIMING_SHAPE = {"cuda": (16384, 4096, 128256), "dry run": (16, 16, 256)}
NO_CUDA = "skipped: no CUDA device"
DRY_RUN_AOT = ["fwd-bf16-plain"]  # the dry run compiles one variant (the GPU run every one)


@dataclass
class Context:
    device: torch.device
    out: str
    deadline: float  # time.monotonic() at which the run must have ended
    log: Callable[[str], None]
    results: Dict[str, dict] = field(default_factory=dict)
    measured: Dict[str, float] = field(default_factory=dict)
    device_model: Optional[dict] = None  # what this run wrote to OUT/device_model.json
    section_end: float = math.inf  # rows of the running section stop here (twice its estimate)

    @property
    def geometry(self) -> str:
        return "cuda" if self.device.type == "cuda" else "dry run"

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def row_fits(self, what: str) -> bool:
        """Whether one more row fits before the deadline and within the section's share (twice its
        estimate, so that one slow section leaves the later ones their time); if not, says so in one line."""
        left = min(self.deadline, self.section_end) - time.monotonic()
        if left >= ROW_ESTIMATE_S[self.geometry]:
            return True
        self.log(f"first contact: {what}: skipped, {left:.0f} s left of the section's share of the deadline")
        return False


def _kernels_cannot_run(ctx: Context) -> Optional[str]:
    """Why the Triton kernels cannot run on this run's device, or None (CUDA, or CPU under the interpreter)."""
    from prefopt.kernels import linear_logprobs as K

    if ctx.device.type == "cuda" or K.INTERPRET:
        return None
    return NO_CUDA + " (set TRITON_INTERPRET=1 for the dry run under the interpreter)"


def _inputs(ctx: Context, ref: bool = False, requires_grad: bool = False):
    """Inputs of the timing sections, drawn on the device (bf16; logits of standard deviation about 2)."""
    n, hidden, vocab = TIMING_SHAPE[ctx.geometry]
    g = torch.Generator(device=ctx.device).manual_seed(0)

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g, device=ctx.device) * scale).to(torch.bfloat16)

    h, w = randn(n, hidden), randn(vocab, hidden, scale=2 / hidden**0.5)
    y = torch.randint(0, vocab, (n,), generator=g, device=ctx.device)
    rh, rw = (randn(n, hidden), randn(vocab, hidden, scale=2 / hidden**0.5)) if ref else (None, None)
    if requires_grad:
        h.requires_grad_()
        w.requires_grad_()
    return h, w, y, rh, rw


# ---------------------------------------------------------------------------------------------------
# sections


def environment(ctx: Context) -> dict:
    import prefopt
    from prefopt.kernels import linear_logprobs as K

    from .impls import IMPLS, PEERS
    from .report import _git

    env = {"status": "ok", "dry_run": ctx.device.type != "cuda",
           "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
           "commit": _git("rev-parse", "HEAD") or "unknown (not a git checkout)",
           "python": platform.python_version(), "torch": torch.__version__, "cuda_runtime": torch.version.cuda,
           "prefopt_file": os.path.abspath(prefopt.__file__), "kernels_file": os.path.abspath(K.__file__),
           "triton_interpreter": K.INTERPRET, "addmm_out_dtype": K.ADDMM_OUT_DTYPE,
           "matmul_fp32_precision": hasattr(torch.backends.cuda.matmul, "fp32_precision"), "tf32_allowed": K.tf32_allowed(),
           "peers_installed": {p: all(importlib.util.find_spec(m) is not None for m in IMPLS[p].modules) for p in PEERS}}
    try:
        import triton
        from triton.testing import do_bench

        env["triton"] = triton.__version__
        env["do_bench_args"] = sorted(inspect.signature(do_bench).parameters)
    except ImportError as exc:
        env["triton"] = f"not importable: {exc}"
    if ctx.device.type == "cuda":
        props = torch.cuda.get_device_properties(ctx.device)
        env.update(device=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1),
                   l2_bytes=getattr(props, "L2_cache_size", None), capability=list(torch.cuda.get_device_capability(ctx.device)))
    else:
        env["device"] = "cpu (dry run)"
    return env


def ceilings(ctx: Context) -> dict:
    if ctx.device.type != "cuda":
        return {"status": NO_CUDA}
    a = torch.randn(8192, 8192, device=ctx.device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=ctx.device, dtype=torch.bfloat16)
    mm = measure(lambda: a @ b, ctx.device)
    src = torch.randn(2**28, device=ctx.device)  # 1 GiB
    dst = torch.empty_like(src)
    copy = measure(lambda: dst.copy_(src), ctx.device)
    ctx.measured["peak_flops"] = 2 * 8192**3 / (mm["median_ms"] / 1e3)
    ctx.measured["copy_bytes_per_s"] = 2 * src.numel() * 4 / (copy["median_ms"] / 1e3)
    return {"status": "ok", "bf16_mm_8192_tflops": ctx.measured["peak_flops"] / 1e12,
            "copy_1gib_tbps": ctx.measured["copy_bytes_per_s"] / 1e12, "mm": mm, "copy": copy}


def _gate_geometry(ctx: Context):
    return gate.dry_run_geometry() if ctx.device.type != "cuda" else contextlib.nullcontext()


def gate_self_test(ctx: Context) -> dict:
    why = _kernels_cannot_run(ctx)
    if why:
        return {"status": why}
    with _gate_geometry(ctx):
        return gate.self_test(gate.SHAPES[ctx.geometry]["ragged"], ctx.device)


def correctness(ctx: Context) -> dict:
    from prefopt.kernels import linear_logprobs as K

    why = _kernels_cannot_run(ctx)
    if why:
        return {"status": why, "variants": [v.name for v in gate.VARIANTS]}
    rows = []
    with _gate_geometry(ctx):
        for variant in gate.VARIANTS:
            for shape_name in variant.shapes:
                shape = gate.SHAPES[ctx.geometry][shape_name]
                if not ctx.row_fits(f"correctness: {variant.name} ({shape_name})"):
                    rows.append({"variant": variant.name, "shape": list(shape), "status": "skipped: deadline"})
                    continue
                try:
                    rows.append(gate.run_variant(variant, shape, ctx.device))
                except Exception as exc:  # one broken variant must not hide the others
                    rows.append({"variant": variant.name, "shape": list(shape), "status": f"error: {type(exc).__name__}: {exc}"})
    status = "ok" if all(r["status"] in ("ok", "skipped: deadline") for r in rows) else "FAILED"
    return {"status": status, "shapes": gate.SHAPES[ctx.geometry], "variants": rows,
            "addmm_out_dtype_after": K.ADDMM_OUT_DTYPE, "addmm_out_dtype_rejected": K.ADDMM_OUT_DTYPE_REJECTED}


def kernels(ctx: Context) -> dict:
    from prefopt.kernels import linear_logprobs as K
    from prefopt.ops.common import GradCoefficients, OpConfig
    from prefopt.ops.triton_backend import recompute_grads

    why = _kernels_cannot_run(ctx)
    if why:
        return {"status": why}
    n, hidden, vocab = TIMING_SHAPE[ctx.geometry]
    h, w, y, rh, rw = _inputs(ctx, ref=True)
    bf16 = torch.bfloat16
    bb = K.backward_blocks(n, vocab, hidden, bf16)
    width = K.chunk_width(n, vocab, hidden, 2, bb.block_v)
    lse = K.forward(h, w, None, y).lse
    g = torch.Generator(device=ctx.device).manual_seed(1)
    a, c1, c2 = (torch.randn(n, generator=g, device=ctx.device) * s for s in (1.0, 0.1, 0.1))
    c0 = -a
    ds = torch.empty(n, width, device=ctx.device, dtype=bf16)
    w_chunk = w[:width]
    acc = torch.zeros(n, hidden, device=ctx.device)
    rows_per_product = K.product_rows(K.CHUNK_BYTES, hidden, 4)
    moments_e = torch.rand(n, width, generator=g, device=ctx.device).to(bf16)
    coef = GradCoefficients(a, c0, None, None, None)

    def moments_products():
        for v0 in range(0, vocab, width):
            K.accumulate_product(acc, moments_e[:, : min(width, vocab - v0)], w[v0:v0 + width], rows_per_product)

    nvh = 2.0 * n * vocab * hidden
    chunk = 2.0 * n * width * hidden
    plan = [
        ("policy forward", "forward", nvh, lambda: K.forward(h, w, None, y)),
        ("policy forward, 64 x 128 tiles", None, nvh, lambda: K.forward(h, w, None, y, blocks=K.Blocks(64, 128, 64, 8, 4))),
        ("reference-head forward (KL statistics)", "forward_ref", 2 * nvh,
         lambda: K.forward(h, w, None, y, ref_hidden=rh, ref_weight=rw, mean_logit=True, mean_ref_logit=True)),
        ("frozen forward: kernel + moments products", "frozen_path", 2 * nvh, lambda: K.forward(h, w, None, y, moments=True)),
        ("frozen moments products alone (cuBLAS)", "moments", nvh, moments_products),
        ("logit-gradient kernel, one chunk", "logit_gradient", chunk, lambda: K.grad_logits(ds, 0, h, w, None, y, lse, a, c0)),
        ("logit-gradient kernel + reference tile (KL), one chunk", "logit_gradient_kl", 2 * chunk,
         lambda: K.grad_logits(ds, 0, h, w, None, y, lse, a, c0, c1, c2, ref_hidden=rh, ref_weight=rw)),
        ("d hidden += ds @ W_chunk (cuBLAS, fp32 out), one chunk", "cublas", chunk,
         lambda: K.accumulate_product(acc, ds, w_chunk, rows_per_product)),
        ("trainable backward: every chunk, kernel + both products", None, 3 * nvh,
         lambda: recompute_grads(h, w, None, y, lse, None, None, None, coef, OpConfig(), True, True, False)),
    ]
    rows = []
    for name, kind, flops, fn in plan:
        if not ctx.row_fits(f"kernels: {name}"):
            rows.append({"kernel": name, "status": "skipped: deadline"})
            continue
        try:
            timing = measure(fn, ctx.device)
            rows.append({"kernel": name, "kind": kind, "status": "ok", "tflops": flops / (timing["median_ms"] / 1e3) / 1e12,
                         **timing})
        except Exception as exc:
            rows.append({"kernel": name, "status": f"error: {type(exc).__name__}: {exc}"})
    status = "ok" if all(r["status"] in ("ok", "skipped: deadline") for r in rows) else "FAILED"
    record = {"status": status, "shape": {"n": n, "hidden": hidden, "vocab": vocab, "chunk_columns": width}, "rows": rows}
    record["device_model"] = _write_device_model(ctx, rows)
    return record


def _write_device_model(ctx: Context, rows: List[dict]) -> str:
    """OUT/device_model.json from the measured rates (fractions of the measured cuBLAS peak)."""
    from prefopt.ops.launch_model import DeviceModel

    if ctx.device.type != "cuda" or "peak_flops" not in ctx.measured:
        return "not written: " + ("dry run" if ctx.device.type != "cuda" else "no ceilings measured")
    peak = ctx.measured["peak_flops"]
    rate = {r["kind"]: r["tflops"] * 1e12 for r in rows if r.get("status") == "ok" and r.get("kind")}
    seconds = {r["kind"]: r["median_ms"] / 1e3 for r in rows if r.get("status") == "ok" and r.get("kind")}
    efficiency = {k: rate[k] / peak for k in ("forward", "forward_ref", "logit_gradient", "logit_gradient_kl", "cublas")
                  if k in rate}
    if "frozen_path" in seconds and "moments" in seconds and seconds["frozen_path"] > seconds["moments"]:
        # the frozen forward's kernel alone: the path's time less its moments products
        efficiency["frozen_forward"] = rate["moments"] * seconds["moments"] / (seconds["frozen_path"] - seconds["moments"]) / peak
    efficiency["memory"] = 1.0  # the bandwidth below is the measured copy rate itself
    env = ctx.results["environment"]
    data = {"name": env["device"], "sms": env["sms"], "peak_flops": {"bfloat16": peak, "float16": peak},
            "hbm_bytes_per_s": ctx.measured["copy_bytes_per_s"], "efficiency": efficiency,
            "source": f"measured by the first contact, {env['date']}, commit {env['commit']}"}
    try:
        DeviceModel.from_dict(data)
    except ValueError as exc:
        return f"not written: {exc}"
    with open(os.path.join(ctx.out, "device_model.json"), "w") as f:
        json.dump(data, f, indent=1)
    ctx.device_model = data
    return os.path.join(ctx.out, "device_model.json")


def op(ctx: Context) -> dict:
    from prefopt import linear_logprobs
    from prefopt.ops.launch_model import H100, DeviceModel, call_time, frozen_shortcut_pays, triton_launches
    from prefopt.ops.triton_backend import LinearLogprobsTriton

    why = _kernels_cannot_run(ctx)
    if why:
        return {"status": why}
    n, hidden, vocab = TIMING_SHAPE[ctx.geometry]
    h, w, y, rh, rw = _inputs(ctx, ref=True, requires_grad=True)
    measured_model = DeviceModel.from_dict(ctx.device_model) if ctx.device_model else None
    auto = frozen_shortcut_pays(n, vocab, hidden, torch.bfloat16)
    plan = [  # name, linear_logprobs options, frozen_head_shortcut, modelled (ref, kl, frozen, shortcut)
        ("trainable, log-probs", {}, "auto", (False, False, False, False)),
        ("trainable, reference head, KL + entropy", dict(ref_hidden=rh, ref_weight=rw, kl=True, entropy=True), "auto",
         (True, True, False, False)),
        ("frozen head, shortcut on", {}, True, (False, False, True, True)),
        ("frozen head, shortcut off", {}, False, (False, False, True, False)),
        (f"frozen head, auto (takes the shortcut: {auto})", {}, "auto", (False, False, True, auto)),
    ]
    rows = []
    saved = LinearLogprobsTriton.frozen_head_shortcut
    try:
        for name, options, shortcut, (ref, kl, frozen, modelled_shortcut) in plan:
            if not ctx.row_fits(f"op: {name}"):
                rows.append({"call": name, "status": "skipped: deadline"})
                continue
            LinearLogprobsTriton.frozen_head_shortcut = shortcut
            weight = w.detach() if frozen else w

            def step(options=options, weight=weight):
                out = linear_logprobs(h, weight, y, backend="triton", **options)
                loss = out.logp.sum() + (out.kl.sum() + out.entropy.sum() if "kl" in options else 0)
                loss.backward()
                h.grad = w.grad = None

            launches = triton_launches(n, hidden, vocab, torch.bfloat16, ref=ref, kl=kl, frozen=frozen,
                                       shortcut=modelled_shortcut)[0]
            row = {"call": name, "predicted_ms": call_time(launches, H100, torch.bfloat16) * 1e3}
            if measured_model is not None:
                row["predicted_ms_measured_model"] = call_time(launches, measured_model, torch.bfloat16) * 1e3
            try:
                rows.append({**row, "status": "ok", **measure(step, ctx.device)})
            except Exception as exc:
                rows.append({**row, "status": f"error: {type(exc).__name__}: {exc}"})
    finally:
        LinearLogprobsTriton.frozen_head_shortcut = saved
    status = "ok" if all(r["status"] in ("ok", "skipped: deadline") for r in rows) else "FAILED"
    return {"status": status, "shape": {"n": n, "hidden": hidden, "vocab": vocab}, "rows": rows}


def start_aot(ctx: Context) -> Optional[subprocess.Popen]:
    """bench/aot_compile.py in its own process (without the interpreter), lines into OUT/aot_compile.jsonl;
    None when Triton has no NVIDIA backend to compile for."""
    from .runner import child_env

    if importlib.util.find_spec("triton.backends.nvidia") is None:
        return None
    env = {k: v for k, v in child_env().items() if k != "TRITON_INTERPRET"}
    names = DRY_RUN_AOT if ctx.device.type != "cuda" else []
    ctx.measured["aot_started"] = time.time()
    with open(os.path.join(ctx.out, "aot_compile.jsonl"), "w") as out, \
            open(os.path.join(ctx.out, "aot_compile.log"), "w") as log:
        return subprocess.Popen([sys.executable, "-m", f"{__package__}.aot_compile", *names], stdout=out, stderr=log,
                                env=env, start_new_session=True)


def aot_compile(ctx: Context, proc: Optional[subprocess.Popen]) -> dict:
    if proc is None:
        return {"status": "skipped: triton without its NVIDIA backend"}
    try:
        rc = proc.wait(timeout=max(1.0, ctx.left() - 5))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = None
    with open(os.path.join(ctx.out, "aot_compile.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.startswith("{")]
    with open(os.path.join(ctx.out, "aot_compile.log"), errors="replace") as f:
        log_tail = f.read()[-1500:]
    spills = [r["name"] for r in rows if r.get("spill_stores") or r.get("spill_loads")]
    status = "ok" if rc == 0 and rows else ("stopped: deadline" if rc is None else f"error: exit code {rc}")
    last_line = os.path.getmtime(os.path.join(ctx.out, "aot_compile.jsonl"))
    record = {"status": status, "variants": rows, "spilling": spills,
              "background_seconds": round(last_line - ctx.measured["aot_started"], 1)}
    if status != "ok":
        record["log_tail"] = log_tail
    if ctx.device.type != "cuda":
        record["note"] = f"dry run: only {', '.join(DRY_RUN_AOT)} (the GPU run compiles every variant)"
    return record


def profile(ctx: Context) -> dict:
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from prefopt import linear_logprobs

    why = _kernels_cannot_run(ctx)
    if why:
        return {"status": why}
    h, w, y, _, _ = _inputs(ctx, requires_grad=True)
    cuda = ctx.device.type == "cuda"

    def step():
        linear_logprobs(h, w, y, backend="triton").logp.sum().backward()
        h.grad = w.grad = None
        if cuda:
            torch.cuda.synchronize(ctx.device)

    step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        step()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=15)
    return {"status": "ok", "table": table}


def end_to_end(ctx: Context) -> dict:
    from .io_model import predictions
    from .runner import Point, available_bytes, plan_cells, run_all
    from .workloads import WORKLOADS, Shape

    n, hidden, vocab = TIMING_SHAPE["cuda"]
    shape = Shape(8, n // 8, hidden, vocab)
    plan = [("dpo-ref", ["prefopt-triton", "floor", "liger", "cce", "trl"]), ("dpo-frozen", ["prefopt-triton", "floor"])]
    predicted = {wl: {k: v * 1e3 for k, v in predictions(WORKLOADS[wl], shape, torch.bfloat16).items()} for wl, _ in plan}
    cuda = ctx.device.type == "cuda"
    cells = plan_cells([Point(wl, shape) for wl, _ in plan], sorted({i for _, impls in plan for i in impls}), "cuda",
                       torch.bfloat16, available_bytes("cuda") if cuda else None)
    cells = [c for c in cells if c.impl in dict(plan)[c.point.workload]]
    for cell in cells:
        if not cell.result and not cuda:
            cell.result = {"status": "skipped", "reason": "no CUDA device (dry run)"}
        elif not cell.result and not ctx.row_fits(f"end_to_end: {cell.point.workload} {cell.impl}"):
            cell.result = {"status": "skipped", "reason": "deadline"}
        if cell.result:
            ctx.log(f"first contact: end_to_end: {cell.point.workload} {cell.impl}: skipped: {cell.result['reason']}")
            continue
        run_all([cell], device="cuda", dtype="bfloat16", warmup=2, repeats=MIN_SAMPLES,
                timeout=max(10.0, min(150.0, ctx.left() - 5)), progress=ctx.log)
    rows = [{"workload": c.point.workload, "impl": c.impl, **{k: c.result.get(k) for k in
             ("status", "reason", "median_s", "min_s", "times_s", "peak_extra_bytes", "loss")}} for c in cells]
    ran = [r for r in rows if r["status"] != "skipped"]
    status = "ok" if all(r["status"] == "ok" for r in ran) else "FAILED"
    return {"status": status if cuda else NO_CUDA, "shape": shape.as_dict(), "rows": rows, "predicted_ms": predicted}


SECTIONS = ["environment", "ceilings", "gate_self_test", "correctness", "kernels", "op", "aot_compile", "profile",
            "end_to_end"]


# ---------------------------------------------------------------------------------------------------
# the run


def run(out: str, device: str, deadline_s: float = DEADLINE_S) -> int:
    """Every section in turn within ``deadline_s`` seconds; exit status 1 if a section failed."""
    if device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
        print("prefopt bench: gpu-first-contact: TRITON_INTERPRET=1 would run the kernels under the interpreter "
              "on the GPU; unset it", file=sys.stderr)
        return 2
    os.makedirs(out, exist_ok=True)
    ctx = Context(torch.device("cuda" if device == "cuda" else "cpu"), out, time.monotonic() + deadline_s,
                  lambda msg: print(msg, file=sys.stderr, flush=True))
    lock = threading.Lock()
    aot = start_aot(ctx)
    current = {"section": None}

    def hard_stop():
        with lock:
            if current["section"]:
                ctx.results[current["section"]] = {"status": f"stopped: hard deadline of {deadline_s:g} s"}
            _write(ctx)
        ctx.log(f"first contact: hard deadline of {deadline_s:g} s reached in {current['section']}; "
                f"finished sections are in {out}/first_contact.json")
        if aot is not None:
            aot.kill()
        os._exit(124)

    watchdog = threading.Timer(deadline_s, hard_stop)
    watchdog.daemon = True
    watchdog.start()
    sections = {name: globals()[name] for name in SECTIONS}
    sections["aot_compile"] = lambda c: aot_compile(c, aot)
    try:
        for name in SECTIONS:
            estimate = 0 if name == "environment" else ESTIMATE_S[name]
            if ctx.left() < estimate:
                record = {"status": f"skipped: deadline (needs about {estimate} s, {ctx.left():.0f} s left)"}
                ctx.log(f"first contact: {name}: {record['status']}")
            else:
                ctx.log(f"first contact: {name} ...")
                current["section"] = name
                start = time.monotonic()
                ctx.section_end = start + 2 * estimate if estimate else math.inf
                try:
                    record = sections[name](ctx)
                except Exception as exc:  # a section's crash is its record; the next section still runs
                    record = {"status": f"error: {type(exc).__name__}: {exc}"}
                record["seconds"] = round(time.monotonic() - start, 1)
            with lock:
                ctx.results[name] = record
                current["section"] = None
                _write(ctx)
    finally:
        watchdog.cancel()
        if aot is not None and aot.poll() is None:
            aot.kill()
    print(markdown(ctx.results))
    ctx.log(f"wrote {out}/first_contact.json and first_contact.md")
    failed = [n for n, r in ctx.results.items() if not r["status"].startswith(("ok", "skipped"))]
    return 1 if failed else 0


def _write(ctx: Context) -> None:
    with open(os.path.join(ctx.out, "first_contact.json"), "w") as f:
        json.dump(ctx.results, f, indent=1, default=str)
    with open(os.path.join(ctx.out, "first_contact.md"), "w") as f:
        f.write(markdown(ctx.results))


def _ms(value) -> str:
    return f"{value:.2f}" if isinstance(value, (int, float)) and math.isfinite(value) else "-"


def markdown(results: Dict[str, dict]) -> str:
    env = results.get("environment", {})
    lines = ["## prefopt first contact", "",
             f"{env.get('device', '?')}; torch {env.get('torch', '?')}, triton {env.get('triton', '?')}, CUDA "
             f"{env.get('cuda_runtime', '?')}; commit {env.get('commit', '?')}; {env.get('date', '?')}; prefopt from "
             f"{env.get('prefopt_file', '?')}", ""]
    for name, rec in results.items():
        lines += [f"### {name}: {rec['status']} ({rec.get('seconds', '?')} s)", ""]
        if name == "gate_self_test" and "rows" in rec:
            lines += ["| planted defect | gate | verdict | worst error / tolerance |", "|---|---|---|---:|"]
            for r in rec["rows"]:
                lines.append(f"| {r['defect']} | {r['status']} | {r['verdict']} | {_worst(r):.3g} |")
        elif name == "correctness" and rec.get("variants") and isinstance(rec["variants"][0], dict):
            lines += ["| variant | shape | status | worst error / tolerance | splits | chunks |", "|---|---|---|---:|---:|---:|"]
            for r in rec["variants"]:
                geo = r.get("geometry", {})
                lines.append(f"| {r['variant']} | {r.get('shape')} | {r['status']} | {_worst(r):.3g} | "
                             f"{geo.get('forward_splits', '-')} | {geo.get('chunks', '-')} |")
        elif name in ("kernels", "op") and "rows" in rec:
            key = "kernel" if name == "kernels" else "call"
            lines += [f"| {key} | status | first call ms | min ms | median ms | TFLOP/s | predicted ms |",
                      "|---|---|---:|---:|---:|---:|---:|"]
            for r in rec["rows"]:
                lines.append(f"| {r[key]} | {r['status']} | {_ms(r.get('first_call_ms'))} | {_ms(r.get('min_ms'))} | "
                             f"{_ms(r.get('median_ms'))} | {_ms(r.get('tflops'))} | {_ms(r.get('predicted_ms'))} |")
        elif name == "aot_compile" and rec.get("variants"):
            lines += ["| variant | registers | spill stores B | spill loads B | shared B |", "|---|---:|---:|---:|---:|"]
            for r in rec["variants"]:
                lines.append(f"| {r['name']} | {r.get('registers')} | {r.get('spill_stores')} | {r.get('spill_loads')} | "
                             f"{r.get('shared')} |")
        elif name == "profile" and "table" in rec:
            lines += ["```", rec["table"], "```"]
        else:
            body = {k: v for k, v in rec.items() if k not in ("status", "seconds")}
            lines += ["```", json.dumps(body, indent=1, default=str), "```"]
        lines.append("")
    return "\n".join(lines)


def _worst(row: dict) -> float:
    """The largest error of a gate row as a fraction of its tolerance (> 1: the gate fails it)."""
    tol = row.get("tolerance")
    if not tol or not row.get("errors"):
        return math.nan
    return max(e / tol["gradients" if k.startswith("d ") else "values"] for k, e in row["errors"].items())
