"""Chunked PyTorch backend of the fused op: runs on any device, the CPU default.

Forward walks token chunks and, inside each, vocabulary chunks with an online (max, sum-exp) as in
flash attention, so the largest temporary is ``chunk_tokens x chunk_vocab``. Backward walks vocabulary
chunks outside and token chunks inside, recomputing each logits tile: a weight-gradient tile is then
finished before the next one starts (no ``[V, H]`` fp32 buffer), while ``d hidden`` accumulates in an
fp32 ``[n, H]`` buffer.

Frozen head (neither weight nor bias needs a gradient) with only log-probs, lse and, without softcap,
the uniform terms asked for: forward also
accumulates ``M' = sum_{v != y} p_v f_v W_v`` per token (f is the softcap derivative), and backward is
``d hidden = (f_y W_y (a (1 - p_y) + g p_y) + c0 M') / temperature`` with no pass over the vocabulary.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
from torch import Tensor

from .common import ForwardStats, GradCoefficients, OpConfig, compute_dtype, make_backend_function

#: Tile sizes (tokens, vocabulary entries) per device type; the largest temporary has their product.
CHUNK_SIZES = {"cpu": (1024, 4096), "cuda": (2048, 8192)}


#: The narrowest vocabulary tile a byte budget makes on its own (narrower products run below speed).
MIN_BUDGET_TILE_VOCAB = 512


def tiles_alive(config: OpConfig, reference: bool) -> int:
    """The most tile-sized tensors either pass holds at once: the logits, whose storage becomes their
    exponentials and then the gradient; with E_p[z] (entropy, KL) the exponentials apart and a product
    temporary; the reference's logits and, when the KL keeps them, a log-sum-exp temporary; tanh under
    softcap."""
    return 1 + 2 * config.needs_mean_logit + (1 + config.kl if reference else 0) + (config.softcap is not None)


def chunk_sizes(device: torch.device, n: int = 0, budget_bytes: Optional[int] = None,
                item: int = 4) -> Tuple[int, int]:
    """Tile (tokens, vocabulary entries) for ``n`` tokens: with fewer tokens than a tile holds, the tile
    grows along the vocabulary instead (same size), so a small batch makes fewer, larger tile operations:
    on CPU each is a parallel region whose start and join cost more than the work at small shapes (and
    much more on a loaded machine). ``budget_bytes`` (one tile of ``item``-byte entries) shrinks the
    tile to fit, tokens first down to a :data:`MIN_BUDGET_TILE_VOCAB`-wide tile."""
    chunk_t, chunk_v = CHUNK_SIZES.get(device.type, CHUNK_SIZES["cuda"])
    if 0 < n < chunk_t:
        chunk_v *= chunk_t // n
        chunk_t = n
    if budget_bytes is not None:
        entries = max(1, budget_bytes // item)
        chunk_t = max(1, min(chunk_t, entries // MIN_BUDGET_TILE_VOCAB))
        chunk_v = max(1, min(chunk_v, entries // chunk_t))
    return chunk_t, chunk_v


def _tile_budget(config: OpConfig, reference: bool, dtype: torch.dtype) -> Tuple[Optional[int], int]:
    """The byte budget of one tile of a pass under ``config.budget_bytes`` and the tiles' entry size."""
    item = torch.finfo(dtype).bits // 8
    if config.budget_bytes is None:
        return None, item
    return config.budget_bytes // tiles_alive(config, reference), item


def logits_tile(
    hidden: Tensor, weight: Tensor, bias: Optional[Tensor], config: OpConfig, dtype: torch.dtype,
    out: Optional[Tensor] = None,
) -> Tuple[Tensor, Optional[Tensor]]:
    """z = softcap(hidden @ weight.T + bias) / temperature in ``dtype``; also tanh(s/cap) for its derivative.
    ``out``: a ``[rows, V]`` buffer the product writes into when it has ``dtype`` already (see
    :func:`fused_gradient_pass`)."""
    # Products run in the dtype of hidden (as under autocast); the result is a fresh tile (or the caller's
    # buffer), so every step below may work in place.
    if out is not None and hidden.dtype == dtype:
        s = torch.mm(hidden, weight.T.to(dtype), out=out)
    else:
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


def _finite_or_zero(row_max: Tensor) -> Tensor:
    """The shift of a log-sum-exp: the row max, or 0 where it is infinite (as torch.logsumexp does), so
    that an infinite logit gives what float64 gives (lse = inf) instead of inf - inf = NaN."""
    return torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)


def _tile_logsumexp_(z: Tensor, row_max: Tensor) -> Tensor:
    """Row log-sum-exp of a tile given its row max, overwriting the tile (no second tile-sized temporary)."""
    shift = _finite_or_zero(row_max)
    return shift + z.sub_(shift[:, None]).exp_().sum(1).log()


def _add_weight_grad(acc: Tensor, grad: Tensor, h: Tensor, first: bool) -> None:
    """``acc += grad^T @ h`` in ``acc``'s dtype (``acc = ...`` for the ``first`` term: whatever ``acc`` held is
    not read, so it needs no zeroing): in place when the hidden states share its dtype, else the product in
    the hidden states' dtype (a low-precision matmul), then added."""
    if h.dtype == acc.dtype:
        acc.addmm_(grad.T, h, beta=0 if first else 1)
    elif first:
        acc.copy_(grad.T.to(h.dtype) @ h)
    else:
        acc += (grad.T.to(h.dtype) @ h).to(acc.dtype)


def _target_columns(targets: Tensor, start: int, stop: int) -> Tuple[Tensor, Tensor]:
    """Rows whose target lies in vocabulary tile [start, stop) and that target's column in the tile."""
    rows = ((targets >= start) & (targets < stop)).nonzero().squeeze(1)
    return rows, targets.index_select(0, rows) - start


def _coef_rows(coef: GradCoefficients, t0: int, t1: int) -> GradCoefficients:
    """The gradient coefficients of tokens [t0, t1)."""
    return GradCoefficients(*(None if c is None else c[t0:t1] for c in coef))


def logit_grad_(p: Tensor, z: Tensor, zr: Optional[Tensor], tanh: Optional[Tensor], coef: GradCoefficients,
                rows: Tensor, cols: Tensor, config: OpConfig) -> Tensor:
    """The gradient on the raw logits of a tile (common.py's formula), formed in the storage of ``p``.

    ``dz = a onehot + p (c0 + c1 z + c2 zr) + c3``, then the softcap and temperature derivatives; ``p`` is
    the tile's probabilities, ``coef`` the tile's rows, ``(rows, cols)`` the tile entries of the targets.
    ``z`` is overwritten when c1 / c2 are live (a fresh tile, not needed afterwards).
    """
    if coef.c1 is None and coef.c2 is None:
        grad = p.mul_(coef.c0[:, None])
    else:
        # one pass per term, in the logits' storage
        inner = torch.addcmul(coef.c0[:, None], z, coef.c1[:, None], out=z)
        if coef.c2 is not None:
            inner.addcmul_(zr, coef.c2[:, None])
        grad = p.mul_(inner)
    if coef.c3 is not None:
        grad.add_(coef.c3[:, None])
    grad[rows, cols] += coef.a[rows]
    if tanh is not None:
        grad.mul_(tanh.mul_(tanh).neg_().add_(1))  # tanh is not read afterwards
    if config.temperature != 1.0:
        grad.div_(config.temperature)
    return grad


def stream_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig,
                   moments: bool) -> ForwardStats:
    """Token chunks outside, vocabulary chunks inside with an online (max, sum-exp) per token."""
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    want_ref = ref_hidden is not None
    chunk_t, chunk_v = chunk_sizes(hidden.device, n, *_tile_budget(config, want_ref, dtype))

    def new():
        return hidden.new_zeros(n, dtype=dtype)

    lse, target_logit = new(), new()
    mean_logit = new() if config.needs_mean_logit else None
    mean_ref_logit = new() if config.kl else None
    logit_sum = new() if config.needs_logit_sum else None
    argmax = torch.zeros(n, dtype=torch.long, device=hidden.device) if config.top1 else None
    ref_lse, ref_target_logit = (new(), new()) if want_ref else (None, None)
    moment = hidden.new_zeros(n, hidden_size, dtype=dtype) if moments else None
    rest_mass = new() if moments else None
    # sum_v exp(2 (z_v - max)), relative to the running max of the sum-exp (so it cannot overflow); it
    # becomes log sum_v p_v^2 = log sq_sum - 2 log run_sum once its token chunk is done
    sq_sum = new() if config.log_sum_sq_probs else None
    # The probabilities themselves weight E_p[z], E_p[zr], sum p^2 and the moments; otherwise only lse is needed.
    needs_weights = mean_logit is not None or moment is not None or sq_sum is not None

    for t0 in range(0, n, chunk_t):
        t1 = min(t0 + chunk_t, n)
        h, y = hidden[t0:t1], targets[t0:t1]
        rh = ref_hidden[t0:t1] if want_ref else None
        run_max = torch.full((t1 - t0,), float("-inf"), dtype=dtype, device=hidden.device)
        run_sum = torch.zeros_like(run_max)
        run_lse, run_ref_lse = run_max.clone(), run_max.clone()
        for v0 in range(0, vocab, chunk_v):
            v1 = min(v0 + chunk_v, vocab)
            z = tanh = e = zr = weights = None  # the previous tile's, freed before this one exists
            z, tanh = logits_tile(h, weight[v0:v1], None if bias is None else bias[v0:v1], config, dtype)
            rows, cols = _target_columns(y, v0, v1)
            target_logit[t0 + rows] = z[rows, cols]
            if logit_sum is not None:
                logit_sum[t0:t1] += z.sum(1)
            # the first maximum of the tile (its index only for top1)
            tile_max, tile_argmax = z.max(1) if argmax is not None else (z.amax(1), None)
            if argmax is not None:
                # Strictly greater: on a tie the earlier tile's (lower) index stays, as argmax over the row.
                better = (tile_max > run_max) | (v0 == 0)
                argmax[t0:t1] = torch.where(better, tile_argmax + v0, argmax[t0:t1])
            if not needs_weights:
                # Only the log-sum-exp is needed: merge each tile's, computed in place over the tile.
                run_lse = torch.logaddexp(run_lse, _tile_logsumexp_(z, tile_max))
                if argmax is not None:
                    run_max = torch.maximum(run_max, tile_max)
            else:
                new_max = torch.maximum(run_max, tile_max)
                # Nothing accumulated yet (run_max = -inf): scale 0, whatever the new max.
                scale = torch.exp(_finite_or_zero(run_max) - _finite_or_zero(new_max))
                scale.masked_fill_(run_max == float("-inf"), 0)
                run_max = new_max
                shift = _finite_or_zero(new_max)[:, None]
                # e = exp(z - max); z itself is only needed afterwards for E_p[z], else overwrite it.
                e = (z - shift).exp_() if mean_logit is not None else z.sub_(shift).exp_()
                run_sum = run_sum * scale + e.sum(1)
                if mean_logit is not None:
                    mean_logit[t0:t1] = mean_logit[t0:t1] * scale + (e * z).sum(1)
                if sq_sum is not None:
                    sq_sum[t0:t1] = sq_sum[t0:t1] * (scale * scale) + (e * e).sum(1)
                if moment is not None:
                    # M' and 1 - p_y leave the target out (see common.shortcut_grad_hidden)
                    e[rows, cols] = 0
                    rest_mass[t0:t1] = rest_mass[t0:t1] * scale + e.sum(1)
                    weights = e if tanh is None else e.mul_(tanh.mul_(tanh).neg_().add_(1))
                    tile_moment = weights.to(hidden.dtype) @ weight[v0:v1].to(hidden.dtype)
                    moment[t0:t1] = moment[t0:t1] * scale[:, None] + tile_moment.to(dtype)
            if want_ref:
                rb = None if ref_bias is None else ref_bias[v0:v1]
                zr, _ = logits_tile(rh, ref_weight[v0:v1], rb, config, dtype)
                ref_target_logit[t0 + rows] = zr[rows, cols]
                if mean_ref_logit is not None:
                    mean_ref_logit[t0:t1] = mean_ref_logit[t0:t1] * scale + (e * zr).sum(1)
                run_ref_lse = torch.logaddexp(run_ref_lse, _tile_logsumexp_(zr, zr.amax(1)))
        lse[t0:t1] = run_lse if not needs_weights else _finite_or_zero(run_max) + torch.log(run_sum)
        if mean_logit is not None:
            mean_logit[t0:t1] /= run_sum
        if sq_sum is not None:
            sq_sum[t0:t1] = sq_sum[t0:t1].log() - 2 * run_sum.log()
        if mean_ref_logit is not None:
            mean_ref_logit[t0:t1] /= run_sum
        if moment is not None:
            moment[t0:t1] /= run_sum[:, None]
            rest_mass[t0:t1] /= run_sum
        if want_ref:
            ref_lse[t0:t1] = run_ref_lse
    return ForwardStats(lse, target_logit, mean_logit, logit_sum, ref_lse, ref_target_logit, mean_ref_logit, moment,
                        argmax, rest_mass, sq_sum)


def recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config, want_h, want_w, want_b):
    """Vocabulary chunks outside (each weight-gradient tile finished in one go), token chunks inside."""
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = lse.dtype
    chunk_t, chunk_v = chunk_sizes(hidden.device, n, *_tile_budget(config, ref_hidden is not None, dtype))
    grad_hidden = hidden.new_zeros(n, hidden_size, dtype=dtype) if want_h else None
    grad_weight = torch.empty_like(weight) if want_w else None
    grad_bias = torch.empty_like(bias) if want_b else None
    for v0 in range(0, vocab, chunk_v):
        v1 = min(v0 + chunk_v, vocab)
        w, b = weight[v0:v1], None if bias is None else bias[v0:v1]
        tile_grad_w = None
        if want_w:
            # Accumulate straight into the gradient when it has the compute dtype, else in an fp32 tile; the
            # first token chunk overwrites it (zeroed only when there are no tokens).
            if weight.dtype == dtype:
                tile_grad_w = grad_weight[v0:v1]
            else:
                tile_grad_w = hidden.new_empty(v1 - v0, hidden_size, dtype=dtype)
            if n == 0:
                tile_grad_w.zero_()
        tile_grad_b = hidden.new_zeros(v1 - v0, dtype=dtype) if want_b else None
        for t0 in range(0, n, chunk_t):
            t1 = min(t0 + chunk_t, n)
            h = hidden[t0:t1]
            z = tanh = p = grad = None  # the previous tile's, freed before this one exists
            z, tanh = logits_tile(h, w, b, config, dtype)
            zr = None
            if coef.c2 is not None:
                rb = None if ref_bias is None else ref_bias[v0:v1]
                zr, _ = logits_tile(ref_hidden[t0:t1], ref_weight[v0:v1], rb, config, dtype)
            # Without c1 the logits are not needed once p is formed: p takes their storage.
            p = z.sub_(lse[t0:t1, None]).exp_() if coef.c1 is None else (z - lse[t0:t1, None]).exp_()
            rows, cols = _target_columns(targets[t0:t1], v0, v1)
            grad = logit_grad_(p, z, zr, tanh, _coef_rows(coef, t0, t1), rows, cols, config)
            if want_h:
                if h.dtype == dtype == w.dtype:
                    grad_hidden[t0:t1].addmm_(grad, w)
                else:
                    grad_hidden[t0:t1] += (grad.to(h.dtype) @ w.to(h.dtype)).to(dtype)
            if want_w:
                _add_weight_grad(tile_grad_w, grad, h, first=t0 == 0)
            if want_b:
                tile_grad_b += grad.sum(0)
        if want_w and weight.dtype != dtype:
            grad_weight[v0:v1] = tile_grad_w
        if want_b:
            grad_bias[v0:v1] = tile_grad_b
    return (
        grad_hidden.to(hidden.dtype) if want_h else None,
        grad_weight,
        grad_bias,
    )


LinearLogprobsTorch = make_backend_function("LinearLogprobsTorch", stream_forward, recompute_grads)


def _row_dot(a: Tensor, b: Tensor) -> Tensor:
    """sum_v a[n, v] * b[n, v] per row, without a tile-sized temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).view(-1)


def tokens_per_chunk(vocab: int, dtype: torch.dtype, config: OpConfig, reference: bool, budget_bytes: int) -> int:
    """Tokens whose whole-vocabulary tiles in :func:`fused_gradient_pass` fit ``budget_bytes``
    (:func:`tiles_alive` of them)."""
    return max(1, budget_bytes // (vocab * torch.finfo(dtype).bits // 8 * tiles_alive(config, reference)))


def fused_gradient_pass(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig, upstream,
                        chunks: Sequence[Tuple[int, int]], want_h: bool, want_w: bool, want_b: bool, tile_step=None):
    """The 3-product pass: per chunk ``[t0, t1)`` of tokens, the whole-vocabulary logits tile, the
    statistics, the objective's per-token gradient (``upstream(t0, t1, ForwardStats of the chunk) ->
    GradCoefficients``) and, while the tile is live, d hidden and the chunk's share of d weight / d bias.

    ``tile_step(h, y, ref_h, weight, bias, ref_weight, ref_bias, config, dtype, gradient_rule, out) ->
    (ForwardStats of the chunk, the gradient on its raw logits)`` forms the tile (in ``out``, one
    ``[chunk, V]`` buffer for every chunk: a fresh tile per chunk left the allocator's heap holding a second
    one, in resident memory, as often as not) and its gradient (default :func:`torch_tile_step`; the Triton
    backend gives its kernels'); the products stay here.

    Returns ``(ForwardStats of every token, d hidden, d weight, d bias)``; the gradients are those of the
    objective itself (not yet scaled by an incoming gradient), in the dtype of their input.
    """
    n, hidden_size = hidden.shape
    vocab = weight.shape[0]
    dtype = compute_dtype(hidden.dtype)
    want_ref = ref_hidden is not None
    tile_step = tile_step or torch_tile_step

    def new():
        return hidden.new_zeros(n, dtype=dtype)

    stats = ForwardStats(new(), new(), new() if config.needs_mean_logit else None,
                         new() if config.needs_logit_sum else None, new() if want_ref else None,
                         new() if want_ref else None, new() if config.kl else None)
    grad_hidden = hidden.new_empty(n, hidden_size) if want_h else None
    grad_weight = None
    if want_w:  # the first chunk overwrites it (zeroed only when there is none)
        grad_weight = (torch.empty if chunks else torch.zeros)(weight.shape, dtype=dtype, device=weight.device)
    grad_bias = torch.zeros(vocab, dtype=dtype, device=weight.device) if want_b else None
    buffer = None
    if hidden.dtype == dtype:  # the product writes there (a low-precision product needs its own tile)
        buffer = hidden.new_empty(max((t1 - t0 for t0, t1 in chunks), default=0), vocab, dtype=dtype)
    for i, (t0, t1) in enumerate(chunks):
        h = hidden[t0:t1]
        chunk, grad = tile_step(h, targets[t0:t1], ref_hidden[t0:t1] if want_ref else None, weight, bias, ref_weight,
                                ref_bias, config, dtype, lambda chunk_stats: upstream(t0, t1, chunk_stats),
                                None if buffer is None else buffer[: t1 - t0])
        for name in _PASS_STATS:
            value = getattr(chunk, name)
            if value is not None:
                getattr(stats, name)[t0:t1] = value
        if want_h:
            if h.dtype == dtype == weight.dtype:
                torch.mm(grad, weight, out=grad_hidden[t0:t1])
            else:
                grad_hidden[t0:t1] = grad.to(h.dtype) @ weight.to(h.dtype)
        if want_w:
            _add_weight_grad(grad_weight, grad, h, first=i == 0)
        if want_b:
            grad_bias += grad.sum(0)
        del grad  # before the next chunk's tiles exist
    return (stats, grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
            None if grad_bias is None else grad_bias.to(bias.dtype))


#: What the fused-gradient pass computes per token.
_PASS_STATS = ("lse", "target_logit", "mean_logit", "logit_sum", "ref_lse", "ref_target_logit", "mean_ref_logit")


def torch_tile_step(h, y, ref_h, weight, bias, ref_weight, ref_bias, config: OpConfig, dtype, gradient_rule, out):
    """One chunk of :func:`fused_gradient_pass` in torch: the tile (in ``out``), its statistics,
    ``gradient_rule(ForwardStats) -> GradCoefficients`` and the gradient on the raw logits, formed in the tile's
    storage."""
    z, tanh = logits_tile(h, weight, bias, config, dtype, out)
    target_logit = z.gather(1, y[:, None]).squeeze(1)
    logit_sum = z.sum(1) if config.needs_logit_sum else None
    shift = _finite_or_zero(z.amax(1))
    # The logits are read after p exists only for E_p[z] (and then the entropy / KL gradients).
    p = (z - shift[:, None]).exp_() if config.needs_mean_logit else z.sub_(shift[:, None]).exp_()
    total = p.sum(1)
    lse = shift + total.log()
    mean_logit = None
    if config.needs_mean_logit:
        p.div_(total[:, None])
        mean_logit = _row_dot(p, z)
    zr = ref_lse = ref_target_logit = mean_ref_logit = None
    if ref_h is not None:
        zr, _ = logits_tile(ref_h, ref_weight, ref_bias, config, dtype)
        ref_target_logit = zr.gather(1, y[:, None]).squeeze(1)
        if config.kl:  # the KL gradient reads the reference logits again
            ref_lse = torch.logsumexp(zr, 1)
            mean_ref_logit = _row_dot(p, zr)
        else:
            ref_lse = _tile_logsumexp_(zr, zr.amax(1))
            zr = None
    chunk = ForwardStats(lse, target_logit, mean_logit, logit_sum, ref_lse, ref_target_logit, mean_ref_logit)
    coef = gradient_rule(chunk)
    if not config.needs_mean_logit:
        # p is still exp(z - max), unnormalised; without c1 / c2 the 1 / sum folds into c0 (one pass fewer).
        coef = coef._replace(c0=coef.c0 / total)
    rows = torch.arange(y.shape[0], device=y.device)
    return chunk, logit_grad_(p, z, zr, tanh, coef, rows, y, config)
