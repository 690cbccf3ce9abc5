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
import torch.nn.functional as F
from torch import Tensor, nn

from .. import objectives
from ..ops import linear_logprobs
from ._common import LigerFunction, UnsupportedLossTypeError, row_logps

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


def _cpo_preference(beta, gamma, label_smoothing) -> PreferenceFn:
    def preference(chosen, rejected, ref_chosen, ref_rejected):
        per_pair = objectives.cpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=label_smoothing)
        return per_pair, (beta * chosen, beta * rejected)

    return preference


class LigerFusedLinearSimPOFunction(LigerFunction):
    """SimPO with label smoothing on per-token mean log-probs (Liger's order and defaults: ``beta=0.1``,
    ``gamma=0.5``; prefopt's own :class:`prefopt.FusedSimPOLoss` keeps the paper's 2.0 / 1.0).
    Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * avg``)."""

    @staticmethod
    def forward(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                compute_nll_loss=False, compiled=True, gamma=0.5, chunk_size=1):
        return paired_loss(_input, weight, target, bias, _cpo_preference(beta, gamma, label_smoothing),
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


class LigerFusedLinearCPOFunction(LigerFunction):
    """CPO with label smoothing (Liger's order; log-prob sums unless ``average_log_prob``).
    Aux outputs: ``chosen_rewards, rejected_rewards`` (``beta * lp``)."""

    @staticmethod
    def forward(_input, weight, target, bias=None, ignore_index=-100, beta=0.1, alpha=1.0, label_smoothing=0.0,
                compute_nll_loss=True, compiled=True, average_log_prob=False, chunk_size=1):
        return paired_loss(_input, weight, target, bias, _cpo_preference(beta, 0.0, label_smoothing),
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
