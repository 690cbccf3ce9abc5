"""Float64 oracle of the fused op: materialises the full logits (the tests, and the GPU first-contact check)."""
from __future__ import annotations

import torch

from prefopt.ops import TokenStats


def _logits(hidden, weight, bias, temperature, softcap):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def oracle_linear_logprobs(hidden, weight, targets, *, bias=None, ignore_index=-100, temperature=1.0,
                           softcap=None, ref_hidden=None, ref_weight=None, ref_bias=None):
    """Every statistic of :func:`prefopt.linear_logprobs`, in float64, from materialised logits."""
    z = _logits(hidden, weight, bias, temperature, softcap)
    # z - logsumexp rather than log_softmax: with one logit at +inf the others get -inf (their limit), where
    # log_softmax turns the whole row into NaN.
    logq = z - torch.logsumexp(z, -1, keepdim=True)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets)).long()
    logp = logq.gather(-1, safe[..., None]).squeeze(-1)
    p = logq.exp()
    zero = torch.zeros((), dtype=torch.float64)
    mask = lambda t: torch.where(valid, t, zero)  # noqa: E731
    ref_logp = kl = None
    if ref_hidden is not None:
        if ref_weight is None:
            ref_weight, ref_bias = weight, bias
        logr = torch.log_softmax(_logits(ref_hidden, ref_weight.detach(), None if ref_bias is None else ref_bias.detach(), temperature, softcap).detach(), -1)
        ref_logp = mask(logr.gather(-1, safe[..., None]).squeeze(-1))
        kl = mask((p * (logq - logr)).sum(-1))
    return TokenStats(
        logp=mask(logp),
        lse=mask(torch.logsumexp(z, -1)),
        entropy=mask(-(p * logq).sum(-1)),
        ref_logp=ref_logp,
        kl=kl,
        uniform_nll=mask(-logq.mean(-1)),
        mean_logit=mask(z.mean(-1)),
        top1=mask((z.argmax(-1) == safe).double()),
        log_sum_sq_probs=mask(torch.logsumexp(2 * logq, -1)),  # log sum_v p_v^2
    )
