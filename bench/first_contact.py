"""``python -m bench --preset gpu-first-contact``: the first run of the Triton path on a real GPU (<= 10 min on an H100).

Sections, each written to ``OUT/first_contact.json`` and ``OUT/first_contact.md`` as soon as it ends (a
crash or a timeout keeps what came before):

1. ``environment``: device, SMs, L2, versions, and the features the code detects (``addmm``'s
   ``out_dtype``, ``fp32_precision``, ``do_bench``'s arguments); the stack seen on the GPU machines
   (torch 2.11, triton 3.6) differs from the development one (2.13, 3.9).
2. ``ceilings``: a large cuBLAS bf16 product and a device-to-device copy, the two peaks the IO model assumes.
3. ``correctness``: every variant against a float64 oracle on the device (bf16, fp32 with TF32 off and on,
   softcap + temperature + bias, reference head + KL + entropy, frozen head with the shortcut on and off,
   a transposed fp32 head under bf16 hidden, ``capturable=True``, top-1), values and gradients.
4. ``kernels``: each kernel alone at N=16384, H=4096, V=128256 (bf16), two tile choices each, in TFLOP/s.
5. ``profile``: torch.profiler's split of one trainable forward+backward by kernel.
6. ``frozen``: the frozen head with the shortcut on and off (forward+backward time).
7. ``end_to_end``: the bench's cells (dpo-ref and dpo-frozen at N=16384, V=128256) for prefopt-triton, the
   floor, Liger, Cut Cross-Entropy and TRL's fused head, with the IO model's prediction beside them.

Without CUDA (the CI dry run) every section runs its orchestration and writes its record with
``"status": "skipped: no CUDA device"`` for what needs the GPU; the environment and the model still run.
"""
from __future__ import annotations

import inspect
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List

import torch

from .oracle import oracle_linear_logprobs

SHAPE = dict(n=16384, hidden=4096, vocab=128256)
NO_CUDA = "skipped: no CUDA device"


def _features() -> Dict[str, object]:
    """The versions, and what the kernels' launcher decided from them (not a second detection)."""
    from prefopt.kernels import linear_logprobs as K

    feats: Dict[str, object] = {
        "python": platform.python_version(), "torch": torch.__version__,
        "addmm_out_dtype": K.ADDMM_OUT_DTYPE,
        "matmul_fp32_precision": hasattr(torch.backends.cuda.matmul, "fp32_precision"),
        "tf32_allowed": K.tf32_allowed(),
        "cuda": torch.cuda.is_available(),
    }
    try:
        import triton
        from triton.testing import do_bench

        feats["triton"] = triton.__version__
        feats["do_bench_args"] = sorted(inspect.signature(do_bench).parameters)
    except ImportError as exc:
        feats["triton"] = f"not importable: {exc}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        feats.update(device=props.name, sms=props.multi_processor_count, memory_gib=props.total_memory / 2**30,
                     l2_bytes=getattr(props, "L2_cache_size", None), capability=list(torch.cuda.get_device_capability()))
    return feats


def _bench_ms(fn: Callable[[], object]) -> float:
    """Median milliseconds with CUDA events (triton's do_bench; its argument names differ across versions)."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    kwargs = {"return_mode": "median"} if "return_mode" in params else {"quantiles": [0.5]}
    out = do_bench(fn, **kwargs)
    return float(out[0] if isinstance(out, (list, tuple)) else out)


# ---------------------------------------------------------------------------------------------------


def ceilings(device: str) -> dict:
    if device != "cuda":
        return {"status": NO_CUDA}
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    mm_ms = _bench_ms(lambda: a @ b)
    src = torch.randn(2**28, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    copy_ms = _bench_ms(lambda: dst.copy_(src))
    return {"status": "ok", "bf16_mm_tflops": 2 * 8192**3 / mm_ms / 1e9,
            "copy_tbps": 2 * src.numel() * 4 / copy_ms / 1e9}


def _variant(name, device, dtype, tol, size, *, frozen=False, softcap=None, temperature=1.0, bias=False, ref=False,
             transposed_fp32_head=False, capturable=False, shortcut=None, tf32=None):
    from prefopt import linear_logprobs
    from prefopt.ops.triton_backend import LinearLogprobsTriton

    g = torch.Generator(device="cpu").manual_seed(1234)
    n, hidden, vocab = size
    h = torch.randn(n, hidden, generator=g).to(device, dtype).requires_grad_()
    if transposed_fp32_head:
        w = (torch.randn(hidden, vocab, generator=g) / hidden**0.5).to(device).T
    else:
        w = (torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype)
    w.requires_grad_(not frozen)
    b = (torch.randn(vocab, generator=g) * 0.1).to(device, w.dtype) if bias else None
    y = torch.randint(0, vocab, (n,), generator=g).to(device)
    extra = {}
    if ref:
        extra = dict(ref_hidden=torch.randn(n, hidden, generator=g).to(device, dtype),
                     ref_weight=(torch.randn(vocab, hidden, generator=g) / hidden**0.5).to(device, dtype))
    # With softcap the shortcut covers log-probs only (mean_logit's gradient is per entry there).
    stats = dict(entropy=not frozen, kl=ref and not frozen, mean_logit=not (frozen and softcap is not None), top1=True)
    old_shortcut, old_precision = LinearLogprobsTriton.frozen_head_shortcut, _get_tf32()
    try:
        if shortcut is not None:
            LinearLogprobsTriton.frozen_head_shortcut = shortcut
        if tf32 is not None:
            _set_tf32(tf32)
        out = linear_logprobs(h, w, y, bias=b, softcap=softcap, temperature=temperature, backend="triton",
                              capturable=capturable, **stats, **extra)
        names = [k for k in ("logp", "lse", "entropy", "kl", "mean_logit") if getattr(out, k) is not None]
        up = {k: torch.randn(n, generator=g).to(device, torch.float64) for k in names}
        total = sum((getattr(out, k).double() * up[k]).sum() for k in names)
        leaves = [h] + ([] if frozen else [w])
        grads = torch.autograd.grad(total, leaves)
        torch.cuda.synchronize() if device == "cuda" else None
    finally:
        LinearLogprobsTriton.frozen_head_shortcut = old_shortcut
        _set_tf32(old_precision)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    want = oracle_linear_logprobs(leaves64[0], leaves64[1] if not frozen else w.detach(), y, bias=b,
                                  temperature=temperature, softcap=softcap, ref_hidden=extra.get("ref_hidden"),
                                  ref_weight=extra.get("ref_weight"))
    want_grads = torch.autograd.grad(sum((getattr(want, k) * up[k]).sum() for k in names), leaves64)
    errors = {}
    for k in names + ["top1"]:
        errors[k] = _rel(getattr(out, k), getattr(want, k))
    for got, expected, label in zip(grads, want_grads, ("d hidden", "d weight")):
        errors[label] = _rel(got, expected)
    top1_agree = float((out.top1.double() == want.top1).double().mean())
    ok = all(e <= tol for k, e in errors.items() if k != "top1") and top1_agree >= 0.99
    return {"variant": name, "status": "ok" if ok else "FAILED", "tolerance": tol, "errors": errors,
            "top1_agreement": top1_agree}


def _rel(actual, expected) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).abs().max() / (expected.abs().max() + 1.0))


def _get_tf32():
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def _set_tf32(value) -> None:
    matmul = torch.backends.cuda.matmul
    if isinstance(value, bool):
        value = ("tf32" if value else "ieee") if hasattr(matmul, "fp32_precision") else value
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = value
    else:
        matmul.allow_tf32 = value


CORRECTNESS = [
    ("bf16 trainable, bias, softcap 30, temperature 0.9", torch.bfloat16, 3e-2,
     dict(bias=True, softcap=30.0, temperature=0.9)),
    ("bf16 trainable, reference head, KL + entropy", torch.bfloat16, 3e-2, dict(ref=True)),
    ("bf16 frozen head, shortcut on", torch.bfloat16, 3e-2, dict(frozen=True, shortcut=True)),
    ("bf16 frozen head, shortcut off", torch.bfloat16, 3e-2, dict(frozen=True, shortcut=False)),
    ("bf16 frozen head, softcap, shortcut on", torch.bfloat16, 3e-2, dict(frozen=True, shortcut=True, softcap=20.0)),
    ("bf16 hidden, transposed fp32 head", torch.bfloat16, 3e-2, dict(transposed_fp32_head=True)),
    ("bf16 capturable=True", torch.bfloat16, 3e-2, dict(capturable=True, ref=True)),
    ("fp32, TF32 off", torch.float32, 1e-4, dict(tf32=False, softcap=30.0, bias=True)),
    ("fp32, TF32 on", torch.float32, 1e-2, dict(tf32=True, ref=True)),
]


def correctness(device: str) -> dict:
    """On CUDA at n=300, H=256, V=5000 (several tiles, splits and chunks); without CUDA, under the Triton
    interpreter (``TRITON_INTERPRET=1``, the CI dry run) at a tiny shape, so the harness itself is tested."""
    size = (300, 256, 5000)
    if device != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return {"status": NO_CUDA + " (set TRITON_INTERPRET=1 to run the variants under the interpreter)",
                    "variants": [name for name, *_ in CORRECTNESS]}
        size = (24, 32, 200)
    rows = []
    for name, dtype, tol, opts in CORRECTNESS:
        try:
            rows.append(_variant(name, device, dtype, tol, size, **opts))
        except Exception as exc:  # one broken variant must not hide the others
            rows.append({"variant": name, "status": f"error: {type(exc).__name__}: {exc}"})
    return {"status": "ok" if all(r["status"] == "ok" for r in rows) else "FAILED", "shape": size, "variants": rows}


def _issue_inputs(device):
    n, hidden, vocab = SHAPE["n"], SHAPE["hidden"], SHAPE["vocab"]
    h = torch.randn(n, hidden, device=device, dtype=torch.bfloat16)
    w = torch.randn(vocab, hidden, device=device, dtype=torch.bfloat16) / hidden**0.5
    y = torch.randint(0, vocab, (n,), device=device)
    return h, w, y


def kernels(device: str) -> dict:
    from prefopt.kernels import linear_logprobs as K

    n, hidden, vocab = SHAPE["n"], SHAPE["hidden"], SHAPE["vocab"]
    tiles = {"forward": [K.Blocks(128, 128, 64, 8, 3), K.Blocks(64, 128, 64, 8, 4)],
             "frozen forward": [K.Blocks(64, 128, 64, 8, 4, 8), K.Blocks(64, 128, 64, 8, 4, 16)],
             "logit gradient": [K.Blocks(128, 128, 64, 8, 3, 8), K.Blocks(64, 128, 64, 8, 4, 8)]}
    if device != "cuda":
        return {"status": NO_CUDA, "tiles": {k: [str(b) for b in v] for k, v in tiles.items()}}
    h, w, y = _issue_inputs(device)
    lse = K.forward(h, w, None, y).lse
    a = torch.randn(n, device=device)
    c0 = -a
    width = K.chunk_width(n, vocab, hidden, 2, 128)
    ds = torch.empty(n, width, device=device, dtype=torch.bfloat16)
    rows = []
    for kind, choices in tiles.items():
        for blocks in choices:
            if kind == "forward":
                fn, flops = (lambda b=blocks: K.forward(h, w, None, y, blocks=b)), 2.0 * n * hidden * vocab
            elif kind == "frozen forward":
                fn, flops = (lambda b=blocks: K.forward(h, w, None, y, moments=True, blocks=b)), 4.0 * n * hidden * vocab
            else:
                fn, flops = (lambda b=blocks: K.grad_logits(ds, 0, h, w, None, y, lse, a, c0, blocks=b)), 2.0 * n * hidden * width
            try:
                ms = _bench_ms(fn)
                rows.append({"kernel": kind, "blocks": str(blocks), "ms": ms, "tflops": flops / ms / 1e9})
            except Exception as exc:
                rows.append({"kernel": kind, "blocks": str(blocks), "status": f"error: {type(exc).__name__}: {exc}"})
    mm_ms = _bench_ms(lambda: h @ w[:width].T)
    rows.append({"kernel": "cuBLAS h @ W[:width]^T (reference)", "ms": mm_ms, "tflops": 2.0 * n * hidden * width / mm_ms / 1e9})
    return {"status": "ok", "shape": SHAPE, "rows": rows}


def profile(device: str) -> dict:
    if device != "cuda":
        return {"status": NO_CUDA}
    from torch.profiler import ProfilerActivity, profile as torch_profile

    from prefopt import linear_logprobs

    h, w, y = _issue_inputs(device)
    h.requires_grad_()
    w.requires_grad_()

    def step():
        linear_logprobs(h, w, y, backend="triton").logp.sum().backward()
        h.grad = w.grad = None

    step()
    torch.cuda.synchronize()
    with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=15)
    return {"status": "ok", "table": table}


def frozen(device: str) -> dict:
    if device != "cuda":
        return {"status": NO_CUDA}
    from prefopt import linear_logprobs
    from prefopt.ops.triton_backend import LinearLogprobsTriton

    h, w, y = _issue_inputs(device)
    h.requires_grad_()
    old = LinearLogprobsTriton.frozen_head_shortcut
    rows = {}
    try:
        for shortcut in (True, False):
            LinearLogprobsTriton.frozen_head_shortcut = shortcut

            def step():
                linear_logprobs(h, w, y, backend="triton").logp.sum().backward()
                h.grad = None

            rows["shortcut on" if shortcut else "shortcut off"] = _bench_ms(step)
    finally:
        LinearLogprobsTriton.frozen_head_shortcut = old
    return {"status": "ok", "fwd_bwd_ms": rows}


def end_to_end(device: str) -> dict:
    from .io_model import predictions
    from .runner import Cell, Point, run_all
    from .workloads import WORKLOADS, Shape

    shape = Shape(8, SHAPE["n"] // 8, SHAPE["hidden"], SHAPE["vocab"])
    plan = [("dpo-ref", ["prefopt-triton", "floor", "liger", "cce", "trl"]), ("dpo-frozen", ["prefopt-triton", "floor"])]
    predicted = {wl: {k: v * 1e3 for k, v in predictions(WORKLOADS[wl], shape, torch.bfloat16).items()}
                 for wl, _ in plan}
    if device != "cuda":
        return {"status": NO_CUDA, "plan": plan, "predicted_ms": predicted}
    cells = [Cell(Point(wl, shape), impl) for wl, impls in plan for impl in impls]
    run_all(cells, device="cuda", dtype="bfloat16", warmup=2, repeats=5, timeout=150,
            progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    rows = [{"workload": c.point.workload, "impl": c.impl, **{k: c.result.get(k) for k in
             ("status", "reason", "median_s", "peak_extra_bytes", "loss")}} for c in cells]
    return {"status": "ok", "rows": rows, "predicted_ms": predicted}


SECTIONS = [("environment", lambda device: {"status": "ok", **_features()}), ("ceilings", ceilings),
            ("correctness", correctness), ("kernels", kernels), ("profile", profile), ("frozen", frozen),
            ("end_to_end", end_to_end)]


def run(out: str, device: str) -> int:
    os.makedirs(out, exist_ok=True)
    results: Dict[str, dict] = {}
    failed: List[str] = []
    for name, section in SECTIONS:
        start = time.time()
        print(f"first contact: {name} ...", file=sys.stderr, flush=True)
        try:
            results[name] = section(device)
        except Exception as exc:
            results[name] = {"status": f"error: {type(exc).__name__}: {exc}"}
        results[name]["seconds"] = round(time.time() - start, 1)
        if not results[name]["status"].startswith(("ok", "skipped")):
            failed.append(name)
        with open(os.path.join(out, "first_contact.json"), "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(os.path.join(out, "first_contact.md"), "w") as f:
            f.write(markdown(results))
    print(markdown(results))
    print(f"wrote {out}/first_contact.json and first_contact.md", file=sys.stderr)
    return 1 if failed else 0


def markdown(results: Dict[str, dict]) -> str:
    lines = ["## prefopt first contact", ""]
    for name, rec in results.items():
        lines.append(f"### {name}: {rec['status']} ({rec.get('seconds', '?')} s)")
        lines.append("")
        if name == "correctness" and isinstance(rec.get("variants"), list) and rec["variants"] and isinstance(rec["variants"][0], dict):
            lines += ["| variant | status | worst relative error | tolerance |", "|---|---|---:|---:|"]
            for r in rec["variants"]:
                worst = max((v for k, v in r.get("errors", {}).items() if k != "top1"), default=float("nan"))
                lines.append(f"| {r['variant']} | {r['status']} | {worst:.2e} | {r.get('tolerance', '')} |")
        elif name == "kernels" and "rows" in rec:
            lines += ["| kernel | blocks | ms | TFLOP/s |", "|---|---|---:|---:|"]
            for r in rec["rows"]:
                lines.append(f"| {r['kernel']} | {r.get('blocks', '')} | {r.get('ms', float('nan')):.2f} | {r.get('tflops', float('nan')):.0f} |")
        elif name == "profile" and "table" in rec:
            lines += ["```", rec["table"], "```"]
        else:
            body = {k: v for k, v in rec.items() if k not in ("status", "seconds")}
            lines += ["```", json.dumps(body, indent=1, default=str), "```"]
        lines.append("")
    return "\n".join(lines)
