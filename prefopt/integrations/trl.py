"""TRL's ``DPOTrainer`` and ``GRPOTrainer`` with prefopt's fused op in place of TRL's fused LM head.

TRL 1.16 scores completions through a fused head it adds to the model
(``trl.trainer.utils.add_fused_lm_head``: ``model(..., labels=labels, fused_lm_head=True)`` returns per-token
log-probs, entropy, mean logit, top-1 flags and, for WPO, ``log_sum_sq_probs``, computed by
``trl.kernels.ChunkedLogProbFunction``). The trainers here replace that head, on the policy and on the
reference, by :func:`add_prefopt_lm_head`, which computes the same fields with
:func:`prefopt.linear_logprobs`; everything else (data, losses, metrics, accumulation, generation) is TRL's
own code, so the trainers take the same constructor, config and data as TRL's::

    from prefopt.integrations.trl import PrefoptDPOTrainer
    trainer = PrefoptDPOTrainer(model=model, args=DPOConfig(...), train_dataset=data, processing_class=tok)

:class:`PrefoptDPOConfig` adds prefopt's own losses (``loss_type="cw-dpo"``, ``"sft-c"`` or ``"nsft"``) with
the fields of ``prefopt train``'s options of the same names.
"""
from __future__ import annotations

import dataclasses
import functools
import types
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch
from transformers import TrainingArguments
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.trainer import dpo_trainer as dpo_trainer_module
from trl.trainer import grpo_trainer as grpo_trainer_module
from trl.trainer.utils import FusedCausalLMOutput, maybe_gather_lm_head_ctx, use_adapter

from .. import objectives
from ..ops import linear_logprobs
from ..train.prefixes import SHARE_PREFIX_CHOICES, pack_padded_batch, packed_positions, share_refusal

__all__ = ["add_prefopt_lm_head", "PrefoptDPOConfig", "PrefoptDPOTrainer", "PrefoptGRPOConfig", "PrefoptGRPOTrainer",
           "DPO_SUPPORTED_OPTIONS", "GRPO_SUPPORTED_OPTIONS"]

#: Per-token fields of TRL's ``FusedCausalLMOutput`` prefopt's head computes (all of TRL 1.16's).
HEAD_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _logit_transform(text_config) -> Tuple[Optional[float], float]:
    """(final logit softcap, scale of the raw logits) of a model config; only plain scales are supported."""
    for name in ("output_multiplier", "lm_head_multiplier", "logits_scaling"):
        if getattr(text_config, name, None) is not None:
            raise ValueError(f"model config: {name} is not supported by prefopt's head (only logit_scale and "
                             "final_logit_softcapping are)")
    softcap = getattr(text_config, "final_logit_softcapping", None)
    scale = getattr(text_config, "logit_scale", None)
    return (float(softcap) if softcap else None), (1.0 if scale is None else float(scale))


def _head_stats(hidden, weight, bias, *, targets, temperature, softcap, backend, entropy, mean_logit, top1,
                log_sum_sq_probs):
    """(logp, entropy, mean_logit, top1, log_sum_sq_probs) of the op, None for those not asked for."""
    stats = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                            entropy=entropy, mean_logit=mean_logit, top1=top1, log_sum_sq_probs=log_sum_sq_probs,
                            backend=backend)
    return stats.logp, stats.entropy, stats.mean_logit, stats.top1, stats.log_sum_sq_probs


def _gathered_fsdp2(param):
    """The full value of an FSDP2-sharded parameter (a DTensor, or None), read outside its FSDP group's
    forward, so FSDP will not reduce its gradient: each rank's gradient comes from its own batch, and is
    averaged over ranks here (``Partial("avg")``, FSDP's own reduction), where TRL's ``full_tensor()``
    keeps each rank's shard of its own batch's gradient only."""
    if not hasattr(param, "full_tensor"):
        return param
    from torch.distributed.tensor import Partial

    return param.full_tensor(grad_placements=[Partial("avg")] * param.device_mesh.ndim)


def _zero3_enabled() -> bool:
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    return is_deepspeed_zero3_enabled()


class _GatheredHead(torch.autograd.Function):
    """The op with a ZeRO-3-partitioned head: gathered (TRL's ``maybe_gather_lm_head_ctx``) for the forward
    and gathered again for the backward, which recomputes the op's forward there (the op's own backward
    reads the weight it saved, which ZeRO-3 has partitioned again by then). TRL's own head does the same
    two gathers; the recomputation is the price of not touching the op."""

    @staticmethod
    def forward(ctx, op, hidden, weight, bias):
        ctx.op = op
        ctx.save_for_backward(hidden, weight, bias)
        with maybe_gather_lm_head_ctx(weight, bias), torch.no_grad():
            outputs = op(hidden, weight, bias)
        ctx.mark_non_differentiable(*(out for out in outputs[3:] if out is not None))  # top1, log_sum_sq_probs
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        hidden, weight, bias = ctx.saved_tensors
        inputs = [(hidden.detach().requires_grad_(ctx.needs_input_grad[1]), ctx.needs_input_grad[1]),
                  (weight, ctx.needs_input_grad[2]), (bias, ctx.needs_input_grad[3])]
        wanted = [t for t, need in inputs if need and t is not None]
        with maybe_gather_lm_head_ctx(weight, bias), torch.enable_grad():
            outputs = ctx.op(inputs[0][0], weight, bias)[:3]
            pairs = [(out, g) for out, g in zip(outputs, grads) if out is not None and g is not None]
            found = torch.autograd.grad([o for o, _ in pairs], wanted, [g for _, g in pairs], allow_unused=True) \
                if pairs and wanted else [None] * len(wanted)
        found = iter(found)
        return (None,) + tuple(next(found) if need and t is not None else None for t, need in inputs)


def add_prefopt_lm_head(model, temperature: float = 1.0, cast_lm_head_to_fp32: bool = False,
                        outputs: Tuple[str, ...] = ("log_probs",), backend: str = "auto",
                        share_prefix: str = "off") -> None:
    """Give ``model`` TRL's fused-head calling convention, computed by :func:`prefopt.linear_logprobs`.

    After it, ``model(..., labels=labels, fused_lm_head=True)`` runs the backbone and returns a
    ``trl.trainer.utils.FusedCausalLMOutput`` whose fields mean what TRL's mean: ``log_probs`` (of each
    next-token label under the temperature-scaled logits), ``entropy``, ``mean_logits`` (mean over the
    vocabulary of the temperature-scaled logits, no gradient), ``is_top1`` (the label is the first argmax),
    ``log_sum_sq_probs`` (``log sum_v p_v^2``, no gradient; WPO's weights), ``label_mask`` and ``loss``
    (summed NLL over ``num_items_in_batch``, default the label count); every field is 0 where the label is
    -100. ``shift_labels`` (already aligned labels) is taken as TRL takes it. Without ``fused_lm_head`` the
    model's own forward runs (generation is unchanged).
    Like TRL's, it wraps the model's current ``forward``: add it before accelerate or PEFT wrap the model
    (the trainers below have TRL add it where TRL adds its own). Under DeepSpeed ZeRO-3 the head's weight
    is gathered for the op with TRL's ``maybe_gather_lm_head_ctx`` (forward and backward); an FSDP2
    (DTensor) head with its gradient averaged over ranks (:func:`_gathered_fsdp2`).

    prefopt's own additions (nSFT): ``fused_lm_head="hidden"`` returns the scored positions' final hidden
    states; ``prefopt_ref_hidden`` (those of the reference) with ``prefopt_ref_head`` (its ``(weight,
    bias)``, default this model's head) adds ``output["kl"]``, the full-vocabulary KL(pi || pi_ref) per token.

    ``share_prefix`` (``auto``, ``on``, ``off``: ``prefopt train --share-prefix``'s rules for the model's
    family, :func:`prefopt.train.prefixes.share_refusal` and :data:`TRL_SHARED_FAMILIES`): the rows of a
    scored batch that hold the same prompt and images run as one packed row
    (:func:`prefopt.train.prefixes.pack_padded_batch`), and the answers' hidden states go back to the rows'
    own layout before the head, so every output field is the unshared one's.
    """
    unknown = [name for name in outputs if name not in HEAD_OUTPUTS]
    if unknown:
        raise ValueError(f"outputs: prefopt's head computes {HEAD_OUTPUTS}, not {unknown}")
    if getattr(model.config.get_text_config(), "output_router_logits", False):
        raise ValueError("model config: output_router_logits (MoE load-balancing loss) is not supported by "
                         "prefopt's head")
    softcap, logit_scale = _logit_transform(model.config.get_text_config())
    share = _share_prefix(model.config, share_prefix)
    image_token_ids = [i for i in (getattr(model.config, n, None) for n in ("image_token_id", "image_token_index"))
                       if isinstance(i, int)][:1]
    original_forward = model.forward

    @functools.wraps(type(model).forward)  # generate() checks its keyword arguments against this signature
    def forward(self, *args, fused_lm_head=False, labels=None, shift_labels=None, num_items_in_batch=None,
                prefopt_ref_hidden=None, prefopt_ref_head=None, **kwargs):
        if not fused_lm_head:
            extra = dict(labels=labels, shift_labels=shift_labels, num_items_in_batch=num_items_in_batch)
            return original_forward(*args, **kwargs, **{k: v for k, v in extra.items() if v is not None})
        if kwargs.get("output_router_logits"):
            raise ValueError("output_router_logits: the MoE load-balancing loss is not supported by prefopt's head")
        kwargs["use_cache"] = False
        packed = None
        if share and not args and labels is not None and shift_labels is None:
            packed = pack_padded_batch(kwargs, labels, image_token_ids=image_token_ids)
        if packed is None:
            hidden = self.base_model(*args, **kwargs).last_hidden_state
        else:  # one row per prefix; the answers' hidden states back in their rows (0 where no label is predicted)
            inputs, index = packed
            prefix_lengths = inputs.pop("prefix_lengths")
            inputs["position_ids"] = packed_positions(self.base_model, inputs, prefix_lengths)
            hidden = self.base_model(**inputs).last_hidden_state
            hidden = torch.cat([hidden.flatten(0, 1), hidden.new_zeros(1, hidden.shape[-1])])[index]
        if shift_labels is None:  # hidden[:, t] predicts labels[:, t + 1]
            hidden, targets = hidden[:, :-1], labels[:, 1:]
        else:
            targets = shift_labels
        if fused_lm_head == "hidden":  # the scored positions' hidden states (a reference pass of nSFT)
            return hidden
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if hasattr(weight, "full_tensor"):  # FSDP2 shards parameters as DTensors
            weight, bias = (_gathered_fsdp2(p) for p in (weight, bias))
        hidden, targets = hidden.to(weight.device), targets.to(weight.device)
        autocast = nullcontext()
        if cast_lm_head_to_fp32:
            hidden = hidden.float()
            autocast = torch.autocast(hidden.device.type, enabled=False)
        if logit_scale != 1.0:  # softcap(s * (h W^T + b)) = softcap((s h) W^T + s b)
            hidden = hidden * logit_scale
            bias = bias * logit_scale if bias is not None else None
        if prefopt_ref_hidden is not None:  # nSFT: the full-vocabulary KL to the reference, in the same pass
            if _zero3_enabled():
                raise ValueError("loss_type='nsft' is not supported under DeepSpeed ZeRO-3")
            ref_weight, ref_bias = prefopt_ref_head if prefopt_ref_head is not None else (None, None)
            if logit_scale != 1.0:
                prefopt_ref_hidden = prefopt_ref_hidden * logit_scale
                ref_bias = ref_bias * logit_scale if ref_bias is not None else None
            with autocast:
                stats = linear_logprobs(hidden, weight, targets, bias=bias, temperature=temperature, softcap=softcap,
                                        ref_hidden=prefopt_ref_hidden.to(hidden.dtype), ref_weight=ref_weight,
                                        ref_bias=ref_bias, kl=True, entropy=True, mean_logit=True, top1=True,
                                        backend=backend)
            out = FusedCausalLMOutput(loss=None, log_probs=stats.logp, entropy=stats.entropy,
                                      mean_logits=stats.mean_logit.detach(), is_top1=stats.top1.bool(),
                                      label_mask=targets != -100)
            out["kl"] = stats.kl
            return out
        op = functools.partial(
            _head_stats, targets=targets, temperature=temperature, softcap=softcap, backend=backend,
            entropy="entropy" in outputs, mean_logit="mean_logits" in outputs, top1="is_top1" in outputs,
            log_sum_sq_probs="log_sum_sq_probs" in outputs,
        )
        with autocast:
            if _zero3_enabled():
                stats = _GatheredHead.apply(op, hidden, weight, bias)
            else:
                stats = op(hidden, weight, bias)
        stats = dict(zip(("logp", "entropy", "mean_logit", "top1", "log_sum_sq_probs"), stats))
        mask = targets != -100
        count = mask.sum().clamp(min=1) if num_items_in_batch is None else num_items_in_batch
        return FusedCausalLMOutput(
            loss=-stats["logp"].sum() / count,
            log_probs=stats["logp"],
            entropy=stats["entropy"],
            log_sum_sq_probs=stats["log_sum_sq_probs"],
            mean_logits=None if stats["mean_logit"] is None else stats["mean_logit"].detach(),
            is_top1=None if stats["top1"] is None else stats["top1"].bool(),
            label_mask=mask,
        )

    model.forward = types.MethodType(forward, model)


#: ``config.model_type`` of the families whose shared rows through TRL's trainers are tested equal to the
#: unshared ones (tests/test_trl_integration.py); the others train unshared (``auto``) or are refused (``on``).
TRL_SHARED_FAMILIES = ("llama", "qwen2", "llava")


def _share_prefix_choice(value) -> str:
    """``share_prefix``'s value as ``auto``, ``on`` or ``off`` (True is ``on``, False ``off``)."""
    choice = ("on" if value else "off") if isinstance(value, bool) else value
    if choice not in SHARE_PREFIX_CHOICES:
        raise ValueError(f"share_prefix: expected one of {', '.join(SHARE_PREFIX_CHOICES)} or a bool, got {value!r}")
    return choice


def _share_prefix(config, share_prefix) -> bool:
    """Whether a model of ``config`` shares prefixes under ``share_prefix`` (:func:`_share_prefix_choice`);
    ``on`` where it cannot: ValueError, one line naming why."""
    choice = _share_prefix_choice(share_prefix)
    if choice == "off":
        return False
    refusal = share_refusal(config)
    family = getattr(config, "model_type", "?")
    if refusal is None and family not in TRL_SHARED_FAMILIES:
        refusal = (f"model family {family!r} is not tested with shared prefixes in TRL's trainers "
                   f"(tested: {', '.join(TRL_SHARED_FAMILIES)})")
    if refusal is not None and choice == "on":
        raise ValueError(f"share_prefix='on': {refusal}")
    return refusal is None


@contextmanager
def _prefopt_heads(trainer_module, backend: str = "auto", share_prefix: str = "off"):
    """While TRL's trainer is constructed, its calls to ``add_fused_lm_head`` add prefopt's head instead, with
    the arguments TRL gives (outputs, temperature, fp32 head), at the point where TRL adds its own: before
    accelerate (mixed precision, DeepSpeed) and PEFT wrap the models."""
    trl_head = trainer_module.add_fused_lm_head
    trainer_module.add_fused_lm_head = functools.partial(add_prefopt_lm_head, backend=backend,
                                                         share_prefix=share_prefix)
    try:
        yield
    finally:
        trainer_module.add_fused_lm_head = trl_head


def _check_options(args, config_cls, supported, unsupported_reasons, trainer_name: str) -> None:
    """ValueError naming the first option of ``args`` that differs from ``config_cls``'s default and is not in
    ``supported`` (TrainingArguments' own options are the Trainer's and pass)."""
    base = {f.name for f in dataclasses.fields(TrainingArguments)} - set(unsupported_reasons)
    for f in dataclasses.fields(config_cls):
        if f.name in supported or f.name in base:
            continue
        value = getattr(args, f.name)
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if value != default:
            why = unsupported_reasons.get(f.name, "not supported")
            raise ValueError(f"{f.name}: {why} by {trainer_name} (got {value!r}, only the default {default!r})")


DPO_SUPPORTED_OPTIONS = (
    "model_init_kwargs", "trust_remote_code", "disable_dropout", "dataset_num_proc", "max_length", "truncation_mode",
    "pad_to_multiple_of", "precompute_ref_log_probs", "precompute_ref_batch_size", "loss_type", "loss_weights",
    "ld_alpha", "f_divergence_type", "f_alpha_divergence_coef", "label_smoothing", "beta", "discopop_tau",
    "sync_ref_model", "ref_model_mixup_alpha", "ref_model_sync_steps", "pad_token", "activation_offloading",
    "use_weighting",
    # PrefoptDPOConfig's own
    "cw_floor", "cw_tau", "cw_detach_weight", "sftc_lam", "sftc_margin", "kl_coef", "prefopt_backend", "share_prefix",
)
MOE = "the MoE load-balancing loss is not computed by prefopt's head: not supported"
DPO_UNSUPPORTED = {
    "router_aux_loss_coef": MOE,
    "padding_free": "not tested with prefopt's head: not supported",
    "use_liger_kernel": "replaces the model's forward: not supported",
}

SHARE_PREFIX_HELP = ("one prefix per record (True / 'on', 'auto', False / 'off'): the rows of a batch with the "
                     "same prompt and images run their prefix through the vision tower and the decoder once")

#: prefopt's own paired losses reachable through ``PrefoptDPOConfig(loss_type=...)``.
PREFOPT_DPO_LOSS_TYPES = ("cw-dpo", "sft-c", "nsft")


@dataclass
class PrefoptDPOConfig(DPOConfig):
    """``DPOConfig`` plus prefopt's own losses and the op's backend.

    ``loss_type="cw-dpo"`` (cooling-weighted DPO, :func:`prefopt.objectives.cwdpo_loss`, with ``beta``,
    ``cw_floor``, ``cw_tau``, ``cw_detach_weight``), ``"sft-c"`` (constrained SFT,
    :func:`prefopt.objectives.sftc_loss` with ``sftc_lam`` and ``sftc_margin``; no reference) or ``"nsft"``
    (:func:`prefopt.objectives.nsft_loss` on the chosen answers, which are the positives: token-mean NLL plus
    ``kl_coef`` times the full-vocabulary KL to the reference; the rejected answers are not used; not with
    ``precompute_ref_log_probs`` or under ZeRO-3), alone (not mixed with TRL's loss types). The field
    names are those of ``prefopt train``'s options (``--cw-floor`` ...), with the same defaults as
    prefopt's losses.

    ``share_prefix=True`` (``"on"``; ``"auto"``; default False, ``"off"``): a record's chosen and rejected rows
    run their images and prompt through the vision tower and the decoder once, for the policy and the
    reference (:func:`add_prefopt_lm_head`); losses, metrics and gradients are the unshared ones.
    """

    cw_floor: float = field(default=-3.0, metadata={"help": "CW-DPO: per-token log-prob of a negative below which "
                                                            "its push-down cools off."})
    cw_tau: float = field(default=0.5, metadata={"help": "CW-DPO: temperature of the cooling weight."})
    cw_detach_weight: bool = field(default=True, metadata={"help": "CW-DPO: no gradient through the cooling weight."})
    sftc_lam: float = field(default=0.1, metadata={"help": "SFT-C: weight of the negative hinge."})
    sftc_margin: float = field(default=2.0, metadata={"help": "SFT-C: NLL per token a negative is pushed up to."})
    kl_coef: float = field(default=0.1, metadata={"help": "nSFT: weight of the per-token KL to the reference."})
    prefopt_backend: str = field(default="auto", metadata={"help": "backend of prefopt's op: auto, torch or triton."})
    share_prefix: str = field(default="off", metadata={"help": SHARE_PREFIX_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.share_prefix = _share_prefix_choice(self.share_prefix)
        ours = [t for t in self.loss_type if t in PREFOPT_DPO_LOSS_TYPES]
        if ours and len(self.loss_type) > 1:
            raise ValueError(f"loss_type: prefopt's {ours[0]!r} runs alone, not mixed with {self.loss_type}")
        # prefopt's loss types sum log-probs and weight losses their own way: refuse what they would ignore.
        if ours and self.use_weighting:
            raise ValueError(f"use_weighting: not supported with loss_type={ours[0]!r} (TRL's WPO weighting)")
        if ours and self.ld_alpha is not None:
            raise ValueError(f"ld_alpha: not supported with loss_type={ours[0]!r} (TRL's LD-DPO weighting)")
        if ours and self.loss_weights is not None and any(w != 1.0 for w in self.loss_weights):
            raise ValueError(f"loss_weights: not supported with loss_type={ours[0]!r}, got {self.loss_weights}")
        if "nsft" in self.loss_type and self.precompute_ref_log_probs:
            raise ValueError("precompute_ref_log_probs: loss_type='nsft' needs the reference's hidden states")
        if self.cw_tau <= 0:
            raise ValueError(f"cw_tau: expected a temperature > 0, got {self.cw_tau!r}")


class PrefoptDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` whose policy and reference log-probs (and the entropy, ``logits/*`` and
    ``mean_token_accuracy`` statistics, and WPO's ``log_sum_sq_probs``) come from prefopt's fused op; same
    constructor and behaviour.

    Supported ``DPOConfig`` options: every ``TrainingArguments`` option except ``use_liger_kernel``, and
    :data:`DPO_SUPPORTED_OPTIONS`; any other option set away from its default raises a ValueError naming it.
    With a :class:`PrefoptDPOConfig`, also prefopt's ``cw-dpo``, ``sft-c`` and ``nsft`` loss types.
    """

    def __init__(self, model, ref_model=None, args=None, *rest, **kwargs):
        if args is not None:
            _check_options(args, type(args) if isinstance(args, PrefoptDPOConfig) else DPOConfig,
                           DPO_SUPPORTED_OPTIONS, DPO_UNSUPPORTED, "PrefoptDPOTrainer")
        with _prefopt_heads(dpo_trainer_module, getattr(args, "prefopt_backend", "auto"),
                            getattr(args, "share_prefix", "off")):
            super().__init__(model, ref_model, args, *rest, **kwargs)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        # Keep the cached reference log-probs of prefopt's head apart from those of TRL's (datasets' cache files
        # are named after this hash).
        if not str(self._precompute_model_hash).startswith("prefopt-"):
            self._precompute_model_hash = f"prefopt-{self._precompute_model_hash}"
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def _compute_loss(self, model, inputs, return_outputs):
        loss_type = self.loss_types[0]
        if loss_type not in PREFOPT_DPO_LOSS_TYPES:
            return super()._compute_loss(model, inputs, return_outputs)
        if return_outputs:
            raise ValueError(f"return_outputs: not supported with loss_type={loss_type!r}")
        if loss_type == "nsft":
            return self._prefopt_nsft_loss(model, inputs)
        return self._prefopt_paired_loss(model, inputs, loss_type)

    def _prefopt_nsft_loss(self, model, inputs):
        """nSFT on the chosen rows: token-mean of ``-logp + kl_coef * KL(pi || pi_ref)``. The batch's tensors
        are cut at half their first dimension: image inputs must have one entry per row (LLaVA's do)."""
        mode = "train" if self.model.training else "eval"
        half = inputs["input_ids"].shape[0] // 2
        chosen = {k: v[:half] for k, v in inputs.items() if torch.is_tensor(v)}
        model_kwargs = {k: v for k, v in chosen.items() if k != "completion_mask"}
        labels = chosen["input_ids"].masked_fill(chosen["completion_mask"] == 0, -100)
        with torch.no_grad():
            if self.ref_model is None:  # peft: the policy with its adapters off
                unwrapped = self.accelerator.unwrap_model(self.model)
                ref_head = None
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    ref_hidden = self.model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head="hidden")
            else:
                ref_hidden = self.ref_model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head="hidden")
                ref_head = self.accelerator.unwrap_model(self.ref_model).get_output_embeddings()
                ref_head = (ref_head.weight, ref_head.bias)
        outputs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True,
                        prefopt_ref_hidden=ref_hidden, prefopt_ref_head=ref_head)
        count = outputs.label_mask.sum().clamp(min=1)
        nll, kl = -outputs.log_probs.sum() / count, outputs["kl"].sum() / count
        for key, value in (("nll", nll), ("kl", kl)):
            self._metrics[mode][key].append(self.accelerator.gather(value.detach()).float().mean().item())
        self._metrics[mode]["logps/chosen"].append(
            self.accelerator.gather(outputs.log_probs.sum(1).detach()).float().mean().item())
        return objectives.nsft_loss(nll, kl, kl_coef=self.args.kl_coef)

    def _prefopt_paired_loss(self, model, inputs, loss_type: str):
        """prefopt's cw-dpo / sft-c on the batch ``[chosen rows, rejected rows]``, with TRL's metrics."""
        mode = "train" if self.model.training else "eval"
        model_kwargs = {k: v for k, v in inputs.items()
                        if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        mask = inputs["completion_mask"][..., 1:]
        labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
        outputs = model(**model_kwargs, use_cache=False, labels=labels, fused_lm_head=True)
        per_token = outputs.log_probs[:, -mask.size(1):]
        logps = per_token.sum(1)
        lengths = mask.sum(1).clamp(min=1)
        chosen, rejected = logps.chunk(2)
        chosen_avg, rejected_avg = (logps / lengths).chunk(2)
        metrics = {}
        if loss_type == "cw-dpo":
            if self.precompute_ref_logps:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_chosen, ref_rejected = self.compute_ref_log_probs(self.ref_model or self.model, inputs)
            out = objectives.cwdpo_loss(chosen, rejected, ref_chosen, ref_rejected, rejected_avg, beta=self.beta,
                                        floor=self.args.cw_floor, tau=self.args.cw_tau,
                                        detach_weight=self.args.cw_detach_weight)
            per_pair = out.loss
            metrics["cooling_weight"] = out.weight.detach()
            chosen_rewards = self.beta * (chosen - ref_chosen).detach()
            rejected_rewards = self.beta * (rejected - ref_rejected).detach()
            metrics.update({
                "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
                "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
                "rewards/margins": chosen_rewards - rejected_rewards,
            })
        else:
            per_pair = objectives.sftc_loss(-chosen_avg, -rejected_avg, lam=self.args.sftc_lam,
                                            margin=self.args.sftc_margin)
            metrics.update({"nll/positive": -chosen_avg.detach(), "nll/negative": -rejected_avg.detach()})
        metrics["logps/chosen"], metrics["logps/rejected"] = chosen.detach(), rejected.detach()
        self._log_head_metrics(outputs, mask, inputs, mode)
        for key, value in metrics.items():
            self._metrics[mode][key].append(self.accelerator.gather(value).float().mean().item())
        return per_pair.mean()

    def _log_head_metrics(self, outputs, mask, inputs, mode: str) -> None:
        """TRL's ``entropy``, ``num_tokens``, ``logits/*`` and ``mean_token_accuracy``, weighted over ranks
        by token counts as DPOTrainer weights them."""
        seq_len = mask.size(1)

        def token_mean(values, where):
            total = self.accelerator.gather_for_metrics((values * where).sum()).sum()
            count = self.accelerator.gather_for_metrics(where.sum()).sum()
            return (total / count).item() if count > 0 else 0.0

        chosen_mask, rejected_mask = mask.chunk(2)
        self._metrics[mode]["entropy"].append(token_mean(outputs.entropy[:, -seq_len:].detach(), mask))
        if mode == "train":
            tokens = self.accelerator.gather_for_metrics(inputs["attention_mask"].sum()).sum().item()
            self._total_train_tokens += tokens // self._tp_size
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        chosen_logits, rejected_logits = outputs.mean_logits[:, -seq_len:].chunk(2)
        self._metrics[mode]["logits/chosen"].append(token_mean(chosen_logits, chosen_mask))
        self._metrics[mode]["logits/rejected"].append(token_mean(rejected_logits, rejected_mask))
        chosen_top1, _ = outputs.is_top1[:, -seq_len:].chunk(2)
        self._metrics[mode]["mean_token_accuracy"].append(token_mean(chosen_top1.float(), chosen_mask))


GRPO_UNSUPPORTED = {
    "router_aux_loss_coef": MOE,
    "use_vllm": "vLLM generation is not tested with prefopt's head: not supported",
    "use_liger_kernel": "replaces the model's forward: not supported",
}
GRPO_SUPPORTED_OPTIONS = tuple(
    f.name for f in dataclasses.fields(GRPOConfig)
    if f.name not in GRPO_UNSUPPORTED and f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}
)


@dataclass
class PrefoptGRPOConfig(GRPOConfig):
    """``GRPOConfig`` plus ``share_prefix`` (as :class:`PrefoptDPOConfig`'s): the answers sampled for one prompt
    run its images and prompt through the vision tower and the decoder once when they are scored (policy,
    old policy and reference); generation is TRL's."""

    share_prefix: str = field(default="off", metadata={"help": SHARE_PREFIX_HELP})

    def __post_init__(self):
        super().__post_init__()
        self.share_prefix = _share_prefix_choice(self.share_prefix)


class PrefoptGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose per-token log-probs and entropies (policy, old policy and reference) come
    from prefopt's fused op; same constructor, ``GRPOConfig`` and behaviour.

    TRL's own loss code runs on them, so every ``loss_type`` of the installed TRL (grpo, bnpo, dr_grpo,
    dapo, cispo, sapo, luspo, vespo in 1.16) and its ``num_items_in_batch`` normalisation hold as in TRL.
    Supported options: every ``GRPOConfig`` option but ``use_vllm``, ``use_liger_kernel`` and
    ``router_aux_loss_coef`` (:data:`GRPO_SUPPORTED_OPTIONS`); those raise a ValueError naming them. With a
    :class:`PrefoptGRPOConfig`, also ``share_prefix``.
    """

    def __init__(self, model, reward_funcs, args=None, *rest, **kwargs):
        if args is not None:
            _check_options(args, GRPOConfig, GRPO_SUPPORTED_OPTIONS, GRPO_UNSUPPORTED, "PrefoptGRPOTrainer")
        with _prefopt_heads(grpo_trainer_module, share_prefix=getattr(args, "share_prefix", "off")):
            super().__init__(model, reward_funcs, args, *rest, **kwargs)
