"""Liger's GRPO loss (and its family: bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo) on prefopt's fused op.

Returns Liger's ``(loss, (kl_mean, clip_ratio))`` (``kl_mean`` only when ``beta != 0``): the mean k3 KL
and the fraction of clipped tokens over the completion tokens of ``attention_mask``, without gradient.
Only positions with ``attention_mask != 0`` reach the op: padded positions are never scored, and their
old / reference log-probs (which may be very negative or ``-inf``) never reach the loss or its gradient.
``compiled`` and ``chunk_size`` are accepted for compatibility; prefopt's op needs neither.
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .. import objectives
from ..ops import linear_logprobs
from ..ops.objective import linear_objective
from ._common import ArgumentAssertionError, LigerFunction

_UNSCORED = -100


def _vllm_ratio(vllm_is_ratio, attention_mask):
    """Liger's accepted shapes ``[B]``, ``[B, 1]`` or ``[B, T]``; ``[B]`` becomes ``[B, 1]``."""
    if vllm_is_ratio is None:
        return None
    rows, length = attention_mask.shape
    if vllm_is_ratio.dim() == 1 and vllm_is_ratio.shape[0] == rows:
        return vllm_is_ratio.unsqueeze(-1)
    if vllm_is_ratio.dim() == 2 and vllm_is_ratio.shape[0] == rows and vllm_is_ratio.shape[1] in (1, length):
        return vllm_is_ratio
    raise ArgumentAssertionError(
        f"vllm_is_ratio: expected shape [{rows}], [{rows}, 1] or [{rows}, {length}], got {list(vllm_is_ratio.shape)}"
    )


def _token_normalizer(attention_mask, num_items_in_batch):
    """Liger's (and TRL's) per-process token count for dapo / cispo / vespo: ``num_items_in_batch`` (the
    whole generation batch) or the completion tokens summed over processes, divided by the world size."""
    distributed = dist.is_available() and dist.is_initialized()
    world = dist.get_world_size() if distributed else 1
    if num_items_in_batch is not None:
        tokens = torch.as_tensor(num_items_in_batch, dtype=torch.float32, device=attention_mask.device)
    else:
        tokens = attention_mask.float().sum()
        if distributed:
            dist.all_reduce(tokens)
    return tokens / world


class LigerFusedLinearGRPOFunction(LigerFunction):
    """GRPO with Liger's positional order ``(_input, weight, selected_token_ids, attention_mask, advantages,
    bias, ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias, beta, ...)``.

    Per token: :func:`prefopt.objectives.policy_gradient_loss` plus ``beta * k3`` (times the importance
    weight with ``use_bias_correction_kl``), reduced with the weights of :func:`prefopt.objectives.policy_token_weights`
    (the gradient formed in the forward pass for token-level importance weights, see :func:`prefopt.linear_objective`).
    The reference is ``ref_per_token_logps`` if given, else the reference head on ``ref_input`` in the same
    fused pass; without ``use_ref_model`` it is the policy itself (KL 0). ``old_per_token_logps`` None means
    on-policy (``rho = 1`` with its gradient).
    """

    @staticmethod
    def forward(_input, weight, selected_token_ids, attention_mask, advantages, bias=None, ref_per_token_logps=None,
                old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None, beta=0.04, epsilon_low=0.2,
                epsilon_high=0.2, loss_type="dapo", max_completion_length=None, importance_sampling_level="token",
                sapo_temperature_pos=1.0, sapo_temperature_neg=1.05, temperature=1.0, compiled=True,
                use_ref_model=True, chunk_size=1, vllm_is_ratio=None, delta=None, use_bias_correction_kl=False,
                vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
                num_items_in_batch=None):
        objectives.check_grpo_options(sapo_temperature_pos, sapo_temperature_neg, delta)
        if importance_sampling_level == "sequence" and loss_type in ("cispo", "sapo", "vespo"):
            raise ValueError(f"importance_sampling_level: 'sequence' is not supported for loss_type={loss_type!r}")
        if use_ref_model and ref_per_token_logps is None and ref_input is None:
            raise ArgumentAssertionError("ref_per_token_logps/ref_input: use_ref_model=True needs one of them")
        if use_ref_model and ref_per_token_logps is not None and ref_input is not None:
            warnings.warn("ref_per_token_logps and ref_input both given: using ref_per_token_logps", stacklevel=2)
        if loss_type == "dr_grpo" and max_completion_length is None:
            raise ArgumentAssertionError("max_completion_length: required for loss_type='dr_grpo'")
        if attention_mask.shape != selected_token_ids.shape:
            raise ValueError(f"attention_mask: expected shape {list(selected_token_ids.shape)} "
                             f"like selected_token_ids, "
                             f"got {list(attention_mask.shape)}")
        if advantages.shape != attention_mask.shape[:1]:
            raise ValueError(f"advantages: expected shape [{attention_mask.shape[0]}], got {list(advantages.shape)}")
        vllm_is_ratio = _vllm_ratio(vllm_is_ratio, attention_mask)
        scored = attention_mask != 0
        targets = torch.where(scored, selected_token_ids, _UNSCORED)
        ref_from_head = use_ref_model and ref_per_token_logps is None
        options = dict(loss_type=loss_type, epsilon_low=epsilon_low, epsilon_high=epsilon_high,
                       importance_sampling_level=importance_sampling_level, delta=delta,
                       sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
                       vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
                       vespo_lambda_neg=vespo_lambda_neg)
        given_ref = ref_per_token_logps if use_ref_model and not ref_from_head else None

        def terms(logps, mask, advantage, old, ref, is_ratio):
            """Per-token loss, k3 (None without beta) and clipped, for logps ``[B, T]`` (or ``[n, 1]``);
            ``old`` / ``ref`` None: the policy's own log-probs (on-policy; no reference model)."""
            current = logps.detach()
            token = objectives.policy_gradient_loss(
                logps, current if old is None else old, advantage, mask, vllm_is_ratio=is_ratio, **options)
            per_token, kl = token.loss, None
            if beta != 0.0:
                kl = objectives.k3_kl(logps, current if ref is None else ref)
                if use_bias_correction_kl:
                    kl = kl * torch.exp(token.log_weights)
                per_token = per_token + beta * kl
            return per_token, kl, token.clipped

        # The aggregation as per-token weights, from the mask alone (see objectives.policy_token_weights).
        stat_dtype = torch.float64 if _input.dtype == torch.float64 else torch.float32
        normalizer = None
        if loss_type in ("dapo", "cispo", "vespo"):
            normalizer = _token_normalizer(attention_mask, num_items_in_batch)
        token_weights = objectives.policy_token_weights(
            attention_mask.to(stat_dtype), loss_type=loss_type, max_completion_length=max_completion_length,
            num_tokens=normalizer)
        head = dict(bias=bias, ignore_index=_UNSCORED, temperature=temperature,
                    ref_hidden=ref_input if ref_from_head else None, ref_weight=ref_weight if ref_from_head else None,
                    ref_bias=ref_bias if ref_from_head else None)
        out = None
        if importance_sampling_level == "token" and loss_type != "vespo":
            # Each token's loss is a function of its own statistics: the gradient is formed in the forward
            # pass. GSPO's sequence-level weights and vespo's need whole sequences: they recompute.
            extras = [t for t in (old_per_token_logps, given_ref) if t is not None]
            if vllm_is_ratio is not None:
                extras.append(vllm_is_ratio.expand(attention_mask.shape))

            def token_loss(stats, advantage, token_weight, *rest):
                rest = [t[:, None] for t in rest]
                old = rest.pop(0) if old_per_token_logps is not None else None
                ref = rest.pop(0) if given_ref is not None else (stats.ref_logp[:, None] if ref_from_head else None)
                per_token, _, _ = terms(stats.logp[:, None], torch.ones_like(advantage[:, None]), advantage, old, ref,
                                        rest.pop(0) if rest else None)
                return per_token[:, 0] * token_weight

            inputs = [advantages[:, None].expand(attention_mask.shape), token_weights, *extras]
            out = linear_objective(_input, weight, targets, token_loss,
                                   token_inputs=[t.to(stat_dtype) for t in inputs], **head)
            stats = out.stats
        else:
            stats = linear_logprobs(_input, weight, targets, **head)
        logps = stats.logp
        current = logps.detach()

        def at_scored(per_token: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            # Padded positions take the policy's own value: ratio 1, KL 0, nothing from padding.
            if per_token is None:
                return None
            return torch.where(scored, per_token.detach().to(logps.dtype), current)

        ref = at_scored(stats.ref_logp if ref_from_head else given_ref)
        with torch.set_grad_enabled(out is None and torch.is_grad_enabled()):
            per_token, kl, clipped = terms(logps, attention_mask, advantages, at_scored(old_per_token_logps), ref,
                                           vllm_is_ratio)
        loss = (per_token * token_weights).sum() if out is None else out.loss
        mask = attention_mask.to(logps.dtype)
        tokens = mask.sum().clamp(min=1.0)
        metrics = [] if kl is None else [(kl * mask).sum() / tokens]
        metrics.append((clipped.to(mask.dtype) * mask).sum() / tokens)
        return loss, tuple(m.detach() for m in metrics)


class LigerFusedLinearGRPOLoss(nn.Module):
    """Module form of :class:`LigerFusedLinearGRPOFunction`; ``forward(_input, lin_weight, selected_token_ids,
    attention_mask, advantages, bias, ref_per_token_logps, old_per_token_logps, ref_input, ref_weight, ref_bias,
    vllm_is_ratio, num_items_in_batch)``. ``compiled`` and ``chunk_size`` are accepted and not needed by prefopt."""

    def __init__(self, beta: float = 0.04, compiled: bool = True, use_ref_model: bool = True, chunk_size: int = 1,
                 epsilon_low: float = 0.2, epsilon_high: float = 0.2, loss_type: str = "dapo",
                 max_completion_length: Optional[int] = None, importance_sampling_level: str = "token",
                 sapo_temperature_pos: float = 1.0, sapo_temperature_neg: float = 1.05, temperature: float = 1.0,
                 delta: Optional[float] = None, use_bias_correction_kl: bool = False, vespo_k_pos: float = 2.0,
                 vespo_lambda_pos: float = 3.0, vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0):
        super().__init__()
        objectives.check_grpo_options(sapo_temperature_pos, sapo_temperature_neg, delta)
        self.beta, self.compiled, self.use_ref_model, self.chunk_size = beta, compiled, use_ref_model, chunk_size
        self.epsilon_low, self.epsilon_high, self.loss_type = epsilon_low, epsilon_high, loss_type
        self.max_completion_length, self.importance_sampling_level = max_completion_length, importance_sampling_level
        self.sapo_temperature_pos, self.sapo_temperature_neg = sapo_temperature_pos, sapo_temperature_neg
        self.temperature, self.delta, self.use_bias_correction_kl = temperature, delta, use_bias_correction_kl
        self.vespo_k_pos, self.vespo_lambda_pos = vespo_k_pos, vespo_lambda_pos
        self.vespo_k_neg, self.vespo_lambda_neg = vespo_k_neg, vespo_lambda_neg

    def forward(self, _input, lin_weight, selected_token_ids, attention_mask, advantages, bias=None,
                ref_per_token_logps=None, old_per_token_logps=None, ref_input=None, ref_weight=None, ref_bias=None,
                vllm_is_ratio=None, num_items_in_batch=None):
        return LigerFusedLinearGRPOFunction.apply(
            _input, lin_weight, selected_token_ids, attention_mask, advantages, bias, ref_per_token_logps,
            old_per_token_logps, ref_input, ref_weight, ref_bias, self.beta, self.epsilon_low, self.epsilon_high,
            self.loss_type, self.max_completion_length, self.importance_sampling_level, self.sapo_temperature_pos,
            self.sapo_temperature_neg, self.temperature, self.compiled, self.use_ref_model, self.chunk_size,
            vllm_is_ratio, self.delta, self.use_bias_correction_kl, self.vespo_k_pos, self.vespo_lambda_pos,
            self.vespo_k_neg, self.vespo_lambda_neg, num_items_in_batch,
        )
