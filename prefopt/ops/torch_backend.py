"""Chunked PyTorch backend of the fused op: runs on any device, the CPU default.

Forward walks token chunks and, inside each, vocabulary chunks with an online (max, sum-exp) as in
flash attention, so the largest temporary is ``chunk_tokens x chunk_vocab``. Backward walks vocabulary
chunks outside and token chunks inside, recomputing each logits tile: a weight-gradient tile is then
finished before the next one starts (no ``[V, H]`` fp32 buffer), while ``d hidden`` accumulates in an
fp32 ``[n, H]`` buffer.

Frozen head (neither weight nor bias needs a gradient) with only log-probs asked for: forward also
accumulates ``M = sum_v p_v f_v W_v`` per token (f is the softcap derivative), and backward is
``d hidden = (a f_y W_y + c0 M) / temperature`` with no pass over the vocabulary.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .common import OpConfig, empty_stat, logit_grad_coefficients

#: Tile sizes (tokens, vocabulary entries) per device type; the largest temporary has their product.
CHUNK_SIZES = {"cpu": (1024, 4096), "cuda": (2048, 8192)}


def chunk_sizes(device: torch.device) -> Tuple[int, int]:
    return CHUNK_SIZES.get(device.type, CHUNK_SIZES["cuda"])


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def logits_tile(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], config: OpConfig, dtype: torch.dtype
) -> Tuple[Tensor, Optional[Tensor]]:
    """z = softcap(hidden @ weight.T + bias) / temperature in ``dtype``; also tanh(s/cap) for its derivative."""
    # Products run in the dtype of hidden (as under autocast); the result is a fresh tile, so every
    # step below may work in place.
    s = (hidden @ weight.T.to(hidden.dtype)).to(dtype)
    if bias is not None:
        s.add_(bias.to(dtype))
    tanh = None
    if config.softcap is not None:
        tanh = s.div_(config.softcap).tanh_()
        s = tanh * config.softcap
    if config.temperature != 1.0:
        s.div_(config.temperature)
    return s, tanh


def _target_columns(targets: Tensor, start: int, stop: int) -> Tuple[Tensor, Tensor]:
    """Rows whose target lies in vocabulary tile [start, stop) and that target's column in the tile."""
    rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows) - start


class LinearLogprobsTorch(torch.autograd.Function):
    """Contract shared by every backend.

    forward(hidden [n, H], weight [V, H], bias [V] | None, targets [n] int64, ref_hidden [n, H'] | None,
    ref_weight [V, H'] | None, ref_bias | None, config: OpConfig)
    -> (logp, lse, entropy, ref_logp, kl, uniform_nll), each [n] in the compute dtype, or empty when
    not asked for. Every target is a valid index; ignored tokens were removed by the caller.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig):
        n, hidden_size = hidden.shape
        vocab = weight.shape[0]
        dtype = compute_dtype(hidden.dtype)
        chunk_t, chunk_v = chunk_sizes(hidden.device)
        want_ref = ref_hidden is not None
        head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
        shortcut = ctx.needs_input_grad[0] and not head_grad and not (config.entropy or config.kl or config.uniform_nll)

        def new():
            return hidden.new_zeros(n, dtype=dtype)

        lse, target_logit = new(), new()
        mean_logit = new() if config.needs_mean_logit else None
        mean_ref_logit = new() if config.kl else None
        logit_sum = new() if config.uniform_nll else None
        ref_lse, ref_target_logit = (new(), new()) if want_ref else (None, None)
        moments = hidden.new_zeros(n, hidden_size, dtype=dtype) if shortcut else None

        for t0 in range(0, n, chunk_t):
            t1 = min(t0 + chunk_t, n)
            h, y = hidden[t0:t1], targets[t0:t1]
            rh = ref_hidden[t0:t1] if want_ref else None
            run_max = torch.full((t1 - t0,), float("-inf"), dtype=dtype, device=hidden.device)
            run_sum = torch.zeros_like(run_max)
            ref_max, ref_sum = run_max.clone(), run_sum.clone()
            for v0 in range(0, vocab, chunk_v):
                v1 = min(v0 + chunk_v, vocab)
                z, tanh = logits_tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], config, dtype)
                rows, cols = _target_columns(y, v0, v1)
                target_logit[t0 + rows] = z[rows, cols]
                if logit_sum is not None:
                    logit_sum[t0:t1] += z.sum(1)
                new_max = torch.maximum(run_max, z.amax(1))
                scale = torch.exp(run_max - new_max)
                run_max = new_max
                # e = exp(z - max); z itself is only needed afterwards for E_p[z], else overwrite it.
                e = torch.exp(z - new_max[:, None]) if mean_logit is not None else z.sub_(new_max[:, None]).exp_()
                run_sum = run_sum * scale + e.sum(1)
                if mean_logit is not None:
                    mean_logit[t0:t1] = mean_logit[t0:t1] * scale + (e * z).sum(1)
                if moments is not None:
                    weights = e if tanh is None else e.mul_(1 - tanh * tanh)
                    moments[t0:t1] = moments[t0:t1] * scale[:, None] + (weights.to(hidden.dtype) @ weight[v0:v1].to(hidden.dtype)).to(dtype)
                if want_ref:
                    rb = None if ref_bias is None else ref_bias[v0:v1]
                    zr, _ = logits_tile(rh, ref_weight[v0:v1], rb, config, dtype)
                    ref_target_logit[t0 + rows] = zr[rows, cols]
                    if mean_ref_logit is not None:
                        mean_ref_logit[t0:t1] = mean_ref_logit[t0:t1] * scale + (e * zr).sum(1)
                    new_ref_max = torch.maximum(ref_max, zr.amax(1))
                    ref_sum = ref_sum * torch.exp(ref_max - new_ref_max) + zr.sub_(new_ref_max[:, None]).exp_().sum(1)
                    ref_max = new_ref_max
            lse[t0:t1] = run_max + torch.log(run_sum)
            if mean_logit is not None:
                mean_logit[t0:t1] /= run_sum
            if mean_ref_logit is not None:
                mean_ref_logit[t0:t1] /= run_sum
            if moments is not None:
                moments[t0:t1] /= run_sum[:, None]
            if want_ref:
                ref_lse[t0:t1] = ref_max + torch.log(ref_sum)

        logp = target_logit - lse
        entropy = lse - mean_logit if config.entropy else empty_stat(lse)
        ref_logp = ref_target_logit - ref_lse if want_ref else empty_stat(lse)
        kl = (mean_logit - mean_ref_logit) - lse + ref_lse if config.kl else empty_stat(lse)
        uniform = lse - logit_sum / vocab if config.uniform_nll else empty_stat(lse)

        ctx.config, ctx.shortcut, ctx.vocab, ctx.hidden_dtype = config, shortcut, vocab, hidden.dtype
        if shortcut:
            ctx.save_for_backward(weight, targets, target_logit, moments)
        else:
            ctx.save_for_backward(
                hidden, weight, bias, targets, lse, mean_logit, mean_ref_logit,
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
        else:
            (hidden, weight, bias, targets, lse, mean_logit, mean_ref_logit,
             ref_hidden, ref_weight, ref_bias) = ctx.saved_tensors
        like = target_logit if ctx.shortcut else lse
        coef = logit_grad_coefficients(
            g_logp, g_lse, g_entropy, g_kl, g_uniform,
            None if ctx.shortcut else mean_logit, None if ctx.shortcut else mean_ref_logit,
            ctx.vocab, like,
        )
        if ctx.shortcut:
            grad = _shortcut_grad_hidden(weight, targets, target_logit, moments, coef.a, coef.c0, config)
            return (grad.to(ctx.hidden_dtype),) + (None,) * 7
        return _recompute_grads(
            hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config, want_h, want_w, want_b
        ) + (None,) * 5


def _shortcut_grad_hidden(weight, targets, target_logit, moments, a, c0, config: OpConfig) -> Tensor:
    """d hidden = (a f_y W_y + c0 M) / temperature for a frozen head."""
    dtype = moments.dtype
    scale_y = a
    if config.softcap is not None:
        tanh_y = target_logit * config.temperature / config.softcap
        scale_y = a * (1 - tanh_y * tanh_y)
    grad = scale_y[:, None] * weight.index_select(0, targets).to(dtype) + c0[:, None] * moments
    return grad / config.temperature


def _recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config, want_h, want_w, want_b):
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    chunk_t, chunk_v = chunk_sizes(hidden.device)
    grad_hidden = hidden.new_zeros(n, hidden_size, dtype=dtype) if want_h else None
    grad_weight = torch.empty_like(weight) if want_w else None
    grad_bias = torch.empty_like(bias) if want_b else None
    for v0 in range(0, vocab, chunk_v):
        v1 = min(v0 + chunk_v, vocab)
        w, b = weight[v0:v1], None if bias is None else bias[v0:v1]
        tile_grad_w = hidden.new_zeros(v1 - v0, hidden_size, dtype=dtype) if want_w else None
        tile_grad_b = hidden.new_zeros(v1 - v0, dtype=dtype) if want_b else None
        for t0 in range(0, n, chunk_t):
            t1 = min(t0 + chunk_t, n)
            h = hidden[t0:t1]
            z, tanh = logits_tile(h, w, b, config, dtype)
            if coef.c1 is None and coef.c2 is None:
                # Log-prob / lse gradients only: p * c0, computed in place over the logits tile.
                grad = z.sub_(lse[t0:t1, None]).exp_().mul_(coef.c0[t0:t1, None])
            else:
                inner = coef.c0[t0:t1, None]
                if coef.c1 is not None:
                    inner = inner + coef.c1[t0:t1, None] * z
                if coef.c2 is not None:
                    rb = None if ref_bias is None else ref_bias[v0:v1]
                    zr, _ = logits_tile(ref_hidden[t0:t1], ref_weight[v0:v1], rb, config, dtype)
                    inner = inner + coef.c2[t0:t1, None] * zr
                grad = torch.exp(z - lse[t0:t1, None]).mul_(inner)
            if coef.c3 is not None:
                grad.add_(coef.c3[t0:t1, None])
            rows, cols = _target_columns(targets[t0:t1], v0, v1)
            grad[rows, cols] += coef.a[t0 + rows]
            if tanh is not None:
                grad.mul_(1 - tanh * tanh)
            if config.temperature != 1.0:
                grad.div_(config.temperature)
            if want_h:
                grad_hidden[t0:t1] += (grad.to(h.dtype) @ w.to(h.dtype)).to(dtype)
            if want_w:
                tile_grad_w += (grad.T.to(h.dtype) @ h).to(dtype)
            if want_b:
                tile_grad_b += grad.sum(0)
        if want_w:
            grad_weight[v0:v1] = tile_grad_w
        if want_b:
            grad_bias[v0:v1] = tile_grad_b
    return (
        grad_hidden.to(hidden.dtype) if want_h else None,
        grad_weight,
        grad_bias,
    )
