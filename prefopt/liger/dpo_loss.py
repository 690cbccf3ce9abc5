"""Liger's DPO loss and its variants on prefopt's fused op (see :mod:`prefopt.liger._paired` for the outputs)."""
from __future__ import annotations

import torch
from torch import nn

from .. import objectives
from ._common import LigerFunction, UnsupportedLossTypeError
from ._paired import PreferenceFn, paired_loss

DPO_LOSS_TYPES = ("sigmoid", "hinge", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "apo_zero",
                  "apo_down", "discopop")


def _check_dpo_options(loss_type, label_smoothing):
    if loss_type == "ipo":
        raise UnsupportedLossTypeError(
            "loss_type: Liger's DPO has no 'ipo' (it needs token counts); use prefopt.FusedDPOLoss(loss_type='ipo')"
        )
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    if loss_type == "exo_pair" and not label_smoothing > 0:
        raise ValueError(f"label_smoothing: loss_type='exo_pair' needs a value > 0 (EXO uses 1e-3), "
                         f"got {label_smoothing!r}")
    if loss_type == "robust" and not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: loss_type='robust' needs a value in [0, 0.5), got {label_smoothing!r}")


def _dpo_preference(beta, loss_type, label_smoothing, discopop_tau) -> PreferenceFn:
    def preference(chosen, rejected, ref_chosen, ref_rejected):
        ref_chosen = torch.zeros_like(chosen) if ref_chosen is None else ref_chosen
        ref_rejected = torch.zeros_like(rejected) if ref_rejected is None else ref_rejected
        if loss_type in ("sigmoid", "hinge", "robust"):
            # Liger's "sigmoid" ignores label_smoothing (no cDPO); only "robust" reads it.
            per_pair = objectives.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type,
                                           label_smoothing=label_smoothing if loss_type == "robust" else 0.0)
        else:
            per_pair = objectives.dpo_variant_loss(chosen - ref_chosen, rejected - ref_rejected, beta=beta,
                                                   loss_type=loss_type, label_smoothing=label_smoothing,
                                                   discopop_tau=discopop_tau)
        return per_pair, (beta * (chosen - ref_chosen), beta * (rejected - ref_rejected))

    return preference


class LigerFusedLinearDPOFunction(LigerFunction):
    """DPO and its variants (``loss_type``, see :data:`DPO_LOSS_TYPES`) with Liger's positional order.

    Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * (lp - rf)``, ``[B]``). Without a reference
    model (``use_ref_model=False``) the reference log-probs are 0. ``ref_weight=None`` with a reference
    model uses the policy head for the reference too (a frozen shared head, e.g. LoRA), where Liger
    needs it given. ``loss_type="ipo"`` raises Liger's ``NotImplementedError`` (also a ``ValueError``):
    prefopt's own :class:`prefopt.FusedDPOLoss` has IPO.
    """

    @staticmethod
    def forward(_input, weight, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None, ignore_index=-100,
                beta=0.1, compute_nll_loss=False, compiled=True, use_ref_model=True, average_log_prob=False,
                chunk_size=1, loss_type="sigmoid", label_smoothing=0.0, discopop_tau=0.05, alpha=1.0):
        _check_dpo_options(loss_type, label_smoothing)
        preference = _dpo_preference(beta, loss_type, label_smoothing, discopop_tau)
        return paired_loss(_input, weight, target, bias, preference,
                           ignore_index=ignore_index, alpha=alpha, compute_nll_loss=compute_nll_loss,
                           use_ref_model=use_ref_model, ref_input=ref_input, ref_weight=ref_weight, ref_bias=ref_bias,
                           average_log_prob=average_log_prob)


class LigerFusedLinearDPOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearDPOFunction`; ``forward(lin_weight, _input, target, bias, ref_input,
    ref_weight, ref_bias)``. ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, ignore_index: int = -100, beta: float = 0.1, alpha: float = 1.0, compute_nll_loss: bool = False,
                 compiled: bool = True, use_ref_model: bool = True, average_log_prob: bool = False,
                 chunk_size: int = 1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 discopop_tau: float = 0.05):
        super().__init__()
        if loss_type not in DPO_LOSS_TYPES:  # the module refuses "ipo" with a ValueError, as Liger's does
            raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
        _check_dpo_options(loss_type, label_smoothing)
        self.ignore_index, self.beta, self.alpha = ignore_index, beta, alpha
        self.compute_nll_loss, self.compiled, self.use_ref_model = compute_nll_loss, compiled, use_ref_model
        self.average_log_prob, self.chunk_size, self.loss_type = average_log_prob, chunk_size, loss_type
        self.label_smoothing, self.discopop_tau = label_smoothing, discopop_tau

    def forward(self, lin_weight, _input, target, bias=None, ref_input=None, ref_weight=None, ref_bias=None):
        return LigerFusedLinearDPOFunction.apply(
            _input, lin_weight, target, bias, ref_input, ref_weight, ref_bias, self.ignore_index, self.beta,
            self.compute_nll_loss, self.compiled, self.use_ref_model, self.average_log_prob, self.chunk_size,
            self.loss_type, self.label_smoothing, self.discopop_tau, self.alpha,
        )
