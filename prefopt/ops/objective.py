"""The op's second entry point: an objective's gradients formed while each logits tile is live.

:func:`linear_logprobs` returns statistics and recomputes every logits tile in backward: 4 matrix
products of N x H x V for a trainable head (forward, recompute, d hidden, d weight). When the loss is a
sum over tokens of a function of each token's own statistics (SFT, nSFT's per-token KL, per-token
GRPO), its gradient with respect to a token's statistics is known as soon as they are. Then
:func:`linear_objective` takes that function, and per chunk of tokens it forms the whole-vocabulary
logits tile, the statistics, their gradient (autograd on the few per-token numbers), the gradient on
the logits and from it d hidden and d weight: 3 products, +1 per reference head (the KL gradient reuses
the reference tile). The gradients wait for backward, which only scales them by the incoming gradient.
Both backends: torch forms the tile's statistics and gradient with torch ops, Triton with the kernels of
:mod:`prefopt.kernels.live_tile`; the products are torch's (cuBLAS on a GPU) either way.

The chunk of tokens is sized so that its tiles fit ``budget_bytes``. Where the path does not apply (no
gradient wanted, a head partitioned by DeepSpeed ZeRO-3, whose full-size gradient
would be held from forward to backward), the same objective runs on :func:`linear_logprobs` and the
recompute backward. :data:`prefopt.ops.PATH_COUNTS` counts the calls of each path.
"""
from __future__ import annotations

from typing import Callable, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import (FUSED_GRADIENT, PATH_COUNTS, RECOMPUTE, PackedInputs, TokenStats, check_budget_bytes, linear_logprobs,
               pack_inputs)
from .common import ForwardStats, GradCoefficients, OpConfig, empty_stat, logit_grad_coefficients
from .torch_backend import fused_gradient_pass, tokens_per_chunk, torch_tile_step

#: The most memory the logits tiles of one call take by default (see :func:`default_budget_bytes`).
DEFAULT_BUDGET_BYTES = 64 * 2**20
#: ... and the least (below it the products get too thin to run at speed).
MIN_BUDGET_BYTES = 2**20


def default_budget_bytes(weight: Tensor) -> int:
    """A quarter of the head's fp32 gradient, within [MIN_BUDGET_BYTES, DEFAULT_BUDGET_BYTES], on either
    path: the tiles add at most a quarter of the gradient every path must produce. The memory-efficient
    peers hold about one gradient's worth of logits tiles beyond it (Cut Cross-Entropy at the quick
    bench's shapes, 16 MiB for an 8 MiB head), so peak memory stays under half of theirs (at the issue-2
    shape a 125 MiB head gets 31 MiB, under the 44 MiB of headroom there); larger budgets are faster on a
    CPU (fewer, larger chunks) and the keyword trades."""
    return min(DEFAULT_BUDGET_BYTES, max(MIN_BUDGET_BYTES, weight.numel()))  # 4-byte entries, a quarter


#: ``token_loss(stats, *token_inputs) -> [n]``: each scored token's share of the loss (see linear_objective).
TokenLoss = Callable[..., Tensor]


class ObjectiveOutput(NamedTuple):
    """``loss``: the sum of the per-token losses (differentiable); ``stats``: the statistics shaped like
    ``targets`` (0 at ignored positions, no gradient), for metrics; ``path``: which path ran."""

    loss: Tensor
    stats: TokenStats
    path: str


def _token_values(fs: ForwardStats, config: OpConfig, vocab: int) -> TokenStats:
    """The statistics of :class:`TokenStats` from what the pass accumulated (common.py's definitions)."""
    return TokenStats(
        logp=fs.target_logit - fs.lse,
        lse=fs.lse,
        entropy=fs.lse - fs.mean_logit if config.entropy else None,
        ref_logp=fs.ref_target_logit - fs.ref_lse if fs.ref_lse is not None else None,
        kl=fs.mean_logit - fs.mean_ref_logit - fs.lse + fs.ref_lse if config.kl else None,
        uniform_nll=fs.lse - fs.logit_sum / vocab if config.uniform_nll else None,
    )


class _Upstream:
    """The objective's per-token gradient rule for one call: the chunk's statistics in, the coefficients
    of its logit gradient out; it also sums the per-token losses."""

    def __init__(self, token_loss: TokenLoss, inputs: Sequence[Tensor], config: OpConfig, vocab: int, grouped: bool):
        self.token_loss, self.inputs, self.config, self.vocab, self.grouped = token_loss, inputs, config, vocab, grouped
        self.parts = []

    def __call__(self, t0: int, t1: int, fs: ForwardStats) -> GradCoefficients:
        values = _token_values(fs, self.config, self.vocab)
        with torch.enable_grad():
            # ref_logp has no gradient: it stays a plain tensor, every other statistic becomes a leaf.
            leaves = values._replace(**{k: v.detach().requires_grad_() for k, v in values._asdict().items()
                                        if v is not None and k != "ref_logp"})
            per_token = self.token_loss(leaves, *(x[t0:t1] for x in self.inputs))
            _check_token_loss(per_token, t1 - t0, self.grouped)
            names = [k for k, v in leaves._asdict().items() if v is not None and v.requires_grad]
            grads = [None] * len(names)
            if per_token.requires_grad:
                grads = torch.autograd.grad(per_token.sum(), [getattr(leaves, k) for k in names], allow_unused=True)
        self.parts.append(per_token.detach().sum().to(fs.lse.dtype))
        g = dict(zip(names, grads))
        return logit_grad_coefficients(g.get("logp"), g.get("lse"), g.get("entropy"), g.get("kl"),
                                       g.get("uniform_nll"), None, fs.mean_logit, fs.mean_ref_logit, self.vocab, fs.lse)

    def total(self, like: Tensor) -> Tensor:
        return torch.stack(self.parts).sum() if self.parts else like.new_zeros(())


def _tile_step(backend: str):
    """The backend's chunk step of :func:`prefopt.ops.torch_backend.fused_gradient_pass`."""
    if backend == "torch":
        return torch_tile_step
    from .triton_backend import tile_step

    return tile_step


class FusedGradient(torch.autograd.Function):
    """forward(hidden [n, H], weight, bias, targets [n], ref_hidden, ref_weight, ref_bias, config, upstream,
    chunks, tile_step) -> (loss, logp, lse, entropy, ref_logp, kl, uniform_nll), the statistics without
    gradient. Saved for backward: the objective's d hidden, d weight, d bias (nothing else)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config, upstream, chunks,
                tile_step):
        stats, grad_hidden, grad_weight, grad_bias = fused_gradient_pass(
            hidden, weight, bias, targets, ref_hidden, ref_weight, ref_bias, config, upstream, chunks,
            *ctx.needs_input_grad[:3], tile_step=tile_step)
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        values = [empty_stat(stats.lse) if v is None else v
                  for v in _token_values(stats, config, weight.shape[0])[:6]]
        ctx.mark_non_differentiable(*values)
        return (upstream.total(stats.lse), *values)

    @staticmethod
    def backward(ctx, g_loss, *_):
        if torch.is_grad_enabled():
            raise RuntimeError("linear_objective: double backward (create_graph=True) is not supported by the fused op")
        grads = ctx.saved_tensors
        if not bool(g_loss == 1):  # g_loss is materialised: 0 when only the statistics were used
            grads = [None if g is None else g * g_loss.to(g.dtype) for g in grads]
        return (*grads,) + (None,) * 8


def _check_token_loss(loss, tokens: int, grouped: bool) -> None:
    if not isinstance(loss, Tensor) or (not grouped and loss.shape != (tokens,)):
        expected = "a tensor" if grouped else f"a tensor of shape [{tokens}] (one loss per scored token)"
        raise ValueError(f"token_loss: expected {expected}, got {getattr(loss, 'shape', type(loss).__name__)}")


def _chunks(group_sizes: Sequence[int], limit: int) -> List[Tuple[int, int]]:
    """Consecutive groups of tokens packed greedily into chunks of at most ``limit`` tokens (a group is
    never split; every group fits)."""
    chunks, start, end = [], 0, 0
    for size in group_sizes:
        if end + size - start > limit:
            chunks.append((start, end))
            start = end
        end += size
    if end > start:
        chunks.append((start, end))
    return chunks


def _partitioned(t: Optional[Tensor]) -> bool:
    """A parameter DeepSpeed ZeRO-3 partitions (gathered only around its module's forward and backward)."""
    return t is not None and hasattr(t, "ds_id")


def linear_objective(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    token_loss: TokenLoss,
    *,
    token_inputs: Sequence[Tensor] = (),
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
    backend: str = "auto",
    budget_bytes: Optional[int] = None,
    fused_gradient: bool = True,
    groups: Optional[Tensor] = None,
) -> ObjectiveOutput:
    """``loss = sum over scored tokens t of token_loss(stats_t, *token_inputs_t)``, with its gradient formed
    in the forward pass (3 matrix products for a trainable head) where it applies.

    ``token_loss(stats, *inputs)`` gets a :class:`TokenStats` of ``[n]`` tensors for ``n`` scored tokens
    (``logp``, ``lse``, ``ref_logp`` with a reference, ``entropy`` / ``kl`` / ``uniform_nll`` when asked;
    ``ref_logp`` without gradient) and each of ``token_inputs`` at the same tokens, and returns each
    token's loss ``[n]``, differentiable in the statistics. It is called on chunks of tokens, so it must
    treat tokens independently: a normalisation over the batch (a token mean, a per-sequence mean) goes
    in as a per-token weight among ``token_inputs`` or as a constant, computed from the targets before
    the call, so that the gradient formed in the forward is the exact one.

    Objectives on whole sequences (DPO's per-pair sums) pass ``groups``, an integer tensor shaped like
    ``targets`` (a pair's id at each of its positions): every chunk then holds whole groups, and
    ``token_loss`` may return any tensor whose sum is the chunk's share of the loss (it finds each token's
    sequence among its ``token_inputs``); tokens of one group never straddle two chunks. Where the largest
    group does not fit the budget, the call recomputes (memory first; a larger ``budget_bytes`` trades it).
    ``token_loss`` also runs once on all scored tokens together on the recompute path, so groups without
    any scored token never reach it: their share of the loss is the caller's.

    The other arguments are those of :func:`prefopt.linear_logprobs`. ``token_inputs`` are tensors shaped
    like ``targets`` (per position; detached: they get no gradient). ``budget_bytes`` bounds the logits
    tiles of one chunk of tokens (default :func:`default_budget_bytes`; at least one token per chunk);
    ``fused_gradient=False`` forces the recompute path.

    Returns :class:`ObjectiveOutput`. Backward of the fused-gradient path scales the stored gradients by
    the incoming gradient; it refuses double backward.
    """
    if not callable(token_loss):
        raise TypeError("token_loss: expected a callable (stats, *token_inputs) -> [n], "
                        f"got {type(token_loss).__name__}")
    for i, x in enumerate(token_inputs):
        if not isinstance(x, Tensor) or x.shape != targets.shape:
            raise ValueError(f"token_inputs[{i}]: expected a tensor of shape {list(targets.shape)} like targets, "
                             f"got {getattr(x, 'shape', type(x).__name__)}")
    if budget_bytes is None:
        budget_bytes = default_budget_bytes(weight)
    check_budget_bytes(budget_bytes, optional=False)
    if groups is not None and (not isinstance(groups, Tensor) or groups.shape != targets.shape
                               or groups.is_floating_point() or groups.is_complex()):
        raise ValueError(f"groups: expected an integer tensor of shape {list(targets.shape)} like targets, "
                         f"got {getattr(groups, 'dtype', type(groups).__name__)} {getattr(groups, 'shape', '')}")
    inputs = [x.detach() for x in token_inputs]
    wants_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    common = dict(bias=bias, ignore_index=ignore_index, temperature=temperature, softcap=softcap,
                  ref_hidden=ref_hidden, ref_weight=ref_weight, ref_bias=ref_bias, backend=backend)
    config = OpConfig(float(temperature), None if softcap is None else float(softcap), entropy, kl, uniform_nll)
    packed = chunks = None
    if fused_gradient and wants_grad and not (_partitioned(weight) or _partitioned(bias)):
        packed = pack_inputs(hidden, weight, targets, kl=kl, capturable=False, **common)
        limit = tokens_per_chunk(weight.shape[0], packed.stat_dtype, config, ref_hidden is not None, budget_bytes)
        n = packed.targets.shape[0]
        chunks = [(t0, min(t0 + limit, n)) for t0 in range(0, n, limit)]
        if groups is not None:
            packed, sizes = _grouped(packed, groups)
            chunks = _chunks(sizes, limit) if max(sizes, default=0) <= limit else None
    if chunks is None:
        stats = linear_logprobs(hidden, weight, targets, entropy=entropy, kl=kl, uniform_nll=uniform_nll,
                                budget_bytes=budget_bytes, **common)
        valid = targets != ignore_index
        scored = TokenStats(*(None if s is None else s[valid] for s in stats))
        per_token = token_loss(scored, *(x[valid] for x in inputs))
        _check_token_loss(per_token, int(valid.sum()), groups is not None)
        detached = TokenStats(*(None if s is None else s.detach() for s in stats))
        return ObjectiveOutput(per_token.sum(), detached, RECOMPUTE)

    PATH_COUNTS[FUSED_GRADIENT] += 1
    upstream = _Upstream(token_loss, [packed.pack(x) for x in inputs], config, weight.shape[0], groups is not None)
    loss, *values = FusedGradient.apply(packed.hidden, weight, bias, packed.targets, packed.ref_hidden,
                                        packed.ref_weight, packed.ref_bias, config, upstream, chunks,
                                        _tile_step(packed.backend))
    asked = (True, True, entropy, ref_hidden is not None, kl, uniform_nll)
    stats = TokenStats(*(packed.unpack(v) if wanted else None for v, wanted in zip(values, asked)))
    return ObjectiveOutput(loss, stats, FUSED_GRADIENT)


def _grouped(packed: PackedInputs, groups: Tensor) -> Tuple[PackedInputs, List[int]]:
    """The scored tokens reordered so that each group's are consecutive (stable: in order within a group),
    and the size of each group in that order."""
    ids = packed.pack(groups)
    order = torch.argsort(ids, stable=True)
    sizes = torch.unique_consecutive(ids.index_select(0, order), return_counts=True)[1].tolist()
    take = lambda t: None if t is None else t.index_select(0, order)  # noqa: E731
    return packed._replace(hidden=take(packed.hidden), targets=take(packed.targets),
                           ref_hidden=take(packed.ref_hidden), index=take(packed.index)), sizes
