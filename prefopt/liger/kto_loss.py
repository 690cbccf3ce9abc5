"""Liger's KTO loss (unpaired preferences) on prefopt's fused op.

Rows of ``_input [B, T, H]`` are single answers; ``preference_labels [B]`` (bool) marks the desirable ones.
Returns Liger's ``(loss, (chosen_logps_sum, rejected_logps_sum, chosen_logits_sum, rejected_logits_sum,
chosen_rewards_sum, rejected_rewards_sum))``: scalar sums over the desirable / undesirable rows of the
per-row log-probs, of the logits over every position (padding included) and the vocabulary, and of the
rewards ``beta * (lp - rf)``; none of them carries a gradient. ``loss = sum of per-row KTO losses / B``.
``compiled`` and ``chunk_size`` are accepted for compatibility; prefopt's op needs neither.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import objectives
from ._common import ArgumentAssertionError, LigerFunction, row_logps


class LigerFusedLinearKTOFunction(LigerFunction):
    """KTO with Liger's positional order ``(_input, weight, target, preference_labels, bias, ref_input,
    ref_weight, ref_bias, kl, ...)``; see :func:`prefopt.objectives.kto_loss`. ``kl`` is the reference point,
    a scalar or one value per row ``[B]`` (None: 0). Without a reference model the log-ratio is ``lp``."""

    @staticmethod
    def forward(_input, weight, target, preference_labels, bias=None, ref_input=None, ref_weight=None, ref_bias=None,
                kl=None, ignore_index=-100, beta=0.1, compiled=True, use_ref_model=True, average_log_prob=False,
                chunk_size=1):
        if preference_labels is None:
            raise ArgumentAssertionError("preference_labels: KTO needs one boolean label per row, got None")
        if preference_labels.shape != _input.shape[:1] or preference_labels.dtype != torch.bool:
            raise ArgumentAssertionError(
                f"preference_labels: expected a bool tensor of shape [{_input.shape[0]}], "
                f"got {preference_labels.dtype} {list(preference_labels.shape)}"
            )
        rows = row_logps(_input, weight, target, bias, ignore_index=ignore_index, average_log_prob=average_log_prob,
                         use_ref_model=use_ref_model, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias)
        logratios = rows.logps if rows.ref_logps is None else rows.logps - rows.ref_logps.detach()
        if isinstance(kl, torch.Tensor):
            kl = kl.detach()  # a reference point, as in Liger: no gradient flows into it
        per_row = objectives.kto_loss(logratios, preference_labels, kl, beta=beta)
        loss = per_row.sum() / _input.shape[0]
        desirable = preference_labels.to(rows.logps.dtype)
        undesirable = 1 - desirable
        logits_sums = rows.mean_logits.sum(-1) * weight.shape[0]
        rewards = beta * logratios
        outputs = ((rows.logps * desirable).sum(), (rows.logps * undesirable).sum(), (logits_sums * desirable).sum(),
                   (logits_sums * undesirable).sum(), (rewards * desirable).sum(), (rewards * undesirable).sum())
        return loss, tuple(t.detach() for t in outputs)


class LigerFusedLinearKTOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearKTOFunction`; ``forward(_input, lin_weight, target, bias,
    preference_labels, ref_input, ref_weight, ref_bias, kl)`` (Liger's order: hidden states first here).
    ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compiled: bool = True, use_ref_model: bool = False,
                 average_log_prob: bool = False, chunk_size: int = 1):
        super().__init__()
        self.ignore_index, self.beta, self.compiled = ignore_index, beta, compiled
        self.use_ref_model, self.average_log_prob, self.chunk_size = use_ref_model, average_log_prob, chunk_size

    def forward(self, _input, lin_weight, target, bias=None, preference_labels=None, ref_input=None, ref_weight=None,
                ref_bias=None, kl=None):
        return LigerFusedLinearKTOFunction.apply(
            _input, lin_weight, target, preference_labels, bias, ref_input, ref_weight, ref_bias, kl,
            self.ignore_index, self.beta, self.compiled, self.use_ref_model, self.average_log_prob, self.chunk_size,
        )
