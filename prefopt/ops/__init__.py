"""The fused op: output head -> per-token statistics, never holding the ``[tokens, vocab]`` logits.

:func:`linear_logprobs` checks its inputs, drops ignored tokens, hands the packed tokens to a backend
(an autograd Function with the contract of :mod:`prefopt.ops.torch_backend`) and scatters the
per-token results back to the shape of ``targets``.
"""
from __future__ import annotations

import math
from collections import Counter
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .common import OpConfig, compute_dtype

BACKENDS = ("auto", "torch", "triton")

FUSED_GRADIENT = "fused-gradient"
RECOMPUTE = "recompute"

#: Calls of the op by path: ``"recompute"`` (:func:`linear_logprobs`: statistics out, backward recomputes
#: the logits) and ``"fused-gradient"`` (:func:`prefopt.linear_objective`: gradients formed in forward).
PATH_COUNTS: Counter = Counter()
SIGNED_INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


class TokenStats(NamedTuple):
    """Per-token statistics with the shape of ``targets``; ignored tokens hold 0.

    ``logp``: log pi(y_t); ``lse``: log-sum-exp of the logits; ``entropy``: H(pi_t);
    ``ref_logp``: log pi_ref(y_t) (no gradient); ``kl``: KL(pi_t || pi_ref,t) over the full vocabulary;
    ``uniform_nll``: -(1/V) sum_v log pi_t(v), the uniform term of label smoothing;
    ``mean_logit``: (1/V) sum_v z_t(v), the mean logit over the vocabulary (differentiable);
    ``top1``: 1.0 where y_t is the first maximum of z_t (argmax, lowest index on ties), else 0.0;
    ``log_sum_sq_probs``: log sum_v pi_t(v)^2, the log collision probability (no gradient; TRL's WPO weights).
    Fields that were not asked for are ``None``.
    """

    logp: Tensor
    lse: Tensor
    entropy: Optional[Tensor] = None
    ref_logp: Optional[Tensor] = None
    kl: Optional[Tensor] = None
    uniform_nll: Optional[Tensor] = None
    mean_logit: Optional[Tensor] = None
    top1: Optional[Tensor] = None
    log_sum_sq_probs: Optional[Tensor] = None


def _check_float(name: str, t: Optional[Tensor], required: bool = True) -> None:
    if t is None:
        if required:
            raise TypeError(f"{name}: expected a floating-point tensor, got None")
        return
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got dtype {t.dtype}")


def _check_head(prefix: str, weight: Tensor, bias: Optional[Tensor], hidden_size: int, device) -> None:
    _check_float(f"{prefix}weight", weight)
    if weight.dim() != 2 or weight.shape[1] != hidden_size:
        raise ValueError(
            f"{prefix}weight: expected shape [V, {hidden_size}] (vocab x hidden size of {prefix}hidden), "
            f"got {list(weight.shape)}"
        )
    if weight.device != device:
        raise ValueError(f"{prefix}weight: expected device {device} like {prefix}hidden, got {weight.device}")
    if bias is not None:
        _check_float(f"{prefix}bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"{prefix}bias: expected shape [{weight.shape[0]}], got {list(bias.shape)}")
        if bias.device != device:
            raise ValueError(f"{prefix}bias: expected device {device}, got {bias.device}")


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``"auto"`` to the backend for ``device``: Triton on CUDA when it is installed, torch otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and triton_available():
        return "triton"
    return "torch"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _backend_function(name: str):
    if name == "torch":
        from .torch_backend import LinearLogprobsTorch

        return LinearLogprobsTorch
    if not triton_available():
        raise ValueError("backend: 'triton' needs the triton package (pip install triton)")
    from .triton_backend import LinearLogprobsTriton

    return LinearLogprobsTriton


class PackedInputs(NamedTuple):
    """The scored tokens of one call, as a backend takes them, and the way back to the shape of ``targets``."""

    hidden: Tensor  # [n, H]
    targets: Tensor  # [n] int64, every value a valid index
    ref_hidden: Optional[Tensor]  # [n, H'], detached, in the policy's compute precision
    ref_weight: Optional[Tensor]
    ref_bias: Optional[Tensor]
    backend: str
    index: Optional[Tensor]  # positions of the scored tokens in targets.reshape(-1); None under capturable
    valid: Tensor  # [numel(targets)] bool
    shape: torch.Size
    stat_dtype: torch.dtype

    def pack(self, per_position: Tensor) -> Tensor:
        """A tensor shaped like ``targets`` -> its values at the scored tokens, in the backend's order."""
        flat = per_position.reshape(-1)
        return flat if self.index is None else flat.index_select(0, self.index)

    def unpack(self, packed: Tensor) -> Tensor:
        """Per-token values of the scored tokens -> shaped like ``targets``, 0 at ignored positions."""
        zero = torch.zeros((), dtype=self.stat_dtype, device=packed.device)
        if self.index is None:
            return torch.where(self.valid, packed.to(self.stat_dtype), zero).view(self.shape)
        full = torch.zeros(self.valid.shape[0], dtype=self.stat_dtype, device=packed.device)
        return full.index_copy(0, self.index, packed.to(self.stat_dtype)).view(self.shape)


def pack_inputs(hidden: Tensor, weight: Tensor, targets: Tensor, *, bias: Optional[Tensor], ignore_index: int,
                temperature: float, softcap: Optional[float], ref_hidden: Optional[Tensor],
                ref_weight: Optional[Tensor], ref_bias: Optional[Tensor], kl: bool, backend: str,
                capturable: bool) -> PackedInputs:
    """Check the arguments of :func:`linear_logprobs` (one clear error naming the argument) and keep the
    scored tokens only (all of them, target 0 where ignored, under ``capturable``)."""
    _check_float("hidden", hidden)
    if hidden.dim() < 2:
        raise ValueError(f"hidden: expected shape [..., H] with at least 2 dims, got {list(hidden.shape)}")
    hidden_size = hidden.shape[-1]
    _check_head("", weight, bias, hidden_size, hidden.device)
    vocab_size = weight.shape[0]
    if not isinstance(targets, Tensor):
        raise TypeError(f"targets: expected a torch.Tensor, got {type(targets).__name__}")
    if targets.dtype not in SIGNED_INTEGER_DTYPES:
        # Unsigned types would wrap ignore_index (-100 becomes 156 in uint8) into a real token id.
        raise TypeError(f"targets: expected a signed integer tensor (int8/16/32/64), got dtype {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(
            f"targets: expected shape {list(hidden.shape[:-1])} (the leading shape of hidden), "
            f"got {list(targets.shape)}"
        )
    if targets.device != hidden.device:
        raise ValueError(f"targets: expected device {hidden.device} like hidden, got {targets.device}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature: expected a finite number > 0, got {temperature!r}")
    if softcap is not None and (not isinstance(softcap, (int, float)) or not softcap > 0):
        raise ValueError(f"softcap: expected None or a number > 0, got {softcap!r}")
    if ref_hidden is not None:
        _check_float("ref_hidden", ref_hidden)
        if ref_hidden.shape[:-1] != hidden.shape[:-1]:
            raise ValueError(
                f"ref_hidden: expected leading shape {list(hidden.shape[:-1])} like hidden, "
                f"got {list(ref_hidden.shape)}"
            )
        if ref_hidden.device != hidden.device:
            raise ValueError(f"ref_hidden: expected device {hidden.device} like hidden, got {ref_hidden.device}")
        if ref_weight is None:
            if ref_bias is not None:
                raise ValueError("ref_bias: given without ref_weight; pass the reference head's weight too")
            ref_weight, ref_bias = weight, bias
        _check_head("ref_", ref_weight, ref_bias, ref_hidden.shape[-1], hidden.device)
        if ref_weight.shape[0] != vocab_size:
            raise ValueError(
                f"ref_weight: expected {vocab_size} rows (the vocabulary of weight), got {ref_weight.shape[0]}"
            )
    elif ref_weight is not None or ref_bias is not None:
        raise ValueError("ref_hidden: required when ref_weight or ref_bias is given")
    if kl and ref_hidden is None:
        raise ValueError("kl: needs the reference head (pass ref_hidden, and ref_weight if it differs)")
    name = resolve_backend(backend, hidden.device)

    flat_targets = targets.reshape(-1).long()
    valid = flat_targets != ignore_index
    bad = valid & ((flat_targets < 0) | (flat_targets >= vocab_size))
    range_message = f"targets: expected values in [0, {vocab_size}) or ignore_index={ignore_index}"
    if capturable:
        torch._assert_async(~bad.any(), range_message)
        index = None
        packed_hidden = hidden.reshape(-1, hidden_size)
        packed_targets = torch.where(valid, flat_targets, torch.zeros_like(flat_targets))
    else:
        if bool(bad.any()):
            raise ValueError(f"{range_message}, found {int(flat_targets[bad][0])}")
        index = valid.nonzero().squeeze(1)
        packed_hidden = hidden.reshape(-1, hidden_size).index_select(0, index)
        packed_targets = flat_targets.index_select(0, index)
    packed_ref = None
    if ref_hidden is not None:
        packed_ref = ref_hidden.detach().reshape(-1, ref_hidden.shape[-1])
        packed_ref = packed_ref if index is None else packed_ref.index_select(0, index)
        if compute_dtype(packed_ref.dtype) != compute_dtype(hidden.dtype):
            # Both heads accumulate in one precision (a kernel has one accumulator type): a float64
            # reference beside a float32 policy, or the reverse, runs in the policy's dtype (no gradient).
            packed_ref = packed_ref.to(hidden.dtype)
        ref_weight = ref_weight.detach()
        ref_bias = ref_bias.detach() if ref_bias is not None else None

    return PackedInputs(packed_hidden, packed_targets, packed_ref, ref_weight, ref_bias, name, index, valid,
                        targets.shape, compute_dtype(hidden.dtype))


def check_budget_bytes(budget_bytes, optional: bool) -> None:
    """``budget_bytes`` is a positive int (or None where ``optional``); one clear error otherwise."""
    if optional and budget_bytes is None:
        return
    if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, int) or budget_bytes <= 0:
        expected = "None or a positive int (bytes)" if optional else "a positive int (bytes)"
        raise ValueError(f"budget_bytes: expected {expected}, got {budget_bytes!r}")


def linear_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    temperature: float = 1.0,
    softcap: Optional[float] = None,
    ref_hidden: Optional[Tensor] = None,
    ref_weight: Optional[Tensor] = None,
    ref_bias: Optional[Tensor] = None,
    entropy: bool = False,
    kl: bool = False,
    uniform_nll: bool = False,
    mean_logit: bool = False,
    top1: bool = False,
    log_sum_sq_probs: bool = False,
    backend: str = "auto",
    capturable: bool = False,
    budget_bytes: Optional[int] = None,
) -> TokenStats:
    """Per-token log-probabilities of ``targets`` under the head ``weight`` applied to ``hidden``.

    Computes, for every token whose target is not ``ignore_index``,

        z = softcap(hidden @ weight.T + bias) / temperature,   softcap(s) = cap * tanh(s / cap)
        logp = z[y] - logsumexp(z),   lse = logsumexp(z)

    and on request ``entropy = -sum p log p``, ``uniform_nll = -(1/V) sum log p``,
    ``mean_logit = (1/V) sum_v z_v``, ``top1 = [y == argmax_v z_v]`` (first maximum),
    ``log_sum_sq_probs = log sum_v p_v^2`` (from an online ``sum_v exp(2 (z_v - max))``) and, with a reference
    head, ``ref_logp`` (no gradient) and ``kl = KL(pi || pi_ref)`` over the full vocabulary, streaming
    over vocabulary tiles so that no ``[tokens, V]`` tensor ever exists. Statistics are accumulated in
    float32 (float64 for float64 inputs) whatever the input dtype, and returned in that precision.

    Args:
        hidden: ``[..., H]`` final hidden states of the policy, any float dtype.
        weight: ``[V, H]`` output head. When it (and ``bias``) do not require grad (a frozen or LoRA
            head) no weight gradient is computed and, for log-prob-only calls, backward needs no pass
            over the vocabulary.
        targets: signed integer ``[...]`` (the leading shape of ``hidden``), aligned with ``hidden``
            (position t is scored on ``targets[t]``); values in ``[0, V)`` or ``ignore_index``.
        ref_hidden / ref_weight / ref_bias: the reference model's hidden states (same shape as
            ``hidden``) and head; ``ref_weight`` defaults to ``weight`` (shared frozen head, e.g. LoRA
            with adapters disabled). No gradient flows into the reference.
        entropy / kl / uniform_nll / mean_logit / top1 / log_sum_sq_probs: also return these statistics
            (``kl`` needs ``ref_hidden``; ``top1`` and ``log_sum_sq_probs`` have no gradient).
        backend: ``"auto"`` (Triton for CUDA tensors, torch otherwise), ``"torch"`` or ``"triton"``.
        capturable: no host synchronisation in the op itself, so that it can be captured in a CUDA graph
            or compiled with ``fullgraph=True`` (with the Triton backend, whose launchers do not
            synchronise either): the target range is checked on the device (a device-side assert instead
            of the ``ValueError``), and ignored positions are computed and masked out instead of being
            removed first (they cost their share of the products, and their hidden states must be finite).
        budget_bytes: the most memory the torch backend's logits tiles take at once (tiles shrink to fit,
            down to one token by one vocabulary entry); None keeps its fixed tile sizes (16 MiB of fp32 on
            a CPU). The Triton backend sizes its buffers itself.

    Returns:
        :class:`TokenStats` of tensors shaped like ``targets`` (0 at ignored positions).
    """
    packed = pack_inputs(hidden, weight, targets, bias=bias, ignore_index=ignore_index, temperature=temperature,
                         softcap=softcap, ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, kl=kl,
                         backend=backend, capturable=capturable)
    check_budget_bytes(budget_bytes, optional=True)
    PATH_COUNTS[RECOMPUTE] += 1
    config = OpConfig(float(temperature), None if softcap is None else float(softcap), entropy, kl, uniform_nll,
                      mean_logit, top1, log_sum_sq_probs, budget_bytes)
    outputs = _backend_function(packed.backend).apply(
        packed.hidden, weight, bias, packed.targets, packed.ref_hidden, packed.ref_weight, packed.ref_bias, config
    )
    asked = (True, True, entropy, ref_hidden is not None, kl, uniform_nll, mean_logit, top1, log_sum_sq_probs)
    return TokenStats(*(packed.unpack(out) if wanted else None for out, wanted in zip(outputs, asked)))
