"""How long the Triton backend's launches take on a GPU, from shapes alone (no GPU needed).

The cost model behind ``frozen_head_shortcut="auto"`` (:func:`frozen_shortcut_pays`) and the launch
lists that ``bench/io_model.py`` prints. One call of the op is a list of :class:`Launch` es (kernel
launches, cuBLAS products, elementwise passes) taken from the launcher's own functions
(:func:`prefopt.kernels.linear_logprobs.forward_blocks`, ``backward_blocks``, ``split_for``,
``chunk_width``, ``forward_grid``). A launch of kind ``k`` takes

    max(waves * (FLOPs of one program) / (efficiency[k] * peak / SMs),
        bytes / (efficiency["memory"] * bandwidth)),                 waves = ceil(programs / SMs)

so a grid that leaves part of its last wave idle pays for a whole wave. ``peak`` is the rate cuBLAS
reaches on a large product (790 TFLOP/s bf16 on an H100), ``efficiency[k]`` the fraction of it that
kernels of kind ``k`` reach (:data:`KINDS`). One program per SM is assumed for the matrix kernels;
cuBLAS is modelled with 128 x 256 output tiles. HBM bytes follow an L2 model per launch (the split
forward reads W once per wave of programs, grouped launches read hidden once per chunk and W once per
group of token blocks, cuBLAS products and elementwise passes read each operand once).

The default efficiencies are not measurements: no GPU has run these kernels yet. They are set so that
the model agrees with an independent reading of the design (issue 14's review: a trainable head at
about 1.1-1.45x its floor, a frozen head at 1.4-2.2x): Triton kernels that carry an online-softmax
epilogue reach 60-70% of cuBLAS's rate, the frozen forward that also writes its probability tiles
(64 x 128 tiles, one per program) half of it. ``python -m bench --preset gpu-first-contact`` measures
every kind and writes ``OUT/device_model.json``; :meth:`DeviceModel.from_dict` reads it, and the
figures it holds are what these defaults should become.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, replace
from typing import Dict, List, Mapping, Optional, Tuple

import torch

#: Kernel kinds and what they are; an efficiency is given for each (a fraction of ``peak``, or of the
#: bandwidth for ``memory``).
KINDS: Dict[str, str] = {
    "forward": "Triton forward kernel, policy head (split layout, online softmax in registers)",
    "forward_ref": "Triton forward kernel with the reference head in the same pass",
    "frozen_forward": "Triton forward kernel writing the frozen head's probability tiles (grouped)",
    "logit_gradient": "Triton logit-gradient kernel (backward recompute + ds epilogue)",
    "logit_gradient_kl": "Triton logit-gradient kernel recomputing the reference tile too (KL gradient)",
    "cublas": "cuBLAS products at the op's shapes (d hidden, d weight, the frozen moments)",
    "memory": "HBM traffic of every launch and the elementwise passes (fraction of the bandwidth)",
}

DEFAULT_EFFICIENCY: Dict[str, float] = {
    "forward": 0.70, "forward_ref": 0.60, "frozen_forward": 0.50, "logit_gradient": 0.70,
    "logit_gradient_kl": 0.60, "cublas": 0.95, "memory": 0.85,
}
DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float16: "float16", torch.float32: "float32"}


@dataclass(frozen=True, eq=False)
class DeviceModel:
    """A GPU as the model sees it: SMs, cuBLAS's peak per dtype, HBM bandwidth, efficiency per kind."""

    name: str
    sms: int
    peak_flops: Mapping[str, float]  # by dtype name ("float32": TF32)
    hbm_bytes_per_s: float
    efficiency: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_EFFICIENCY))
    source: str = "defaults"

    def peak(self, dtype: torch.dtype) -> float:
        return self.peak_flops[DTYPE_NAMES.get(dtype, "float32")]

    def as_dict(self) -> dict:
        return {"name": self.name, "sms": self.sms, "peak_flops": dict(self.peak_flops),
                "hbm_bytes_per_s": self.hbm_bytes_per_s, "efficiency": dict(self.efficiency), "source": self.source}

    @classmethod
    def from_dict(cls, data: Mapping, base: Optional["DeviceModel"] = None) -> "DeviceModel":
        """A model from ``as_dict()``'s form (a measured ``device_model.json``); missing entries come from
        ``base`` (the H100 defaults). Anything malformed is a ValueError naming the entry."""
        base = base or H100
        if not isinstance(data, Mapping):
            raise ValueError(f"device model: expected a JSON object, got {type(data).__name__}")
        unknown = set(data) - set(base.as_dict())
        if unknown:
            raise ValueError(f"device model: unknown entries {sorted(unknown)}; expected {sorted(base.as_dict())}")
        efficiency = dict(base.efficiency)
        for kind, value in dict(data.get("efficiency", {})).items():
            if kind not in KINDS:
                raise ValueError(f"device model: efficiency: unknown kind {kind!r}; expected one of {', '.join(KINDS)}")
            efficiency[kind] = _positive(f"efficiency[{kind!r}]", value, upper=1.5)
        peaks = dict(base.peak_flops)
        for name, value in dict(data.get("peak_flops", {})).items():
            if name not in peaks:
                raise ValueError(f"device model: peak_flops: unknown dtype {name!r}; expected one of {', '.join(peaks)}")
            peaks[name] = _positive(f"peak_flops[{name!r}]", value)
        sms = data.get("sms", base.sms)
        if not isinstance(sms, int) or sms <= 0:
            raise ValueError(f"device model: sms: expected a positive integer, got {sms!r}")
        return cls(str(data.get("name", base.name)), sms, peaks,
                   _positive("hbm_bytes_per_s", data.get("hbm_bytes_per_s", base.hbm_bytes_per_s)),
                   efficiency, str(data.get("source", "measured")))


def _positive(what: str, value, upper: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= upper:
        raise ValueError(f"device model: {what}: expected a number in (0, {upper:g}], got {value!r}")
    return float(value)


#: The H100 (SXM) of issues 3 and 11: cuBLAS's bf16 rate, 3.0 TB/s, default efficiencies.
H100 = DeviceModel("H100 (modelled)", 132, {"bfloat16": 790e12, "float16": 790e12, "float32": 395e12}, 3.0e12)
#: The same device with every kernel at cuBLAS's rate and full bandwidth: the product and traffic count
#: alone (what the model predicted before it had efficiencies).
H100_AT_CUBLAS_RATE = replace(H100, efficiency={k: 1.0 for k in KINDS}, source="every kind at cuBLAS's rate")

CUBLAS_TILE = (128, 256)


@dataclass
class Launch:
    """One kernel launch (or one cuBLAS call, or one elementwise pass) of the modelled call."""

    name: str
    kind: str  # one of KINDS, or "" for products at the peak itself (the floors)
    flops: float
    bytes: float
    programs: int = 0  # grid size; 0 for memory-only passes
    program_flops: float = 0.0  # FLOPs of one program (uniform grids)
    count: int = 1  # identical launches (one per chunk)

    def time(self, device: DeviceModel, dtype: torch.dtype) -> float:
        memory = self.bytes / (device.hbm_bytes_per_s * device.efficiency["memory"])
        compute = 0.0
        if self.programs:
            waves = math.ceil(self.programs / device.sms)
            efficiency = device.efficiency[self.kind] if self.kind else 1.0
            compute = waves * self.program_flops / (device.peak(dtype) * efficiency / device.sms)
        return self.count * max(compute, memory)

    def wave_efficiency(self, device: DeviceModel) -> float:
        if not self.programs:
            return 1.0
        return self.programs / (math.ceil(self.programs / device.sms) * device.sms)


def cublas(name: str, m: int, n: int, k: int, nbytes: float, count: int = 1) -> Launch:
    """An ``[m, k] @ [k, n]`` cuBLAS product moving ``nbytes``."""
    tm, tn = CUBLAS_TILE
    programs = math.ceil(m / tm) * math.ceil(n / tn)
    return Launch(name, "cublas", 2.0 * m * n * k, nbytes, programs, 2.0 * tm * tn * k, count)


def _chunks(vocab: int, width: int) -> List[Tuple[int, int]]:
    """(columns, how many chunks of that width): the full chunks and the ragged last one."""
    full, rest = divmod(vocab, width)
    return [(w, c) for w, c in ((width, full), (rest, 1 if rest else 0)) if c]


def triton_launches(n: int, hidden: int, vocab: int, dtype: torch.dtype, *, ref: bool, kl: bool, frozen: bool,
                    shortcut: bool, sms: int = H100.sms) -> Tuple[List[Launch], str]:
    """The launches :mod:`prefopt.ops.triton_backend` makes for one forward + backward, and a note.

    ``ref``: a reference head in the pass; ``kl``: the KL gradient is live (backward recomputes the
    reference tile); ``frozen``: no weight gradient; ``shortcut``: the frozen head's moments shortcut.
    """
    from prefopt.kernels import linear_logprobs as K

    e = torch.empty((), dtype=dtype).element_size()
    heads = 2 if ref else 1
    launches: List[Launch] = []
    fb = K.forward_blocks(n, vocab, hidden, dtype, ref=ref, extras=kl, write_e=shortcut, interpret=False)
    if shortcut:
        full_width = K.chunk_width(n, vocab, hidden, e, fb.block_v)
        w_reads = math.ceil(math.ceil(n / fb.block_n) / fb.group_n)
        for width, times in _chunks(vocab, full_width):
            count = math.ceil(width / fb.block_v)
            programs = K.forward_grid(n, count, fb, grouped=True)[0]
            fwd_bytes = heads * (n * hidden * e + width * hidden * e * w_reads) + n * count * fb.block_v * e
            launches.append(Launch(f"forward kernel + probability tiles ({width} columns)", "frozen_forward",
                                   heads * 2.0 * n * width * hidden, fwd_bytes, programs,
                                   heads * 2.0 * fb.block_n * fb.block_v * hidden, times))
            launches.append(Launch(f"rescale tiles to the running max ({width} columns)", "memory", 0.0,
                                   2.0 * n * count * fb.block_v * e, count=times))
            launches.append(Launch("rescale M", "memory", 0.0, 8.0 * n * hidden, count=times))
            launches.append(cublas(f"M += E @ W_chunk (cuBLAS, fp32 out, {width} columns)", n, hidden, width,
                                   n * width * e + width * hidden * e + 8.0 * n * hidden, times))
        launches.append(Launch("backward: gather W[y], axpy with M", "memory", 0.0, n * hidden * (e + 4 + 4 + e)))
        return launches, f"frozen-head shortcut, {math.ceil(vocab / full_width)} chunks of {full_width} columns"

    split = K.split_for(n, vocab, fb, sms)
    tiles = math.ceil(vocab / fb.block_v)
    tiles_per_split = math.ceil(tiles / split)
    split = math.ceil(tiles / tiles_per_split)
    grid = K.forward_grid(n, split, fb, grouped=False)
    programs = grid[0] * grid[1]
    waves = math.ceil(programs / sms)
    fwd_bytes = heads * (n * hidden * e + waves * min(split, sms) / split * vocab * hidden * e)
    launches.append(Launch(f"forward kernel (split {split})", "forward_ref" if ref else "forward",
                           heads * 2.0 * n * vocab * hidden, fwd_bytes, programs,
                           heads * tiles_per_split * 2.0 * fb.block_n * fb.block_v * hidden))

    bb = K.backward_blocks(n, vocab, hidden, dtype, interpret=False)
    full_width = K.chunk_width(n, vocab, hidden, e, bb.block_v)
    token_blocks = math.ceil(n / bb.block_n)
    w_reads = math.ceil(token_blocks / bb.group_n)
    rheads = 2 if kl else 1  # the KL gradient recomputes the reference tile too
    for width, times in _chunks(vocab, full_width):
        count = math.ceil(width / bb.block_v)
        launches.append(Launch(f"logit-gradient kernel ({width} columns)", "logit_gradient_kl" if kl else "logit_gradient",
                               rheads * 2.0 * n * width * hidden,
                               rheads * (n * hidden * e + width * hidden * e * w_reads) + n * width * e,
                               token_blocks * count, rheads * 2.0 * bb.block_n * bb.block_v * hidden, times))
        launches.append(cublas(f"d hidden += ds @ W_chunk (cuBLAS, fp32 out, {width} columns)", n, hidden, width,
                               n * width * e + width * hidden * e + 8.0 * n * hidden, times))
        if not frozen:
            launches.append(cublas(f"d W_chunk = ds^T @ hidden (cuBLAS, {width} columns)", width, hidden, n,
                                   n * width * e + n * hidden * e + width * hidden * e, times))
    launches.append(Launch("d hidden: zero, cast to the input dtype", "memory", 0.0, n * hidden * (4 + 4 + e)))
    return launches, f"split {split}, backward {math.ceil(vocab / full_width)} chunks of {full_width} columns"


def call_time(launches: List[Launch], device: DeviceModel, dtype: torch.dtype) -> float:
    return sum(launch.time(device, dtype) for launch in launches)


@functools.lru_cache(maxsize=256)
def frozen_shortcut_pays(n: int, vocab: int, hidden: int, dtype: torch.dtype, device: DeviceModel = H100) -> bool:
    """Frozen head, log-probs only: whether the moments shortcut (forward writes probability tiles, one
    cuBLAS product for M, no backward pass over the vocabulary) is predicted faster on ``device`` than
    a recompute backward (forward, logit-gradient kernel, d hidden product).

    The shortcut saves the recompute and pays for the probability tiles (written, rescaled, read), two
    fp32 passes over M per chunk, and a slower forward kernel: at bf16 with 8192 tokens or more it pays
    from H of about 1400 up on the default H100 model (1024 with every kernel at cuBLAS's rate).
    """
    dtype = dtype if dtype in DTYPE_NAMES else torch.float32
    times = [call_time(triton_launches(n, hidden, vocab, dtype, ref=False, kl=False, frozen=True, shortcut=s,
                                       sms=device.sms)[0], device, dtype) for s in (True, False)]
    return times[0] < times[1]
