"""Triton backend of the fused op (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``).

Same contract as :class:`prefopt.ops.torch_backend.LinearLogprobsTorch`; the kernels live in
:mod:`prefopt.kernels.linear_logprobs`.

Forward: one Triton kernel streams the vocabulary once per token block and returns every statistic
(split over the vocabulary when there are few tokens, merged here with an ``[splits, n]`` log-sum-exp).
Nothing of size ``[n, V]`` is written.

Frozen head (neither weight nor bias needs a gradient) with only log-probs / lse and, without softcap,
the uniform terms (uniform_nll, mean_logit) asked for: forward
also returns ``M' = sum_{v != y} p_v f_v W_v`` (``f`` the softcap derivative), computed chunk by chunk
(the kernel writes rescaled probability tiles in the product dtype, cuBLAS accumulates them against the
head in fp32; :func:`prefopt.kernels.linear_logprobs.frozen_moments`), and backward is a gather and an
axpy (:func:`prefopt.ops.common.shortcut_grad_hidden`), no pass over the vocabulary: 2 products in all
instead of 3. ``LinearLogprobsTriton.frozen_head_shortcut = False`` switches it off (backward then
recomputes the logits like a trainable head, minus the weight gradient), for measuring one against the
other; the default ``"auto"`` asks :func:`shortcut_pays`.

Backward otherwise: vocabulary chunk by chunk, a Triton kernel recomputes the logits tiles of the
chunk (and the reference tiles when the KL gradient is live) and writes the logit gradient ``ds`` of
the chunk into a ``[n, width]`` buffer (width from :func:`prefopt.kernels.linear_logprobs.chunk_width`); then
``d hidden += ds @ W[chunk]`` (accumulated in fp32 by cuBLAS itself where torch can, ``out_dtype``) and ``d W[chunk] = ds^T @ hidden`` run as cuBLAS
products, ``d W[chunk]`` being complete after that one product (its token reduction is inside it, in
fp32), so no fp32 ``[V, H]`` buffer exists either. Why not fuse those two products into the kernel:
each tile of ``ds`` contributes to an ``[BLOCK_N, H]`` slab of ``d hidden`` and a ``[BLOCK_V, H]``
slab of ``d W``; for real H (4096) neither fits in registers, so a fused kernel must either add them
with atomics or read-modify-write them in global memory once per tile, which costs about one fp32
read+write of ``H`` values per ``BLOCK`` multiply-adds — memory-bound by several times on an H100 —
whereas the chunk buffer is written once and read twice per chunk and the products run at cuBLAS
speed. The op thus performs the minimum number of ``n x H x V`` products: 1 forward + 3 backward for
a trainable head (recompute, d hidden, d weight), 1 forward (+ the moments product) for a frozen one.

The fused-gradient path (:func:`prefopt.linear_objective`, 3 products): :func:`tile_step` is one chunk of
:func:`prefopt.ops.torch_backend.fused_gradient_pass` with cuBLAS forming the chunk's raw logits tile
(fp32) and :mod:`prefopt.kernels.live_tile` its statistics and, once the objective has its gradient, the
gradient on the logits over the tile; d hidden and d weight are then cuBLAS products of that tile.
"""
from __future__ import annotations

from dataclasses import fields

import torch

from prefopt.kernels import linear_logprobs as K
from prefopt.kernels import live_tile

from .common import ForwardStats, OpConfig, make_backend_function
from .launch_model import frozen_shortcut_pays
from .torch_backend import logits_tile


def stream_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig,
                   moments: bool) -> ForwardStats:
    """One launch of the forward kernel (see the module docstring)."""
    stats = K.forward(
        hidden, weight, bias, targets, temperature=config.temperature, softcap=config.softcap,
        ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, mean_logit=config.needs_mean_logit,
        logit_sum=config.needs_logit_sum, mean_ref_logit=config.kl, argmax=config.top1,
        log_sum_sq_probs=config.log_sum_sq_probs, moments=moments,
    )
    return ForwardStats(**{f.name: getattr(stats, f.name) for f in fields(stats)})


def recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config: OpConfig,
                    want_h, want_w, want_b):
    """Vocabulary chunk by chunk: the kernel writes ds, cuBLAS applies it to W and to hidden."""
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

    # ds is stored in the dtype of the products that consume it: hidden's, as the torch backend multiplies
    mm_dtype = hidden.dtype
    blocks = K.backward_blocks(n, vocab, hidden_size, hidden.dtype)
    item = torch.empty((), dtype=mm_dtype).element_size()
    width = K.chunk_width(n, vocab, hidden_size, item, blocks.block_v)
    # zeros, not empty: a narrower last chunk leaves columns of the buffer unwritten within each row's stride,
    # and torch's CPU bf16 matmul reads them (times zero, harmless when finite; uninitialised NaN/Inf there
    # made d hidden NaN)
    buffer = torch.zeros(n, width, dtype=mm_dtype, device=hidden.device)
    rows = K.product_rows(K.CHUNK_BYTES, hidden_size, 4)
    for v0 in range(0, vocab, width):
        v1 = min(v0 + width, vocab)
        ds = buffer[:, : v1 - v0]
        K.grad_logits(
            ds, v0, hidden, weight, bias, targets, lse, coef.a, coef.c0, coef.c1, coef.c2, coef.c3,
            temperature=config.temperature, softcap=config.softcap,
            ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, blocks=blocks,
        )
        # the head is cast chunk by chunk (an fp32 head under bf16 autocast), never as a whole
        w = weight[v0:v1].to(mm_dtype)
        if want_h:
            K.accumulate_product(grad_hidden, ds, w, rows)
        if want_w:
            if weight.dtype == mm_dtype:
                torch.mm(ds.T, hidden, out=grad_weight[v0:v1])
            else:
                grad_weight[v0:v1] = ds.T @ hidden
        if want_b:
            grad_bias[v0:v1] = ds.sum(0, dtype=dtype)
    return (grad_hidden.to(hidden.dtype) if want_h else None, grad_weight, grad_bias)


def shortcut_pays(hidden: torch.Tensor, weight: torch.Tensor) -> bool:
    """Frozen head on CUDA: the moments shortcut or a recompute backward, whichever the launch model
    (:func:`prefopt.ops.launch_model.frozen_shortcut_pays`: H100 peaks, per-kernel efficiencies)
    predicts is faster; elsewhere, the interpreter included, always the shortcut."""
    if hidden.device.type != "cuda":
        return True
    return frozen_shortcut_pays(hidden.shape[0], weight.shape[0], hidden.shape[1], hidden.dtype)


LinearLogprobsTriton = make_backend_function("LinearLogprobsTriton", stream_forward, recompute_grads, shortcut_pays)


def tile_step(h, y, ref_h, weight, bias, ref_weight, ref_bias, config: OpConfig, dtype, gradient_rule, out):
    """One chunk of the fused-gradient pass (see the module docstring): returns the chunk's ForwardStats and
    the gradient on its raw logits, in the storage of the raw logits tile (``out`` where the product can write
    there)."""
    raw = OpConfig()  # softcap and temperature are applied inside the kernels
    s, _ = logits_tile(h, weight, bias, raw, dtype, out)
    sr = logits_tile(ref_h, ref_weight, ref_bias, raw, dtype)[0] if ref_h is not None else None
    opts = dict(temperature=config.temperature, softcap=config.softcap)
    stats = live_tile.tile_stats(s, y, sr=sr, mean_logit=config.needs_mean_logit, logit_sum=config.needs_logit_sum,
                                 mean_ref_logit=config.kl, **opts)
    chunk = ForwardStats(*stats)
    coef = gradient_rule(chunk)
    return chunk, live_tile.tile_grad_(s, y, stats.lse, *coef, sr=sr if config.kl else None, **opts)
