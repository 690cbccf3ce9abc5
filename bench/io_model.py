"""An IO and FLOP model of one fused-op call (forward + backward) on a GPU, computed without a GPU.

For each implementation and workload the model lists the kernel launches a call makes, each with its
matrix-product FLOPs, the HBM bytes it reads and writes, its grid and its kind. prefopt's Triton
launches, the device model (SMs, cuBLAS's peak, bandwidth) and the per-kernel efficiencies live in
the library, :mod:`prefopt.ops.launch_model`, whose docstring gives the time formula; the op's
``frozen_head_shortcut="auto"`` decides with the same model. This module adds the torch backend, the
naive path and the floors, and prints them.

Two floors per workload, in products of N x H x V at cuBLAS's peak: the naive path's (the logits kept:
forward, d hidden, d weight, plus one per reference head: 3 for a trainable head, 2 frozen) and the
recomputing design's (nothing stored, one product more: 4, 3 frozen). What is not modelled: L2 and
shared-memory bandwidth (a 64 x 128 bf16 tile feeds about 43 FLOP per byte, 128 x 128 about 64),
launch gaps, and the small per-token vectors. ``--device-model FILE`` (the ``device_model.json`` a
first contact writes) replaces the H100 defaults with measured figures.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from prefopt.ops.launch_model import H100, KINDS, DeviceModel, Launch, call_time, cublas, frozen_shortcut_pays, \
    triton_launches

from .workloads import Shape, Workload

SMS = H100.sms

#: Why a fused path does one product more than a naive one (printed with the model).
WHY_ONE_MORE = (
    "A fused head never stores the [tokens x vocabulary] logits, so backward computes them again (one "
    "extra matrix product, the 'recompute'); the naive path keeps them from forward instead, which costs "
    "memory that grows with tokens x vocabulary and several passes over it. With a frozen head prefopt "
    "avoids the recompute: forward also accumulates the probability-weighted head rows."
)


@dataclass
class CallModel:
    impl: str
    workload: str
    shape: Shape
    dtype: torch.dtype
    device: DeviceModel = H100
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
        return call_time(self.launches, self.device, self.dtype)


def _product_time(products: int, shape: Shape, dtype: torch.dtype, device: DeviceModel) -> float:
    return products * 2.0 * shape.scored * shape.hidden * shape.vocab / device.peak(dtype)


def floor_time(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> float:
    """Issue 3's floor (:attr:`Workload.floor_products`) at cuBLAS's peak."""
    return _product_time(workload.floor_products, shape, dtype, device)


def floors(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> Dict[str, dict]:
    """Both floors: ``naive`` (the logits kept) and ``recompute`` (nothing stored), products and seconds."""
    return {name: {"products": p, "seconds": _product_time(p, shape, dtype, device)}
            for name, p in (("naive", workload.naive_floor_products), ("recompute", workload.recompute_floor_products))}


def load_device_model(path: str) -> DeviceModel:
    """A measured device model (``device_model.json``), checked entry by entry."""
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not JSON: {exc}") from None
    try:
        return DeviceModel.from_dict(data)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def triton_model(workload: Workload, shape: Shape, dtype: torch.dtype, shortcut: Optional[bool] = None,
                 device: DeviceModel = H100) -> CallModel:
    """prefopt's Triton backend: the launches :mod:`prefopt.ops.triton_backend` makes for one call
    (the frozen shortcut where the op's ``"auto"`` would take it, unless ``shortcut`` says)."""
    n, h, v = shape.scored, shape.hidden, shape.vocab
    if shortcut is None:
        shortcut = workload.frozen and not workload.kl and frozen_shortcut_pays(n, v, h, dtype, device)
    launches, note = triton_launches(n, h, v, dtype, ref=workload.ref_head, kl=workload.kl, frozen=workload.frozen,
                                     shortcut=shortcut, sms=device.sms)
    return CallModel("prefopt-triton", workload.name, shape, dtype, device, launches, note)


def torch_model(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> CallModel:
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
    ref, kl, frozen = workload.ref_head, workload.kl, workload.frozen
    chunk_t, chunk_v = CHUNK_SIZES["cuda"]
    model = CallModel("prefopt-torch", workload.name, shape, dtype, device)
    heads = 2 if ref else 1
    nv = float(n) * v
    tiles = math.ceil(n / chunk_t) * math.ceil(v / chunk_v)
    shortcut = frozen and not kl
    model.launches.append(cublas("forward tile products", n, v, h, heads * (n * h * e + math.ceil(n / chunk_t) * v * h * e)))
    model.launches[-1].flops *= heads
    model.launches[-1].program_flops *= heads
    fwd_passes = (e + 4 + 4 + 8 + 4) + (4 if kl else 0)
    model.launches.append(Launch("forward tile passes", "memory", 0.0, heads * nv * fwd_passes))
    if shortcut:
        model.launches.append(cublas("moments tile products", n, h, v, nv * (4 + e) + tiles * chunk_t * h * (e + 8)))
        model.note = "frozen-head shortcut"
        return model
    rheads = 2 if kl else 1
    model.launches.append(cublas("recompute tile products", n, v, h, rheads * (n * h * e + math.ceil(n / chunk_t) * v * h * e)))
    model.launches[-1].flops *= rheads
    model.launches[-1].program_flops *= rheads
    model.launches.append(Launch("backward tile passes", "memory", 0.0, rheads * nv * (e + 4) + nv * (8 + 4 + e)))
    model.launches.append(cublas("d hidden tile products", n, h, v,
                                  nv * e + math.ceil(n / chunk_t) * v * h * e + math.ceil(v / chunk_v) * n * h * (e + 8)))
    if not frozen:
        model.launches.append(cublas("d weight tile products", v, h, n,
                                      nv * e + math.ceil(v / chunk_v) * n * h * e + math.ceil(n / chunk_t) * v * h * (e + 8)))
    return model


def naive_model(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> CallModel:
    """Materialised logits: one product forward, two backward (no recompute), and passes over [N, V]."""
    n, h, v = shape.scored, shape.hidden, shape.vocab
    e = torch.empty((), dtype=dtype).element_size()
    ref, kl, frozen = workload.ref_head, workload.kl, workload.frozen
    nv = float(n) * v
    model = CallModel("naive", workload.name, shape, dtype, device)
    model.launches.append(cublas("logits", n, v, h, n * h * e + v * h * e + nv * e))
    if ref:
        model.launches.append(cublas("reference logits", n, v, h, n * h * e + v * h * e + nv * e))
    # fp32 copy, log_softmax (read, write), gather; backward: softmax grad (2 reads, 1 write), cast back
    passes = (e + 4) + 8 + 12 + (4 + e) + ((e + 4) + 8 if ref else 0) + (16 if kl else 0)
    model.launches.append(Launch("passes over the [N, V] logits", "memory", 0.0, nv * passes))
    model.launches.append(cublas("d hidden", n, h, v, nv * e + v * h * e + n * h * e))
    if not frozen:
        model.launches.append(cublas("d weight", v, h, n, nv * e + n * h * e + v * h * e))
    return model


def floor_model(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> CallModel:
    n, h, v = shape.scored, shape.hidden, shape.vocab
    flops = workload.floor_products * 2.0 * n * h * v
    model = CallModel("floor", workload.name, shape, dtype, device)
    model.launches.append(Launch("the unavoidable products at peak", "", flops, 0.0, device.sms, flops / device.sms))
    return model


MODELS = {"prefopt-triton": triton_model, "prefopt-torch": torch_model, "naive": naive_model, "floor": floor_model}


def model_table(points, dtype: torch.dtype, impls=("prefopt-triton", "prefopt-torch", "naive"),
                device: DeviceModel = H100) -> str:
    """Markdown: per cell and implementation, products, HBM GB, predicted ms and the ratios to both floors."""
    from .workloads import WORKLOADS

    efficiency = ", ".join(f"{k} {device.efficiency[k]:.2f}" for k in KINDS)
    lines = [f"## IO and FLOP model ({device.name}: {device.sms} SMs, {device.peak(dtype) / 1e12:.0f} TFLOP/s, "
             f"{device.hbm_bytes_per_s / 1e12:.1f} TB/s; {str(dtype).replace('torch.', '')})", "",
             f"Efficiency per kernel kind ({device.source}; fraction of the peak, memory: of the bandwidth): "
             f"{efficiency}.", "", WHY_ONE_MORE, ""]
    for point in points:
        wl = WORKLOADS[point.workload]
        both = floors(wl, point.shape, dtype, device)
        naive_s, recompute_s = both["naive"]["seconds"], both["recompute"]["seconds"]
        lines += [f"### {wl.name}: {point.shape.label()}", "",
                  f"floors: naive path {both['naive']['products']} products, {naive_s * 1e3:.1f} ms; recomputing "
                  f"design {both['recompute']['products']} products, {recompute_s * 1e3:.1f} ms", "",
                  "| implementation | products (N x H x V) | HBM GB | predicted ms | vs naive floor | vs recompute floor | notes |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for name in impls:
            m = MODELS[name](wl, point.shape, dtype, device=device)
            lines.append(f"| {name} | {m.products():.2f} | {m.bytes / 1e9:.1f} | {m.time() * 1e3:.1f} | "
                         f"{m.time() / naive_s:.2f}x | {m.time() / recompute_s:.2f}x | {m.note} |")
        lines.append("")
    return "\n".join(lines)


def launches_table(model: CallModel) -> str:
    rows = ["| launch | kind | count | TFLOP | GB | programs | wave efficiency | ms |",
            "|---|---|---:|---:|---:|---:|---:|---:|"]
    for l in model.launches:
        rows.append(f"| {l.name} | {l.kind} | {l.count} | {l.flops * l.count / 1e12:.2f} | {l.bytes * l.count / 1e9:.2f} | "
                    f"{l.programs} | {l.wave_efficiency(model.device):.2f} | {l.time(model.device, model.dtype) * 1e3:.2f} |")
    return "\n".join(rows)


def predictions(workload: Workload, shape: Shape, dtype: torch.dtype, device: DeviceModel = H100) -> Dict[str, float]:
    """Predicted seconds per implementation and both floors (for the report beside measured figures)."""
    out = {name: fn(workload, shape, dtype, device=device).time() for name, fn in MODELS.items()}
    out.update({f"{name} floor": f["seconds"] for name, f in floors(workload, shape, dtype, device).items()})
    return out
