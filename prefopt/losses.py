"""Drop-in fused losses: (head weight, hidden states, targets) -> loss, without ever holding the logits.

Each loss has a module form (``FusedDPOLoss(beta=0.1)(weight, hidden, targets, ...)``) and a functional
form (``fused_dpo_loss(weight, hidden, targets, ..., beta=0.1)``). Paired losses take the chosen rows
first and the rejected rows second (``hidden [2B, T, H]``), in the positional order of Liger-Kernel's
``LigerFusedLinearDPOLoss``, and return ``LossOutput(loss, metrics)`` with TRL's metric names.

Gradient accumulation: every loss averages over a unit (``pairs``, target ``tokens`` or ``sequences``,
see ``unit``); pass the size of the whole accumulated batch in that unit as ``num_items_in_batch`` (sum
of :meth:`FusedLoss.count_items` over the micro-batches) and the micro-batch losses add up to the loss of
the whole batch.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import objectives
from .ops import TokenStats, linear_logprobs
from .ops.objective import ObjectiveOutput, linear_objective


class LossOutput(NamedTuple):
    loss: Tensor
    metrics: Dict[str, Tensor]


def shift_left(t: Tensor, fill) -> Tensor:
    """``out[..., i] = t[..., i + 1]``, the last position filled: aligns HF-style labels with hidden."""
    return torch.cat([t[..., 1:], t.new_full(t.shape[:-1] + (1,), fill)], dim=-1)


def sequence_logps(
    weight: Tensor,
    hidden: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    shift: bool = False,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    backend: str = "auto",
) -> Tuple[Tensor, Tensor]:
    """Per-row summed log-prob of the targets and the number of scored tokens: ``(sum_t logp, n)``.

    For reference precompute passes and log-prob probes. ``shift=True`` takes Hugging Face labels.
    """
    if shift:
        targets = shift_left(targets, ignore_index)
    stats = linear_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore_index,
                            temperature=temperature, softcap=softcap, backend=backend)
    return stats.logp.sum(-1), (targets != ignore_index).sum(-1)


class FusedLoss(nn.Module):
    """Common options of every fused loss.

    Args:
        ignore_index: target value of positions that are not scored (prompt, image, padding).
        temperature: logits are divided by it before the softmax.
        softcap: ``cap * tanh(logits / cap)`` before the temperature (Gemma-2 style); None for none.
        shift: targets are Hugging Face labels (``hidden[:, t]`` predicts ``targets[:, t + 1]``);
            False means they are already aligned with ``hidden``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"`` (see :func:`prefopt.linear_logprobs`).
        fused_gradient: form the gradients in the forward pass (:func:`prefopt.linear_objective`: 3 matrix
            products for a trainable head instead of 4) where the loss allows it; False always recomputes.
        budget_bytes: memory for the logits tiles of one chunk of tokens on that path (None: the op's
            default, :func:`prefopt.ops.objective.default_budget_bytes`).
    """

    unit = "tokens"

    def __init__(self, *, ignore_index: int = -100, temperature: float = 1.0, softcap: Optional[float] = None,
                 shift: bool = False, backend: str = "auto", fused_gradient: bool = True,
                 budget_bytes: Optional[int] = None):
        super().__init__()
        self.ignore_index = ignore_index
        self.temperature = temperature
        self.softcap = softcap
        self.shift = shift
        self.backend = backend
        self.fused_gradient = fused_gradient
        self.budget_bytes = budget_bytes

    def align(self, per_token: Tensor, fill) -> Tensor:
        """Shift a per-position tensor like the targets when ``shift`` is on."""
        return shift_left(per_token, fill) if self.shift else per_token

    def count_items(self, targets: Tensor) -> int:
        """Size of this micro-batch in the loss's ``unit``, to sum into ``num_items_in_batch``."""
        mask = self.align(targets, self.ignore_index) != self.ignore_index
        if self.unit == "tokens":
            return int(mask.sum())
        if self.unit == "sequences":
            return int(mask.any(-1).sum())
        return targets.shape[0] // 2

    def objective_pass(self, weight, hidden, targets, token_loss, token_inputs=(), bias=None, ref_hidden=None,
                       ref_weight=None, ref_bias=None, **flags) -> ObjectiveOutput:
        """Run :func:`prefopt.linear_objective` on the (aligned) targets: the loss ``sum_t token_loss``,
        its gradient formed in the forward pass where it applies. ``token_inputs`` are aligned already."""
        return linear_objective(
            hidden, weight, self.align(targets, self.ignore_index), token_loss, token_inputs=token_inputs, bias=bias,
            ignore_index=self.ignore_index, temperature=self.temperature, softcap=self.softcap, ref_hidden=ref_hidden,
            ref_weight=ref_weight, ref_bias=ref_bias, backend=self.backend, budget_bytes=self.budget_bytes,
            fused_gradient=self.fused_gradient, **flags,
        )

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_") and k != "training")


@dataclass
class PairStats:
    """Per-pair sums the paired objectives are written on (``[B]`` each)."""

    chosen_logps: Tensor
    rejected_logps: Tensor
    chosen_lengths: Tensor
    rejected_lengths: Tensor
    ref_chosen_logps: Optional[Tensor]
    ref_rejected_logps: Optional[Tensor]
    chosen_uniform_nll: Optional[Tensor]

    @property
    def chosen_avg(self) -> Tensor:
        return self.chosen_logps / self.chosen_lengths.clamp(min=1)

    @property
    def rejected_avg(self) -> Tensor:
        return self.rejected_logps / self.rejected_lengths.clamp(min=1)

    def reference_rewards(self, beta: float) -> Dict[str, Tensor]:
        """TRL's reward metrics with DPO's implicit rewards ``beta * (lp - rf)``."""
        return reward_metrics(beta * (self.chosen_logps - self.ref_chosen_logps),
                              beta * (self.rejected_logps - self.ref_rejected_logps))


class PairedLoss(FusedLoss):
    """Base of the losses on (chosen, rejected) pairs; subclasses implement :meth:`objective`."""

    unit = "pairs"
    needs_reference = True
    # What ``logps/chosen`` / ``logps/rejected`` report, as the peers report them under those names: per-row
    # sums (TRL's DPOTrainer) or per-token averages (TRL's CPO/ORPO trainers and Liger for SimPO and ORPO).
    average_logps = False

    def stat_flags(self) -> Dict[str, bool]:
        return {}

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                num_items_in_batch: Optional[int] = None) -> LossOutput:
        """Loss of ``B`` pairs: ``hidden [2B, T, H]`` holds chosen rows then rejected rows.

        The reference comes either as hidden states (``ref_hidden`` with ``ref_weight``, which defaults
        to ``weight``, computed in the same fused pass) or as precomputed per-row log-prob sums
        ``ref_logps [2B]`` in the same row order.
        """
        if hidden.dim() != 3 or hidden.shape[0] % 2:
            raise ValueError(
                f"hidden: expected [2B, T, H] with chosen rows then rejected rows, got {list(hidden.shape)}"
            )
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError("ref_logps: give either ref_logps or ref_hidden, not both")
        if self.needs_reference and ref_logps is None and ref_hidden is None:
            raise ValueError(f"ref_hidden/ref_logps: {type(self).__name__} needs the reference policy")
        if ref_logps is not None and ref_logps.shape != (hidden.shape[0],):
            raise ValueError(f"ref_logps: expected shape [{hidden.shape[0]}] (one per row), got {list(ref_logps.shape)}")
        rows, half = hidden.shape[0], hidden.shape[0] // 2
        lengths = (self.align(targets, self.ignore_index) != self.ignore_index).sum(-1)
        divisor = num_items_in_batch if num_items_in_batch is not None else half
        row_ids = torch.arange(rows, device=targets.device)[:, None].expand(targets.shape)

        def pair_stats(logps: Tensor, refs: Optional[Tensor], uniform: Optional[Tensor], pairs: Tensor) -> PairStats:
            """The per-row sums ``[2B]`` of ``pairs`` (indices of pairs) as PairStats."""
            if ref_logps is not None:
                refs = ref_logps.detach().to(logps.dtype)
            take = lambda t, offset: None if t is None else t.index_select(0, pairs + offset)  # noqa: E731
            return PairStats(take(logps, 0), take(logps, half), take(lengths, 0), take(lengths, half),
                             take(refs, 0), take(refs, half), take(uniform, 0))

        def pair_loss(stats: TokenStats, row: Tensor) -> Tensor:
            # A chunk holds whole pairs: the objective of the pairs present, on their row sums.
            def row_sums(values):
                return None if values is None else values.new_zeros(rows).index_add(0, row, values)

            pairs = torch.unique(row % half)
            per_pair, _ = self.objective(pair_stats(row_sums(stats.logp), row_sums(stats.ref_logp),
                                                    row_sums(stats.uniform_nll), pairs))
            return per_pair / divisor

        out = self.objective_pass(weight, hidden, targets, pair_loss, [row_ids], bias, ref_hidden, ref_weight, ref_bias,
                                  groups=row_ids % half, **self.stat_flags())
        sums = [None if t is None else t.sum(-1) for t in (out.stats.logp, out.stats.ref_logp, out.stats.uniform_nll)]
        pairs = pair_stats(*sums, torch.arange(half, device=targets.device))
        with torch.no_grad():
            per_pair, metrics = self.objective(pairs)
        loss = out.loss
        empty = (lengths[:half] + lengths[half:]) == 0
        if bool(empty.any()):
            # Pairs without a scored token never reach pair_loss; their loss is a constant.
            loss = loss + per_pair[empty].sum() / divisor
        metrics = {k: v.float().mean() for k, v in metrics.items()}
        chosen, rejected = ((pairs.chosen_avg, pairs.rejected_avg) if self.average_logps
                            else (pairs.chosen_logps, pairs.rejected_logps))
        metrics["logps/chosen"] = chosen.float().mean()
        metrics["logps/rejected"] = rejected.float().mean()
        return LossOutput(loss, metrics)

    def objective(self, pairs: PairStats) -> Tuple[Tensor, Dict[str, Tensor]]:
        raise NotImplementedError


def reward_metrics(chosen_rewards: Tensor, rejected_rewards: Tensor) -> Dict[str, Tensor]:
    """TRL's reward metrics from per-pair implicit rewards."""
    return {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "rewards/margins": chosen_rewards - rejected_rewards,
    }


class FusedDPOLoss(PairedLoss):
    """DPO and its variants (see :func:`prefopt.objectives.dpo_loss`) on the fused op.

    ``loss = mean over pairs of dpo_loss(lp_c, lp_r, rf_c, rf_r)``; rewards are ``beta * (lp - rf)``.
    """

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0,
                 rpo_alpha: float = 1.0, **options):
        super().__init__(**options)
        if loss_type not in objectives.DPO_LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {objectives.DPO_LOSS_TYPES}, got {loss_type!r}")
        objectives.check_dpo_label_smoothing(loss_type, label_smoothing)
        self.beta, self.loss_type, self.label_smoothing, self.rpo_alpha = beta, loss_type, label_smoothing, rpo_alpha

    def objective(self, pairs: PairStats):
        loss = objectives.dpo_loss(
            pairs.chosen_logps, pairs.rejected_logps, pairs.ref_chosen_logps, pairs.ref_rejected_logps,
            beta=self.beta, loss_type=self.loss_type, label_smoothing=self.label_smoothing,
            rpo_alpha=self.rpo_alpha, chosen_lengths=pairs.chosen_lengths, rejected_lengths=pairs.rejected_lengths,
        )
        return loss, pairs.reference_rewards(self.beta)


class FusedCWDPOLoss(PairedLoss):
    """Cooling-weighted DPO (see :func:`prefopt.objectives.cwdpo_loss`); metric ``cooling_weight``."""

    def __init__(self, beta: float = 0.1, floor: float = -3.0, tau: float = 0.5, detach_weight: bool = True,
                 **options):
        super().__init__(**options)
        if tau <= 0:
            raise ValueError(f"tau: expected a temperature > 0, got {tau!r}")
        self.beta, self.floor, self.tau, self.detach_weight = beta, floor, tau, detach_weight

    def objective(self, pairs: PairStats):
        out = objectives.cwdpo_loss(
            pairs.chosen_logps, pairs.rejected_logps, pairs.ref_chosen_logps, pairs.ref_rejected_logps,
            pairs.rejected_avg, beta=self.beta, floor=self.floor, tau=self.tau, detach_weight=self.detach_weight,
        )
        metrics = pairs.reference_rewards(self.beta)
        metrics["cooling_weight"] = out.weight
        return out.loss, metrics


class FusedSimPOLoss(PairedLoss):
    """SimPO (see :func:`prefopt.objectives.simpo_loss`), no reference; rewards are ``beta * avg``.

    ``logps/*`` are per-token averages (as in TRL and Liger). The defaults ``beta=2.0, gamma=1.0`` are the
    paper's (Liger's are in :mod:`prefopt.liger`).
    """

    needs_reference = False
    average_logps = True

    def __init__(self, beta: float = 2.0, gamma: float = 1.0, **options):
        super().__init__(**options)
        self.beta, self.gamma = beta, gamma

    def objective(self, pairs: PairStats):
        loss = objectives.simpo_loss(pairs.chosen_avg, pairs.rejected_avg, beta=self.beta, gamma=self.gamma)
        return loss, reward_metrics(self.beta * pairs.chosen_avg, self.beta * pairs.rejected_avg)


class FusedORPOLoss(PairedLoss):
    """ORPO (see :func:`prefopt.objectives.orpo_loss`), no reference; rewards are ``beta * avg``.

    ``logps/*`` are per-token averages (as in TRL and Liger).
    """

    needs_reference = False
    average_logps = True

    def __init__(self, beta: float = 0.1, **options):
        super().__init__(**options)
        self.beta = beta

    def objective(self, pairs: PairStats):
        nll = -pairs.chosen_avg
        loss = objectives.orpo_loss(pairs.chosen_avg, pairs.rejected_avg, nll, beta=self.beta)
        metrics = reward_metrics(self.beta * pairs.chosen_avg, self.beta * pairs.rejected_avg)
        metrics["nll"] = nll
        return loss, metrics


class FusedSFTCLoss(PairedLoss):
    """Constrained SFT (see :func:`prefopt.objectives.sftc_loss`): rows are positives then negatives.

    With ``label_smoothing = e`` the positive NLL per token is ``(1 - e) * (-logp) + e * uniform_nll``.
    """

    needs_reference = False

    def __init__(self, lam: float = 0.1, margin: float = 2.0, label_smoothing: float = 0.0, **options):
        super().__init__(**options)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
        self.lam, self.margin, self.label_smoothing = lam, margin, label_smoothing

    def stat_flags(self):
        return {"uniform_nll": self.label_smoothing > 0}

    def objective(self, pairs: PairStats):
        positive_nll = -pairs.chosen_avg
        if pairs.chosen_uniform_nll is not None:
            smooth = pairs.chosen_uniform_nll / pairs.chosen_lengths.clamp(min=1)
            positive_nll = (1 - self.label_smoothing) * positive_nll + self.label_smoothing * smooth
        negative_nll = -pairs.rejected_avg
        loss = objectives.sftc_loss(positive_nll, negative_nll, lam=self.lam, margin=self.margin)
        return loss, {"nll/positive": positive_nll, "nll/negative": negative_nll}


class FusedSFTLoss(FusedLoss):
    """Supervised fine-tuning: token-mean ``(1 - e) * (-logp) + e * uniform_nll`` (e = label_smoothing)."""

    def __init__(self, label_smoothing: float = 0.0, **options):
        super().__init__(**options)
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: expected a value in [0, 1), got {label_smoothing!r}")
        self.label_smoothing = label_smoothing

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                num_items_in_batch: Optional[int] = None) -> LossOutput:
        count = (self.align(targets, self.ignore_index) != self.ignore_index).sum()
        divisor = num_items_in_batch if num_items_in_batch is not None else count.clamp(min=1)
        smoothing = self.label_smoothing

        def token_loss(stats: TokenStats) -> Tensor:
            nll = -stats.logp
            if smoothing > 0:
                nll = (1 - smoothing) * nll + smoothing * stats.uniform_nll
            return nll / divisor

        out = self.objective_pass(weight, hidden, targets, token_loss, bias=bias, uniform_nll=smoothing > 0)
        return LossOutput(out.loss, {"nll": -out.stats.logp.sum() / count.clamp(min=1)})


class FusedNSFTLoss(FusedLoss):
    """nSFT (see :func:`prefopt.objectives.nsft_loss`): every row is a positive (chosen or correction).

    ``loss = sum_t (-logp_t + kl_coef * KL_t) / N`` over the scored tokens of all rows, with ``KL_t`` the
    full-vocabulary KL(pi || pi_ref) from the reference hidden states (computed in the same pass).
    """

    def __init__(self, kl_coef: float = 0.1, **options):
        super().__init__(**options)
        self.kl_coef = kl_coef

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, bias: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, num_items_in_batch: Optional[int] = None) -> LossOutput:
        if ref_hidden is None:
            raise ValueError("ref_hidden: FusedNSFTLoss needs the reference hidden states for its per-token KL")
        count = (self.align(targets, self.ignore_index) != self.ignore_index).sum().clamp(min=1)
        divisor = num_items_in_batch if num_items_in_batch is not None else count
        kl_coef = self.kl_coef

        def token_loss(stats: TokenStats) -> Tensor:
            return objectives.nsft_loss(-stats.logp, stats.kl, kl_coef=kl_coef) / divisor

        out = self.objective_pass(weight, hidden, targets, token_loss, (), bias, ref_hidden, ref_weight, ref_bias,
                                  kl=True)
        return LossOutput(out.loss, {"nll": -out.stats.logp.sum() / count, "kl": out.stats.kl.sum() / count})


class FusedGRPOLoss(FusedLoss):
    """GRPO per token (see :func:`prefopt.objectives.grpo_loss`) on the fused op, with TRL's loss types.

    ``loss_type`` takes the names of TRL's ``GRPOConfig.loss_type`` and means what TRL means; with ``L_t``
    the per-token loss, ``m`` the mask of scored tokens and ``R`` the number of rows (sequences):

    - ``"grpo"``: ``(1/R) sum_i (sum_t m L / sum_t m)``, each sequence's token mean, then the mean.
    - ``"bnpo"``: ``sum m L / sum m`` over this call's tokens.
    - ``"dr_grpo"``: ``sum m L / (R * max_completion_length)`` (Dr. GRPO; needs ``max_completion_length``).
    - ``"dapo"`` (default, TRL's too): ``sum m L / num_items_in_batch``, the number of scored tokens in
      the whole accumulated batch (this call's when not given).
    - ``"cispo"``: cispo's per-token loss, aggregated like ``dapo``.
    - ``"sapo"``: sapo's per-token loss, aggregated like ``grpo``.

    TRL's ``luspo`` and ``vespo`` need sequence-level importance weights and raise a ValueError here
    (``PrefoptGRPOTrainer`` has every TRL loss type). ``num_items_in_batch`` is the accumulated batch's
    size in the loss's ``unit`` (see :meth:`count_items`): tokens for dapo and cispo, rows for grpo,
    sapo and dr_grpo (``R`` above becomes it); bnpo normalises within the call by definition and
    refuses it (use ``"dapo"`` for a token mean over an accumulated batch).

    ``old_logps`` / ``ref_logps`` are per-position tensors shaped like ``targets`` (shifted with them when
    ``shift=True``); their values at ignored positions never reach the loss or its gradient (padding may
    carry ``-inf`` there); neither gets a gradient. Without ``old_logps`` the step is on-policy (``rho = 1``
    with its gradient).
    The reference comes as ``ref_logps`` or as hidden states (``ref_hidden``, same fused pass).
    Metrics: ``kl`` (mean k3), ``clip_fraction`` (TRL's ``clip_ratio/region_mean``), ``ratio``.

    ``loss_agg`` is prefopt's older name for two of these: ``"token-mean"`` is ``"dapo"`` and
    ``"sequence-mean"`` is ``"grpo"``.
    """

    LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo")
    UNSUPPORTED = {"luspo": "sequence-level importance sampling", "vespo": "sequence-level gamma weights"}
    AGGREGATIONS = {"token-mean": "dapo", "sequence-mean": "grpo"}

    def __init__(self, beta: float = 0.04, epsilon_low: float = 0.2, epsilon_high: float = 0.2,
                 loss_type: Optional[str] = None, loss_agg: Optional[str] = None,
                 max_completion_length: Optional[int] = None, delta: Optional[float] = None,
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05,
                 use_bias_correction_kl: bool = False, **options):
        super().__init__(**options)
        if loss_agg is not None:
            if loss_agg not in self.AGGREGATIONS:
                raise ValueError(f"loss_agg: expected one of {tuple(self.AGGREGATIONS)}, got {loss_agg!r}")
            if loss_type is not None:
                raise ValueError("loss_agg: give either loss_type or loss_agg (its older name), not both")
            loss_type = self.AGGREGATIONS[loss_agg]
        loss_type = "dapo" if loss_type is None else loss_type
        if loss_type in self.UNSUPPORTED:
            raise ValueError(f"loss_type: {loss_type!r} needs {self.UNSUPPORTED[loss_type]}, which FusedGRPOLoss does "
                             f"not have; use one of {self.LOSS_TYPES} or prefopt.integrations.trl.PrefoptGRPOTrainer")
        if loss_type not in self.LOSS_TYPES:
            raise ValueError(f"loss_type: expected one of {self.LOSS_TYPES}, got {loss_type!r}")
        if loss_type == "dr_grpo" and not (isinstance(max_completion_length, int) and max_completion_length > 0):
            raise ValueError("max_completion_length: loss_type='dr_grpo' needs a positive int, "
                             f"got {max_completion_length!r}")
        objectives.check_grpo_options(sapo_temperature_pos, sapo_temperature_neg, delta)
        self.beta, self.epsilon_low, self.epsilon_high = beta, epsilon_low, epsilon_high
        self.loss_type, self.max_completion_length, self.delta = loss_type, max_completion_length, delta
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.use_bias_correction_kl = use_bias_correction_kl
        self.unit = {"dapo": "tokens", "cispo": "tokens", "bnpo": None}.get(loss_type, "rows")

    def count_items(self, targets: Tensor) -> int:
        if self.unit is None:
            raise ValueError("num_items_in_batch: loss_type='bnpo' normalises within each call; use loss_type='dapo' "
                             "for a token mean over an accumulated batch")
        if self.unit == "rows":
            return targets.shape[:-1].numel()
        return super().count_items(targets)

    def forward(self, weight: Tensor, hidden: Tensor, targets: Tensor, advantages: Tensor,
                bias: Optional[Tensor] = None, old_logps: Optional[Tensor] = None,
                ref_hidden: Optional[Tensor] = None, ref_weight: Optional[Tensor] = None,
                ref_bias: Optional[Tensor] = None, ref_logps: Optional[Tensor] = None,
                num_items_in_batch: Optional[int] = None) -> LossOutput:
        rows = targets.shape[:-1]
        if advantages.shape != rows:
            raise ValueError(f"advantages: expected shape {list(rows)} (one per sequence), got {list(advantages.shape)}")
        for name, per_token in (("old_logps", old_logps), ("ref_logps", ref_logps)):
            if per_token is not None and per_token.shape != targets.shape:
                raise ValueError(f"{name}: expected shape {list(targets.shape)} like targets, got {list(per_token.shape)}")
        if ref_logps is not None and ref_hidden is not None:
            raise ValueError("ref_logps: give either ref_logps or ref_hidden, not both")
        if num_items_in_batch is not None:
            self.count_items(targets)  # refuses it for bnpo
        aligned = self.align(targets, self.ignore_index)
        mask = aligned != self.ignore_index
        stat_dtype = torch.float64 if hidden.dtype == torch.float64 else torch.float32
        # num_items_in_batch is rows for grpo, sapo and dr_grpo, tokens for dapo and cispo (see count_items).
        given = num_items_in_batch
        token_weights = objectives.policy_token_weights(
            mask.to(stat_dtype), loss_type=self.loss_type, max_completion_length=self.max_completion_length,
            num_sequences=rows.numel() if given is None else given, num_tokens=given)
        zero = torch.zeros((), dtype=stat_dtype, device=hidden.device)
        # Padding may carry -inf or huge old/reference log-probs: they are replaced before anything reads
        # them (and the op never hands ignored positions to the per-token loss).
        inputs = [advantages.to(stat_dtype)[..., None].expand(aligned.shape), token_weights]
        for per_token in (old_logps, ref_logps):
            if per_token is not None:
                inputs.append(torch.where(mask, self.align(per_token, 0).to(stat_dtype), zero))

        def token_loss(stats: TokenStats, advantage: Tensor, token_weight: Tensor, *given_logps: Tensor) -> Tensor:
            return self.token_terms(stats, advantage, *given_logps, old_given=old_logps is not None).loss * token_weight

        out = self.objective_pass(weight, hidden, targets, token_loss, inputs, bias, ref_hidden, ref_weight, ref_bias)
        stats = out.stats
        logps = stats.logp
        token = self.token_terms(stats, inputs[0], *inputs[2:], old_given=old_logps is not None)
        weights = mask.to(stat_dtype)
        count = weights.sum().clamp(min=1)
        old = inputs[2] if old_logps is not None else logps
        metrics = {
            "clip_fraction": (token.clipped.to(weights.dtype) * weights).sum() / count,
            "ratio": torch.where(mask, torch.exp(logps - old), zero).sum() / count,
        }
        if token.k3 is not None:
            metrics["kl"] = torch.where(mask, token.k3, zero).sum() / count
        return LossOutput(out.loss, metrics)

    def token_terms(self, stats: TokenStats, advantage: Tensor, *given_logps: Tensor,
                    old_given: bool) -> objectives.GRPOTokenLoss:
        """:func:`prefopt.objectives.grpo_loss` per token, with this module's options: the old log-probs are
        the first of ``given_logps`` when ``old_given`` (else the policy's, detached: on-policy), the
        reference's the next one (else the op's ``ref_logp``, or None)."""
        rest = list(given_logps)
        old = rest.pop(0) if old_given else stats.logp.detach()
        ref = rest.pop(0) if rest else stats.ref_logp
        policy_loss = {"cispo": "cispo", "sapo": "sapo"}.get(self.loss_type, "clip")
        return objectives.grpo_loss(
            stats.logp, old, advantage, ref, beta=self.beta, epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high, policy_loss=policy_loss, delta=self.delta,
            sapo_temperature_pos=self.sapo_temperature_pos, sapo_temperature_neg=self.sapo_temperature_neg,
            use_bias_correction_kl=self.use_bias_correction_kl,
        )


def _functional(module_cls) -> Callable[..., LossOutput]:
    """The functional form of a loss module: constructor options as keywords, the rest to forward."""
    forward_params = set(inspect.signature(module_cls.forward).parameters) - {"self"}

    def loss_fn(*args, **kwargs) -> LossOutput:
        options = {k: kwargs.pop(k) for k in list(kwargs) if k not in forward_params}
        return module_cls(**options)(*args, **kwargs)

    loss_fn.__doc__ = (
        f"Functional form of :class:`{module_cls.__name__}`: arguments of its ``forward`` plus its "
        f"constructor options as keywords.\n\n{module_cls.__doc__}"
    )
    return loss_fn


fused_dpo_loss = _functional(FusedDPOLoss)
fused_cwdpo_loss = _functional(FusedCWDPOLoss)
fused_simpo_loss = _functional(FusedSimPOLoss)
fused_orpo_loss = _functional(FusedORPOLoss)
fused_sftc_loss = _functional(FusedSFTCLoss)
fused_sft_loss = _functional(FusedSFTLoss)
fused_nsft_loss = _functional(FusedNSFTLoss)
fused_grpo_loss = _functional(FusedGRPOLoss)
