"""``prefopt bench`` / ``python -m bench``: memory and time of the fused op against the naive path and the peers.

Every implementation runs each cell in its own subprocess (bench/worker.py says how memory is measured),
after a warm-up, over several repeats. The markdown table goes to stdout, progress to stderr, and the
raw figures with the environment to ``OUT/results.json`` (plus ``results.md`` and growth-curve PNGs).

Examples::

    python -m bench --quick                        # < 3 min on 2 CPU cores
    python -m bench --preset issue2                # issue 2's CPU comparison (DPO with a reference head)
    python -m bench --preset gpu                   # issue 3's GPU grid, incl. the matrix-product floor
    python -m bench --preset gpu --io-model        # the H100 IO/FLOP model of that grid (no GPU needed)
    python -m bench --preset gpu-first-contact --out DIR   # first run on a GPU (<= 5 min, nothing to install)
    python -m bench --preset vlm-step              # DPO/GRPO steps of VLMs, shared prefixes or not, TRL
    python -m bench --workload grpo,nsft-kl --tokens 1024,2048 --vocab 32000 --impl naive,prefopt-torch
"""
from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from dataclasses import dataclass, field
from typing import List, Optional

from .impls import IMPLS
from .workloads import WORKLOADS, Shape

QUICK_IMPLS = ["naive", "prefopt-torch", "liger", "trl"]
ALL_IMPLS = list(IMPLS)


def _cpu_impls() -> List[str]:
    return [n for n, i in IMPLS.items() if i.default_on_cpu and not i.cuda_only]


@dataclass
class Preset:
    name: str
    description: str
    device: str
    dtype: str
    impls: List[str]
    points: list
    warmup: int = 1
    repeats: int = 5
    timeout: float = 900.0
    rounds: int = 1
    not_run: dict = field(default_factory=dict)  # impl -> why this preset leaves it out


def _points(workloads, shapes, sweeps=(), tag=""):
    from .runner import Point

    return [Point(w, s, tuple(sweeps), tag) for w in workloads for s in shapes]


def _growth(hidden, vocab, rows, seqs, vocabs, base_seq):
    return (_points(["dpo-ref"], [Shape(rows, s, hidden, vocab) for s in seqs], ["tokens"])
            + _points(["dpo-ref"], [Shape(rows, base_seq, hidden, v) for v in vocabs], ["vocab"]))


_COMPILE_NOTE = "not in --quick: torch.compile on CPU costs about a minute per process with a cold cache; name it with --impl to add it"


def make_preset(name: str, device: str) -> Preset:
    if name == "quick":
        pts = _points(list(WORKLOADS), [Shape(4, 128, 256, 8192)]) + _growth(256, 8192, 4, (64, 128, 256), (4096, 8192, 16384), 128)
        return Preset("quick", "small shapes, every workload, growth curves; under 3 minutes on 2 CPU cores",
                      device, "float32", QUICK_IMPLS, pts, warmup=1, repeats=3, timeout=180,
                      not_run={"liger-compiled": _COMPILE_NOTE, "cce": _COMPILE_NOTE, "floor": "GPU preset only",
                               "prefopt-triton": "CUDA only"})
    if name == "issue2":
        return Preset("issue2", "issue 2: DPO with a reference head, 2 pairs x 512 tokens, H=1024, V=32000, fp32, CPU",
                      "cpu", "float32", ["naive", "prefopt-torch", "liger", "liger-compiled", "cce", "trl"],
                      _points(["dpo-ref"], [Shape(4, 512, 1024, 32000)], tag="issue2"), warmup=1, repeats=3, rounds=2,
                      not_run={"floor": "GPU preset only", "prefopt-triton": "CUDA only"})
    if name == "gpu":
        grid = []
        for n in (4096, 8192, 16384):
            for v in (32000, 128256, 152064):
                sweeps = (["tokens"] if v == 152064 else []) + (["vocab"] if n == 8192 else [])
                grid += _points(["dpo-ref"], [Shape(8, n // 8, 4096, v)], sweeps, "issue3")
        grid += _points(["dpo-frozen"], [Shape(8, 1024, 4096, 152064)], tag="issue3-frozen")
        return Preset("gpu", "issue 3: N=4096/8192/16384, H=4096, V=32000/128256/152064, bf16, with the floor",
                      "cuda", "bfloat16", ["naive", "prefopt-triton", "prefopt-torch", "liger", "liger-compiled", "cce", "trl", "floor"],
                      grid, warmup=2, repeats=10, timeout=600)
    if name == "gpu-first-contact":
        return Preset("gpu-first-contact", "first run on a GPU, within 5 minutes: the gate's self-test, every variant "
                      "against float64, each kernel alone, the op, AOT compile evidence, a profile, end to end against "
                      "the floor and the installed peers (bench/first_contact.py); without CUDA a dry run", device,
                      "bfloat16", [], [])
    if name == "vlm-step":
        return Preset("vlm-step", "whole DPO and GRPO optimizer steps of a LLaVA-like and a Qwen2-VL-like VLM, unshared "
                      "rows against one prefix per record and stock TRL, and a FLOP model at 7B shapes "
                      "(bench/vlm_step.py)", device, "float32", [], [])
    if name == "full":
        if device == "cuda":
            pts = make_preset("gpu", device).points
            pts += _points([w for w in WORKLOADS if w != "dpo-ref"], [Shape(8, 1024, 4096, 128256)])
            pts += _points(["dpo-ref"], [Shape(8, 1024 + 512, 3584, 152064, prompt=1024)], tag="vlm")
            return Preset("full", "every workload, growth curves and the VLM head on GPU", device, "bfloat16",
                          ALL_IMPLS, pts, warmup=2, repeats=10, timeout=600)
        pts = _points(list(WORKLOADS), [Shape(4, 256, 1024, 32000)])
        pts += _growth(1024, 32000, 4, (128, 256, 512, 1024), (8192, 32000, 65536, 128256), 256)
        pts += _points(["dpo-ref"], [Shape(2, 1024 + 128, 3584, 152064, prompt=1024)], tag="vlm")
        return Preset("full", "every workload, growth curves and the VLM head (Qwen2-VL-7B: H=3584, V=152064) on CPU",
                      device, "float32", _cpu_impls(), pts, warmup=1, repeats=3,
                      timeout=1800, not_run={"floor": "GPU only by default; name it with --impl", "prefopt-triton": "CUDA only"})
    raise ValueError(name)


PRESETS = ("quick", "issue2", "gpu", "gpu-first-contact", "vlm-step", "full")


def _csv(text: str) -> List[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _ints(text: str) -> List[int]:
    try:
        vals = [int(t) for t in _csv(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return vals


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prefopt bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=PRESETS, help=" | ".join(PRESETS) + " (default: full)")
    p.add_argument("--quick", action="store_true", help="same as --preset quick")
    p.add_argument("--impl", action="append", default=[], metavar="LIST",
                   help=f"implementations, comma-separated (repeatable): {', '.join(IMPLS)}")
    p.add_argument("--workload", action="append", default=[], metavar="LIST",
                   help=f"workloads, comma-separated (repeatable): {', '.join(WORKLOADS)}")
    p.add_argument("--tokens", type=_ints, metavar="N[,N...]", help="custom shapes: scored tokens (rows x seq)")
    p.add_argument("--vocab", type=_ints, metavar="V[,V...]", help="custom shapes: vocabulary sizes")
    p.add_argument("--hidden", type=int, metavar="H", help="custom shapes: hidden size (default 1024)")
    p.add_argument("--rows", type=int, metavar="R", help="custom shapes: rows (2 x pairs for DPO; default 4)")
    p.add_argument("--prompt", type=int, default=0, metavar="P", help="custom shapes: ignored leading positions per row")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None)
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--rounds", type=int, default=None,
                   help="run every cell this many times, interleaved, to spread a shared machine's load drift (default 1)")
    p.add_argument("--timeout", type=float, default=None, help="seconds per cell before its process is killed")
    p.add_argument("--out", default=None, help="output folder (default out/bench/PRESET-DATE)")
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--list", action="store_true", help="list implementations, workloads and presets, then exit")
    p.add_argument("--io-model", action="store_true",
                   help="print the H100 IO and FLOP model of the cells (bench/io_model.py); without a GPU, "
                        "only the model is printed, with one the measured table follows it")
    p.add_argument("--deadline", type=float, metavar="SECONDS",
                   help="gpu-first-contact: hard deadline for the whole run (default 300); sections that would pass "
                        "it are skipped with one line")
    p.add_argument("--device-model", metavar="FILE",
                   help="with --io-model: measured figures (the device_model.json a first contact writes) in place "
                        "of the H100 defaults")
    return p


def _listing() -> str:
    lines = ["implementations:"] + [f"  {n:<15} {i.description}" for n, i in IMPLS.items()]
    lines += ["workloads:"] + [f"  {n:<15} {w.description}" for n, w in WORKLOADS.items()]
    lines += ["presets:"] + [f"  {n:<15} {make_preset(n, 'cpu').description}" for n in PRESETS]
    return "\n".join(lines)


def _resolve(args, parser) -> Preset:
    import torch

    name = "quick" if args.quick else (args.preset or ("custom" if args.tokens or args.vocab else "full"))
    if args.quick and args.preset and args.preset != "quick":
        parser.error(f"--quick conflicts with --preset {args.preset}")
    device = args.device or "auto"
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "custom":
        preset = Preset("custom", "custom shapes", device, "bfloat16" if device == "cuda" else "float32",
                        ALL_IMPLS if device == "cuda" else _cpu_impls(), [],
                        not_run={} if device == "cuda" else {"floor": "GPU only by default; name it with --impl",
                                                             "prefopt-triton": "CUDA only"})
    else:
        preset = make_preset(name, device)
        if args.device in (None, "auto") and name in ("issue2", "gpu"):
            device = preset.device
    preset.device = device
    if device == "cuda" and not torch.cuda.is_available() and not args.io_model:
        parser.error("--device cuda: no CUDA device is visible to torch (torch.cuda.is_available() is False)")

    impls = [i for a in args.impl for i in _csv(a)]
    unknown = [i for i in impls if i not in IMPLS]
    if unknown:
        parser.error(f"--impl: unknown implementation {unknown[0]!r}; choose from {', '.join(IMPLS)}")
    if impls:
        preset.impls, preset.not_run = list(dict.fromkeys(impls)), {}
    workloads = [w for a in args.workload for w in _csv(a)]
    unknown = [w for w in workloads if w not in WORKLOADS]
    if unknown:
        parser.error(f"--workload: unknown workload {unknown[0]!r}; choose from {', '.join(WORKLOADS)}")

    if args.tokens or args.vocab or args.hidden or args.rows:
        rows = args.rows or 4
        hidden = args.hidden or 1024
        if args.prompt < 0:
            parser.error(f"--prompt: expected >= 0, got {args.prompt}")
        tokens_list, vocab_list = args.tokens or [2048], args.vocab or [32000]
        sweeps = (["tokens"] if len(tokens_list) > 1 else []) + (["vocab"] if len(vocab_list) > 1 else [])
        shapes = []
        for n in tokens_list:
            if n % rows:
                parser.error(f"--tokens: {n} is not a multiple of --rows {rows} (tokens = rows x scored positions per row)")
            shapes += [Shape(rows, n // rows + args.prompt, hidden, v, args.prompt) for v in vocab_list]
        if any(WORKLOADS[w].paired for w in (workloads or ["dpo-ref"])) and rows % 2:
            parser.error(f"--rows: paired workloads need an even number of rows (chosen then rejected), got {rows}")
        preset.points = _points(workloads or ["dpo-ref"], shapes, sweeps)
    elif workloads:
        preset.points = [p for p in preset.points if p.workload in workloads]
        if not preset.points:
            parser.error(f"preset {preset.name!r} has no cell for {', '.join(workloads)}; give --tokens/--vocab for custom shapes")
    if args.device_model and not args.io_model:
        parser.error("--device-model: only with --io-model (it replaces the model's H100 defaults)")
    if args.deadline is not None and (preset.name != "gpu-first-contact" or not args.deadline > 0):
        parser.error(f"--deadline: expected a positive number of seconds with --preset gpu-first-contact, got "
                     f"{args.deadline} with preset {preset.name}")
    preset.dtype = args.dtype or preset.dtype
    for attr in ("warmup", "repeats", "timeout", "rounds"):
        val = getattr(args, attr)
        if val is not None:
            if val <= 0 and not (attr == "warmup" and val == 0):
                parser.error(f"--{attr}: expected a positive number, got {val}")
            setattr(preset, attr, val)
    return preset


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.list:
            print(_listing())
            return 0
        preset = _resolve(args, parser)
    except SystemExit as exc:  # argparse's errors: usage + message on stderr, exit code 2
        return int(exc.code or 0)
    if preset.name == "gpu-first-contact":
        from . import first_contact

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return first_contact.run(args.out or os.path.join("out", "bench", f"first-contact-{stamp}"), preset.device,
                                 args.deadline or first_contact.DEADLINE_S)
    if preset.name == "vlm-step":
        from . import vlm_step

        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        return vlm_step.run(args.out or os.path.join("out", "bench", f"vlm-step-{stamp}"))
    if args.io_model:
        import torch

        from .io_model import H100, load_device_model, model_table
        from .runner import merge_points

        try:
            device = load_device_model(args.device_model) if args.device_model else H100
        except (OSError, ValueError) as exc:
            print(f"prefopt bench: --device-model: {exc}", file=sys.stderr)
            return 2
        print(model_table(merge_points(preset.points), getattr(torch, preset.dtype), device=device))
        if preset.device != "cuda" or not torch.cuda.is_available():
            print("(model only: no CUDA device here, nothing measured)", file=sys.stderr)
            return 0
    return run(preset, args.out, plots=not args.no_plots)


def run(preset: Preset, out: Optional[str], plots: bool = True) -> int:
    import torch

    from . import report
    from .runner import available_bytes, merge_points, plan_cells, run_all

    def progress(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    out = out or os.path.join("out", "bench", f"{preset.name}-{stamp}")
    points = merge_points(preset.points)
    dtype = getattr(torch, preset.dtype)
    avail = available_bytes(preset.device)
    cells = plan_cells(points, preset.impls, preset.device, dtype, avail)
    mem = f"{avail / 2**30:.1f} GiB" if avail else "unknown"
    progress(f"prefopt bench: preset {preset.name} ({preset.description}); {preset.device}, {preset.dtype}; "
             f"{len(points)} shapes x {len(preset.impls)} implementations; warm-up {preset.warmup}, "
             f"repeats {preset.repeats}, rounds {preset.rounds}; memory available {mem}")
    for impl, why in preset.not_run.items():
        progress(f"not run: {impl}: {why}")
    run_all(cells, device=preset.device, dtype=preset.dtype, warmup=preset.warmup, repeats=preset.repeats,
            timeout=preset.timeout, progress=progress, rounds=preset.rounds)

    env = report.environment(preset.device, preset.dtype, cells)
    title = f"prefopt bench, preset {preset.name}"
    load = ", ".join(f"{x:.1f}" for x in env.get("loadavg", []))
    md = report.markdown(cells, env, title, conditions=(
        f"Each cell in its own process: {preset.warmup} warm-up step(s), then {preset.repeats} timed repeat(s)"
        f" x {preset.rounds} interleaved round(s). Load average at the end: {load or 'unknown'}."))
    if preset.not_run:
        md += "\nNot run in this preset: " + "; ".join(f"{k} ({v})" for k, v in preset.not_run.items()) + "\n"
    print(md)
    os.makedirs(out, exist_ok=True)
    config = {"preset": preset.name, "description": preset.description, "device": preset.device, "dtype": preset.dtype,
              "impls": preset.impls, "warmup": preset.warmup, "repeats": preset.repeats, "rounds": preset.rounds,
              "timeout_s": preset.timeout,
              "available_bytes": avail, "not_run": preset.not_run, "argv": sys.argv}
    report.write_json(os.path.join(out, "results.json"), cells, env, config)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    progress(f"wrote {os.path.join(out, 'results.json')} and results.md")
    if plots:
        try:
            for path in report.write_plots(out, cells, env):
                progress(f"wrote {path}")
        except ImportError:
            progress("plots skipped: matplotlib is not installed (pip install 'prefopt[bench]')")
    if not any(c.result.get("status") == "ok" for c in cells):
        reasons = sorted({c.result.get("reason", c.result.get("status")) for c in cells})
        progress("nothing could be measured: " + "; ".join(reasons[:5]))
        return 2
    return 0
