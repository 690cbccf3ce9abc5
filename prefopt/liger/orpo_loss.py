"""Liger's ORPO loss on prefopt's fused op (see :mod:`prefopt.liger._paired` for the outputs)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import objectives
from ._common import LigerFunction
from ._paired import PreferenceFn, paired_loss


def _orpo_preference(beta) -> PreferenceFn:
    def preference(chosen, rejected, ref_chosen, ref_rejected):
        log_odds = objectives.orpo_log_odds_ratio(chosen, rejected)
        per_pair = objectives.orpo_loss(chosen, rejected, torch.zeros_like(chosen), beta=beta)
        pairs = chosen.shape[0]
        return per_pair, (beta * chosen, beta * rejected, F.logsigmoid(log_odds).sum() / pairs, log_odds.sum() / pairs)

    return preference


class LigerFusedLinearORPOFunction(LigerFunction):
    """ORPO on per-token mean log-probs with Liger's positional order: ``loss = nll - beta * mean logsig(log odds
    ratio)``. Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * avg``), ``log_odds_ratio`` (mean
    ``logsig``) and ``log_odds_chosen`` (mean log odds ratio). ``nll_target [2B, T]`` replaces the NLL targets
    of the chosen rows. The loss term is :func:`prefopt.objectives.orpo_loss`, which keeps a per-token mean
    log-prob of 0 (probability 1) finite where Liger's ``log(1 - exp(0))`` gives an infinite loss."""

    @staticmethod
    def forward(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, compute_nll_loss=True,
                nll_target=None, compiled=True, chunk_size=1):
        return paired_loss(_input, weight, target, bias, _orpo_preference(beta), ignore_index=ignore_index,
                           compute_nll_loss=compute_nll_loss, nll_target=nll_target, average_log_prob=True)


class LigerFusedLinearORPOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearORPOFunction`; ``forward(lin_weight, _input, target, bias,
    nll_target)``. ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, compute_nll_loss: bool = True,
                 compiled: bool = True, chunk_size: int = 1):
        super().__init__()
        self.ignore_index, self.beta, self.compute_nll_loss = ignore_index, beta, compute_nll_loss
        self.compiled, self.chunk_size = compiled, chunk_size

    def forward(self, lin_weight, _input, target, bias=None, nll_target=None):
        return LigerFusedLinearORPOFunction.apply(_input, lin_weight, target, bias, self.ignore_index, self.beta,
                                                  self.compute_nll_loss, nll_target, self.compiled, self.chunk_size)
