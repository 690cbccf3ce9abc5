"""Triton kernels of the fused-gradient path: a materialised logits tile's statistics, then its gradient in place.

Notation as in :mod:`prefopt.ops.common`: ``s`` the raw logits (``hidden @ W^T + b``, a ``[T, V]`` tile
formed by a cuBLAS product), ``z = softcap(s) / temperature``, ``lse = log sum_v exp(z_v)``,
``p = exp(z - lse)``; ``zr`` the reference's, from its own raw tile.

Forward, :func:`tile_stats` / ``_stats_kernel``
    One program per block of ``BLOCK_N`` rows walks the tile's columns once with an online
    (max, sum-exp): ``lse``, the target logit, and on request ``E_p[z]``, ``sum_v z``, the reference's
    ``lse``, target logit and ``E_p[zr]``. The tile is only read.

Backward, :func:`tile_grad_` / ``_grad_kernel``
    Once the objective has turned those statistics into the per-token scalars of
    ``dz = a*onehot + p*(c0 + c1*z + c2*zr) + c3``, one program per ``[BLOCK_N, BLOCK_V]`` block reads
    ``s`` (and ``sr``), forms ``ds = dz * (1 - tanh(s/cap)^2) / temperature`` and writes it over ``s``: the
    tile becomes the gradient on the raw logits, which cuBLAS then applies to the head (d hidden) and to
    the hidden states (d weight). No product runs in these kernels, so there is no ``tl.dot`` (nothing
    that the interpreter's bf16 would spoil): the tile is fp32 (fp64 for fp64 inputs).
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _capped(s, inv_temp, softcap, inv_softcap, SOFTCAP: tl.constexpr):
    """z = softcap(s) / temperature and tanh(s / cap) (or s) for the derivative 1 - tanh^2."""
    th = s
    if SOFTCAP:
        # tanh(u) = sign(u) (1 - e) / (1 + e), e = exp(-2|u|): no overflow, no libdevice needed
        u = s * inv_softcap
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        th = tl.where(u < 0, -th, th)
        s = th * softcap
    return s * inv_temp, th


@triton.jit
def _finite_or_zero(x):
    return tl.where((x == float("inf")) | (x == float("-inf")), 0.0, x)


@triton.jit
def _stats_kernel(
    s_ptr, sr_ptr, t_ptr, lse_ptr, tgt_ptr, mean_ptr, sum_ptr, rlse_ptr, rtgt_ptr, rmean_ptr,
    n, V, stride_s, stride_sr, inv_temp, softcap, inv_softcap,
    SOFTCAP: tl.constexpr, REF: tl.constexpr, MEAN: tl.constexpr, SUM: tl.constexpr, REF_MEAN: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n
    zero = tl.zeros([BLOCK_N], ACC)
    run_max = zero - float("inf")
    run_sum, e_z, z_sum, e_zr = zero, zero, zero, zero
    ref_max, ref_sum = zero - float("inf"), zero
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        mask = row_mask[:, None] & (cols < V)[None, :]
        s = tl.load(s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :], mask=mask, other=0.0).to(ACC)
        z, _ = _capped(s, inv_temp, softcap, inv_softcap, SOFTCAP)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(z, 1))
        shift = _finite_or_zero(new_max)
        # nothing accumulated yet (run_max = -inf): scale 0, whatever the new max
        scale = tl.where(run_max == float("-inf"), 0.0, tl.exp(_finite_or_zero(run_max) - shift))
        e = tl.exp(z - shift[:, None])
        run_sum = run_sum * scale + tl.sum(e, 1)
        z_live = tl.where(mask, z, 0.0)
        if MEAN:
            e_z = e_z * scale + tl.sum(e * z_live, 1)
        if SUM:
            z_sum += tl.sum(z_live, 1)
        if REF:
            sr = tl.load(sr_ptr + rows[:, None].to(tl.int64) * stride_sr + cols[None, :], mask=mask, other=0.0)
            zr, _ = _capped(sr.to(ACC), inv_temp, softcap, inv_softcap, SOFTCAP)
            zr = tl.where(mask, zr, float("-inf"))
            new_ref_max = tl.maximum(ref_max, tl.max(zr, 1))
            ref_shift = _finite_or_zero(new_ref_max)
            ref_scale = tl.where(ref_max == float("-inf"), 0.0, tl.exp(_finite_or_zero(ref_max) - ref_shift))
            ref_sum = ref_sum * ref_scale + tl.sum(tl.exp(zr - ref_shift[:, None]), 1)
            ref_max = new_ref_max
            if REF_MEAN:
                e_zr = e_zr * scale + tl.sum(e * tl.where(mask, zr, 0.0), 1)
        run_max = new_max
    tl.store(lse_ptr + rows, _finite_or_zero(run_max) + tl.log(run_sum), mask=row_mask)
    y = tl.load(t_ptr + rows, mask=row_mask, other=0)
    s_y = tl.load(s_ptr + rows.to(tl.int64) * stride_s + y, mask=row_mask, other=0.0).to(ACC)
    z_y, _ = _capped(s_y, inv_temp, softcap, inv_softcap, SOFTCAP)
    tl.store(tgt_ptr + rows, z_y, mask=row_mask)
    if MEAN:
        tl.store(mean_ptr + rows, e_z / run_sum, mask=row_mask)
    if SUM:
        tl.store(sum_ptr + rows, z_sum, mask=row_mask)
    if REF:
        tl.store(rlse_ptr + rows, _finite_or_zero(ref_max) + tl.log(ref_sum), mask=row_mask)
        sr_y = tl.load(sr_ptr + rows.to(tl.int64) * stride_sr + y, mask=row_mask, other=0.0).to(ACC)
        zr_y, _ = _capped(sr_y, inv_temp, softcap, inv_softcap, SOFTCAP)
        tl.store(rtgt_ptr + rows, zr_y, mask=row_mask)
        if REF_MEAN:
            tl.store(rmean_ptr + rows, e_zr / run_sum, mask=row_mask)


@triton.jit
def _grad_kernel(
    s_ptr, sr_ptr, t_ptr, lse_ptr, a_ptr, c0_ptr, c1_ptr, c2_ptr, c3_ptr,
    n, V, stride_s, stride_sr, inv_temp, softcap, inv_softcap,
    SOFTCAP: tl.constexpr, HAS_C1: tl.constexpr, HAS_C2: tl.constexpr, HAS_C3: tl.constexpr,
    ACC: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n
    mask = row_mask[:, None] & (cols < V)[None, :]
    ptrs = s_ptr + rows[:, None].to(tl.int64) * stride_s + cols[None, :]
    s = tl.load(ptrs, mask=mask, other=0.0).to(ACC)
    z, th = _capped(s, inv_temp, softcap, inv_softcap, SOFTCAP)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    inner = tl.load(c0_ptr + rows, mask=row_mask, other=0.0)[:, None] + tl.zeros([BLOCK_N, BLOCK_V], ACC)
    if HAS_C1:
        inner += tl.load(c1_ptr + rows, mask=row_mask, other=0.0)[:, None] * z
    if HAS_C2:
        sr = tl.load(sr_ptr + rows[:, None].to(tl.int64) * stride_sr + cols[None, :], mask=mask, other=0.0)
        zr, _ = _capped(sr.to(ACC), inv_temp, softcap, inv_softcap, SOFTCAP)
        inner += tl.load(c2_ptr + rows, mask=row_mask, other=0.0)[:, None] * zr
    g = tl.exp(z - lse[:, None]) * inner
    if HAS_C3:
        g += tl.load(c3_ptr + rows, mask=row_mask, other=0.0)[:, None]
    y = tl.load(t_ptr + rows, mask=row_mask, other=-1)
    a = tl.load(a_ptr + rows, mask=row_mask, other=0.0)
    g += tl.where(cols[None, :] == y[:, None], a[:, None], 0.0)
    if SOFTCAP:
        g = g * (1.0 - th * th)
    tl.store(ptrs, (g * inv_temp).to(s_ptr.dtype.element_ty), mask=mask)


class TileStats(NamedTuple):
    """Per-row statistics of a tile ([T] each, the tile's dtype; None where not asked for)."""

    lse: torch.Tensor
    target_logit: torch.Tensor
    mean_logit: Optional[torch.Tensor]  # E_p[z]
    logit_sum: Optional[torch.Tensor]  # sum_v z_v
    ref_lse: Optional[torch.Tensor]
    ref_target_logit: Optional[torch.Tensor]
    mean_ref_logit: Optional[torch.Tensor]  # E_p[zr]


#: Rows and columns per program, and warps per program, of both kernels (fp32 tiles: 96 and 80 registers per
#: thread on sm_90, no spills; fp64 tiles take half the columns, as registers hold half the entries).
BLOCK_N, BLOCK_V, NUM_WARPS = 16, 128, 4


def block_v(dtype: torch.dtype) -> int:
    """Columns per program for a tile of ``dtype``."""
    return BLOCK_V // 2 if dtype == torch.float64 else BLOCK_V


def _acc(tile: torch.Tensor):
    if tile.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"live_tile: expected an fp32 or fp64 logits tile, got {tile.dtype}")
    if tile.stride(1) != 1:
        raise ValueError("live_tile: the tile needs unit stride along its columns")
    return tl.float64 if tile.dtype == torch.float64 else tl.float32


def _scales(temperature: float, softcap: Optional[float]):
    return 1.0 / temperature, float(softcap or 1.0), 1.0 / float(softcap or 1.0)


def tile_stats(s: torch.Tensor, targets: torch.Tensor, *, sr: Optional[torch.Tensor] = None, temperature: float = 1.0,
               softcap: Optional[float] = None, mean_logit: bool = False, logit_sum: bool = False,
               mean_ref_logit: bool = False) -> TileStats:
    """The statistics of the raw logits tile ``s`` ``[T, V]`` (and the reference's ``sr``) at ``targets`` ``[T]``."""
    acc = _acc(s)
    n, vocab = s.shape
    new = lambda on=True: torch.empty(n, dtype=s.dtype, device=s.device) if on else None  # noqa: E731
    out = TileStats(new(), new(), new(mean_logit), new(logit_sum), new(sr is not None), new(sr is not None),
                    new(mean_ref_logit and sr is not None))
    if n == 0:
        return out
    if sr is not None:
        _acc(sr)
    dummy = out.lse
    _stats_kernel[(triton.cdiv(n, BLOCK_N),)](
        s, dummy if sr is None else sr, targets.contiguous(), *(dummy if t is None else t for t in out),
        n, vocab, s.stride(0), 0 if sr is None else sr.stride(0), *_scales(temperature, softcap),
        SOFTCAP=softcap is not None, REF=sr is not None, MEAN=mean_logit, SUM=logit_sum,
        REF_MEAN=out.mean_ref_logit is not None, ACC=acc, BLOCK_N=BLOCK_N, BLOCK_V=block_v(s.dtype),
        num_warps=NUM_WARPS,
    )
    return out


def tile_grad_(s: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, a: torch.Tensor, c0: torch.Tensor,
               c1: Optional[torch.Tensor] = None, c2: Optional[torch.Tensor] = None, c3: Optional[torch.Tensor] = None,
               *, sr: Optional[torch.Tensor] = None, temperature: float = 1.0,
               softcap: Optional[float] = None) -> torch.Tensor:
    """Overwrite the raw logits tile ``s`` with ``d loss / d s`` (the per-row scalars ``[T]`` of
    :func:`prefopt.ops.common.logit_grad_coefficients`; ``c2`` needs the reference tile ``sr``); returns ``s``."""
    acc = _acc(s)
    if c2 is not None and sr is None:
        raise ValueError("tile_grad_: c2 needs the reference tile sr")
    n, vocab = s.shape
    if n == 0 or vocab == 0:
        return s
    dummy = lse
    _grad_kernel[(triton.cdiv(n, BLOCK_N), triton.cdiv(vocab, block_v(s.dtype)))](
        s, sr if c2 is not None else dummy, targets.contiguous(), lse.contiguous(), a.contiguous(), c0.contiguous(),
        *(dummy if c is None else c.contiguous() for c in (c1, c2, c3)),
        n, vocab, s.stride(0), sr.stride(0) if c2 is not None else 0, *_scales(temperature, softcap),
        SOFTCAP=softcap is not None, HAS_C1=c1 is not None, HAS_C2=c2 is not None, HAS_C3=c3 is not None,
        ACC=acc, BLOCK_N=BLOCK_N, BLOCK_V=block_v(s.dtype), num_warps=NUM_WARPS,
    )
    return s
