"""What the Liger shims share: the ``.apply`` surface, Liger's exception types, per-row log-probs."""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
from torch import Tensor

from ..ops import linear_logprobs


class ArgumentAssertionError(ValueError, AssertionError):
    """A bad argument where Liger-Kernel asserts: catchable as Liger's ``AssertionError`` and as ``ValueError``."""


class UnsupportedLossTypeError(ValueError, NotImplementedError):
    """A loss type Liger's Function leaves unimplemented: Liger's ``NotImplementedError``, also a ``ValueError``."""


class LigerFunction:
    """Liger's autograd-Function surface: ``Cls.apply(*args)`` with Liger's positional order.

    Not a ``torch.autograd.Function``: ``apply`` runs :meth:`forward` (the shim, written on
    :func:`prefopt.linear_logprobs`) and autograd flows through prefopt's fused op, whose backward
    recomputes logits tile by tile. Liger's Functions take ``ctx`` first in ``forward``; here
    ``forward`` takes exactly the arguments of ``apply``.
    """

    @classmethod
    def apply(cls, *args, **kwargs):
        return cls.forward(*args, **kwargs)


def head_mean_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], valid: Tensor,
                     valid_mean_logit: Tensor) -> Tensor:
    """Mean logit over the vocabulary at every position of ``hidden [..., H]`` (no gradient, float32).

    Liger averages the logits of every position, padding included. Scored positions take the op's
    ``mean_logit``; at the others ``mean_v (h . W_v + b_v) = h . mean(W) + mean(b)``, one
    matrix-vector product with the mean head row instead of a pass over the vocabulary.
    """
    with torch.no_grad():
        dtype = valid_mean_logit.dtype
        mean_row = weight.detach().to(dtype).mean(0)
        unscored = hidden.detach().to(dtype) @ mean_row
        if bias is not None:
            unscored = unscored + bias.detach().to(dtype).mean()
        return torch.where(valid, valid_mean_logit.detach(), unscored)


class RowLogps(NamedTuple):
    """Statistics of a batch ``[R, T]``: per-row log-prob sums (or means) and the reference's, the
    per-position mean logits ``[R, T]`` and log-probs ``[R, T]`` (0 where not scored)."""

    logps: Tensor
    ref_logps: Optional[Tensor]
    mean_logits: Tensor
    token_logps: Tensor


def row_logps(_input: Tensor, weight: Tensor, target: Tensor, bias: Optional[Tensor], *, ignore_index: int,
              average_log_prob: bool, use_ref_model: bool, ref_input: Optional[Tensor],
              ref_weight: Optional[Tensor], ref_bias: Optional[Tensor]) -> RowLogps:
    """One pass of the fused op over ``_input [R, T, H]``: per-row log-prob (sum, or mean with
    ``average_log_prob``; Liger's division, so an empty row gives NaN as in Liger), the reference's
    (without gradient) when ``use_ref_model``, and the per-position mean logit of every position."""
    if _input.dim() != 3:
        raise ValueError(f"_input: expected [B, T, H] hidden states, got shape {list(_input.shape)}")
    if use_ref_model and ref_input is None:
        raise TypeError("ref_input: use_ref_model=True needs the reference hidden states, got None")
    stats = linear_logprobs(
        _input, weight, target, bias=bias, ignore_index=ignore_index,
        ref_hidden=ref_input if use_ref_model else None,
        ref_weight=ref_weight if use_ref_model else None,
        ref_bias=ref_bias if use_ref_model else None,
        mean_logit=True,
    )
    valid = target != ignore_index
    lengths = valid.sum(-1)
    logps = stats.logp.sum(-1)
    ref_logps = stats.ref_logp.sum(-1) if stats.ref_logp is not None else None
    if average_log_prob:
        logps = logps / lengths
        ref_logps = ref_logps / lengths if ref_logps is not None else None
    mean_logits = head_mean_logits(_input, weight, bias, valid, stats.mean_logit)
    return RowLogps(logps, ref_logps, mean_logits, stats.logp)
