"""What is measured: the workloads (objective + inputs) and the shapes they run on.

A workload fixes which statistics an implementation must produce and which objective turns them into
the loss; the shared objectives below are written on per-token statistics so that every implementation
that produces those statistics (naive, prefopt, Cut Cross-Entropy, ...) ends in the same formula and
the same loss value. Peer libraries with their own fused modules (Liger) compute their own loss; the
worker records every loss so that the report can show that they agree.

Conventions: paired workloads have ``rows = 2 * pairs`` rows, chosen rows first then rejected rows
(Liger's and prefopt's order); the first ``prompt`` positions of every row are ignored (``-100``), so
``scored = rows * (seq - prompt)`` tokens reach the head.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = -100
BETA = 0.1  # DPO beta (the usual default of TRL and Liger)
KAPPA = 0.1  # nSFT's per-token KL coefficient (prefopt's documented default choice)
GRPO_BETA = 0.04  # GRPO's KL coefficient (Liger's and TRL's default)
GRPO_EPS = 0.2  # GRPO's clip range


@dataclass(frozen=True)
class Shape:
    """Rows x positions of hidden states of width ``hidden``, over a vocabulary of ``vocab`` entries."""

    rows: int
    seq: int
    hidden: int
    vocab: int
    prompt: int = 0

    @property
    def positions(self) -> int:
        return self.rows * self.seq

    @property
    def scored(self) -> int:
        """Tokens whose target is not ignored: the N of the N x H x V products."""
        return self.rows * (self.seq - self.prompt)

    def label(self) -> str:
        p = f" (+{self.rows * self.prompt} ignored)" if self.prompt else ""
        return f"N={self.scored}{p} H={self.hidden} V={self.vocab}"

    def as_dict(self) -> dict:
        return {**asdict(self), "positions": self.positions, "scored": self.scored}


@dataclass(frozen=True)
class Workload:
    name: str
    description: str
    paired: bool  # rows are chosen rows then rejected rows
    ref_head: bool  # a reference head runs in the same pass (ref hidden states + ref weight)
    ref_precomputed: bool  # per-sequence (DPO) or per-token (GRPO) reference log-probs come as inputs
    frozen: bool  # the head does not require grad (LoRA): the reference shares the policy head
    kl: bool  # the objective needs the full-vocabulary per-token KL(pi || pi_ref)
    grpo: bool = False

    @property
    def naive_floor_products(self) -> int:
        """Products of N x H x V with the logits kept (the naive path): forward, d hidden, d weight when
        the head trains, plus one per reference head."""
        return (2 if self.frozen else 3) + (1 if self.ref_head else 0)

    @property
    def recompute_floor_products(self) -> int:
        """Products of a design that stores nothing and recomputes the logits in backward: one more."""
        return self.naive_floor_products + 1

    @property
    def floor_products(self) -> int:
        """Issue 3's floor, what prefopt's design needs: the recomputing floor for a trainable head, the
        naive one for a frozen head (the moments shortcut needs no recompute)."""
        return self.naive_floor_products if self.frozen else self.recompute_floor_products


WORKLOADS: Dict[str, Workload] = {
    w.name: w
    for w in [
        Workload("dpo-ref", "DPO (sigmoid) with a reference head in the same pass", True, True, False, False, False),
        Workload("dpo-precomputed", "DPO (sigmoid) with precomputed per-sequence reference log-probs", True, False, True, False, False),
        Workload("dpo-frozen", "DPO with a frozen head (LoRA): the reference shares the head", True, True, False, True, False),
        Workload("nsft-kl", "nSFT: token NLL + kappa * per-token KL(pi || pi_ref) over the vocabulary", False, True, False, False, True),
        Workload("grpo", "GRPO per token with precomputed old and reference log-probs", False, False, True, False, False, grpo=True),
    ]
}


def make_inputs(workload: Workload, shape: Shape, dtype: torch.dtype, device: str, seed: int = 0) -> Dict[str, Tensor]:
    """Random inputs of one cell, identical for every implementation (same seed, same order of draws).

    Logits come out with a standard deviation of about 2 (hidden ~ N(0, 1), weight ~ N(0, 4/H)), so the
    softmax is neither flat nor one-hot.
    """
    g = torch.Generator().manual_seed(seed)
    r, t, h, v = shape.rows, shape.seq, shape.hidden, shape.vocab

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=g) * scale).to(device=device, dtype=dtype)

    inp: Dict[str, Tensor] = {}
    inp["hidden"] = randn(r, t, h).requires_grad_(True)
    inp["weight"] = randn(v, h, scale=2.0 / h**0.5).requires_grad_(not workload.frozen)
    targets = torch.randint(0, v, (r, t), generator=g)
    targets[:, : shape.prompt] = IGNORE_INDEX
    inp["targets"] = targets.to(device)
    if workload.ref_head:
        inp["ref_hidden"] = (inp["hidden"].detach().float() + randn(r, t, h, scale=0.1).float()).to(dtype)
        if not workload.frozen:
            inp["ref_weight"] = (inp["weight"].detach().float() + randn(v, h, scale=0.2 / h**0.5).float()).to(dtype)
    if workload.ref_precomputed or workload.grpo:
        # Near the policy's own log-probs so that DPO margins and GRPO ratios are realistic.
        with torch.no_grad():
            base = token_logps_chunked(inp["hidden"].detach(), inp["weight"].detach(), inp["targets"])
        if workload.grpo:
            inp["old_logps"] = base + randn(r, t, scale=0.05).float()
            inp["ref_token_logps"] = base + randn(r, t, scale=0.1).float()
            inp["advantages"] = torch.randn(r, generator=g).to(device)
        else:
            inp["ref_logps"] = base.sum(-1) + randn(r, scale=1.0).float()
    return inp


def token_logps_chunked(hidden: Tensor, weight: Tensor, targets: Tensor, chunk: int = 256) -> Tensor:
    """log p(target) per position (0 where ignored) in chunks of rows x positions, no grad; setup only."""
    flat_h = hidden.reshape(-1, hidden.shape[-1])
    flat_y = targets.reshape(-1)
    out = torch.zeros(flat_y.shape[0], dtype=torch.float32, device=hidden.device)
    for i in range(0, flat_y.shape[0], chunk):
        z = (flat_h[i : i + chunk] @ weight.T).float()
        y = flat_y[i : i + chunk]
        safe = y.clamp_min(0)
        lp = z.gather(1, safe[:, None]).squeeze(1) - torch.logsumexp(z, 1)
        out[i : i + chunk] = torch.where(y != IGNORE_INDEX, lp, torch.zeros_like(lp))
    return out.view(targets.shape)


# ---------------------------------------------------------------------------------------------------
# Shared objectives on per-token statistics ([rows, seq], 0 at ignored positions).


def dpo_loss(token_logp: Tensor, ref: Tensor, *, per_token_ref: bool) -> Tensor:
    """DPO sigmoid: ``-logsig(beta * ((lp_c - rf_c) - (lp_r - rf_r)))`` averaged over pairs.

    ``lp`` and ``rf`` are per-sequence sums of token log-probs; ``ref`` is either per-token reference
    log-probs (summed here) or per-sequence sums.
    """
    lp = token_logp.float().sum(-1)
    rf = ref.float().sum(-1) if per_token_ref else ref.float()
    half = lp.shape[0] // 2
    margin = (lp[:half] - rf[:half]) - (lp[half:] - rf[half:])
    return -F.logsigmoid(BETA * margin).mean()


def nsft_loss(token_logp: Tensor, token_kl: Tensor, mask: Tensor) -> Tensor:
    """nSFT on one batch: mean token NLL + kappa * mean token KL(pi || pi_ref)."""
    n = mask.sum().clamp_min(1)
    return (-(token_logp.float() * mask).sum() + KAPPA * (token_kl.float() * mask).sum()) / n


def grpo_loss(token_logp: Tensor, old: Tensor, ref: Tensor, adv: Tensor, mask: Tensor) -> Tensor:
    """GRPO per token: ``-min(rho A, clip(rho, 1-eps, 1+eps) A) + beta k3``, mean over each sequence's
    tokens then over sequences (Liger's ``loss_type="grpo"``); ``rho = exp(lp - lp_old)``,
    ``k3 = exp(rf - lp) - (rf - lp) - 1``."""
    lp = token_logp.float()
    rho = torch.exp(lp - old)
    a = adv[:, None]
    pg = -torch.minimum(rho * a, torch.clamp(rho, 1 - GRPO_EPS, 1 + GRPO_EPS) * a)
    k3 = torch.exp(ref - lp) - (ref - lp) - 1
    per_token = (pg + GRPO_BETA * k3) * mask
    return (per_token.sum(-1) / mask.sum(-1).clamp_min(1)).mean()


def objective(workload: Workload, inp: Dict[str, Tensor], token_logp: Tensor, token_ref_logp: Optional[Tensor] = None,
              token_kl: Optional[Tensor] = None) -> Tensor:
    """The loss of ``workload`` from per-token statistics computed by any implementation."""
    mask = (inp["targets"] != IGNORE_INDEX).float()
    if workload.grpo:
        return grpo_loss(token_logp, inp["old_logps"], inp["ref_token_logps"], inp["advantages"], mask)
    if workload.kl:
        return nsft_loss(token_logp, token_kl, mask)
    if workload.ref_precomputed:
        return dpo_loss(token_logp, inp["ref_logps"], per_token_ref=False)
    return dpo_loss(token_logp, token_ref_logp, per_token_ref=True)


def element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def input_bytes(workload: Workload, shape: Shape, dtype: torch.dtype) -> int:
    e = element_size(dtype)
    n = shape.positions * shape.hidden * e * (2 if workload.ref_head else 1)
    w = shape.vocab * shape.hidden * e * (2 if workload.ref_head and not workload.frozen else 1)
    return n + w + shape.positions * 8 * 3


def grad_bytes(workload: Workload, shape: Shape, dtype: torch.dtype) -> int:
    e = element_size(dtype)
    return shape.positions * shape.hidden * e + (0 if workload.frozen else shape.vocab * shape.hidden * e)
