"""What every backend of the fused op shares: its configuration and the gradient algebra.

Notation, per token n and vocabulary entry v:

    s_v  = hidden . W_v + b_v                        raw logit
    c_v  = cap * tanh(s_v / cap)  (or s_v without softcap)
    z_v  = c_v / temperature                         the logit the distribution is built on
    lse  = log sum_v exp(z_v),   p_v = exp(z_v - lse)

The statistics and their gradients with respect to z_j:

    logp        = z_y - lse                            d/dz_j = onehot_j - p_j
    lse                                                 d/dz_j = p_j
    entropy     = lse - E_p[z]                          d/dz_j = -p_j (z_j - E_p[z])
    kl          = E_p[z - zr] - lse + lse_ref           d/dz_j = p_j ((z_j - zr_j) - E_p[z - zr])
    uniform_nll = lse - mean_v z_v                      d/dz_j = p_j - 1/V

so for incoming gradients g_* the gradient on the logits of one token is always

    dz_j = a * onehot_j + p_j * (c0 + c1 z_j + c2 zr_j) + c3

with four per-token scalars (computed by :func:`logit_grad_coefficients`), and the gradient on the raw
logits is ``ds_j = dz_j * (1 - (c_j / cap)^2) / temperature``. Each backend only has to recompute z
(and zr when the KL gradient is live) tile by tile and apply this formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import Tensor


@dataclass(frozen=True)
class OpConfig:
    """Options of one call of the fused op, shared by every backend."""

    temperature: float = 1.0
    softcap: Optional[float] = None
    entropy: bool = False
    kl: bool = False
    uniform_nll: bool = False

    @property
    def needs_mean_logit(self) -> bool:
        """Whether backward needs E_p[z] (entropy and KL gradients do)."""
        return self.entropy or self.kl


class GradCoefficients(NamedTuple):
    """Per-token scalars of ``dz_j = a*onehot_j + p_j*(c0 + c1*z_j + c2*zr_j) + c3`` ([n] each)."""

    a: Tensor
    c0: Tensor
    c1: Optional[Tensor]
    c2: Optional[Tensor]
    c3: Optional[Tensor]


def logit_grad_coefficients(
    g_logp: Optional[Tensor],
    g_lse: Optional[Tensor],
    g_entropy: Optional[Tensor],
    g_kl: Optional[Tensor],
    g_uniform: Optional[Tensor],
    mean_logit: Optional[Tensor],
    mean_ref_logit: Optional[Tensor],
    vocab_size: int,
    like: Tensor,
) -> GradCoefficients:
    """Fold the incoming per-token gradients into the four scalars of the logit gradient.

    ``mean_logit`` is E_p[z] and ``mean_ref_logit`` is E_p[zr] (both under the policy). ``c1``, ``c2``
    and ``c3`` are ``None`` when no gradient reaches the statistic that needs them, so backends can skip
    the reference recompute (c2) and the per-entry terms entirely.
    """
    zero = torch.zeros_like(like)
    a = g_logp if g_logp is not None else zero
    c0 = -a
    if g_lse is not None:
        c0 = c0 + g_lse
    c1 = c2 = c3 = None
    if g_entropy is not None:
        c0 = c0 + g_entropy * mean_logit
        c1 = -g_entropy
    if g_kl is not None:
        c0 = c0 - g_kl * (mean_logit - mean_ref_logit)
        c1 = g_kl if c1 is None else c1 + g_kl
        c2 = -g_kl
    if g_uniform is not None:
        c0 = c0 + g_uniform
        c3 = -g_uniform / vocab_size
    return GradCoefficients(a, c0, c1, c2, c3)


def empty_stat(like: Tensor) -> Tensor:
    """Placeholder output for a statistic that was not asked for (autograd Functions return tensors)."""
    return like.new_empty(0)
