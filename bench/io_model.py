"""An IO and FLOP model of one fused-op call (forward + backward) on an H100, computed without a GPU.

For each implementation and workload the model lists the kernel launches a call makes, each with its
matrix-product FLOPs, the HBM bytes it reads and writes, and its grid, all taken from the launcher's own
functions (:func:`prefopt.kernels.linear_logprobs.forward_blocks`, ``backward_blocks``, ``split_for``,
``chunk_width``, ``forward_grid``). A launch's predicted time is

    max(waves * (FLOPs of one program) / (peak / SMs),  bytes / bandwidth),   waves = ceil(programs / SMs)

so a grid that leaves part of the last wave idle pays for a whole wave (wave quantisation), and a launch
is bound by whichever of arithmetic and memory is slower. One program per SM is assumed for the
matrix kernels (the forward kernel's 96-192 KiB of shared memory leave room for one; cuBLAS is modelled
with 128 x 256 output tiles). HBM bytes follow an L2 model per launch:

- Triton forward (``split`` fastest): a wave of programs covers a few token blocks and every split, so
  it reads W once per wave and each token block's hidden rows once (their re-reads per tile hit L2);
- grouped launches (the logit-gradient kernel, the frozen-head forward): ``group_n`` token blocks sweep
  the vocabulary tiles together, so hidden is read once per chunk and W once per group of token blocks;
- cuBLAS products and elementwise passes: each operand once.

What is not modelled: L2 and shared-memory bandwidth (the tile's arithmetic intensity is printed so the
reader sees it: 64 x 128 bf16 tiles feed about 43 FLOP per byte, 128 x 128 about 64), launch gaps,
and the small per-token vectors. The peaks are the issue's H100 figures (790 TFLOP/s bf16 dense through
cuBLAS, 3.0 TB/s); measured numbers replace them once a GPU run has measured them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from .workloads import Shape, Workload

SMS = 132
PEAK_FLOPS = {torch.bfloat16: 790e12, torch.float16: 790e12, torch.float32: 395e12}  # fp32: TF32
HBM_BYTES_PER_S = 3.0e12
CUBLAS_TILE = (128, 256)

#: Why a fused path does one product more than a naive one (printed with the model).
WHY_ONE_MORE = (
    "A fused head never stores the [tokens x vocabulary] logits, so backward computes them again (one "
    "extra matrix product, the 'recompute'); the naive path keeps them from forward instead, which costs "
    "memory that grows with tokens x vocabulary and several passes over it. With a frozen head prefopt "
    "avoids the recompute: forward also accumulates the probability-weighted head rows."
)


@dataclass
class Launch:
    """One kernel launch (or one cuBLAS call, or one elementwise pass) of the modelled call."""

    name: str
    flops: float
    bytes: float
    programs: int = 0  # grid size; 0 for memory-only passes
    program_flops: float = 0.0  # FLOPs of one program (uniform grids)
    count: int = 1  # identical launches (one per chunk)

    def time(self, peak: float) -> float:
        memory = self.bytes / HBM_BYTES_PER_S
        compute = 0.0
        if self.programs:
            waves = math.ceil(self.programs / SMS)
            compute = waves * self.program_flops / (peak / SMS)
        return self.count * max(compute, memory)

    def wave_efficiency(self) -> float:
        if not self.programs:
            return 1.0
        return self.programs / (math.ceil(self.programs / SMS) * SMS)


@dataclass
class CallModel:
    impl: str
    workload: str
    shape: Shape
    dtype: torch.dtype
    launches: List[Launch] = field(default_factory=list)
    note: str = ""

    @property
    def flops(self) -> float:
        return sum(l.flops * l.count for l in self.launches)

    @property
    def bytes(self) -> float:
        return sum(l.bytes * l.count for l in self.launches)

    def products(self) -> float:
        """Matrix products in units of N x H x V (N the scored tokens)."""
        s = self.shape
        return self.flops / (2.0 * s.scored * s.hidden * s.vocab)

    def time(self) -> float:
        peak = PEAK_FLOPS[self.dtype]
        return sum(l.time(peak) for l in self.launches)


def floor_time(workload: Workload, shape: Shape, dtype: torch.dtype) -> float:
    """The floor: the products the op cannot avoid, at the peak rate."""
    return workload.floor_products * 2.0 * shape.scored * shape.hidden * shape.vocab / PEAK_FLOPS[dtype]


def _cublas(name: str, m: int, n: int, k: int, nbytes: float, count: int = 1) -> Launch:
    tm, tn = CUBLAS_TILE
    programs = math.ceil(m / tm) * math.ceil(n / tn)
    return Launch(name, 2.0 * m * n * k, nbytes, programs, 2.0 * tm * tn * k, count)


def _chunks(vocab: int, width: int):
    """(columns, how many chunks of that width): the full chunks and the ragged last one."""
    full, rest = divmod(vocab, width)
    return [(w, c) for w, c in ((width, full), (rest, 1 if rest else 0)) if c]


def _op_config(workload: Workload):
    """(reference head in the pass, KL gradient live, frozen head) of the op call the workload makes."""
    return workload.ref_head, workload.kl, workload.frozen


def triton_model(workload: Workload, shape: Shape, dtype: torch.dtype, shortcut: Optional[bool] = None) -> CallModel:
    """prefopt's Triton backend: the launches :mod:`prefopt.ops.triton_backend` makes for one call."""
    from prefopt.kernels import linear_logprobs as K

    n, h, v = shape.scored, shape.hidden, shape.vocab
    e = torch.empty((), dtype=dtype).element_size()
    ref, kl, frozen = _op_config(workload)
    if shortcut is None:
        shortcut = frozen and not kl
    model = CallModel("prefopt-triton", workload.name, shape, dtype)
    fb = K.forward_blocks(n, v, h, dtype, ref=ref, extras=kl, write_e=shortcut, interpret=False)
    heads = 2 if ref else 1
    if shortcut:
        full_width = K.chunk_width(n, v, h, e, fb.block_v)
        chunks = math.ceil(v / full_width)
        token_blocks = math.ceil(n / fb.block_n)
        w_reads = math.ceil(token_blocks / fb.group_n)
        for width, times in _chunks(v, full_width):
            count = math.ceil(width / fb.block_v)
            programs = K.forward_grid(n, count, fb, grouped=True)[0]
            fwd_bytes = heads * (n * h * e + width * h * e * w_reads) + n * count * fb.block_v * e
            model.launches.append(Launch(f"forward kernel + probability tiles ({width} columns)",
                                         heads * 2.0 * n * width * h, fwd_bytes, programs,
                                         heads * 2.0 * fb.block_n * fb.block_v * h, times))
            model.launches.append(Launch(f"rescale tiles to the running max ({width} columns)", 0.0,
                                         2.0 * n * count * fb.block_v * e, count=times))
            model.launches.append(Launch("rescale M", 0.0, 8.0 * n * h, count=times))
            model.launches.append(_cublas(f"M += E @ W_chunk (cuBLAS, fp32 out, {width} columns)", n, h, width,
                                          n * width * e + width * h * e + 8.0 * n * h, times))
        model.launches.append(Launch("backward: gather W[y], axpy with M", 0.0, n * h * (e + 4 + 4 + e)))
        model.note = f"frozen-head shortcut, {chunks} chunks of {full_width} columns"
        return model

    split = K.split_for(n, v, fb, SMS)
    tiles = math.ceil(v / fb.block_v)
    tiles_per_split = math.ceil(tiles / split)
    split = math.ceil(tiles / tiles_per_split)
    grid = K.forward_grid(n, split, fb, grouped=False)
    programs = grid[0] * grid[1]
    waves = math.ceil(programs / SMS)
    w_fraction = min(split, SMS) / split
    fwd_bytes = heads * (n * h * e + waves * w_fraction * v * h * e)
    model.launches.append(Launch(f"forward kernel (split {split})", heads * 2.0 * n * v * h, fwd_bytes, programs,
                                 heads * tiles_per_split * 2.0 * fb.block_n * fb.block_v * h))

    bb = K.backward_blocks(n, v, h, dtype, interpret=False)
    full_width = K.chunk_width(n, v, h, e, bb.block_v)
    chunks = math.ceil(v / full_width)
    token_blocks = math.ceil(n / bb.block_n)
    w_reads = math.ceil(token_blocks / bb.group_n)
    rheads = 2 if kl else 1  # the KL gradient recomputes the reference tile too
    for width, times in _chunks(v, full_width):
        count = math.ceil(width / bb.block_v)
        model.launches.append(Launch(f"logit-gradient kernel ({width} columns)", rheads * 2.0 * n * width * h,
                                     rheads * (n * h * e + width * h * e * w_reads) + n * width * e,
                                     token_blocks * count, rheads * 2.0 * bb.block_n * bb.block_v * h, times))
        model.launches.append(_cublas(f"d hidden += ds @ W_chunk (cuBLAS, fp32 out, {width} columns)", n, h, width,
                                      n * width * e + width * h * e + 8.0 * n * h, times))
        if not frozen:
            model.launches.append(_cublas(f"d W_chunk = ds^T @ hidden (cuBLAS, {width} columns)", width, h, n,
                                          n * width * e + n * h * e + width * h * e, times))
    model.launches.append(Launch("d hidden: zero, cast to the input dtype", 0.0, n * h * (4 + 4 + e)))
    model.note = f"split {split}, backward {chunks} chunks of {full_width} columns"
    return model


def torch_model(workload: Workload, shape: Shape, dtype: torch.dtype) -> CallModel:
    """prefopt's chunked torch backend on CUDA: cuBLAS tiles plus elementwise passes over each tile.

    Tile passes counted from :mod:`prefopt.ops.torch_backend` (fp32 tile = 4 bytes per element per pass):
    forward, the product's output and its fp32 copy, then max, shift+exp in place, sum; backward, the
    recomputed tile and its copy, shift+exp+scale in place, the low-precision copy each product reads,
    and the fp32 read-modify-write of the ``d hidden`` / ``d weight`` slabs per tile (their products are
    not accumulated in fp32 by cuBLAS in this backend).
    """
    from prefopt.ops.torch_backend import CHUNK_SIZES

    n, h, v = shape.scored, shape.hidden, shape.vocab
    e = torch.empty((), dtype=dtype).element_size()
    ref, kl, frozen = _op_config(workload)
    chunk_t, chunk_v = CHUNK_SIZES["cuda"]
    model = CallModel("prefopt-torch", workload.name, shape, dtype)
    heads = 2 if ref else 1
    nv = float(n) * v
    tiles = math.ceil(n / chunk_t) * math.ceil(v / chunk_v)
    shortcut = frozen and not kl
    model.launches.append(_cublas("forward tile products", n, v, h, heads * (n * h * e + math.ceil(n / chunk_t) * v * h * e)))
    model.launches[-1].flops *= heads
    model.launches[-1].program_flops *= heads
    fwd_passes = (e + 4 + 4 + 8 + 4) + (4 if kl else 0)
    model.launches.append(Launch("forward tile passes", 0.0, heads * nv * fwd_passes))
    if shortcut:
        model.launches.append(_cublas("moments tile products", n, h, v, nv * (4 + e) + tiles * chunk_t * h * (e + 8)))
        model.note = "frozen-head shortcut"
        return model
    rheads = 2 if kl else 1
    model.launches.append(_cublas("recompute tile products", n, v, h, rheads * (n * h * e + math.ceil(n / chunk_t) * v * h * e)))
    model.launches[-1].flops *= rheads
    model.launches[-1].program_flops *= rheads
    model.launches.append(Launch("backward tile passes", 0.0, rheads * nv * (e + 4) + nv * (8 + 4 + e)))
    model.launches.append(_cublas("d hidden tile products", n, h, v,
                                  nv * e + math.ceil(n / chunk_t) * v * h * e + math.ceil(v / chunk_v) * n * h * (e + 8)))
    if not frozen:
        model.launches.append(_cublas("d weight tile products", v, h, n,
                                      nv * e + math.ceil(v / chunk_v) * n * h * e + math.ceil(n / chunk_t) * v * h * (e + 8)))
    return model


def naive_model(workload: Workload, shape: Shape, dtype: torch.dtype) -> CallModel:
    """Materialised logits: one product forward, two backward (no recompute), and passes over [N, V]."""
    n, h, v = shape.scored, shape.hidden, shape.vocab
    e = torch.empty((), dtype=dtype).element_size()
    ref, kl, frozen = _op_config(workload)
    nv = float(n) * v
    model = CallModel("naive", workload.name, shape, dtype)
    model.launches.append(_cublas("logits", n, v, h, n * h * e + v * h * e + nv * e))
    if ref:
        model.launches.append(_cublas("reference logits", n, v, h, n * h * e + v * h * e + nv * e))
    # fp32 copy, log_softmax (read, write), gather; backward: softmax grad (2 reads, 1 write), cast back
    passes = (e + 4) + 8 + 12 + (4 + e) + ((e + 4) + 8 if ref else 0) + (16 if kl else 0)
    model.launches.append(Launch("passes over the [N, V] logits", 0.0, nv * passes))
    model.launches.append(_cublas("d hidden", n, h, v, nv * e + v * h * e + n * h * e))
    if not frozen:
        model.launches.append(_cublas("d weight", v, h, n, nv * e + n * h * e + v * h * e))
    return model


def floor_model(workload: Workload, shape: Shape, dtype: torch.dtype) -> CallModel:
    n, h, v = shape.scored, shape.hidden, shape.vocab
    model = CallModel("floor", workload.name, shape, dtype)
    model.launches.append(Launch("the unavoidable products at peak", workload.floor_products * 2.0 * n * h * v, 0.0,
                                 SMS, workload.floor_products * 2.0 * n * h * v / SMS))
    return model


MODELS = {"prefopt-triton": triton_model, "prefopt-torch": torch_model, "naive": naive_model, "floor": floor_model}


def model_table(points, dtype: torch.dtype, impls=("prefopt-triton", "prefopt-torch", "naive")) -> str:
    """Markdown: per cell and implementation, products, HBM GB, predicted ms and ratio to the floor."""
    lines = [f"## IO and FLOP model (H100: {SMS} SMs, {PEAK_FLOPS[dtype] / 1e12:.0f} TFLOP/s, "
             f"{HBM_BYTES_PER_S / 1e12:.1f} TB/s; {str(dtype).replace('torch.', '')})", "",
             WHY_ONE_MORE, ""]
    for point in points:
        from .workloads import WORKLOADS

        wl = WORKLOADS[point.workload]
        floor = floor_time(wl, point.shape, dtype)
        lines += [f"### {wl.name}: {point.shape.label()}", "",
                  f"floor: {wl.floor_products} products, {floor * 1e3:.1f} ms", "",
                  "| implementation | products (N x H x V) | HBM GB | predicted ms | vs floor | notes |",
                  "|---|---:|---:|---:|---:|---|"]
        for name in impls:
            m = MODELS[name](wl, point.shape, dtype)
            lines.append(f"| {name} | {m.products():.2f} | {m.bytes / 1e9:.1f} | {m.time() * 1e3:.1f} | "
                         f"{m.time() / floor:.2f}x | {m.note} |")
        lines.append("")
    return "\n".join(lines)


def launches_table(model: CallModel) -> str:
    peak = PEAK_FLOPS[model.dtype]
    rows = ["| launch | count | TFLOP | GB | programs | wave efficiency | ms |", "|---|---:|---:|---:|---:|---:|---:|"]
    for l in model.launches:
        rows.append(f"| {l.name} | {l.count} | {l.flops * l.count / 1e12:.2f} | {l.bytes * l.count / 1e9:.2f} | "
                    f"{l.programs} | {l.wave_efficiency():.2f} | {l.time(peak) * 1e3:.2f} |")
    return "\n".join(rows)


def predictions(workload: Workload, shape: Shape, dtype: torch.dtype) -> Dict[str, float]:
    """Predicted seconds per implementation (for the report beside measured figures)."""
    return {name: fn(workload, shape, dtype).time() for name, fn in MODELS.items()}
