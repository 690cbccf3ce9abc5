"""Preference objectives as plain functions of per-sequence (GRPO: per-token) statistics.

Notation (DESIGN.md): ``lp_c, lp_r`` are the policy's summed log-probs of the chosen / rejected
answer, ``rf_c, rf_r`` the reference's, ``d_c = lp_c - rf_c``, ``d_r = lp_r - rf_r``,
``z = beta * (d_c - d_r)``, ``avg`` a per-token mean log-prob and ``NLL`` a per-token mean negative
log-likelihood. Every function returns one loss per pair (or per token for GRPO); the fused modules in
:mod:`prefopt.losses` reduce them.
"""
from __future__ import annotations

import math
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


def orpo_log_odds_ratio(chosen_avg: Tensor, rejected_avg: Tensor) -> Tensor:
    """ORPO's log odds ratio ``log(odds_c / odds_r)``, ``odds = p / (1 - p)`` with ``p = exp(avg)``:
    ``(avg_c - avg_r) - (log(1 - exp(avg_c)) - log(1 - exp(avg_r)))``, finite at ``avg = 0``."""
    return _log_odds(chosen_avg) - _log_odds(rejected_avg)


def orpo_loss(chosen_avg: Tensor, rejected_avg: Tensor, chosen_nll: Tensor, *, beta: float = 0.1) -> Tensor:
    """ORPO (Hong et al. 2024): ``NLL(chosen) - beta * logsig(log odds_c - log odds_r)``.

    ``odds = p / (1 - p)`` with ``p = exp(avg)`` the per-token mean probability of the answer.
    """
    return chosen_nll - beta * F.logsigmoid(orpo_log_odds_ratio(chosen_avg, rejected_avg))


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
        k3 = k3_kl(logps, ref_logps)
        loss = loss + beta * (k3 * ratio if use_bias_correction_kl else k3)
    elif beta != 0:
        raise ValueError("ref_logps: required when beta != 0 (the KL term needs the reference)")
    return GRPOTokenLoss(loss, clipped.expand_as(loss), k3)


# Objectives of the Liger-Kernel chunked losses (prefopt.liger) that prefopt's own API does not have.
# Loss-type names are Liger's and TRL's; each formula below is what those names mean there.

DPO_VARIANT_LOSS_TYPES = ("exo_pair", "nca_pair", "bco_pair", "sppo_hard", "apo_zero", "apo_down", "discopop")


def dpo_variant_loss(
    chosen_logratios: Tensor,
    rejected_logratios: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "exo_pair",
    label_smoothing: float = 0.0,
    discopop_tau: float = 0.05,
) -> Tensor:
    """Further DPO variants, one loss per pair, on the log-ratios ``d_c = lp_c - rf_c``, ``d_r = lp_r - rf_r``.

    With ``z = beta * (d_c - d_r)``, rewards ``r_c = beta * d_c``, ``r_r = beta * d_r``, ``e = label_smoothing``:

    - ``exo_pair`` (EXO, Ji et al. 2024, K=2): ``KL(q || p)`` with ``q = (sig(z), sig(-z))`` and
      ``p = (1-e, e)``: ``sig(z) (logsig(z) - log(1-e)) + sig(-z) (logsig(-z) - log e)``; needs ``e > 0``.
    - ``nca_pair`` (NCA, Chen et al. 2024): ``-logsig(r_c) - logsig(-r_c)/2 - logsig(-r_r)/2``.
    - ``bco_pair`` (BCO without its running reward shift): ``-logsig(r_c) - logsig(-r_r)``.
    - ``sppo_hard`` (SPPO, Wu et al. 2024, hard labels): ``(d_c - 1/(2 beta))^2 + (d_r + 1/(2 beta))^2``.
    - ``apo_zero`` (APO, D'Oosterlinck et al. 2024): ``1 - sig(r_c) + sig(r_r)``.
    - ``apo_down`` (APO): ``sig(r_c) + 1 - sig(z)``.
    - ``discopop`` (DiscoPOP, Chris Lu et al. 2024): ``m = sig(z / tau)``,
      ``(1 - m) * (-logsig(z)) + m * exp(-z)`` with ``tau = discopop_tau``.
    """
    if loss_type not in DPO_VARIANT_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {DPO_VARIANT_LOSS_TYPES}, got {loss_type!r}")
    z = beta * (chosen_logratios - rejected_logratios)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    if loss_type == "exo_pair":
        if not 0.0 < label_smoothing < 1.0:
            raise ValueError(
                f"label_smoothing: expected a value in (0, 1) for loss_type='exo_pair', got {label_smoothing!r}"
            )
        e = torch.tensor(label_smoothing, dtype=z.dtype, device=z.device)
        return (torch.sigmoid(z) * (F.logsigmoid(z) - torch.log1p(-e))
                + torch.sigmoid(-z) * (F.logsigmoid(-z) - torch.log(e)))
    if loss_type == "nca_pair":
        return (-F.logsigmoid(chosen_rewards) - 0.5 * F.logsigmoid(-chosen_rewards)
                - 0.5 * F.logsigmoid(-rejected_rewards))
    if loss_type == "bco_pair":
        return -F.logsigmoid(chosen_rewards) - F.logsigmoid(-rejected_rewards)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(chosen_rewards) + torch.sigmoid(rejected_rewards)
    if loss_type == "apo_down":
        return torch.sigmoid(chosen_rewards) + 1 - torch.sigmoid(z)
    modulation = torch.sigmoid(z / discopop_tau)
    return (1 - modulation) * -F.logsigmoid(z) + modulation * torch.exp(-z)


def cpo_loss(chosen_logps: Tensor, rejected_logps: Tensor, *, beta: float = 0.1, gamma: float = 0.0,
             label_smoothing: float = 0.0) -> Tensor:
    """CPO (Xu et al. 2024), reference-free, with label smoothing ``e`` and margin ``gamma``:

    ``x = beta * (lp_c - lp_r) - gamma``, ``loss = -(1-e) logsig(x) - e logsig(-x)``.
    On per-token mean log-probs with ``gamma > 0`` this is SimPO with label smoothing.
    """
    x = beta * (chosen_logps - rejected_logps) - gamma
    return -(1 - label_smoothing) * F.logsigmoid(x) - label_smoothing * F.logsigmoid(-x)


def kto_loss(logratios: Tensor, desirable: Tensor, kl: Optional[Tensor] = None, *, beta: float = 0.1) -> Tensor:
    """KTO (Ethayarajh et al. 2024), one loss per (unpaired) sequence, ``d = lp - rf``:

    desirable: ``1 - sig(beta * (d - KL))``; undesirable: ``1 - sig(beta * (KL - d))``, with ``KL`` the
    reference point (an estimate of KL(pi || pi_ref), detached; 0 when None). ``desirable`` is boolean.
    """
    sign = desirable.to(logratios.dtype) * 2 - 1
    shifted = logratios if kl is None else logratios - kl
    return 1 - torch.sigmoid(beta * shifted * sign)


def k3_kl(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """The k3 estimator of KL(pi || pi_ref) per token: ``exp(rf - lp) - (rf - lp) - 1`` (non-negative, unbiased)."""
    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def check_grpo_options(sapo_temperature_pos: float, sapo_temperature_neg: float, delta: Optional[float]) -> None:
    """ValueError naming the option unless the SAPO temperatures are > 0 and ``delta`` is None or > 0."""
    if not sapo_temperature_pos > 0:
        raise ValueError(f"sapo_temperature_pos: expected > 0, got {sapo_temperature_pos!r}")
    if not sapo_temperature_neg > 0:
        raise ValueError(f"sapo_temperature_neg: expected > 0, got {sapo_temperature_neg!r}")
    if delta is not None and not delta > 0:
        raise ValueError(f"delta: expected None or > 0, got {delta!r}")


POLICY_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")


class PolicyTokenLoss(NamedTuple):
    loss: Tensor
    log_weights: Tensor
    clipped: Tensor


def policy_gradient_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
    importance_sampling_level: str = "token",
    delta: Optional[float] = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vllm_is_ratio: Optional[Tensor] = None,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
) -> PolicyTokenLoss:
    """Per-token policy-gradient loss of the GRPO family (TRL's / Liger's ``loss_type``), before any KL term.

    ``log w = lp - lp_old`` per token, or its masked mean over the sequence for
    ``importance_sampling_level="sequence"`` (GSPO, then ``log w`` is ``[B, 1]``); ``rho = exp(log w)``,
    ``A`` the advantage per row (``advantages [B]``, logps ``[B, T]``):

    - grpo, bnpo, dr_grpo, dapo, luspo: :func:`grpo_loss`'s ``clip`` on ``rho`` (with ``delta``);
      cispo and sapo: :func:`grpo_loss`'s ``cispo`` and ``sapo``.
    - vespo: ``-sg(phi) * A * lp`` with the sequence weight ``phi(w) = exp(lam + k log w - lam w)``,
      ``log w = clamp(sum_t mask * clamp(lp - lp_old, -20, 20) + sum_t clamp(log is_ratio, log 1e-8, 20),
      log 1e-8, 20)``, ``(k, lam)`` = ``(k_pos, lambda_pos)`` for ``A >= 0`` else the negative pair
      (sg: no gradient).

    Every type but vespo is then multiplied by ``vllm_is_ratio`` (``[B, T]`` or ``[B, 1]``) when given.
    ``clipped`` (shaped like ``mask``) marks ``rho < 1-eps_low`` with ``A < 0`` or ``rho > 1+eps_high``
    with ``A > 0`` on ``rho`` before the ``delta`` cap (Liger's count; TRL counts after it); for cispo
    ``rho > eps_high`` with ``A > 0``; never for sapo and vespo.
    """
    if loss_type not in POLICY_LOSS_TYPES:
        raise ValueError(f"loss_type: expected one of {POLICY_LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in ("token", "sequence"):
        raise ValueError(
            f"importance_sampling_level: expected 'token' or 'sequence', got {importance_sampling_level!r}"
        )
    if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
        raise ValueError(f"importance_sampling_level: 'sequence' is not defined for loss_type={loss_type!r}")
    check_grpo_options(sapo_temperature_pos, sapo_temperature_neg, delta)
    mask = mask.to(logps.dtype)
    advantage = advantages.to(logps.dtype).unsqueeze(-1)
    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if loss_type == "vespo":
        with torch.no_grad():
            floor = math.log(1e-8)
            seq_log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True)
            if vllm_is_ratio is not None:
                seq_log_w = seq_log_w + torch.log(vllm_is_ratio).clamp(floor, 20.0).sum(-1, keepdim=True)
            seq_log_w = seq_log_w.clamp(floor, 20.0)
            nonneg = advantage >= 0
            k = torch.where(nonneg, vespo_k_pos, vespo_k_neg)
            lam = torch.where(nonneg, vespo_lambda_pos, vespo_lambda_neg).clamp(min=1e-4)
            phi = torch.exp(lam + k * seq_log_w - lam * torch.exp(seq_log_w)).nan_to_num(0.0, 0.0, 0.0)
        no_clip = torch.zeros_like(mask, dtype=torch.bool)
        return PolicyTokenLoss(-phi * advantage * logps, log_weights, no_clip)
    policy_loss = loss_type if loss_type in ("cispo", "sapo") else "clip"
    # grpo_loss's ratio is exp(lp - lp_old): hand it log w (and 0) so that sequence-level weights work too.
    token = grpo_loss(logps if policy_loss == "cispo" else log_weights,
                      old_logps if policy_loss == "cispo" else torch.zeros_like(log_weights), advantage,
                      beta=0.0, epsilon_low=epsilon_low, epsilon_high=epsilon_high, policy_loss=policy_loss,
                      delta=delta, sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg)
    clipped = token.clipped
    if policy_loss == "clip":
        rho = torch.exp(log_weights)
        clipped = ((rho < 1 - epsilon_low) & (advantage < 0)) | ((rho > 1 + epsilon_high) & (advantage > 0))
    loss = token.loss if vllm_is_ratio is None else token.loss * vllm_is_ratio
    return PolicyTokenLoss(loss, log_weights, clipped.expand_as(mask))


def aggregate_policy_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    num_sequences: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    num_tokens=None,
) -> Tensor:
    """Reduce a per-token loss ``[B, T]`` (or ``[B, 1]``) over the completion mask ``[B, T]`` to a scalar.

    ``n_b = sum_t mask``, ``S`` = ``num_sequences`` (default ``B``), ``N`` = ``num_tokens`` (default ``sum mask``):

    - grpo, sapo: ``sum_b (sum_t mask * l / max(n_b, 1)) / S`` (mean of per-sequence means).
    - bnpo: ``sum mask * l / max(sum mask, 1)``.
    - dr_grpo: ``sum mask * l / (S * max_completion_length)``.
    - dapo, cispo, vespo: ``sum mask * l / max(N, 1)``.
    - luspo: ``sum_b sum_t mask * l / S`` (TRL's; a sequence-level ``l_b`` of shape ``[B, 1]`` counts ``n_b``
      times, the length-unbiased sequence weight of LUSPO).
    """
    mask = mask.to(per_token_loss.dtype)
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    masked = per_token_loss * mask
    if loss_type in ("grpo", "sapo"):
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1.0)).sum() / sequences
    if loss_type == "bnpo":
        return masked.sum() / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo'")
        return masked.sum() / (sequences * max_completion_length)
    if loss_type in ("dapo", "cispo", "vespo"):
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
        return masked.sum() / tokens.clamp(min=1.0)
    if loss_type == "luspo":
        return masked.sum() / sequences
    raise ValueError(f"loss_type: expected one of {POLICY_LOSS_TYPES}, got {loss_type!r}")


def policy_token_weights(
    mask: Tensor,
    *,
    loss_type: str = "dapo",
    num_sequences: Optional[int] = None,
    max_completion_length: Optional[int] = None,
    num_tokens=None,
) -> Tensor:
    """Per-token weights ``w [B, T]`` with ``aggregate_policy_loss(l, mask) = sum_{b,t} l * w`` (for ``l``
    of shape ``[B, T]`` or ``[B, 1]``): the aggregation written as a weighted sum over tokens, known from
    the mask before any log-prob is computed (so a per-token gradient can be formed chunk by chunk).

    grpo, sapo: ``mask / (max(n_b, 1) S)``; bnpo: ``mask / max(sum mask, 1)``; dr_grpo:
    ``mask / (S max_completion_length)``; dapo, cispo, vespo: ``mask / max(N, 1)``; luspo: ``mask / S``.
    """
    mask = mask.to(torch.get_default_dtype() if not mask.is_floating_point() else mask.dtype)
    sequences = mask.shape[0] if num_sequences is None else num_sequences
    if loss_type in ("grpo", "sapo"):
        return mask / (mask.sum(-1, keepdim=True).clamp(min=1.0) * sequences)
    if loss_type == "bnpo":
        return mask / mask.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        if max_completion_length is None:
            raise ValueError("max_completion_length: required for loss_type='dr_grpo'")
        return mask / (sequences * max_completion_length)
    if loss_type in ("dapo", "cispo", "vespo"):
        tokens = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype, device=mask.device)
        return mask / tokens.clamp(min=1.0)
    if loss_type == "luspo":
        return mask / sequences
    raise ValueError(f"loss_type: expected one of {POLICY_LOSS_TYPES}, got {loss_type!r}")
