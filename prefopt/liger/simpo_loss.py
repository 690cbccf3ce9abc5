"""Liger's SimPO loss on prefopt's fused op (see :mod:`prefopt.liger._paired` for the outputs)."""
from __future__ import annotations

from torch import nn

from ._common import LigerFunction
from ._paired import paired_loss
from .cpo_loss import cpo_preference


class LigerFusedLinearSimPOFunction(LigerFunction):
    """SimPO with label smoothing on per-token mean log-probs (Liger's order and defaults: ``beta=0.1``,
    ``gamma=0.5``; prefopt's own :class:`prefopt.FusedSimPOLoss` keeps the paper's 2.0 / 1.0).
    Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * avg``)."""

    @staticmethod
    def forward(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1):
        return paired_loss(_input, weight, target, bias, cpo_preference(beta, gamma, label_smoothing),
                           ignore_index=ignore_index, alpha=alpha, compute_nll_loss=compute_nll_loss,
                           average_log_prob=True)


class LigerFusedLinearSimPOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearSimPOFunction`; ``forward(lin_weight, _input, target, bias)``.
    ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, gamma: float = 0.5, chunk_size: int = 1):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        self.gamma, self.chunk_size = gamma, chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return LigerFusedLinearSimPOFunction.apply(
            _input, lin_weight, target, bias, self.ignore_index, self.beta, self.alpha, self.label_smoothing,
            self.compute_nll_loss, self.compiled, self.gamma, self.chunk_size,
        )
