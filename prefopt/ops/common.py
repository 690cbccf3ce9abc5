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
    mean_logit  = mean_v z_v                            d/dz_j = 1/V
    top1        = [y is the first argmax of z]          no gradient
    log_sum_sq_probs = log sum_v p_v^2                  no gradient

so for incoming gradients g_* the gradient on the logits of one token is always

    dz_j = a * onehot_j + p_j * (c0 + c1 z_j + c2 zr_j) + c3

with four per-token scalars (computed by :func:`logit_grad_coefficients`), and the gradient on the raw
logits is ``ds_j = dz_j * (1 - (c_j / cap)^2) / temperature``. Each backend only has to recompute z
(and zr when the KL gradient is live) tile by tile and apply this formula.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional, Tuple

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
    mean_logit: bool = False
    top1: bool = False
    log_sum_sq_probs: bool = False
    # The torch backend's bound on its logits tiles alive at once (None: its fixed tile sizes).
    budget_bytes: Optional[int] = None

    @property
    def needs_mean_logit(self) -> bool:
        """Whether backward needs E_p[z] (entropy and KL gradients do); not the uniform ``mean_logit``."""
        return self.entropy or self.kl

    @property
    def needs_logit_sum(self) -> bool:
        """Whether forward needs sum_v z_v (the uniform_nll and mean_logit statistics do)."""
        return self.uniform_nll or self.mean_logit


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
    g_mean_logit: Optional[Tensor],
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
    if g_mean_logit is not None:
        c3 = g_mean_logit / vocab_size if c3 is None else c3 + g_mean_logit / vocab_size
    return GradCoefficients(a, c0, c1, c2, c3)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Statistics are accumulated in fp32, or fp64 for fp64 inputs (gradcheck)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def empty_stat(like: Tensor) -> Tensor:
    """Placeholder output for a statistic that was not asked for (autograd Functions return tensors)."""
    return like.new_empty(0)


@dataclass
class ForwardStats:
    """What a backend's streaming forward returns per token ([n] each, compute dtype; None if not asked)."""

    lse: Tensor
    target_logit: Tensor
    mean_logit: Optional[Tensor] = None  # E_p[z]
    logit_sum: Optional[Tensor] = None  # sum_v z_v
    ref_lse: Optional[Tensor] = None
    ref_target_logit: Optional[Tensor] = None
    mean_ref_logit: Optional[Tensor] = None  # E_p[zr]
    moments: Optional[Tensor] = None  # [n, H]: sum_{v != y} p_v f_v W_v (frozen-head shortcut)
    argmax: Optional[Tensor] = None  # int64: first index of max_v z_v (the top1 statistic)
    rest_mass: Optional[Tensor] = None  # 1 - p_y = sum_{v != y} p_v, summed without y (with moments)
    log_sum_sq_probs: Optional[Tensor] = None  # log sum_v p_v^2


def shortcut_grad_hidden(weight: Tensor, targets: Tensor, target_logit: Tensor, rest_mass: Tensor, moments: Tensor,
                         coef: GradCoefficients, config: OpConfig) -> Tensor:
    """Frozen head: ``d hidden = (a f_y W_y + c0 M + c3 sum_v W_v) / temperature``, no pass over the vocabulary.

    Only log-prob, lse and (without softcap) the uniform terms are live (c1 = c2 = 0), so
    ``sum_v ds_v W_v`` collapses to the target row, the moment ``M = sum_v p_v f_v W_v`` accumulated in
    forward (f: softcap derivative) and, for the uniform terms, the column sum of W (a read, no product).

    ``moments`` is ``M' = M - p_y f_y W_y`` (the target's term left out): with ``c0 = g - a``,
    ``a f_y W_y + c0 M = f_y W_y (a (1 - p_y) + g p_y) + c0 M'``, with ``rest_mass = 1 - p_y`` summed in
    forward without the target's term (not ``1 - exp(logp)``, which cancels in fp32 when p_y ~ 1), so a
    confident token (where ``W_y - M`` is tiny) loses nothing to the low-precision products of M'.
    """
    scale_y = coef.a * rest_mass + (coef.c0 + coef.a) * (1 - rest_mass)
    if config.softcap is not None:
        tanh_y = target_logit * config.temperature / config.softcap
        scale_y = scale_y * (1 - tanh_y * tanh_y)
    grad = scale_y[:, None] * weight.index_select(0, targets).to(moments.dtype) + coef.c0[:, None] * moments
    if coef.c3 is not None:
        grad += coef.c3[:, None] * weight.sum(0, dtype=moments.dtype)
    return grad / config.temperature


StreamForward = Callable[..., ForwardStats]
RecomputeGrads = Callable[..., Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]]


def make_backend_function(name: str, stream_forward: StreamForward, recompute_grads: RecomputeGrads,
                          shortcut_pays: Optional[Callable[[Tensor, Tensor], bool]] = None):
    """A backend's autograd Function from its two passes; the contract every backend shares.

    ``forward(hidden [n, H], weight [V, H], bias [V] | None, targets [n] int64, ref_hidden [n, H'] | None,
    ref_weight [V, H'] | None, ref_bias | None, config) -> (logp, lse, entropy, ref_logp, kl, uniform_nll,
    mean_logit, top1, log_sum_sq_probs)``, each [n] in the compute dtype or empty when not asked for. Every
    target is a valid index (ignored tokens were removed by the caller, or, with ``capturable=True``, given
    target 0 and masked afterwards). The backend supplies

    - ``stream_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config, moments)
      -> ForwardStats``: one streaming pass over the vocabulary (``moments``: also accumulate M);
    - ``recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config,
      want_hidden, want_weight, want_bias) -> (d hidden, d weight, d bias)``: the recompute backward.

    Saved for backward: the inputs and per-token lse, E_p[z], E_p[zr] (the reference only when the KL
    gradient can be live); with the frozen-head shortcut only the weight (a parameter), targets, the
    target logits, 1 - p_y and M'. ``frozen_head_shortcut`` on the class: ``True`` always takes the
    shortcut where it applies, ``False`` always recomputes, ``"auto"`` (the default when the backend gives
    ``shortcut_pays(hidden, weight)``) asks that function.
    Double backward is refused: the recompute backward is not itself differentiable.
    """

    class Function(torch.autograd.Function):
        frozen_head_shortcut = "auto" if shortcut_pays is not None else True

        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config: OpConfig):
            head_grad = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
            # The uniform terms (c3) reach the shortcut as a column sum of W, unless softcap makes them per entry;
            # statistics without a gradient (top1, log_sum_sq_probs) come from the forward pass either way.
            uniform_terms = config.uniform_nll or config.mean_logit
            shortcut = (Function.frozen_head_shortcut and ctx.needs_input_grad[0] and not head_grad
                        and not (config.entropy or config.kl or (uniform_terms and config.softcap is not None)))
            if shortcut and Function.frozen_head_shortcut == "auto":
                shortcut = shortcut_pays(hidden, weight)
            stats = stream_forward(hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config, shortcut)
            lse = stats.lse
            logp = stats.target_logit - lse
            entropy = lse - stats.mean_logit if config.entropy else empty_stat(lse)
            ref_logp = stats.ref_target_logit - stats.ref_lse if ref_hidden is not None else empty_stat(lse)
            kl = (stats.mean_logit - stats.mean_ref_logit) - lse + stats.ref_lse if config.kl else empty_stat(lse)
            uniform = lse - stats.logit_sum / weight.shape[0] if config.uniform_nll else empty_stat(lse)
            mean_logit = stats.logit_sum / weight.shape[0] if config.mean_logit else empty_stat(lse)
            top1 = (stats.argmax == targets).to(lse.dtype) if config.top1 else empty_stat(lse)
            log_sum_sq = stats.log_sum_sq_probs if config.log_sum_sq_probs else empty_stat(lse)

            ctx.config, ctx.shortcut, ctx.vocab, ctx.hidden_dtype = config, shortcut, weight.shape[0], hidden.dtype
            if shortcut:
                ctx.save_for_backward(weight, targets, stats.target_logit, stats.rest_mass, stats.moments)
            else:
                ref = (ref_hidden, ref_weight, ref_bias) if config.kl else (None, None, None)
                ctx.save_for_backward(hidden, weight, bias, targets, lse, stats.mean_logit, stats.mean_ref_logit, *ref)
            ctx.mark_non_differentiable(ref_logp, top1, log_sum_sq)
            ctx.set_materialize_grads(False)
            return logp, lse, entropy, ref_logp, kl, uniform, mean_logit, top1, log_sum_sq

        @staticmethod
        def backward(ctx, g_logp, g_lse, g_entropy, g_ref_logp, g_kl, g_uniform, g_mean_logit, g_top1, g_log_sum_sq):
            if torch.is_grad_enabled():
                raise RuntimeError(
                    "linear_logprobs: double backward (create_graph=True) is not supported by the fused op; "
                    "compute second-order terms on materialised logits instead"
                )
            config: OpConfig = ctx.config
            g_uniform = g_uniform if config.uniform_nll else None
            g_mean_logit = g_mean_logit if config.mean_logit else None
            if ctx.shortcut:
                weight, targets, target_logit, rest_mass, moments = ctx.saved_tensors
                coef = logit_grad_coefficients(g_logp, g_lse, None, None, g_uniform, g_mean_logit, None, None,
                                               ctx.vocab, target_logit)
                grad = shortcut_grad_hidden(weight, targets, target_logit, rest_mass, moments, coef, config)
                return (grad.to(ctx.hidden_dtype),) + (None,) * 7
            (hidden, weight, bias, targets, lse, mean_logit, mean_ref_logit,
             ref_hidden, ref_weight, ref_bias) = ctx.saved_tensors
            coef = logit_grad_coefficients(
                g_logp, g_lse, g_entropy if config.entropy else None, g_kl if config.kl else None,
                g_uniform, g_mean_logit, mean_logit, mean_ref_logit, ctx.vocab, lse,
            )
            grads = recompute_grads(hidden, weight, bias, targets, lse, ref_hidden, ref_weight, ref_bias, coef, config,
                                    *ctx.needs_input_grad[:3])
            return tuple(grads) + (None,) * 5

    Function.__name__ = Function.__qualname__ = name
    return Function
