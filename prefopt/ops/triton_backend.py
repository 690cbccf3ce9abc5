"""Triton backend of the fused op (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Same contract as :class:`prefopt.ops.torch_backend.LinearLogprobsTorch`; the kernels live in
:mod:`prefopt.kernels.linear_logprobs`.

Forward: one Triton kernel streams the vocabulary once per token block and returns every statistic
(split over the vocabulary when there are few tokens, merged here with an ``[splits, n]`` log-sum-exp).
Nothing of size ``[n, V]`` is written.

Frozen head (neither weight nor bias needs a gradient) with only log-probs / lse asked for: the same
kernel also accumulates ``M = sum_v p_v f_v W_v`` (online rescaling, ``f`` the softcap derivative),
and backward is ``d hidden = (a f_y W_y + c0 M) / temperature``: a gather and an axpy, no pass over
the vocabulary. :data:`FROZEN_HEAD_SHORTCUT` switches it off (backward then recomputes the logits
like a trainable head, minus the weight gradient), for measuring one against the other.

Backward otherwise: vocabulary chunk by chunk, a Triton kernel recomputes the logits tiles of the
chunk (and the reference tiles when the KL gradient is live) and writes the logit gradient ``ds`` of
the chunk into a ``[n, width]`` buffer whose size is bounded by :data:`CHUNK_BYTES`; then
``d hidden += ds @ W[chunk]`` (fp32 accumulator) and ``d W[chunk] = ds^T @ hidden`` run as cuBLAS
products, ``d W[chunk]`` being complete after that one product (its token reduction is inside it, in
fp32), so no fp32 ``[V, H]`` buffer exists either. Why not fuse those two products into the kernel:
each tile of ``ds`` contributes to an ``[BLOCK_N, H]`` slab of ``d hidden`` and a ``[BLOCK_V, H]``
slab of ``d W``; for real H (4096) neither fits in registers, so a fused kernel must either add them
with atomics or read-modify-write them in global memory once per tile, which costs about one fp32
read+write of ``H`` values per ``BLOCK`` multiply-adds — memory-bound by several times on an H100 —
whereas the chunk buffer is written once and read twice per chunk and the products run at cuBLAS
speed. The op thus performs the minimum number of ``n x H x V`` products: 1 forward + 3 backward for
a trainable head (recompute, d hidden, d weight), 1 forward (+ the moments product) for a frozen one.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from prefopt.kernels import linear_logprobs as K

from .common import OpConfig, empty_stat, logit_grad_coefficients
from .torch_backend import compute_dtype

#: Use the frozen-head moments shortcut (see the module docstring).
FROZEN_HEAD_SHORTCUT = True

#: Upper bound, in bytes, on the backward's logit-gradient chunk buffer ``[n, width]``, and on the
#: temporary ``ds @ W[chunk]`` product (low-precision inputs) before it is added to the fp32 d hidden.
CHUNK_BYTES = 32 * 2**20


def chunk_width(n: int, vocab: int, dtype: torch.dtype, block_v: int) -> int:
    """Vocabulary columns per backward chunk: as many as fit in :data:`CHUNK_BYTES`, a multiple of the tile."""
    item = torch.empty((), dtype=dtype).element_size()
    width = CHUNK_BYTES // max(1, n * item)
    width = max(block_v, width // block_v * block_v)
    return min(width, -(-vocab // block_v) * block_v)


class LinearLogprobsTriton(torch.autograd.Function):
    """See :class:`prefopt.ops.torch_backend.LinearLogprobsTorch` for the contract."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig):
        vocab = weight.shape[0]
        want_ref = ref_hidden is not None
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        shortcut = (
            FROZEN_HEAD_SHORTCUT
            and ctx.needs_input_grad[0]
            and not head_grad
            and not (config.entropy or config.kl or config.uniform_nll)
        )
        stats = K.forward(
            hidden, weight, bias, targets,
            temperature=config.temperature, softcap=config.softcap,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias,
            mean_logit=config.needs_mean_logit, logit_sum=config.uniform_nll, mean_ref_logit=config.kl,
            moments=shortcut,
        )
        lse = stats.lse
        logp = stats.target_logit - lse
        entropy = lse - stats.mean_logit if config.entropy else empty_stat(lse)
        ref_logp = stats.ref_target_logit - stats.ref_lse if want_ref else empty_stat(lse)
        kl = (stats.mean_logit - stats.mean_ref_logit) - lse + stats.ref_lse if config.kl else empty_stat(lse)
        uniform = lse - stats.logit_sum / vocab if config.uniform_nll else empty_stat(lse)

        ctx.config, ctx.shortcut, ctx.vocab, ctx.hidden_dtype = config, shortcut, vocab, hidden.dtype
        if shortcut:
            ctx.save_for_backward(weight, targets, stats.target_logit, stats.moments)
        else:
            ctx.save_for_backward(
                hidden, weight, bias, targets, lse, stats.mean_logit, stats.mean_ref_logit,
                ref_hidden if config.kl else None, ref_weight if config.kl else None,
                ref_bias if config.kl else None,
            )
        ctx.mark_non_differentiable(ref_logp)
        ctx.set_materialize_grads(False)
        return logp, lse, entropy, ref_logp, kl, uniform

    @staticmethod
    def backward(ctx, g_logp, g_lse, g_entropy, g_ref_logp, g_kl, g_uniform):
        config: OpConfig = ctx.config
        g_entropy = g_entropy if config.entropy else None
        g_kl = g_kl if config.kl else None
        g_uniform = g_uniform if config.uniform_nll else None
        want_h, want_w, want_b = ctx.needs_input_grad[:3]
        if ctx.shortcut:
            weight, targets, target_logit, moments = ctx.saved_tensors
            coef = logit_grad_coefficients(g_logp, g_lse, None, None, None, None, None, ctx.vocab, target_logit)
            grad = _shortcut_grad_hidden(weight, targets, target_logit, moments, coef.a, coef.c0, config)
            return (grad.to(ctx.hidden_dtype),) + (None,) * 7
        (hidden, weight, bias, targets, lse, mean_logit, mean_ref_logit,
         ref_hidden, ref_weight, ref_bias) = ctx.saved_tensors
        coef = logit_grad_coefficients(
            g_logp, g_lse, g_entropy, g_kl, g_uniform, mean_logit, mean_ref_logit, ctx.vocab, lse
        )
        return _recompute_grads(
            hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config, want_h, want_w, want_b
        ) + (None,) * 5


def _shortcut_grad_hidden(weight, targets, target_logit, moments, a, c0, config: OpConfig) -> Tensor:
    """d hidden = (a f_y W_y + c0 M) / temperature for a frozen head (in the compute dtype)."""
    dtype = moments.dtype
    scale_y = a
    if config.softcap is not None:
        tanh_y = target_logit * config.temperature / config.softcap
        scale_y = a * (1 - tanh_y * tanh_y)
    grad = scale_y[:, None] * weight.index_select(0, targets).to(dtype) + c0[:, None] * moments
    return grad / config.temperature


def _recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config: OpConfig,
                     want_h, want_w, want_b):
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    grad_hidden = hidden.new_zeros(n, hidden_size, dtype=dtype) if want_h else None
    grad_weight = torch.empty_like(weight) if want_w else None
    grad_bias = torch.empty_like(bias) if want_b else None
    if n == 0:
        for g in (grad_weight, grad_bias):
            if g is not None:
                g.zero_()
        return (grad_hidden.to(hidden.dtype) if want_h else None, grad_weight, grad_bias)

    # ds is stored in the dtype of the products that consume it (the inputs' dtype when they agree)
    mm_dtype = hidden.dtype if hidden.dtype == weight.dtype else dtype
    blocks = K.backward_blocks(n, vocab, hidden_size, hidden.dtype)
    width = chunk_width(n, vocab, mm_dtype, blocks.block_v)
    buffer = torch.empty(n, width, dtype=mm_dtype, device=hidden.device)
    h_mm = hidden if hidden.dtype == mm_dtype else None
    item = buffer.element_size()
    rows_per_product = max(1, _product_rows(CHUNK_BYTES // max(1, hidden_size * item)))
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        ds = buffer[:, : v1 - v0]
        K.grad_logits(
            ds, v0, hidden, weight, bias, targets, lse, coef.a, coef.c0, coef.c1, coef.c2, coef.c3,
            temperature=config.temperature, softcap=config.softcap,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, blocks=blocks,
        )
        if want_h:
            w = weight[v0:v1].to(mm_dtype)
            if mm_dtype == dtype:
                grad_hidden.addmm_(ds, w)
            else:  # low-precision product, fp32 accumulation across chunks (bounded temporary)
                for t0 in range(0, n, rows_per_product):
                    t1 = min(t0 + rows_per_product, n)
                    grad_hidden[t0:t1] += ds[t0:t1] @ w
        if want_w:
            if h_mm is None:
                h_mm = hidden.to(mm_dtype)
            if weight.dtype == mm_dtype:
                torch.mm(ds.T, h_mm, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1] = ds.T @ h_mm
        if want_b:
            grad_bias[v0:v1] = ds.sum(0, dtype=dtype)
    return (grad_hidden.to(hidden.dtype) if want_h else None, grad_weight, grad_bias)


def _product_rows(rows: int) -> int:
    """Token rows per ``ds @ W`` product: a multiple of 128 when large (tensor-core friendly)."""
    return rows // 128 * 128 if rows >= 256 else rows
