"""Triton kernels of the fused op ``linear -> per-token statistics`` (forward and backward side by side).

Notation as in :mod:`prefopt.ops.common`: ``s = h . W_v + b_v``, ``z = softcap(s) / temperature``,
``lse = log sum_v exp(z_v)``, ``p = exp(z - lse)``.

Forward, :func:`forward` / ``_fwd_kernel``
    Grid ``(SPLIT_V, cdiv(n, BLOCK_N))``: program ``(s, i)`` owns token block ``i`` and the ``s``-th
    contiguous range of vocabulary tiles. It walks its tiles once; each logits tile is
    ``tl.dot(hidden_block, weight_tile^T)`` over ``BLOCK_H`` slices of H with an fp32 accumulator
    (fp64 for fp64 inputs), then bias, softcap and ``1/temperature`` are applied in registers, padded
    columns are set to -inf, and an online (max, sum-exp) is updated. On request the same loop
    accumulates ``sum e*z`` (entropy, KL), ``sum z`` (uniform NLL, mean logit), ``sum e^2`` (rescaled by the
    square of the sum-exp's factor, for ``log sum_v p_v^2 = log sum e^2 - 2 log sum e``), the first argmax (a
    running max and its lowest column; splits merged by (max, lowest split)), the reference logits of the same
    tile from the reference hidden block (online reference lse, reference target logit, ``sum e*zr``
    for KL) and the target logit. Each program writes one partial per statistic to ``[SPLIT_V, n]``
    buffers; :func:`forward` merges the splits (a log-sum-exp over ``SPLIT_V`` entries per token). The
    split axis is the fastest grid axis so that the programs of one token block run together and share
    its hidden block in L2, and ``SPLIT_V`` fills the GPU when ``n`` is small.

    Frozen-head moments (``WRITE_E``, :func:`frozen_moments`): launched chunk by chunk with one
    vocabulary tile per program, the kernel also writes ``exp(z - tile max) * f`` (``f`` the softcap
    derivative, the target column zeroed) into an ``[n, width]`` buffer in the product dtype; the
    launcher rescales the tiles to each token's running max and cuBLAS accumulates
    ``M <- M * exp(m_old - m_new) + E @ W_chunk`` in fp32. An earlier version kept ``M`` in the kernel
    (read-modify-write of an fp32 ``[BLOCK_N, H]`` slab per vocabulary tile): at N=16384, H=4096 that is
    about 640 GB of traffic per call, 3.5x the frozen floor on an H100, and forced one split.

Backward, :func:`grad_logits` / ``_bwd_dlogits_kernel``
    For a chunk of vocabulary columns ``[v0, v0 + width)``, grid over ``(token block, vocab tile)``
    pairs in grouped (L2-friendly) order; each program recomputes its logits tile (and the reference
    tile when the KL gradient is live), forms ``dz = a*onehot + p*(c0 + c1*z + c2*zr) + c3``, multiplies
    by the softcap derivative and ``1/temperature`` in fp32 and stores the tile of ``ds`` into a
    ``[n, width]`` chunk buffer in the matrix-product dtype. The two products that consume it,
    ``d hidden += ds @ W_chunk`` (fp32 accumulator) and ``d weight_chunk = ds^T @ hidden`` (complete:
    the whole token reduction is inside one product), are cuBLAS calls made by :func:`grad_logits`'s
    caller; the chunk width is chosen so the buffer stays within a byte budget, so no ``[n, V]`` tensor
    exists. See the backend module for why the two products are not fused into this kernel.

Interpreter (``TRITON_INTERPRET=1``, CPU tensors): ``tl.dot`` on bf16/fp16 operands is unreliable
there, so operands are cast to fp32 before every dot when interpreting (constexpr ``DOT_DTYPE``);
fp64 operands are used as they are (fp64 ``tl.dot`` is exact in the interpreter). No atomics are used.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

#: Whether kernels were built for the interpreter (``triton.jit`` reads the variable when decorating).
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass
class StreamStats:
    """What :func:`forward` returns per token ([n] each, fp32 or fp64; None where not asked for).

    The field names are those of the op's ``ForwardStats`` (the backend copies them over); this module
    imports nothing from the library above it.
    """

    lse: torch.Tensor
    target_logit: torch.Tensor
    mean_logit: Optional[torch.Tensor] = None  # E_p[z]
    logit_sum: Optional[torch.Tensor] = None  # sum_v z_v
    ref_lse: Optional[torch.Tensor] = None
    ref_target_logit: Optional[torch.Tensor] = None
    mean_ref_logit: Optional[torch.Tensor] = None  # E_p[zr]
    moments: Optional[torch.Tensor] = None  # [n, H]
    rest_mass: Optional[torch.Tensor] = None  # 1 - p_y, summed without the target (with moments)
    argmax: Optional[torch.Tensor] = None  # int64: first index of max_v z_v
    log_sum_sq_probs: Optional[torch.Tensor] = None  # log sum_v p_v^2


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in fp32, or fp64 for fp64 inputs (the op's rule)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch options of one kernel launch."""

    block_n: int
    block_v: int
    block_h: int
    num_warps: int = 8
    num_stages: int = 3
    group_n: int = 8


def _pow2(x: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(max(int(x), 1))))


def forward_blocks(n: int, vocab: int, hidden_size: int, dtype: torch.dtype, *, ref: bool = False,
                   extras: bool = False, write_e: bool = False, interpret: Optional[bool] = None) -> Blocks:
    """Tile sizes for the forward kernel variant: H100-sized on GPU, large (fast) tiles under the
    interpreter (``interpret`` defaults to whether this process interprets; the IO model asks for the
    GPU's). ``ref``: the reference head runs in the same pass; ``extras``: softcap or any statistic
    beyond lse and the target logit; ``write_e``: the frozen head's probability tiles.

    From ``bench/aot_compile.py`` (sm_90, ptxas registers / spill bytes, 8 warps): bf16 128 x 128
    compiles without spills for the plain variant (222 registers), with statistics (255, log sum p^2
    included) and with the reference head (255), but spills with both (388 B) and with the probability
    tiles (220 B), which keep 64 x 128 (252 and 192 registers, 188 with log sum p^2); fp64 32 x 64 spills
    (1256 B), 32 x 32 too (36 B) since the infinite-max guards, 16 x 32 does not."""
    if INTERPRET if interpret is None else interpret:
        return Blocks(_pow2(n, 16, 64), _pow2(vocab, 16, 256), _pow2(hidden_size, 16, 128), 1, 1)
    if dtype == torch.float64:
        return Blocks(16, 32, 32, 4, 2)
    if dtype == torch.float32:
        return Blocks(64, 128, 32, 8, 3)
    if write_e or (ref and extras):
        return Blocks(64, 128, 64, 8, 4)
    return Blocks(128, 128, 64, 8, 3)


def backward_blocks(n: int, vocab: int, hidden_size: int, dtype: torch.dtype,
                    interpret: Optional[bool] = None) -> Blocks:
    """Tile sizes for the logit-gradient kernel (a matrix product with an elementwise epilogue)."""
    if INTERPRET if interpret is None else interpret:
        return Blocks(_pow2(n, 16, 64), _pow2(vocab, 16, 256), _pow2(hidden_size, 16, 128), 1, 1, 8)
    if dtype == torch.float64:
        return Blocks(32, 64, 32, 4, 2, 8)
    if dtype == torch.float32:
        return Blocks(128, 128, 32, 8, 3, 8)
    return Blocks(128, 128, 64, 8, 3, 8)


def tf32_allowed() -> bool:
    """Whether torch lets fp32 matmuls use TF32, read through the API that cannot raise.

    torch >= 2.9 has ``torch.backends.cuda.matmul.fp32_precision`` ("tf32", "ieee", or "none": defer to
    ``torch.backends.fp32_precision``); once it has been set, reading the legacy ``allow_tf32`` raises a
    RuntimeError. Older torch has only ``allow_tf32``.
    """
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":
        precision = getattr(torch.backends, "fp32_precision", "ieee")
    return precision == "tf32"


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact fp32 products ("ieee") unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not INTERPRET and tf32_allowed():
        return "tf32"
    return "ieee"


def _dot_dtype(x: torch.Tensor, w: torch.Tensor):
    """What ``tl.dot`` operands are cast to after the head tile is cast to hidden's dtype (the torch
    backend's rule, so a bf16 hidden with an fp32 head runs on bf16 tensor cores): nothing on a GPU;
    fp32 for bf16/fp16 under the interpreter, whose low-precision dot is unreliable (values rounded to
    the low precision first, so the interpreter computes what the GPU does up to accumulation order)."""
    if x.dtype in (torch.float32, torch.float64) or not INTERPRET:
        return None
    return tl.float32


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _check_device(*tensors: Optional[torch.Tensor]) -> None:
    for t in tensors:
        if t is None:
            continue
        if t.device.type == "cpu" and not INTERPRET:
            raise ValueError(
                "backend 'triton': CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 set before "
                "triton is imported); use backend='torch' or CUDA tensors"
            )
        if t.device.type not in ("cpu", "cuda"):
            raise ValueError(f"backend 'triton': unsupported device {t.device}")


# --------------------------------------------------------------------------------------------------
# shared tile helper
# --------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_x, stride_xk, stride_w, stride_wk,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z = softcap(x[rows] @ w[cols]^T + b[cols]) * inv_temp, and tanh(s / cap) (or s) for f = 1 - tanh^2.

    Both operands are read through their strides (a transposed or sliced head is never copied); the head
    tile is cast to x's dtype, as the torch backend multiplies."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=ACC)
    ks = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :] * stride_xk
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None] * stride_wk
    for k0 in range(0, K, BLOCK_H):
        k_mask = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0).to(x.dtype)
        if DOT_DTYPE is not None:
            x = x.to(DOT_DTYPE)
            w = w.to(DOT_DTYPE)
        acc = tl.dot(x, w, acc, input_precision=PRECISION, out_dtype=ACC)
        x_ptrs += BLOCK_H * stride_xk
        w_ptrs += BLOCK_H * stride_wk
    s = acc
    if HAS_BIAS:
        s += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(ACC)[None, :]
    th = s
    if SOFTCAP:
        # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): no overflow, no libdevice needed
        u = s * inv_softcap
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        s = th * softcap
    return s * inv_temp, th


# --------------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _grouped_program(pid, n, num_inner, BLOCK_N: tl.constexpr, GROUP_N: tl.constexpr):
    """(token block, inner index) of program ``pid`` of a 1-D grid in grouped order: GROUP_N token blocks
    sweep the ``num_inner`` vocabulary tiles (or splits) together, so that a wave of programs shares both
    its hidden blocks and its W tiles in L2."""
    num_n = tl.cdiv(n, BLOCK_N)
    per_group = GROUP_N * num_inner
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    return first_n + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
    max_ptr, sum_ptr, tgt_ptr, ez_ptr, zsum_ptr, arg_ptr, sq_ptr, rest_ptr, rmax_ptr, rsum_ptr, rtgt_ptr, ezr_ptr,
    e_ptr,
    n, v_base, v_stop, K, KR, stride_h, stride_hk, stride_w, stride_wk, stride_rh, stride_rhk, stride_rw, stride_rwk,
    stride_e, tiles_per_split, num_splits,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    WANT_EZ: tl.constexpr, WANT_ZSUM: tl.constexpr, WANT_ARGMAX: tl.constexpr, WANT_SQ: tl.constexpr,
    WANT_REF: tl.constexpr,
    WANT_EZR: tl.constexpr, WRITE_E: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    REF_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    if GROUP_N > 0:  # grouped order, one tile per program (the frozen launch)
        pid_n, pid_s = _grouped_program(tl.program_id(0), n, num_splits, BLOCK_N, GROUP_N)
    else:
        # split fastest: the programs of one token block run together and share its hidden block in L2
        pid_s = tl.program_id(0)
        pid_n = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    ninf = float("-inf")

    run_max = tl.full([BLOCK_N], ninf, dtype=ACC)
    run_sum = tl.zeros([BLOCK_N], dtype=ACC)
    tgt_logit = tl.zeros([BLOCK_N], dtype=ACC)
    ez = tl.zeros([BLOCK_N], dtype=ACC)
    zsum = tl.zeros([BLOCK_N], dtype=ACC)
    sq = tl.zeros([BLOCK_N], dtype=ACC)
    rest = tl.zeros([BLOCK_N], dtype=ACC)
    ref_max = tl.full([BLOCK_N], ninf, dtype=ACC)
    ref_sum = tl.zeros([BLOCK_N], dtype=ACC)
    ref_tgt = tl.zeros([BLOCK_N], dtype=ACC)
    ezr = tl.zeros([BLOCK_N], dtype=ACC)

    v_begin = v_base + pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, v_stop)
    arg = tl.zeros([BLOCK_N], dtype=tl.int32) + v_begin
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_stop
        z, th = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_hk, stride_w, stride_wk,
            inv_temp, softcap, inv_softcap, HAS_BIAS, SOFTCAP, ACC, DOT_DTYPE, PRECISION,
            BLOCK_N, BLOCK_V, BLOCK_H,
        )
        z_fin = tl.where(col_mask[None, :], z, 0.0)
        z = tl.where(col_mask[None, :], z, ninf)
        tile_max = tl.max(z, 1)
        if WANT_ARGMAX:
            # first maximum: the lowest column of the tile at its max; a later tile wins only if strictly larger
            tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], v_stop), 1)
            arg = tl.where(tile_max > run_max, tile_arg, arg)
        new_max = tl.maximum(run_max, tile_max)
        # shift by the max, or by 0 where it is infinite (as torch.logsumexp): +inf logits give lse = +inf,
        # as in float64, instead of inf - inf = NaN
        shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
        old_shift = tl.where(tl.abs(run_max) == float("inf"), 0.0, run_max)
        scale = tl.where(run_max == ninf, 0.0, tl.exp(old_shift - shift))
        e = tl.exp(z - shift[:, None])
        run_sum = run_sum * scale + tl.sum(e, 1)
        hit = cols[None, :] == tgt[:, None]
        tgt_logit += tl.sum(tl.where(hit, z_fin, 0.0), 1)
        if WANT_EZ:
            ez = ez * scale + tl.sum(e * z_fin, 1)
        if WANT_ZSUM:
            zsum += tl.sum(z_fin, 1)
        if WANT_SQ:
            # sum exp(2 (z - max)) = sum e^2, relative to the square of the sum-exp's shift: no overflow
            sq = sq * (scale * scale) + tl.sum(e * e, 1)
        if WRITE_E:
            # frozen head: the tile of exp(z - tile max) * f for the moments product, the target column
            # left out (the backend adds p_y f_y W_y in fp32, so W_y - M does not cancel when p_y ~ 1)
            pf = e
            if SOFTCAP:
                pf = e * (1.0 - th * th)
            pf = tl.where(hit, 0.0, pf)
            # sum_{v != y} e_v, summed without the target: 1 - p_y = rest / sum with no cancellation
            rest = rest * scale + tl.sum(tl.where(hit, 0.0, e), 1)
            local = cols - v_base
            e_ptrs = e_ptr + rows[:, None].to(tl.int64) * stride_e + local[None, :]
            tl.store(e_ptrs, pf.to(e_ptr.dtype.element_ty), mask=row_mask[:, None])
        if WANT_REF:
            zr, _ = _logits_tile(
                rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, KR, stride_rh, stride_rhk, stride_rw,
                stride_rwk, inv_temp, softcap, inv_softcap, HAS_REF_BIAS, SOFTCAP, ACC, REF_DOT_DTYPE, PRECISION,
                BLOCK_N, BLOCK_V, BLOCK_H,
            )
            zr_fin = tl.where(col_mask[None, :], zr, 0.0)
            zr = tl.where(col_mask[None, :], zr, ninf)
            new_ref_max = tl.maximum(ref_max, tl.max(zr, 1))
            ref_shift = tl.where(tl.abs(new_ref_max) == float("inf"), 0.0, new_ref_max)
            old_ref_shift = tl.where(tl.abs(ref_max) == float("inf"), 0.0, ref_max)
            ref_scale = tl.where(ref_max == ninf, 0.0, tl.exp(old_ref_shift - ref_shift))
            ref_sum = ref_sum * ref_scale + tl.sum(tl.exp(zr - ref_shift[:, None]), 1)
            ref_max = new_ref_max
            ref_tgt += tl.sum(tl.where(hit, zr_fin, 0.0), 1)
            if WANT_EZR:
                ezr = ezr * scale + tl.sum(e * zr_fin, 1)
        run_max = new_max

    out = pid_s * n + rows
    tl.store(max_ptr + out, run_max, mask=row_mask)
    tl.store(sum_ptr + out, run_sum, mask=row_mask)
    tl.store(tgt_ptr + out, tgt_logit, mask=row_mask)
    if WANT_EZ:
        tl.store(ez_ptr + out, ez, mask=row_mask)
    if WANT_ZSUM:
        tl.store(zsum_ptr + out, zsum, mask=row_mask)
    if WANT_ARGMAX:
        tl.store(arg_ptr + out, arg, mask=row_mask)
    if WANT_SQ:
        tl.store(sq_ptr + out, sq, mask=row_mask)
    if WRITE_E:
        tl.store(rest_ptr + out, rest, mask=row_mask)
    if WANT_REF:
        tl.store(rmax_ptr + out, ref_max, mask=row_mask)
        tl.store(rsum_ptr + out, ref_sum, mask=row_mask)
        tl.store(rtgt_ptr + out, ref_tgt, mask=row_mask)
    if WANT_EZR:
        tl.store(ezr_ptr + out, ezr, mask=row_mask)


def default_split(n: int, vocab: int, blocks: Blocks, device: torch.device) -> int:
    """Vocabulary splits: enough programs to fill the GPU, and co-scheduled programs sharing hidden rows."""
    if INTERPRET or device.type != "cuda":
        return 1
    return split_for(n, vocab, blocks, torch.cuda.get_device_properties(device).multi_processor_count)


def split_for(n: int, vocab: int, blocks: Blocks, sms: int) -> int:
    """:func:`default_split` for a GPU with ``sms`` multiprocessors (also what the IO model calls)."""
    tiles = triton.cdiv(vocab, blocks.block_v)
    token_blocks = triton.cdiv(max(n, 1), blocks.block_n)
    want = max(8, triton.cdiv(2 * sms, token_blocks))
    return max(1, min(want, tiles // 4 if tiles >= 4 else 1))


#: Lower bound, in bytes, on the frozen head's probability chunk ``[n, width]`` (and on the backward's
#: logit-gradient chunk); see :func:`chunk_width` for the other bound.
CHUNK_BYTES = 32 * 2**20
#: Chunks are at least this many times H columns wide: each chunk costs one fp32 read+write of the
#: ``[n, H]`` accumulator (``d hidden`` or the moments), so with width >= 2H that traffic stays below
#: half of the chunk buffer's own (``n * width`` low-precision values written once and read once).
WIDTH_PER_HIDDEN = 2


def chunk_width(n: int, vocab: int, hidden_size: int, item: int, block_v: int) -> int:
    """Vocabulary columns per chunk: ``max(CHUNK_BYTES / (n * item), WIDTH_PER_HIDDEN * H)``, a multiple of
    the tile, at most the (tile-rounded) vocabulary. The buffer is then at most ``WIDTH_PER_HIDDEN`` times
    the size of hidden (or :data:`CHUNK_BYTES`)."""
    width = max(CHUNK_BYTES // max(1, n * item), WIDTH_PER_HIDDEN * hidden_size)
    width = max(block_v, width // block_v * block_v)
    return min(width, triton.cdiv(vocab, block_v) * block_v)


def _has_addmm_out_dtype() -> bool:
    return "dtype_out" in torch.ops.aten.addmm.overloads()


#: ``torch.addmm(..., out_dtype=torch.float32)``: a low-precision product accumulated straight into an
#: fp32 tensor by cuBLAS (CUDA only; torch 2.11 has it, CPU kernels of it do not exist). Set to False
#: the first time a call is rejected (a release may list the overload and still refuse its dtypes).
ADDMM_OUT_DTYPE = _has_addmm_out_dtype()
#: Why this process stopped using ``out_dtype`` (the rejection's message), or None.
ADDMM_OUT_DTYPE_REJECTED: Optional[str] = None


def _addmm_out_dtype_applies(acc: torch.Tensor) -> bool:
    return ADDMM_OUT_DTYPE and acc.is_cuda and acc.dtype == torch.float32


def _addmm_fp32_out(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> bool:
    """``acc += a @ b`` by cuBLAS into fp32; False (``acc`` untouched) when torch rejects the call:
    argument checks run before anything is written."""
    global ADDMM_OUT_DTYPE, ADDMM_OUT_DTYPE_REJECTED
    try:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
        return True
    except (RuntimeError, TypeError, NotImplementedError) as exc:
        ADDMM_OUT_DTYPE, ADDMM_OUT_DTYPE_REJECTED = False, f"{type(exc).__name__}: {exc}".splitlines()[0]
        return False


def accumulate_product(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor, rows_per_product: int) -> None:
    """``acc += a @ b`` with ``acc`` fp32/fp64 and ``a``, ``b`` of one dtype, accumulating in ``acc``'s dtype.

    Same dtypes: ``addmm_``. bf16/fp16 operands on CUDA: cuBLAS writes the fp32 sum itself
    (``out_dtype``), no temporary and no low-precision rounding of the partial product. Elsewhere, or
    once torch has rejected ``out_dtype``: the product in the operands' dtype, ``rows_per_product`` rows
    at a time (a bounded temporary), then added.
    """
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
        return
    if _addmm_out_dtype_applies(acc) and _addmm_fp32_out(acc, a, b):
        return
    for t0 in range(0, a.shape[0], rows_per_product):
        t1 = min(t0 + rows_per_product, a.shape[0])
        acc[t0:t1] += a[t0:t1] @ b


def product_rows(budget_bytes: int, width: int, item: int) -> int:
    """Rows per fallback product of :func:`accumulate_product` within ``budget_bytes``: a multiple of 128
    when large (tensor-core friendly)."""
    rows = max(1, budget_bytes // max(1, width * item))
    return rows // 128 * 128 if rows >= 256 else rows


def forward_grid(n: int, split: int, blocks: Blocks, grouped: bool):
    """The forward kernel's grid: ``(split, token blocks)``, or 1-D in grouped order (``grouped``)."""
    token_blocks = triton.cdiv(n, blocks.block_n)
    return (split * token_blocks,) if grouped else (split, token_blocks)


def _launch(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, parts, v_base, v_stop, split,
            tiles_per_split, blocks, temperature, softcap, e=None):
    """One launch of ``_fwd_kernel`` over vocabulary ``[v_base, v_stop)`` writing ``split`` partials
    (grouped order when it writes the probability tiles ``e``: one tile per program)."""
    n, hidden_size = hidden.shape
    want_ref = ref_hidden is not None
    dummy = parts["sum"]
    grouped = e is not None

    def ptr(name):
        return parts[name] if parts.get(name) is not None else dummy

    _fwd_kernel[forward_grid(n, split, blocks, grouped)](
        hidden, weight, bias if bias is not None else dummy, targets,
        ref_hidden if want_ref else dummy, ref_weight if want_ref else dummy,
        ref_bias if ref_bias is not None else dummy,
        ptr("max"), ptr("sum"), ptr("tgt"), ptr("ez"), ptr("zsum"), ptr("arg"), ptr("sq"), ptr("rest"), ptr("rmax"),
        ptr("rsum"), ptr("rtgt"), ptr("ezr"), e if e is not None else dummy,
        n, v_base, v_stop, hidden_size, ref_hidden.shape[1] if want_ref else 0,
        *hidden.stride(), *weight.stride(),
        *(ref_hidden.stride() if want_ref else (0, 0)), *(ref_weight.stride() if want_ref else (0, 0)),
        e.stride(0) if e is not None else 0, tiles_per_split, split,
        1.0 / temperature, float(softcap or 1.0), 1.0 / float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, SOFTCAP=softcap is not None,
        WANT_EZ="ez" in parts, WANT_ZSUM="zsum" in parts, WANT_ARGMAX="arg" in parts, WANT_SQ="sq" in parts,
        WANT_REF=want_ref,
        WANT_EZR="ezr" in parts, WRITE_E=e is not None, ACC=_acc_dtype(hidden.dtype),
        DOT_DTYPE=_dot_dtype(hidden, weight),
        REF_DOT_DTYPE=_dot_dtype(ref_hidden, ref_weight) if want_ref else None,
        PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
        GROUP_N=blocks.group_n if grouped else 0, num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )


def _shift(row_max: torch.Tensor) -> torch.Tensor:
    """What sums of exponentials are relative to: the max, or 0 where it is infinite (the kernel's rule)."""
    return torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)


def _rescale(old_max: torch.Tensor, new_max: torch.Tensor) -> torch.Tensor:
    """Factor taking a sum relative to ``_shift(old_max)`` to one relative to ``_shift(new_max)``."""
    factor = torch.exp(_shift(old_max) - _shift(new_max))
    return torch.where(old_max == float("-inf"), torch.zeros_like(factor), factor)


def _reduce(parts: dict) -> dict:
    """Merge ``[S, n]`` partials (each relative to its own max) into ``[1, n]`` partials of the same form."""
    gmax = parts["max"].amax(0, keepdim=True)
    w = _rescale(parts["max"], gmax)
    out = {"max": gmax, "sum": (parts["sum"] * w).sum(0, keepdim=True), "tgt": parts["tgt"].sum(0, keepdim=True)}
    for name in ("ez", "ezr", "rest"):
        if name in parts:
            out[name] = (parts[name] * w).sum(0, keepdim=True)
    if "sq" in parts:  # a sum of squared exponentials: its factor is the square
        out["sq"] = (parts["sq"] * (w * w)).sum(0, keepdim=True)
    if "zsum" in parts:
        out["zsum"] = parts["zsum"].sum(0, keepdim=True)
    if "arg" in parts:
        # the first split (lowest columns) whose maximum is the global one holds the first maximum
        first = (parts["max"] == gmax).to(torch.int8).argmax(0, keepdim=True)
        out["arg"] = parts["arg"].gather(0, first)
    if "rmax" in parts:
        rmax = parts["rmax"].amax(0, keepdim=True)
        out["rmax"] = rmax
        out["rsum"] = (parts["rsum"] * _rescale(parts["rmax"], rmax)).sum(0, keepdim=True)
        out["rtgt"] = parts["rtgt"].sum(0, keepdim=True)
    return out


def _finish(parts: dict, mean_logit: bool) -> StreamStats:
    p = {k: v.squeeze(0) for k, v in _reduce(parts).items()}
    stats = StreamStats(lse=_shift(p["max"]) + torch.log(p["sum"]), target_logit=p["tgt"])
    if mean_logit:
        stats.mean_logit = p["ez"] / p["sum"]
    stats.logit_sum = p.get("zsum")
    if "arg" in p:
        stats.argmax = p["arg"].long()
    if "rest" in p:
        stats.rest_mass = p["rest"] / p["sum"]
    if "sq" in p:
        stats.log_sum_sq_probs = torch.log(p["sq"]) - 2 * torch.log(p["sum"])
    if "rmax" in p:
        stats.ref_lse = _shift(p["rmax"]) + torch.log(p["rsum"])
        stats.ref_target_logit = p["rtgt"]
    if "ezr" in p:
        stats.mean_ref_logit = p["ezr"] / p["sum"]
    return stats


def forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    mean_logit: bool = False,
    logit_sum: bool = False,
    mean_ref_logit: bool = False,
    argmax: bool = False,
    log_sum_sq_probs: bool = False,
    moments: bool = False,
    split: Optional[int] = None,
    blocks: Optional[Blocks] = None,
) -> StreamStats:
    """Launch the forward kernel and merge its vocabulary splits.

    ``hidden [n, H]``, ``weight [V, H]``, ``targets [n]`` (valid indices), optional ``bias [V]`` and
    reference head (``ref_hidden [n, H']``, ``ref_weight [V, H']``, ``ref_bias``). Statistics are fp32,
    or fp64 for fp64 ``hidden``; ``argmax`` is the first index of the largest logit;
    ``log_sum_sq_probs`` is ``log sum_v p_v^2``.

    ``moments`` (frozen head): also ``M' = sum_{v != y} p_v f_v W_v`` (the target's own term left out,
    see :func:`frozen_moments`); ``split`` is then ignored.
    """
    _check_device(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
    targets = targets.contiguous()
    bias = None if bias is None else bias.contiguous()
    ref_bias = None if ref_bias is None else ref_bias.contiguous()
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    want_ref = ref_hidden is not None
    if mean_ref_logit and not want_ref:
        raise ValueError("mean_ref_logit needs the reference head")
    dtype = compute_dtype(hidden.dtype)
    dev = hidden.device
    extras = softcap is not None or mean_logit or logit_sum or argmax or mean_ref_logit or log_sum_sq_probs
    blocks = blocks or forward_blocks(n, vocab, hidden_size, hidden.dtype, ref=want_ref, extras=extras,
                                      write_e=moments)

    def new_parts(count):
        def part():
            return torch.empty(count, n, dtype=dtype, device=dev)

        parts = {"max": part(), "sum": part(), "tgt": part()}
        if mean_logit or mean_ref_logit:
            parts["ez"] = part()
        if logit_sum:
            parts["zsum"] = part()
        if argmax:
            parts["arg"] = torch.empty(count, n, dtype=torch.int32, device=dev)
        if log_sum_sq_probs:
            parts["sq"] = part()
        if want_ref:
            parts.update(rmax=part(), rsum=part(), rtgt=part())
        if mean_ref_logit:
            parts["ezr"] = part()
        return parts

    args = (hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
    if moments:
        return frozen_moments(*args, new_parts, blocks, temperature, softcap, mean_logit)

    tiles = triton.cdiv(vocab, blocks.block_v)
    split = max(1, min(split or default_split(n, vocab, blocks, dev), tiles))
    tiles_per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, tiles_per_split)  # every split owns at least one tile
    parts = new_parts(split)
    if n > 0:
        _launch(*args, parts, 0, vocab, split, tiles_per_split, blocks, temperature, softcap)
    return _finish(parts, mean_logit)


def frozen_moments(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, new_parts, blocks, temperature,
                   softcap, mean_logit) -> StreamStats:
    """Frozen head: the forward statistics and ``M' = sum_{v != y} p_v f_v W_v``, two products in all.

    Vocabulary chunk by chunk (:func:`chunk_width`): the kernel, one program per (token block, tile),
    computes the logits tile, its partial statistics and ``E = exp(z - tile max) * f`` (target column
    zeroed) into an ``[n, width]`` buffer in the product dtype. Each tile is rescaled to the running
    maximum of its token (an elementwise pass over the buffer), and cuBLAS accumulates
    ``M <- M * exp(m_old - m_new) + E @ W_chunk`` into an fp32 ``[n, H]`` tensor. Traffic per call: the
    buffer written, rescaled and read (about ``4 n V`` element accesses), plus one fp32 read+write of
    ``M`` per chunk; no per-tile read-modify-write of ``M``, and no split limit on the parallelism.
    """
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    dev = hidden.device
    # the product runs in the dtype of hidden, like the torch backend's (the head is cast chunk by chunk)
    mm_dtype = hidden.dtype
    item = torch.empty((), dtype=mm_dtype).element_size()
    width = chunk_width(n, vocab, hidden_size, item, blocks.block_v)
    moment = torch.zeros(n, hidden_size, dtype=dtype, device=dev)
    run_max = torch.full((n,), float("-inf"), dtype=dtype, device=dev)
    chunks = []
    if n > 0:
        buffer = torch.empty(n, width, dtype=mm_dtype, device=dev)
        rows = product_rows(CHUNK_BYTES, hidden_size, 4)
        for v0 in range(0, vocab, width):
            v1 = min(v0 + width, vocab)
            count = triton.cdiv(v1 - v0, blocks.block_v)
            parts = new_parts(count)
            parts["rest"] = torch.empty_like(parts["sum"])
            e = buffer[:, : count * blocks.block_v]
            _launch(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, parts, v0, v1, count, 1, blocks,
                    temperature, softcap, e)
            new_max = torch.maximum(run_max, parts["max"].amax(0))
            # tile t of E is relative to its own max; bring every tile to the token's running max
            factor = _rescale(parts["max"], new_max)
            e.view(n, count, blocks.block_v).mul_(factor.T.unsqueeze(-1))
            moment.mul_(_rescale(run_max, new_max).unsqueeze(1))
            accumulate_product(moment, e[:, : v1 - v0], weight[v0:v1].to(mm_dtype), rows)
            run_max = new_max
            chunks.append(_reduce(parts))
    parts = {k: torch.cat([c[k] for c in chunks]) for k in chunks[0]} if chunks else new_parts(1)
    if not chunks:
        parts["rest"] = torch.empty_like(parts["sum"])
        for k in ("sum", "tgt", "rest"):
            parts[k].zero_()
        parts["max"].fill_(float("-inf"))
    stats = _finish(parts, mean_logit)
    # M was accumulated relative to run_max = the global max; the sum-exp relative to the same max:
    if n > 0:
        moment.div_(torch.exp(stats.lse - _shift(run_max)).unsqueeze(1))
    stats.moments = moment
    return stats


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
    lse_ptr, a_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, ds_ptr,
    n, V, K, KR, v_begin, width, stride_h, stride_hk, stride_w, stride_wk, stride_rh, stride_rhk, stride_rw,
    stride_rwk, stride_ds,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_C1: tl.constexpr, HAS_C2: tl.constexpr, HAS_C3: tl.constexpr,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, REF_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    pid_n, pid_v = _grouped_program(tl.program_id(0), n, tl.cdiv(width, BLOCK_V), BLOCK_N, GROUP_N)

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_mask = (local < width) & (cols < V)

    z, th = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_hk, stride_w, stride_wk,
        inv_temp, softcap, inv_softcap, HAS_BIAS, SOFTCAP, ACC, DOT_DTYPE, PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H,
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    inner = tl.load(c0_ptr + rows, mask=row_mask, other=0.0)[:, None] + tl.zeros([BLOCK_N, BLOCK_V], ACC)
    if HAS_C1:
        inner += tl.load(c1_ptr + rows, mask=row_mask, other=0.0)[:, None] * z
    if HAS_C2:
        zr, _ = _logits_tile(
            rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, KR, stride_rh, stride_rhk, stride_rw,
            stride_rwk, inv_temp, softcap, inv_softcap, HAS_REF_BIAS, SOFTCAP, ACC, REF_DOT_DTYPE, PRECISION,
            BLOCK_N, BLOCK_V, BLOCK_H,
        )
        inner += tl.load(c2_ptr + rows, mask=row_mask, other=0.0)[:, None] * zr
    g = tl.exp(z - lse[:, None]) * inner
    if HAS_C3:
        g += tl.load(c3_ptr + rows, mask=row_mask, other=0.0)[:, None]
    tgt = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    g += tl.where(cols[None, :] == tgt[:, None], a[:, None], 0.0)
    if SOFTCAP:
        g = g * (1.0 - th * th)
    g = g * inv_temp
    ds_ptrs = ds_ptr + rows[:, None].to(tl.int64) * stride_ds + local[None, :]
    tl.store(ds_ptrs, g.to(ds_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def grad_logits(
    out: torch.Tensor,
    v_begin: int,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    targets: torch.Tensor,
    lse: torch.Tensor,
    a: torch.Tensor,
    c0: torch.Tensor,
    c1: Optional[torch.Tensor] = None,
    c2: Optional[torch.Tensor] = None,
    c3: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ref_hidden: Optional[torch.Tensor] = None,
    ref_weight: Optional[torch.Tensor] = None,
    ref_bias: Optional[torch.Tensor] = None,
    blocks: Optional[Blocks] = None,
) -> torch.Tensor:
    """Write ``ds = d loss / d s`` for vocabulary columns ``[v_begin, v_begin + out.shape[1])`` into ``out``.

    ``out`` is ``[n, width]`` (row stride may exceed ``width``) in the dtype the caller multiplies with.
    ``lse``, ``a``, ``c0..c3`` are ``[n]`` in the compute dtype (see
    :func:`prefopt.ops.common.logit_grad_coefficients`); ``c2`` needs the reference head.
    """
    _check_device(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, out)
    if out.stride(1) != 1:
        raise ValueError("grad_logits: out needs unit stride along its columns")
    if c2 is not None and ref_hidden is None:
        raise ValueError("grad_logits: c2 needs the reference head")
    n, hidden_size = hidden.shape
    width = out.shape[1]
    if n == 0 or width == 0:
        return out
    blocks = blocks or backward_blocks(n, weight.shape[0], hidden_size, hidden.dtype)
    dummy = lse
    want_ref = c2 is not None
    grid = (triton.cdiv(n, blocks.block_n) * triton.cdiv(width, blocks.block_v),)
    _bwd_dlogits_kernel[grid](
        hidden, weight, bias if bias is not None else dummy, targets.contiguous(),
        ref_hidden if want_ref else dummy, ref_weight if want_ref else dummy,
        ref_bias if (want_ref and ref_bias is not None) else dummy,
        lse.contiguous(), a.contiguous(), c0.contiguous(),
        c1.contiguous() if c1 is not None else dummy, c2.contiguous() if c2 is not None else dummy,
        c3.contiguous() if c3 is not None else dummy, out,
        n, weight.shape[0], hidden_size, ref_hidden.shape[1] if want_ref else 0, v_begin, width,
        *hidden.stride(), *weight.stride(),
        *(ref_hidden.stride() if want_ref else (0, 0)), *(ref_weight.stride() if want_ref else (0, 0)), out.stride(0),
        1.0 / temperature, float(softcap or 1.0), 1.0 / float(softcap or 1.0),
        HAS_BIAS=bias is not None, HAS_REF_BIAS=want_ref and ref_bias is not None, SOFTCAP=softcap is not None,
        HAS_C1=c1 is not None, HAS_C2=want_ref, HAS_C3=c3 is not None,
        ACC=_acc_dtype(hidden.dtype), DOT_DTYPE=_dot_dtype(hidden, weight),
        REF_DOT_DTYPE=_dot_dtype(ref_hidden, ref_weight) if want_ref else None,
        PRECISION=_dot_precision(hidden.dtype),
        BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h, GROUP_N=blocks.group_n,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )
    return out
