"""Preference objectives as plain functions of per-sequence (GRPO: per-token) statistics.

Notation (DESIGN.md): ``lp_c, lp_r`` are the policy's summed log-probs of the chosen / rejected
answer, ``rf_c, rf_r`` the reference's, ``d_c = lp_c - rf_c``, ``d_r = lp_r - rf_r``,
``z = beta * (d_c - d_r)``, ``avg`` a per-token mean log-prob and ``NLL`` a per-token mean negative
log-likelihood. Every function returns one loss per pair (or per token for GRPO); the fused modules in
:mod:`prefopt.losses` reduce them.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

DPO_LOSS_TYPES = ("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo")


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    rpo_alpha: float = 1.0,
    chosen_lengths: Optional[Tensor] = None,
    rejected_lengths: Optional[Tensor] = None,
) -> Tensor:
    """DPO and its variants, one loss per pair. With ``z = beta * (d_c - d_r)`` and ``e = label_smoothing``:

    - ``sigmoid`` (Rafailov et al. 2023): ``-logsig(z)``.
    - ``cdpo`` (conservative DPO, label smoothing): ``-(1-e) logsig(z) - e logsig(-z)``.
    - ``robust`` (Chowdhury et al. 2024): ``(-(1-e) logsig(z) + e logsig(-z)) / (1 - 2e)``, ``e < 0.5``.
    - ``hinge`` (SLiC): ``relu(1 - z)``.
    - ``ipo`` (Azar et al. 2023), length-normalised: ``(d_c/n_c - d_r/n_r - 1/(2 beta))^2``.
    - ``rpo`` (Pang et al. 2024): ``-logsig(z) + rpo_alpha * NLL(chosen)``, NLL = ``-lp_c / n_c``.

    ``ipo`` and ``rpo`` need the token counts ``chosen_lengths`` (and ``rejected_lengths`` for ipo).
    ``label_smoothing`` belongs to cdpo, robust and rpo; the other types refuse it rather than silently
    becoming cDPO (TRL's ``sigmoid`` ignores it).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_LOSS_TYPES}, got {loss_type!r}")
    check_dpo_label_smoothing(loss_type, label_smoothing)
    chosen_margin = chosen_logps - ref_chosen_logps
    rejected_margin = rejected_logps - ref_rejected_logps
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("chosen_lengths/rejected_lengths: required for loss_type='ipo'")
        gap = chosen_margin / chosen_lengths.clamp(min=1) - rejected_margin / rejected_lengths.clamp(min=1)
        return (gap - 1 / (2 * beta)) ** 2
    z = beta * (chosen_margin - rejected_margin)
    if loss_type == "hinge":
        return torch.relu(1 - z)
    e = label_smoothing
    if loss_type == "robust":
        return (-(1 - e) * F.logsigmoid(z) + e * F.logsigmoid(-z)) / (1 - 2 * e)
    loss = -(1 - e) * F.logsigmoid(z) - e * F.logsigmoid(-z)
    if loss_type == "rpo":
        if chosen_lengths is None:
            raise ValueError("chosen_lengths: required for loss_type='rpo'")
        loss = loss + rpo_alpha * (-chosen_logps / chosen_lengths.clamp(min=1))
    return loss


def check_dpo_label_smoothing(loss_type: str, label_smoothing: float) -> None:
    """ValueError unless ``label_smoothing`` is in [0, 0.5) and, when non-zero, used by ``loss_type``."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing: expected a value in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing and loss_type in ("sigmoid", "hinge", "ipo"):
        raise ValueError(f"label_smoothing: loss_type={loss_type!r} takes none (got {label_smoothing!r}); "
                         "label-smoothed DPO is loss_type='cdpo' (or 'robust')")


def simpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, *, beta: float = 2.0, gamma: float = 1.0) -> Tensor:
    """SimPO (Meng et al. 2024), reference-free: ``-logsig(beta*avg_c - beta*avg_r - gamma)``."""
    return -F.logsigmoid(beta * (chosen_avg - rejected_avg) - gamma)


def _log_odds(avg: Tensor) -> Tensor:
    # log(p / (1 - p)) with p = exp(avg); avg is clamped just below 0 so that p = 1 stays finite.
    avg = avg.clamp(max=-1e-6)
    return avg - torch.log(-torch.expm1(avg))


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, chosen_nll: Tensor, *, beta: float = 0.1) -> Tensor:
    """ORPO (Hong et al. 2024): ``NLL(chosen) - beta * logsig(log odds_c - log odds_r)``.

    ``odds = p / (1 - p)`` with ``p = exp(avg)`` the per-token mean probability of the answer.
    """
    return chosen_nll - beta * F.logsigmoid(_log_odds(chosen_avg) - _log_odds(rejected_avg))


class CWDPOOutput(NamedTuple):
    loss: Tensor
    weight: Tensor


def cwdpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    rejected_avg: Tensor,
    *,
    beta: float = 0.1,
    floor: float = -3.0,
    tau: float = 0.5,
    detach_weight: bool = True,
) -> CWDPOOutput:
    """Cooling-weighted DPO (Learning Dynamics of VLM Finetuning, arXiv 2510.11978).

    ``loss = -logsig(beta * (d_c - w * d_r))`` with the cooling weight ``w = sig((avg_r - floor) / tau)``,
    ``avg_r`` the policy's per-token mean log-prob of the rejected answer. Once a negative is already
    unlikely (``avg_r`` below ``floor``) its push-down cools towards zero, which avoids squeezing
    probability mass out of the rest of the vocabulary. ``w`` is detached by default.

    The paper leaves ``floor`` and ``tau`` open: prefopt's defaults (``floor=-3.0`` nats per token,
    about 5% per-token probability, ``tau=0.5``) are its own choice.
    """
    weight = torch.sigmoid((rejected_avg - floor) / tau)
    if detach_weight:
        weight = weight.detach()
    chosen_margin = chosen_logps - ref_chosen_logps
    rejected_margin = rejected_logps - ref_rejected_logps
    return CWDPOOutput(-F.logsigmoid(beta * (chosen_margin - weight * rejected_margin)), weight)


def sftc_loss(positive_nll: Tensor, negative_nll: Tensor, *, lam: float = 0.1, margin: float = 2.0) -> Tensor:
    """Constrained SFT, stage 1 of CW-DPO: ``NLL(y+) + lam * relu(C - NLL(y-))``, NLL per-token means.

    The hinge pushes a negative down only until its per-token NLL reaches the margin ``C``. The paper
    leaves ``lam`` and ``C`` open: prefopt's defaults (``lam=0.1``, ``C=2.0`` nats, about 13% per-token
    probability) are its own choice.
    """
    return positive_nll + lam * torch.relu(margin - negative_nll)


def nsft_loss(positive_nll: Tensor, kl: Tensor, *, kl_coef: float = 0.1) -> Tensor:
    """nSFT (Continual SFT Matches Multimodal RLHF, arXiv 2411.14797):
    ``NLL(chosen) + NLL(corrections) + kappa * KL_tok(pi || pi_ref)``.

    ``positive_nll`` is the NLL of the chosen and correction tokens together, ``kl`` the full-vocabulary
    KL to the reference, both on the same token normalisation. ``kl_coef`` (kappa) defaults to 0.1,
    prefopt's choice (the paper leaves it open).
    """
    return positive_nll + kl_coef * kl


class GRPOTokenLoss(NamedTuple):
    loss: Tensor
    clipped: Tensor
    k3: Optional[Tensor]


GRPO_POLICY_LOSSES = ("clip", "cispo", "sapo")


def grpo_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    ref_logps: Optional[Tensor] = None,
    *,
    beta: float = 0.04,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    policy_loss: str = "clip",
    delta: Optional[float] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    use_bias_correction_kl: bool = False,
) -> GRPOTokenLoss:
    """GRPO per token (DeepSeekMath) and its per-token variants, ``rho = exp(lp - lp_old)``:

    - ``clip`` (GRPO, DAPO, Dr. GRPO, BNPO): ``-min(rho*A, clip(rho, 1-eps_low, 1+eps_high)*A)``; with
      ``delta`` (two-sided clipping) the unclipped ``rho`` is first capped at ``delta``.
    - ``cispo`` (MiniMax-M1): ``-sg(min(rho, eps_high)) * A * lp``, sg = no gradient.
    - ``sapo`` (Soft Adaptive Policy Optimization): ``-sig(t * (rho - 1)) * 4 / t * A``, with
      ``t = sapo_temperature_pos`` where ``A > 0`` and ``sapo_temperature_neg`` elsewhere.

    Plus ``beta * k3`` with ``k3 = exp(rf - lp) - (rf - lp) - 1``, the unbiased non-negative KL
    estimator, multiplied by ``rho`` when ``use_bias_correction_kl``. ``advantages`` broadcasts against
    the per-token ``logps`` (pass ``[R, 1]`` for one advantage per sequence). Returns the per-token loss,
    where clipping was active (TRL's ``clip_ratio/region_mean``; for cispo, where ``rho > eps_high`` with
    ``A > 0``; never for sapo), and k3 (None when ``ref_logps`` is None, which needs ``beta == 0``).
    """
    if policy_loss not in GRPO_POLICY_LOSSES:
        raise ValueError(f"policy_loss: expected one of {GRPO_POLICY_LOSSES}, got {policy_loss!r}")
    ratio = torch.exp(logps - old_logps)
    if policy_loss == "clip":
        capped = ratio if delta is None else ratio.clamp(max=delta)
        loss = -torch.minimum(capped * advantages, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * advantages)
        clipped = ((capped < 1 - epsilon_low) & (advantages < 0)) | ((capped > 1 + epsilon_high) & (advantages > 0))
    elif policy_loss == "cispo":
        loss = -ratio.clamp(max=epsilon_high).detach() * advantages * logps
        clipped = (ratio > epsilon_high) & (advantages > 0)
    else:
        temperature = torch.where(advantages > 0, sapo_temperature_pos, sapo_temperature_neg)
        loss = -torch.sigmoid(temperature * (ratio - 1)) * 4 / temperature * advantages
        clipped = torch.zeros_like(ratio, dtype=torch.bool)
    k3 = None
    if ref_logps is not None:
        diff = ref_logps - logps
        k3 = torch.exp(diff) - diff - 1
        loss = loss + beta * (k3 * ratio if use_bias_correction_kl else k3)
    elif beta != 0:
        raise ValueError("ref_logps: required when beta != 0 (the KL term needs the reference)")
    return GRPOTokenLoss(loss, clipped.expand_as(loss), k3)
