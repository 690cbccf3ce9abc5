"""Liger's CPO loss on prefopt's fused op (see :mod:`prefopt.liger._paired` for the outputs)."""
from __future__ import annotations

from torch import nn

from .. import objectives
from ._common import LigerFunction
from ._paired import PreferenceFn, paired_loss


def cpo_preference(beta, gamma, label_smoothing) -> PreferenceFn:
    def preference(chosen, rejected, ref_chosen, ref_rejected):
        per_pair = objectives.cpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        return per_pair, (beta * chosen, beta * rejected)

    return preference


class LigerFusedLinearCPOFunction(LigerFunction):
    """CPO with label smoothing (Liger's order; log-prob sums unless ``average_log_prob``).
    Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * lp``)."""

    @staticmethod
    def forward(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                compute_nll_loss=True, compiled=True, average_log_prob=False, chunk_size=1):
        return paired_loss(_input, weight, target, bias, cpo_preference(beta, 0.0, label_smoothing),
                           ignore_index=ignore_index, alpha=alpha, compute_nll_loss=compute_nll_loss,
                           average_log_prob=average_log_prob)


class LigerFusedLinearCPOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearCPOFunction`; ``forward(lin_weight, _input, target, bias)``.
    ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, label_smoothing: float = 0.0,
                 compute_nll_loss: bool = True, compiled: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1):
        super().__init__()
        self.ignore_index, self.beta, self.alpha, self.label_smoothing = ignore_index, beta, alpha, label_smoothing
        self.compute_nll_loss, self.compiled = compute_nll_loss, compiled
        self.average_log_prob, self.chunk_size = average_log_prob, chunk_size

    def forward(self, lin_weight, _input, target, bias=None):
        return LigerFusedLinearCPOFunction.apply(
            _input, lin_weight, target, bias, self.ignore_index, self.beta, self.alpha, self.label_smoothing,
            self.compute_nll_loss, self.compiled, self.average_log_prob, self.chunk_size,
        )
