"""Training methods: a method name -> its stages, each a fused loss module, a batch mode and a reference need.

==========  =========================================================================  ======  =========
method      stage(s)                                                                   batch   reference
==========  =========================================================================  ======  =========
sft         :class:`~prefopt.FusedSFTLoss` on the chosen answers                        sft     none
sft-c       :class:`~prefopt.FusedSFTCLoss` (NLL(y+) + lam * relu(C - NLL(y-)))         pair    none
dpo         :class:`~prefopt.FusedDPOLoss` with ``loss_type`` (sigmoid, cdpo, robust,   pair    log-probs
            hinge, ipo, rpo)
cw-dpo      SFT-C for the first ``sftc_fraction`` of the steps, then                   pair    log-probs
            :class:`~prefopt.FusedCWDPOLoss` with a share of on-policy negatives
nsft        :class:`~prefopt.FusedNSFTLoss` on chosen + corrections, per-token KL       nsft    hidden
            (``kl_coef=0``: :class:`~prefopt.FusedSFTLoss` on the same rows)                   none
grpo        :class:`~prefopt.FusedGRPOLoss` on ``num_generations`` answers sampled per   grpo    hidden
            prompt, reward 1 for the exact reference answer, TRL's loss types                  none
            (``grpo_beta=0``: no KL, no reference)
simpo       :class:`~prefopt.FusedSimPOLoss`                                           pair    none
orpo        :class:`~prefopt.FusedORPOLoss`                                            pair    none
==========  =========================================================================  ======  =========

"log-probs": the loss needs the reference's per-sequence log-prob sums, which come either from the
reference's hidden states in the same fused pass or from a precompute file; "hidden": nSFT's per-token
full-vocabulary KL and GRPO's per-token k3 need the reference's hidden states themselves (no precompute).
"none": no reference is built at all (one model in memory).

:class:`PolicyObjective` is the module the loop (and DDP / DeepSpeed) wraps: its ``forward`` runs the
reference (no grad), the policy backbone to its final hidden states and the stage's fused loss on the
head weight. Logits are never computed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from .. import (FusedCWDPOLoss, FusedDPOLoss, FusedGRPOLoss, FusedLoss, FusedNSFTLoss, FusedORPOLoss, FusedSFTCLoss,
                FusedSFTLoss, FusedSimPOLoss)
from .. import sequence_logps
from ..objectives import DPO_LOSS_TYPES

METHODS = ("sft", "sft-c", "dpo", "cw-dpo", "nsft", "simpo", "orpo", "grpo")

#: What a stage can need of the reference, weakest first (a method needs the strictest of its stages').
REFERENCE_NEEDS = ("none", "logps", "hidden")

#: TRL's GRPO loss types (``GRPOConfig.loss_type``) the trainer offers (FusedGRPOLoss's, meaning what TRL means).
GRPO_LOSS_TYPES = FusedGRPOLoss.LOSS_TYPES

#: ``--beta`` when not given: each paper's usual value.
DEFAULT_BETA = {"dpo": 0.1, "cw-dpo": 0.1, "simpo": 2.0, "orpo": 0.1}


@dataclass
class MethodOptions:
    """Hyper-parameters of every method (the CLI's options; each method reads its own)."""

    beta: Optional[float] = None  # None: DEFAULT_BETA of the method
    loss_type: str = "sigmoid"  # dpo
    label_smoothing: float = 0.0  # dpo (cdpo/robust), sft, sft-c positives
    rpo_alpha: float = 1.0  # dpo loss_type=rpo
    simpo_gamma: float = 1.0  # simpo
    cw_floor: Optional[float] = None  # cw-dpo; None: FusedCWDPOLoss's default
    cw_tau: float = 0.5  # cw-dpo
    sftc_lam: float = 0.1  # sft-c and cw-dpo stage 1
    sftc_margin: float = 2.0  # sft-c and cw-dpo stage 1
    sftc_fraction: float = 0.3  # cw-dpo: share of the steps spent in stage 1
    onpolicy_fraction: float = 0.25  # cw-dpo stage 2: share of the negatives sampled from the policy
    kl_coef: float = 0.1  # nsft; 0: no KL term and no reference model
    num_generations: int = 4  # grpo: sampled answers per prompt
    grpo_loss_type: str = "dapo"  # grpo: TRL's loss type (TRL's default)
    grpo_beta: float = 0.0  # grpo: weight of the k3 KL to the reference (TRL's default 0: no reference)
    grpo_epsilon: float = 0.2  # grpo: clipping range of the ratio (TRL's default)
    max_completion_length: int = 24  # grpo dr_grpo's constant normaliser (the sampling limit)


@dataclass
class Stage:
    """One phase of a method: ``loss`` (a fused loss module), the collator ``mode`` ("pair", "sft",
    "nsft", or "grpo": rollouts sampled from the policy, collated as "sft" rows), what it needs of the
    reference ("none", "logps", "hidden"), the share of the rejected answers replaced by answers sampled
    from the policy, and GRPO's ``num_generations`` per prompt."""

    name: str
    loss: FusedLoss
    mode: str
    reference: str = "none"
    onpolicy_fraction: float = 0.0
    num_generations: int = 0


@dataclass
class Method:
    """A method's stages, each with the first optimizer step (0-based) it runs at."""

    name: str
    stages: List[Tuple[int, Stage]]

    def stage_at(self, step: int) -> Stage:
        current = self.stages[0][1]
        for first, stage in self.stages:
            if step >= first:
                current = stage
        return current

    @property
    def reference(self) -> str:
        """The strictest need of its stages: "none", "logps" or "hidden"."""
        return max((s.reference for _, s in self.stages), key=REFERENCE_NEEDS.index)

    @property
    def reference_point(self) -> Optional[int]:
        """The step whose policy is the reference: the start of the first stage that needs one (CW-DPO:
        the end of stage 1), None for reference-free methods."""
        return next((first for first, s in self.stages if s.reference != "none"), None)

    @property
    def onpolicy(self) -> bool:
        """Whether it trains on answers sampled while training (which no precompute pass can score)."""
        return any(s.onpolicy_fraction > 0 or s.mode == "grpo" for _, s in self.stages)


def build_method(name: str, options: MethodOptions, *, total_steps: int, temperature: float = 1.0,
                 softcap: Optional[float] = None, backend: str = "auto") -> Method:
    """The :class:`Method` ``name`` with ``options``; the losses take the head's temperature and softcap
    and Hugging Face labels (``shift=True``). ``ValueError`` for an unknown name or a bad option."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r} (expected one of {', '.join(METHODS)})")
    o = options
    if o.loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"--loss-type: expected one of {', '.join(DPO_LOSS_TYPES)}, got {o.loss_type!r}")
    for field, value in (("--sftc-fraction", o.sftc_fraction), ("--onpolicy-fraction", o.onpolicy_fraction)):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{field}: expected a fraction in [0, 1], got {value!r}")
    if name == "grpo" and o.grpo_loss_type not in GRPO_LOSS_TYPES:
        raise ValueError(f"--grpo-loss-type: expected one of {', '.join(GRPO_LOSS_TYPES)}, got {o.grpo_loss_type!r}")
    if name == "grpo" and o.num_generations < 2:
        raise ValueError(f"--num-generations: expected at least 2 (advantages compare answers within a group), "
                         f"got {o.num_generations}")
    for field, value in (("--kl-coef", o.kl_coef), ("--grpo-beta", o.grpo_beta)):
        if value < 0:
            raise ValueError(f"{field}: expected a weight >= 0, got {value!r}")
    common = dict(shift=True, temperature=temperature, softcap=softcap, backend=backend)
    beta = o.beta if o.beta is not None else DEFAULT_BETA.get(name)

    def sftc() -> Stage:
        return Stage("sft-c", FusedSFTCLoss(lam=o.sftc_lam, margin=o.sftc_margin, label_smoothing=o.label_smoothing,
                                            **common), "pair")

    if name == "sft":
        stages = [(0, Stage("sft", FusedSFTLoss(label_smoothing=o.label_smoothing, **common), "sft"))]
    elif name == "sft-c":
        stages = [(0, sftc())]
    elif name == "dpo":
        loss = FusedDPOLoss(beta=beta, loss_type=o.loss_type, label_smoothing=o.label_smoothing,
                            rpo_alpha=o.rpo_alpha, **common)
        stages = [(0, Stage("dpo", loss, "pair", "logps"))]
    elif name == "cw-dpo":
        floor = {} if o.cw_floor is None else {"floor": o.cw_floor}
        cw = Stage("cw-dpo", FusedCWDPOLoss(beta=beta, tau=o.cw_tau, **floor, **common), "pair", "logps",
                   o.onpolicy_fraction)
        boundary = int(round(o.sftc_fraction * total_steps))
        stages = [(0, sftc()), (boundary, cw)] if boundary > 0 else [(0, cw)]
    elif name == "nsft" and o.kl_coef == 0:
        # Without its KL term nSFT is SFT on the chosen answers and corrections: one model, no reference.
        stages = [(0, Stage("nsft", FusedSFTLoss(**common), "nsft"))]
    elif name == "nsft":
        stages = [(0, Stage("nsft", FusedNSFTLoss(kl_coef=o.kl_coef, **common), "nsft", "hidden"))]
    elif name == "grpo":
        loss = FusedGRPOLoss(loss_type=o.grpo_loss_type, max_completion_length=o.max_completion_length,
                             beta=o.grpo_beta, epsilon_low=o.grpo_epsilon, epsilon_high=o.grpo_epsilon, **common)
        stages = [(0, Stage("grpo", loss, "grpo", "hidden" if o.grpo_beta > 0 else "none",
                            num_generations=o.num_generations))]
    elif name == "simpo":
        stages = [(0, Stage("simpo", FusedSimPOLoss(beta=beta, gamma=o.simpo_gamma, **common), "pair"))]
    else:  # orpo
        stages = [(0, Stage("orpo", FusedORPOLoss(beta=beta, **common), "pair"))]
    return Method(name, stages)


def answer_reward(prompt: str, chosen: str, answer: str) -> float:
    """GRPO's verifiable reward: 1.0 for a right answer, else 0.0. On the synthetic set's verifiable
    questions (colour, count, position, presence) the answer is judged by the set's exact parser
    (:func:`prefopt.train.synthetic.judge`: the whole answer must be one of the question's answer forms
    stating the true fact); on any other record it must be the chosen answer itself, compared after
    folding case, collapsing whitespace and dropping final punctuation. Never a substring test."""
    from .synthetic import judge

    verdict = judge(prompt, chosen, answer)
    if verdict is not None:
        return float(verdict[1])
    return float(_normalise_answer(answer) == _normalise_answer(chosen))


def _normalise_answer(text: str) -> str:
    return " ".join(text.split()).rstrip(" .!").casefold()


def group_advantages(rewards: Tensor, num_generations: int) -> Tensor:
    """TRL's GRPO advantages (``scale_rewards="group"``): each reward minus its group's mean, divided by
    the group's standard deviation (unbiased) + 1e-4; ``rewards`` holds ``num_generations`` consecutive
    answers per prompt."""
    groups = rewards.view(-1, num_generations)
    advantages = (groups - groups.mean(-1, keepdim=True)) / (groups.std(-1, keepdim=True) + 1e-4)
    return advantages.reshape(-1)


class PolicyObjective(nn.Module):
    """The module the loop wraps (DDP / DeepSpeed): everything that touches trainable weights runs in its
    ``forward``, so DDP all-reduces every gradient and ZeRO-3 gathers the head weight for the fused op.

    ``forward(batch, stage=stage, num_items=N, indices=idx)`` -> :class:`~prefopt.LossOutput` of the
    stage's loss on ``batch`` (the collator's dict), normalised by ``N`` items of the whole accumulated
    batch; ``indices`` are the records' positions in the training set (for precomputed reference
    log-probs). ``forward(batch)`` without a stage -> ``(logp_sums [R], token_counts [R])`` of the
    policy, for probes.
    """

    def __init__(self, policy, reference=None):
        super().__init__()
        self.model = policy.model  # registered: DDP / DeepSpeed see the trainable parameters
        self.policy = policy  # the ModelAdapter (not a module)
        self.reference = reference  # None or a prefopt.train.reference.Reference (not a module)

    def forward(self, batch: Dict[str, Tensor], stage: Optional[Stage] = None, num_items: Optional[int] = None,
                indices: Optional[Sequence[int]] = None):
        if stage is None:
            return self.sequence_logps(batch)
        batch = dict(batch)
        extra = {"advantages": batch.pop("advantages")} if stage.mode == "grpo" else {}
        ref = {}
        if stage.reference != "none":
            with torch.no_grad():
                ref = self.reference.loss_inputs(batch, indices, hidden=stage.reference == "hidden")
        hidden = self.policy.hidden_states(**batch)
        head = self.policy.head()
        return stage.loss(head.weight, hidden, batch["labels"], bias=head.bias, num_items_in_batch=num_items, **extra,
                          **ref)

    def sequence_logps(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, Tensor]:
        head = self.policy.head()
        hidden = self.policy.hidden_states(**batch)
        return sequence_logps(head.weight, hidden, batch["labels"], bias=head.bias, shift=True,
                              temperature=head.temperature, softcap=head.softcap)
