"""The first contact's correctness gate: the fused op on the device against the float64 oracle.

For each statistic and each gradient of a variant, over all its tokens,

    error = ||out - ref||_2 / ||ref||_2        (float64; NaN or inf anywhere in ``out``: infinite)

must stay within the tolerance of the variant's precision (:data:`TOLERANCES`). The oracle runs on the
inputs as the op sees them (the head rounded to hidden's dtype, as the op multiplies), so the forward
statistics, accumulated in fp32 from exact products of bf16 values, must agree to fp32 accumulation
error (1e-4 leaves a hundredfold margin); the gradients pass through ``ds`` stored in the product
dtype (bf16: 2^-9 relative per entry). The old gate, ``max|err| / (max|ref| + 1) < 3e-2``, passed a
kernel that dropped its last vocabulary tile or one of ten splits; this one must fail both, and
:func:`self_test` plants those defects to prove it (the first contact runs it before the variants).

Before every run the memory the op will be handed is poisoned (:func:`poison_free_memory`), so that an
output a kernel fails to write reads as NaN instead of as a previous run's correct numbers.

Shapes (:data:`SHAPES`) span several vocabulary splits and backward chunks with ragged last token
blocks, vocabulary tiles, chunks and (``ragged``) hidden slices; ``aligned`` has the 16-divisible
sizes that the production shapes' kernels are specialised for. The CPU dry run (the Triton
interpreter) uses small shapes; there the interpreter splits nothing and one chunk would hold the whole
vocabulary, so :func:`dry_run_geometry` splits as a 132-SM GPU would and lowers the chunk budget.
Each row records its geometry (:func:`geometry`) from the launchers' own functions.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

import torch

from prefopt.kernels import linear_logprobs as K

from .oracle import oracle_linear_logprobs

#: Tolerances of the norm-wise relative error, per precision: forward statistics ("values") and gradients.
TOLERANCES: Dict[str, Dict[str, float]] = {
    "bf16": {"values": 1e-4, "gradients": 2e-2},
    "fp32": {"values": 2e-5, "gradients": 2e-5},  # TF32 off: fp32 products
    "tf32": {"values": 2e-3, "gradients": 1e-2},  # operands rounded to 10-bit mantissas
}
TOP1_AGREEMENT = 0.99  # near-ties may flip under rounding

#: (tokens, hidden size, vocabulary) per geometry; "cuda" on a GPU, "dry run" under the interpreter.
SHAPES = {
    # GPU (132 SMs), bf16: 8 splits of 10 tiles (the last tile 100 columns), 3 backward chunks of 3968
    # columns (fp32: 6 of 1920), token blocks whose last has 4 rows, H = 3 x 64 + 8; aligned: 8 splits,
    # 3 chunks (fp32 5).
    "cuda": {"ragged": (4100, 200, 10084), "aligned": (4096, 256, 10240)},
    # interpreter (256-column tiles) under dry_run_geometry: 2 splits of 4 tiles (the last 108 columns),
    # 3 bf16 chunks (8 fp32), H = 48 of 64; aligned: 2 splits, 4 bf16 chunks
    "dry run": {"ragged": (40, 48, 1900), "aligned": (48, 64, 2048)},
}
DRY_RUN_SMS = 132
DRY_RUN_CHUNK_BYTES = 40 * 2 * 768


@dataclass(frozen=True)
class Variant:
    """One configuration of the op checked by the gate."""

    name: str
    dtype: torch.dtype
    precision: str  # key of TOLERANCES
    shapes: Tuple[str, ...] = ("ragged",)
    frozen: bool = False
    ref: bool = False  # reference head in the pass (KL + entropy asked for when the head trains)
    softcap: Optional[float] = None
    temperature: float = 1.0
    bias: bool = False
    transposed_fp32_head: bool = False
    capturable: bool = False
    shortcut: object = None  # LinearLogprobsTriton.frozen_head_shortcut for this run (None: as it is)
    tf32: Optional[bool] = None  # torch's fp32 matmul precision for this run (None: as it is)
    addmm_fallback: bool = False  # force the row-block product instead of addmm(out_dtype=float32)


BF16, FP32 = torch.bfloat16, torch.float32
VARIANTS = [
    Variant("bf16 trainable, bias, softcap 30, temperature 0.9", BF16, "bf16", bias=True, softcap=30.0, temperature=0.9),
    Variant("bf16 trainable, reference head, KL + entropy", BF16, "bf16", ("ragged", "aligned"), ref=True),
    Variant("bf16 trainable, addmm(out_dtype) fallback forced", BF16, "bf16", addmm_fallback=True),
    Variant("bf16 frozen head, shortcut on", BF16, "bf16", ("ragged", "aligned"), frozen=True, shortcut=True),
    Variant("bf16 frozen head, shortcut off", BF16, "bf16", frozen=True, shortcut=False),
    Variant("bf16 frozen head, softcap, shortcut on", BF16, "bf16", frozen=True, shortcut=True, softcap=20.0),
    Variant("bf16 hidden, transposed fp32 head", BF16, "bf16", transposed_fp32_head=True),
    Variant("bf16 capturable=True, reference head", BF16, "bf16", ref=True, capturable=True),
    Variant("fp32, TF32 off, softcap, bias", FP32, "fp32", ("ragged", "aligned"), tf32=False, softcap=30.0, bias=True),
    Variant("fp32, TF32 on, reference head", FP32, "tf32", tf32=True, ref=True),
]
SELF_TEST_VARIANT = Variant("bf16 trainable, entropy", BF16, "bf16")


# --------------------------------------------------------------------------------------------------
# geometry


@contextlib.contextmanager
def dry_run_geometry(sms: int = DRY_RUN_SMS, chunk_bytes: int = DRY_RUN_CHUNK_BYTES):
    """Under the interpreter: split the vocabulary as a GPU with ``sms`` SMs would (the interpreter's
    default is one split) and lower the chunk budget, so small shapes span several splits and chunks."""
    saved = K.default_split, K.CHUNK_BYTES
    K.default_split = lambda n, vocab, blocks, device: K.split_for(n, vocab, blocks, sms)
    K.CHUNK_BYTES = chunk_bytes
    try:
        yield
    finally:
        K.default_split, K.CHUNK_BYTES = saved


def _ragged(total: int, block: int) -> Tuple[int, int]:
    """(blocks, size of the last one)."""
    count = math.ceil(total / block)
    return count, total - (count - 1) * block


def geometry(n: int, hidden: int, vocab: int, dtype: torch.dtype, device: torch.device, *, ref: bool,
             shortcut: bool, gpu_sms: Optional[int] = None) -> dict:
    """How the launchers cut this call: splits, tiles, chunks and the size of the last of each.
    ``gpu_sms``: as on a GPU with that many SMs (its tiles and splits), whatever this process runs."""
    item = torch.empty((), dtype=dtype).element_size()
    interpret = False if gpu_sms else None
    if shortcut:
        fb = K.forward_blocks(n, vocab, hidden, dtype, write_e=True, interpret=interpret)
        width = K.chunk_width(n, vocab, hidden, item, fb.block_v)
        chunks, last_chunk = _ragged(vocab, width)
        return {"path": "frozen shortcut", "forward_splits": None, "chunks": chunks, "last_chunk_columns": last_chunk,
                **_tiles(n, hidden, vocab, fb)}
    fb = K.forward_blocks(n, vocab, hidden, dtype, ref=ref, extras=True, interpret=interpret)
    tiles = math.ceil(vocab / fb.block_v)
    split = K.split_for(n, vocab, fb, gpu_sms) if gpu_sms else K.default_split(n, vocab, fb, device)
    split = max(1, min(split, tiles))
    split = math.ceil(tiles / math.ceil(tiles / split))
    bb = K.backward_blocks(n, vocab, hidden, dtype, interpret=interpret)
    chunks, last_chunk = _ragged(vocab, K.chunk_width(n, vocab, hidden, item, bb.block_v))
    return {"path": "split forward, chunked recompute", "forward_splits": split, "chunks": chunks,
            "last_chunk_columns": last_chunk, **_tiles(n, hidden, vocab, fb)}


def _tiles(n, hidden, vocab, blocks) -> dict:
    tiles, last_tile = _ragged(vocab, blocks.block_v)
    token_blocks, last_rows = _ragged(n, blocks.block_n)
    slices, last_slice = _ragged(hidden, blocks.block_h)
    return {"tile": [blocks.block_n, blocks.block_v, blocks.block_h], "vocab_tiles": tiles, "last_tile_columns": last_tile,
            "token_blocks": token_blocks, "last_token_block_rows": last_rows, "hidden_slices": slices,
            "last_hidden_slice": last_slice}


# --------------------------------------------------------------------------------------------------
# poison


POISON_FRESH_BYTES = 8 * 2**30


def poison_free_memory(device: torch.device) -> str:
    """Fill with 0xFF bytes (NaN in every float dtype, -1 in integers) every block the CUDA caching
    allocator holds free, topped up with fresh device memory to 8 GiB that it keeps cached afterwards:
    whatever the next run allocates starts as NaN. Nothing to do on CPU (no caching allocator)."""
    if device.type != "cuda":
        return "none on CPU (no caching allocator)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.synchronize(device)
    sizes = sorted(block["size"] for segment in torch.cuda.memory_snapshot() if segment.get("device", index) == index
                   for block in segment["blocks"] if block["state"] == "inactive")
    held = [torch.empty(size, dtype=torch.uint8, device=device) for size in sizes]  # smallest fit first
    # what the cache cannot serve comes from the driver: keep 8 GiB of poisoned memory cached (not 8 more each call)
    fresh = min(POISON_FRESH_BYTES - sum(sizes), torch.cuda.mem_get_info(device)[0] - 2**30)
    if fresh > 0:
        held.append(torch.empty(fresh, dtype=torch.uint8, device=device))
    for t in held:
        t.fill_(0xFF)
    torch.cuda.synchronize(device)
    return f"{len(sizes)} free cached blocks and {max(fresh, 0) / 2**30:.1f} GiB of fresh memory filled with 0xFF"


# --------------------------------------------------------------------------------------------------
# one run through the gate


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """``||actual - expected|| / ||expected||`` in float64 (the absolute norm when ``expected`` is 0);
    infinite when ``actual`` holds a NaN or an infinity."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = float(torch.linalg.vector_norm(expected))
    diff = float(torch.linalg.vector_norm(actual - expected))
    return diff / scale if scale > 0 else diff


def _tf32_setting():
    matmul = torch.backends.cuda.matmul
    return matmul.fp32_precision if hasattr(matmul, "fp32_precision") else matmul.allow_tf32


def _set_tf32(value) -> None:
    """``True``/``False`` or a saved setting; through ``fp32_precision`` where torch has it (reading
    ``allow_tf32`` after it was set raises there)."""
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):
        matmul.fp32_precision = ("tf32" if value else "ieee") if isinstance(value, bool) else value
    else:
        matmul.allow_tf32 = value


@contextlib.contextmanager
def _settings(variant: Variant):
    from prefopt.ops.triton_backend import LinearLogprobsTriton

    saved = LinearLogprobsTriton.frozen_head_shortcut, _tf32_setting(), K.ADDMM_OUT_DTYPE
    try:
        if variant.shortcut is not None:
            LinearLogprobsTriton.frozen_head_shortcut = variant.shortcut
        if variant.tf32 is not None:
            _set_tf32(variant.tf32)
        if variant.addmm_fallback:
            K.ADDMM_OUT_DTYPE = False
        yield
    finally:
        LinearLogprobsTriton.frozen_head_shortcut = saved[0]
        _set_tf32(saved[1])
        if variant.addmm_fallback:
            K.ADDMM_OUT_DTYPE = saved[2]


def run_variant(variant: Variant, shape: Tuple[int, int, int], device: torch.device, seed: int = 1234) -> dict:
    """The op forward and backward on ``device`` (inputs drawn there), then the oracle; one gate row."""
    from prefopt import linear_logprobs

    n, hidden, vocab = shape
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0, dtype=variant.dtype):
        return (torch.randn(*size, generator=g, device=device) * scale).to(dtype)

    h = randn(n, hidden).requires_grad_()
    if variant.transposed_fp32_head:
        w = randn(hidden, vocab, scale=2 / hidden**0.5, dtype=torch.float32).T
    else:
        w = randn(vocab, hidden, scale=2 / hidden**0.5)  # logits of standard deviation about 2
    w.requires_grad_(not variant.frozen)
    b = randn(vocab, scale=0.1, dtype=w.dtype) if variant.bias else None
    y = torch.randint(0, vocab, (n,), generator=g, device=device)
    extra = dict(ref_hidden=randn(n, hidden), ref_weight=randn(vocab, hidden, scale=2 / hidden**0.5)) if variant.ref else {}
    # With softcap the frozen shortcut covers log-probs only (mean_logit's gradient is per entry there).
    stats = dict(entropy=not variant.frozen, kl=variant.ref and not variant.frozen, top1=True,
                 mean_logit=not (variant.frozen and variant.softcap is not None))
    leaves = [h] if variant.frozen else [h, w]
    with _settings(variant):
        poison = poison_free_memory(device)
        out = linear_logprobs(h, w, y, bias=b, softcap=variant.softcap, temperature=variant.temperature,
                              backend="triton", capturable=variant.capturable, **stats, **extra)
        names = [k for k in ("logp", "lse", "entropy", "kl", "mean_logit") if getattr(out, k) is not None]
        up = {k: torch.randn(n, generator=g, device=device, dtype=torch.float64) for k in names}
        grads = torch.autograd.grad(sum((getattr(out, k).double() * up[k]).sum() for k in names), leaves)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        shortcut_taken = _shortcut_applies(variant, h, w)

    # the oracle sees the head as the op multiplies it: rounded to hidden's dtype
    leaves64 = [_as_multiplied(t.detach(), h.dtype).double().requires_grad_() for t in leaves]
    weight64 = leaves64[1] if len(leaves64) > 1 else _as_multiplied(w.detach(), h.dtype).double()
    want = oracle_linear_logprobs(leaves64[0], weight64, y, bias=None if b is None else b.double(),
                                  temperature=variant.temperature, softcap=variant.softcap,
                                  ref_hidden=extra.get("ref_hidden"), ref_weight=extra.get("ref_weight"))
    want_grads = torch.autograd.grad(sum((getattr(want, k) * up[k]).sum() for k in names), leaves64)
    errors = {k: relative_error(getattr(out, k), getattr(want, k)) for k in names + (["ref_logp"] if variant.ref else [])}
    errors.update({label: relative_error(got, expected)
                   for got, expected, label in zip(grads, want_grads, ("d hidden", "d weight"))})
    tolerance = TOLERANCES[variant.precision]
    top1 = float((out.top1.double() == want.top1).double().mean())
    passed = all(e <= tolerance["gradients" if k.startswith("d ") else "values"] for k, e in errors.items())
    return {"variant": variant.name, "shape": list(shape), "status": "ok" if passed and top1 >= TOP1_AGREEMENT else "FAILED",
            "precision": variant.precision, "tolerance": tolerance, "errors": errors, "top1_agreement": top1,
            "poison": poison, "geometry": geometry(n, hidden, vocab, variant.dtype, device, ref=variant.ref,
                                                   shortcut=shortcut_taken)}


def _as_multiplied(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` cast to ``dtype`` as the kernels cast it: to nearest on a GPU; the Triton interpreter
    truncates fp32 to bf16 (it keeps the upper 16 bits), so under it the dry run's oracle does too."""
    if K.INTERPRET and t.device.type == "cpu" and t.dtype == torch.float32 and dtype == torch.bfloat16:
        return (t.contiguous().view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)
    return t.to(dtype)


def _shortcut_applies(variant: Variant, h, w) -> bool:
    """Whether this run's frozen head took the moments shortcut (the op's own rule and decision)."""
    from prefopt.ops.triton_backend import LinearLogprobsTriton, shortcut_pays

    setting = LinearLogprobsTriton.frozen_head_shortcut
    if not variant.frozen or not setting:
        return False
    return shortcut_pays(h, w) if setting == "auto" else True


# --------------------------------------------------------------------------------------------------
# planted defects


NEUTRAL = {"max": -math.inf, "rmax": -math.inf}  # every other partial's neutral element is 0


def _drops_last_tile(launch: Callable) -> Callable:
    """The forward kernel stops one vocabulary tile short of the end."""

    def defective(hidden, weight, *args):
        # _launch(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, parts, v_base, v_stop, ...)
        v_base, v_stop, blocks = args[6], args[7], args[10]
        if v_stop == weight.shape[0]:
            v_stop = max(v_base, (v_stop - 1) // blocks.block_v * blocks.block_v)
        return launch(hidden, weight, *args[:7], v_stop, *args[8:])

    return defective


def _drops_a_split(launch: Callable) -> Callable:
    """The merge loses one of several vocabulary splits (its partials left at their neutral values)."""

    def defective(hidden, weight, *args):
        launch(hidden, weight, *args)
        parts, split, e = args[5], args[8], args[13] if len(args) > 13 else None
        if e is None and split > 1:
            for key, t in parts.items():
                t[split // 2].fill_(NEUTRAL.get(key, 0))

    return defective


DEFECTS: Dict[str, Callable[[Callable], Callable]] = {
    "forward skips the last vocabulary tile": _drops_last_tile,
    "forward loses one of its vocabulary splits": _drops_a_split,
}


@contextlib.contextmanager
def planted(defect: str):
    launch = K._launch
    K._launch = DEFECTS[defect](launch)
    try:
        yield
    finally:
        K._launch = launch


def self_test(shape: Tuple[int, int, int], device: torch.device) -> dict:
    """The gate on the clean kernels (must pass) and on each planted defect (must fail)."""
    rows = [{"defect": "none", **run_variant(SELF_TEST_VARIANT, shape, device)}]
    for defect in DEFECTS:
        with planted(defect):
            rows.append({"defect": defect, **run_variant(SELF_TEST_VARIANT, shape, device)})
    for row in rows:
        row["verdict"] = ("passes, as it must" if row["status"] == "ok" else "FAILS a clean kernel") if row["defect"] == "none" \
            else ("caught" if row["status"] != "ok" else "MISSED")
    ok = all(row["verdict"] in ("passes, as it must", "caught") for row in rows)
    return {"status": "ok" if ok else "FAILED", "shape": list(shape), "rows": rows}
