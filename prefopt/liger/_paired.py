"""Liger's paired preference losses (DPO, ORPO, SimPO, CPO) on prefopt's fused op.

Rows of ``_input [2B, T, H]`` are the chosen answers then the rejected ones. Every loss returns Liger's
``(loss, (chosen_logps, rejected_logps, chosen_logits_mean, rejected_logits_mean, nll_loss, *aux))``:
per-pair log-probs ``[B]`` (sums, or per-token means with ``average_log_prob``), the mean logit of the
chosen / rejected rows over every position (padding included) and the vocabulary, the chosen NLL
normalised by the chosen tokens of the whole batch, and the loss's own outputs (rewards ``[B]``, ...).
The outputs after the loss carry no gradient, as in Liger. ``loss = alpha * nll_loss + mean over pairs``.
``compiled`` and ``chunk_size`` are accepted for compatibility; prefopt's op needs neither (it
streams over the vocabulary, not over rows, and is not compiled).
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from ..ops import linear_logprobs
from ._common import row_logps

PreferenceFn = Callable[[Tensor, Tensor, Optional[Tensor], Optional[Tensor]], Tuple[Tensor, Tuple[Tensor, ...]]]


def _chosen_nll(_input, weight, bias, target, nll_target, token_logps, ignore_index):
    """Liger's NLL term: ``-sum log p(nll target)`` over the chosen rows / number of chosen NLL targets.

    The NLL targets default to the targets; where ``nll_target`` differs, one more pass of the op
    scores just those positions.
    """
    half = target.shape[0] // 2
    logps = token_logps[:half]
    if nll_target is None:
        count = (target[:half] != ignore_index).sum()
        return -logps.sum() / count
    if nll_target.shape != target.shape:
        raise ValueError(f"nll_target: expected shape {list(target.shape)} like target, got {list(nll_target.shape)}")
    labels = nll_target[:half]
    scored = labels != ignore_index
    differs = scored & (labels != target[:half])
    logps = torch.where(scored, logps, torch.zeros_like(logps))
    if bool(differs.any()):
        extra = linear_logprobs(_input[:half], weight, torch.where(differs, labels, ignore_index), bias=bias,
                                ignore_index=ignore_index).logp
        logps = torch.where(differs, extra, logps)
    return -logps.sum() / scored.sum()


def paired_loss(_input, weight, target, bias, preference: PreferenceFn, *, ignore_index=-100, alpha=1.0,
                compute_nll_loss=True, nll_target=None, use_ref_model=False, ref_input=None, ref_weight=None,
                ref_bias=None, average_log_prob=True):
    """The shared body of the paired losses: statistics from the op, then ``preference`` per pair."""
    if _input.dim() != 3 or _input.shape[0] % 2:
        raise ValueError(f"_input: expected [2B, T, H] (chosen rows then rejected rows), got {list(_input.shape)}")
    rows = row_logps(_input, weight, target, bias, ignore_index=ignore_index, average_log_prob=average_log_prob,
                     use_ref_model=use_ref_model, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
    half = target.shape[0] // 2
    chosen, rejected = rows.logps[:half], rows.logps[half:]
    ref_chosen = ref_rejected = None
    if rows.ref_logps is not None:
        ref_chosen, ref_rejected = rows.ref_logps[:half].detach(), rows.ref_logps[half:].detach()
    if compute_nll_loss:
        nll = _chosen_nll(_input, weight, bias, target, nll_target, rows.token_logps, ignore_index)
    else:
        nll = torch.zeros((), dtype=rows.logps.dtype, device=_input.device)
    per_pair, aux = preference(chosen, rejected, ref_chosen, ref_rejected)
    loss = alpha * nll + per_pair.sum() / half
    positions = half * target.shape[1]
    outputs = (chosen, rejected, rows.mean_logits[:half].sum() / positions,
               rows.mean_logits[half:].sum() / positions, nll, *aux)
    return loss, tuple(t.detach() for t in outputs)
