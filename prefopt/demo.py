"""``prefopt demo``: the fused DPO loss against the naive materialised path on random data.

Each path runs in its own process on the same random inputs (DPO with a reference head, the bench
harness's ``dpo-ref`` workload), so the peak memory printed for each is its own; the loss values agree.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

MiB = 2**20


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="prefopt demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=2, help="preference pairs (default 2)")
    parser.add_argument("--seq", type=int, default=256, help="tokens per answer row (default 256)")
    parser.add_argument("--hidden", type=int, default=1024, help="hidden size H (default 1024)")
    parser.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: float32 on CPU, bfloat16 on CUDA")
    parser.add_argument("--repeats", type=int, default=2, help="timed steps per path after one warm-up")
    args = parser.parse_args(argv)
    for name in ("pairs", "seq", "hidden", "vocab", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")

    import torch

    from prefopt.bench.runner import Cell, Point, run_cell
    from prefopt.bench.workloads import Shape

    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    impls = ["naive", "prefopt-triton" if device == "cuda" else "prefopt-torch"]
    shape = Shape(rows=2 * args.pairs, seq=args.seq, hidden=args.hidden, vocab=args.vocab)
    print(f"DPO with a reference head on random data: {args.pairs} pairs x {args.seq} tokens, H={args.hidden}, "
          f"V={args.vocab}, {dtype}, {device}")
    rows = []
    for impl in impls:
        print(f"  running {impl} ...", file=sys.stderr, flush=True)
        result = run_cell(Cell(Point("dpo-ref", shape), impl), device=device, dtype=dtype, warmup=1,
                          repeats=args.repeats, timeout=1800)
        if result.get("status") != "ok":
            print(f"{impl}: {result.get('status')}: {result.get('reason')}", file=sys.stderr)
            return 1
        rows.append((impl, result))
    print("\n| path | loss | fwd+bwd (median s) | peak extra memory (MiB) | of which beyond gradients |")
    print("|---|---|---|---|---|")
    for impl, r in rows:
        beyond = r["peak_extra_bytes"] - r["grad_bytes"]
        print(f"| {impl} | {r['loss']:.6f} | {r['median_s']:.3f} | {r['peak_extra_bytes'] / MiB:.1f} | "
              f"{beyond / MiB:.1f} |")
    (_, naive), (name, fused) = rows
    print(f"\nloss difference {abs(naive['loss'] - fused['loss']):.2e}. Peak extra memory: the peak above the "
          f"inputs during forward+backward ({fused['memory_method']}).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
