"""Triton kernels of the fused op ``linear -> per-token statistics`` (forward and backward side by side).

Notation as in :mod:`prefopt.ops.common`: ``s = h . W_v + b_v``, ``z = softcap(s) / temperature``,
``lse = log sum_v exp(z_v)``, ``p = exp(z - lse)``.

Forward, :func:`forward` / ``_fwd_kernel``
    Grid ``(SPLIT_V, cdiv(n, BLOCK_N))``: program ``(s, i)`` owns token block ``i`` and the ``s``-th
    contiguous range of vocabulary tiles. It walks its tiles once; each logits tile is
    ``tl.dot(hidden_block, weight_tile^T)`` over ``BLOCK_H`` slices of H with an fp32 accumulator
    (fp64 for fp64 inputs), then bias, softcap and ``1/temperature`` are applied in registers, padded
    columns are set to -inf, and an online (max, sum-exp) is updated. On request the same loop
    accumulates ``sum e*z`` (entropy, KL), ``sum z`` (uniform NLL, mean logit), the first argmax (a
    running max and its lowest column; splits merged by (max, lowest split)), the reference logits of the same
    tile from the reference hidden block (online reference lse, reference target logit, ``sum e*zr``
    for KL) and the target logit. Each program writes one partial per statistic to ``[SPLIT_V, n]``
    buffers; :func:`forward` merges the splits (a log-sum-exp over ``SPLIT_V`` entries per token). The
    split axis is the fastest grid axis so that the programs of one token block run together and share
    its hidden block in L2, and ``SPLIT_V`` fills the GPU when ``n`` is small.

    Frozen-head moments (``MOMENTS``; one split): the loop also accumulates
    ``M = sum_v p_v f_v W_v`` (``f`` the softcap derivative) with flash-attention style rescaling. An
    ``[BLOCK_N, H]`` accumulator does not fit in registers for real H, so ``M`` lives in its fp32
    output buffer: each vocabulary tile does ``M[rows] = M[rows] * scale + (e f) @ W_tile`` slice by
    slice of H (read-modify-write of the program's own rows, no atomics), and the final division by
    the sum-exp happens in the same kernel.

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
    argmax: Optional[torch.Tensor] = None  # int64: first index of max_v z_v


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


def forward_blocks(n: int, vocab: int, hidden_size: int, dtype: torch.dtype, moments: bool = False) -> Blocks:
    """Tile sizes for the forward kernel: H100-sized on GPU, large (fast) tiles under the interpreter."""
    if INTERPRET:
        return Blocks(_pow2(n, 16, 64), _pow2(vocab, 16, 256), _pow2(hidden_size, 16, 128), 1, 1)
    if dtype == torch.float64:
        return Blocks(32, 64, 32, 4, 2)
    if dtype == torch.float32:
        return Blocks(64, 128, 32, 8, 3)
    if moments:
        # the moments loop also streams W_tile slices against an fp32 [BLOCK_N, BLOCK_H] tile
        return Blocks(64, 128, 64, 8, 3)
    return Blocks(64, 128, 64, 8, 4)


def backward_blocks(n: int, vocab: int, hidden_size: int, dtype: torch.dtype) -> Blocks:
    """Tile sizes for the logit-gradient kernel (a matrix product with an elementwise epilogue)."""
    if INTERPRET:
        return Blocks(_pow2(n, 16, 64), _pow2(vocab, 16, 256), _pow2(hidden_size, 16, 128), 1, 1, 8)
    if dtype == torch.float64:
        return Blocks(32, 64, 32, 4, 2, 8)
    if dtype == torch.float32:
        return Blocks(128, 128, 32, 8, 3, 8)
    return Blocks(128, 128, 64, 8, 3, 8)


def _dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands: exact fp32 products ("ieee") unless torch itself allows TF32 for matmuls."""
    if dtype == torch.float32 and not INTERPRET and torch.backends.cuda.matmul.allow_tf32:
        return "tf32"
    return "ieee"


def _dot_dtype(x: torch.Tensor, w: torch.Tensor):
    """What ``tl.dot`` operands are cast to: nothing when both sides share a dtype the hardware
    multiplies (bf16/fp16 on tensor cores with fp32 accumulation, fp32, fp64); the wider of the two
    for mixed inputs; fp32 for bf16/fp16 under the interpreter, whose low-precision dot is unreliable."""
    wide = {torch.float64: tl.float64, torch.float32: tl.float32}
    if x.dtype == w.dtype and (x.dtype in wide or not INTERPRET):
        return None
    if torch.float64 in (x.dtype, w.dtype):
        return tl.float64
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


def _rows(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """2-D with unit stride along the last dim (what the kernels index)."""
    if t is None:
        return None
    return t if t.stride(-1) == 1 else t.contiguous()


# --------------------------------------------------------------------------------------------------
# shared tile helper
# --------------------------------------------------------------------------------------------------


@triton.jit
def _logits_tile(
    x_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_x, stride_w,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """z = softcap(x[rows] @ w[cols]^T + b[cols]) * inv_temp, and tanh(s / cap) (or s) for f = 1 - tanh^2."""
    # fp64 operands (mixed-dtype inputs with one fp64 side) need an fp64 accumulator
    TILE_ACC: tl.constexpr = tl.float64 if DOT_DTYPE == tl.float64 else ACC
    acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=TILE_ACC)
    ks = tl.arange(0, BLOCK_H)
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    for k0 in range(0, K, BLOCK_H):
        k_mask = (k0 + ks) < K
        x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        if DOT_DTYPE is not None:
            x = x.to(DOT_DTYPE)
            w = w.to(DOT_DTYPE)
        acc = tl.dot(x, w, acc, input_precision=PRECISION, out_dtype=TILE_ACC)
        x_ptrs += BLOCK_H
        w_ptrs += BLOCK_H
    s = acc.to(ACC)
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
def _fwd_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
    max_ptr, sum_ptr, tgt_ptr, ez_ptr, zsum_ptr, arg_ptr, rmax_ptr, rsum_ptr, rtgt_ptr, ezr_ptr, m_ptr,
    n, V, K, KR, stride_h, stride_w, stride_rh, stride_rw, stride_m, tiles_per_split,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    WANT_EZ: tl.constexpr, WANT_ZSUM: tl.constexpr, WANT_ARGMAX: tl.constexpr, WANT_REF: tl.constexpr,
    WANT_EZR: tl.constexpr, MOMENTS: tl.constexpr, ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, REF_DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
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
    ref_max = tl.full([BLOCK_N], ninf, dtype=ACC)
    ref_sum = tl.zeros([BLOCK_N], dtype=ACC)
    ref_tgt = tl.zeros([BLOCK_N], dtype=ACC)
    ezr = tl.zeros([BLOCK_N], dtype=ACC)

    v_begin = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    arg = tl.zeros([BLOCK_N], dtype=tl.int32) + v_begin
    for v0 in range(v_begin, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < V
        z, th = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_w,
            inv_temp, softcap, inv_softcap, HAS_BIAS, SOFTCAP, ACC, DOT_DTYPE, PRECISION,
            BLOCK_N, BLOCK_V, BLOCK_H,
        )
        z_fin = tl.where(col_mask[None, :], z, 0.0)
        z = tl.where(col_mask[None, :], z, ninf)
        tile_max = tl.max(z, 1)
        if WANT_ARGMAX:
            # first maximum: the lowest column of the tile at its max; a later tile wins only if strictly larger
            tile_arg = tl.min(tl.where(z == tile_max[:, None], cols[None, :], V), 1)
            arg = tl.where(tile_max > run_max, tile_arg, arg)
        new_max = tl.maximum(run_max, tile_max)
        scale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * scale + tl.sum(e, 1)
        hit = cols[None, :] == tgt[:, None]
        tgt_logit += tl.sum(tl.where(hit, z_fin, 0.0), 1)
        if WANT_EZ:
            ez = ez * scale + tl.sum(e * z_fin, 1)
        if WANT_ZSUM:
            zsum += tl.sum(z_fin, 1)
        if MOMENTS:
            pf = e
            if SOFTCAP:
                pf = e * (1.0 - th * th)
            # p f rounded to the head's dtype, as the matrix product of the torch backend does
            pf = pf.to(w_ptr.dtype.element_ty)
            if DOT_DTYPE is not None:
                pf = pf.to(DOT_DTYPE)
            hs = tl.arange(0, BLOCK_H)
            for h0 in range(0, K, BLOCK_H):
                h_mask = (h0 + hs) < K
                w = tl.load(
                    w_ptr + cols[:, None].to(tl.int64) * stride_w + (h0 + hs)[None, :],
                    mask=col_mask[:, None] & h_mask[None, :], other=0.0,
                )
                if DOT_DTYPE is not None:
                    w = w.to(DOT_DTYPE)
                m_ptrs = m_ptr + rows[:, None].to(tl.int64) * stride_m + (h0 + hs)[None, :]
                m_mask = row_mask[:, None] & h_mask[None, :]
                acc = tl.load(m_ptrs, mask=m_mask, other=0.0) * scale[:, None]
                if DOT_DTYPE == tl.float64:
                    acc += tl.dot(pf, w, input_precision=PRECISION, out_dtype=tl.float64).to(ACC)
                else:
                    acc = tl.dot(pf, w, acc, input_precision=PRECISION, out_dtype=ACC)
                tl.store(m_ptrs, acc, mask=m_mask)
        if WANT_REF:
            zr, _ = _logits_tile(
                rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, KR, stride_rh, stride_rw,
                inv_temp, softcap, inv_softcap, HAS_REF_BIAS, SOFTCAP, ACC, REF_DOT_DTYPE, PRECISION,
                BLOCK_N, BLOCK_V, BLOCK_H,
            )
            zr_fin = tl.where(col_mask[None, :], zr, 0.0)
            zr = tl.where(col_mask[None, :], zr, ninf)
            new_ref_max = tl.maximum(ref_max, tl.max(zr, 1))
            ref_sum = ref_sum * tl.exp(ref_max - new_ref_max) + tl.sum(tl.exp(zr - new_ref_max[:, None]), 1)
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
    if WANT_REF:
        tl.store(rmax_ptr + out, ref_max, mask=row_mask)
        tl.store(rsum_ptr + out, ref_sum, mask=row_mask)
        tl.store(rtgt_ptr + out, ref_tgt, mask=row_mask)
    if WANT_EZR:
        tl.store(ezr_ptr + out, ezr, mask=row_mask)
    if MOMENTS:
        # the kernel owns every column of its rows (one split): finish M = sum p f W here
        inv_sum = 1.0 / run_sum
        hs = tl.arange(0, BLOCK_H)
        for h0 in range(0, K, BLOCK_H):
            h_mask = (h0 + hs) < K
            m_ptrs = m_ptr + rows[:, None].to(tl.int64) * stride_m + (h0 + hs)[None, :]
            m_mask = row_mask[:, None] & h_mask[None, :]
            tl.store(m_ptrs, tl.load(m_ptrs, mask=m_mask, other=0.0) * inv_sum[:, None], mask=m_mask)


def default_split(n: int, vocab: int, blocks: Blocks, device: torch.device) -> int:
    """Vocabulary splits: enough programs to fill the GPU, and co-scheduled programs sharing hidden rows."""
    tiles = triton.cdiv(vocab, blocks.block_v)
    if INTERPRET or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    token_blocks = triton.cdiv(max(n, 1), blocks.block_n)
    want = max(8, triton.cdiv(2 * sms, token_blocks))
    return max(1, min(want, tiles // 4 if tiles >= 4 else 1))


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
    moments: bool = False,
    split: Optional[int] = None,
    blocks: Optional[Blocks] = None,
) -> StreamStats:
    """Launch the forward kernel and merge its vocabulary splits.

    ``hidden [n, H]``, ``weight [V, H]``, ``targets [n]`` (valid indices), optional ``bias [V]`` and
    reference head (``ref_hidden [n, H']``, ``ref_weight [V, H']``, ``ref_bias``). Statistics are fp32,
    or fp64 for fp64 ``hidden``. ``moments`` (frozen head) forces a single split.
    """
    _check_device(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias)
    hidden, weight, ref_hidden, ref_weight = _rows(hidden), _rows(weight), _rows(ref_hidden), _rows(ref_weight)
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
    blocks = blocks or forward_blocks(n, vocab, hidden_size, hidden.dtype, moments)
    tiles = triton.cdiv(vocab, blocks.block_v)
    split = 1 if moments else (split or default_split(n, vocab, blocks, dev))
    split = max(1, min(split, tiles))
    tiles_per_split = triton.cdiv(tiles, split)
    split = triton.cdiv(tiles, tiles_per_split)  # every split owns at least one tile

    def part():
        return torch.empty(split, n, dtype=dtype, device=dev)

    pmax, psum, ptgt = part(), part(), part()
    pez = part() if (mean_logit or mean_ref_logit) else None
    pzsum = part() if logit_sum else None
    parg = torch.empty(split, n, dtype=torch.int32, device=dev) if argmax else None
    prmax, prsum, prtgt = (part(), part(), part()) if want_ref else (None, None, None)
    pezr = part() if mean_ref_logit else None
    m = torch.zeros(n, hidden_size, dtype=dtype, device=dev) if moments else None

    if n > 0:
        dummy = psum
        grid = (split, triton.cdiv(n, blocks.block_n))
        _fwd_kernel[grid](
            hidden, weight, bias if bias is not None else dummy, targets,
            ref_hidden if want_ref else dummy, ref_weight if want_ref else dummy,
            ref_bias if ref_bias is not None else dummy,
            pmax, psum, ptgt, pez if pez is not None else dummy, pzsum if pzsum is not None else dummy,
            parg if argmax else dummy,
            prmax if want_ref else dummy, prsum if want_ref else dummy, prtgt if want_ref else dummy,
            pezr if pezr is not None else dummy, m if moments else dummy,
            n, vocab, hidden_size, ref_hidden.shape[1] if want_ref else 0,
            hidden.stride(0), weight.stride(0),
            ref_hidden.stride(0) if want_ref else 0, ref_weight.stride(0) if want_ref else 0,
            hidden_size if moments else 0, tiles_per_split,
            1.0 / temperature, float(softcap or 1.0), 1.0 / float(softcap or 1.0),
            HAS_BIAS=bias is not None, HAS_REF_BIAS=ref_bias is not None, SOFTCAP=softcap is not None,
            WANT_EZ=pez is not None, WANT_ZSUM=logit_sum, WANT_ARGMAX=argmax, WANT_REF=want_ref, WANT_EZR=mean_ref_logit,
            MOMENTS=moments, ACC=_acc_dtype(hidden.dtype), DOT_DTYPE=_dot_dtype(hidden, weight),
            REF_DOT_DTYPE=_dot_dtype(ref_hidden, ref_weight) if want_ref else None,
            PRECISION=_dot_precision(hidden.dtype),
            BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
            num_warps=blocks.num_warps, num_stages=blocks.num_stages,
        )

    # merge the splits: log-sum-exp of (max, sum) pairs; sums of exp-weighted moments rescaled alike
    gmax = pmax.amax(0)
    w = torch.exp(pmax - gmax)
    total = (psum * w).sum(0)
    stats = StreamStats(lse=gmax + torch.log(total), target_logit=ptgt.sum(0))
    if pez is not None:
        ez = (pez * w).sum(0) / total
        stats.mean_logit = ez if mean_logit else None
    if pzsum is not None:
        stats.logit_sum = pzsum.sum(0)
    if argmax:
        # the first split (lowest columns) whose maximum is the global one holds the first maximum
        first = (pmax == gmax).to(torch.int8).argmax(0, keepdim=True)
        stats.argmax = parg.gather(0, first).squeeze(0).long()
    if want_ref:
        rmax = prmax.amax(0)
        stats.ref_lse = rmax + torch.log((prsum * torch.exp(prmax - rmax)).sum(0))
        stats.ref_target_logit = prtgt.sum(0)
    if pezr is not None:
        stats.mean_ref_logit = (pezr * w).sum(0) / total
    stats.moments = m
    return stats


# --------------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------------


@triton.jit
def _bwd_dlogits_kernel(
    h_ptr, w_ptr, b_ptr, t_ptr, rh_ptr, rw_ptr, rb_ptr,
    lse_ptr, a_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr, ds_ptr,
    n, V, K, KR, v_begin, width, stride_h, stride_w, stride_rh, stride_rw, stride_ds,
    inv_temp, softcap, inv_softcap,
    HAS_BIAS: tl.constexpr, HAS_REF_BIAS: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_C1: tl.constexpr, HAS_C2: tl.constexpr, HAS_C3: tl.constexpr,
    ACC: tl.constexpr, DOT_DTYPE: tl.constexpr, REF_DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, GROUP_N: tl.constexpr,
):
    # grouped order: GROUP_N token blocks sweep the chunk's vocab tiles together (L2 reuse of W tiles)
    pid = tl.program_id(0)
    num_n = tl.cdiv(n, BLOCK_N)
    num_v = tl.cdiv(width, BLOCK_V)
    per_group = GROUP_N * num_v
    first_n = (pid // per_group) * GROUP_N
    group_size = tl.minimum(num_n - first_n, GROUP_N)
    pid_n = first_n + (pid % per_group) % group_size
    pid_v = (pid % per_group) // group_size

    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    local = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    cols = v_begin + local
    col_mask = (local < width) & (cols < V)

    z, th = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_mask, col_mask, K, stride_h, stride_w,
        inv_temp, softcap, inv_softcap, HAS_BIAS, SOFTCAP, ACC, DOT_DTYPE, PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_H,
    )
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    inner = tl.load(c0_ptr + rows, mask=row_mask, other=0.0)[:, None] + tl.zeros([BLOCK_N, BLOCK_V], ACC)
    if HAS_C1:
        inner += tl.load(c1_ptr + rows, mask=row_mask, other=0.0)[:, None] * z
    if HAS_C2:
        zr, _ = _logits_tile(
            rh_ptr, rw_ptr, rb_ptr, rows, cols, row_mask, col_mask, KR, stride_rh, stride_rw,
            inv_temp, softcap, inv_softcap, HAS_REF_BIAS, SOFTCAP, ACC, REF_DOT_DTYPE, PRECISION,
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
    hidden, weight, ref_hidden, ref_weight = _rows(hidden), _rows(weight), _rows(ref_hidden), _rows(ref_weight)
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
        hidden.stride(0), weight.stride(0),
        ref_hidden.stride(0) if want_ref else 0, ref_weight.stride(0) if want_ref else 0, out.stride(0),
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
