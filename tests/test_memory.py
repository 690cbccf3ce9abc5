"""Memory promises of the torch backend, proved by watching every tensor the op creates."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import prefopt.ops.torch_backend as torch_backend
from prefopt import FusedDPOLoss, linear_logprobs

CHUNK_TOKENS, CHUNK_VOCAB = 64, 512
ROWS, LENGTH, HIDDEN, VOCAB = 4, 480, 16, 2000  # N x V = 4M elements; every other tensor is far smaller


class TensorWatch(TorchDispatchMode):
    """Records the element count and shape of every tensor any op returns."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.shapes = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                self.shapes.append((func, tuple(t.shape)))
        return out


@pytest.fixture(autouse=True)
def chunks(monkeypatch):
    monkeypatch.setitem(torch_backend.CHUNK_SIZES, "cpu", (CHUNK_TOKENS, CHUNK_VOCAB))


def inputs(frozen=False):
    torch.manual_seed(0)
    hidden = torch.randn(ROWS, LENGTH, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=not frozen)
    targets = torch.randint(0, VOCAB, (ROWS, LENGTH))
    targets[:, :100] = -100
    return hidden, weight, targets, torch.randn(ROWS, LENGTH, HIDDEN), torch.randn(VOCAB, HIDDEN)


def bound(tokens):
    """The largest tensor the op may create: a token chunk's full-vocab row block, or an input-sized one."""
    return max(CHUNK_TOKENS * VOCAB, tokens * HIDDEN, VOCAB * HIDDEN)


@pytest.mark.parametrize("stats", [{}, {"entropy": True, "kl": True, "uniform_nll": True}], ids=["logp", "all"])
def test_op_never_allocates_tokens_by_vocab(stats):
    hidden, weight, targets, ref_hidden, ref_weight = inputs()
    tokens = ROWS * LENGTH
    assert bound(tokens) * 8 <= tokens * VOCAB
    with TensorWatch() as watch:
        out = linear_logprobs(hidden, weight, targets, ref_hidden=ref_hidden, ref_weight=ref_weight,
                              backend="torch", **stats)
        sum(t.sum() for t in out if t is not None and t.requires_grad).backward()
    assert watch.largest <= bound(tokens), f"a tensor of {watch.largest} elements (bound {bound(tokens)})"
    assert hidden.grad is not None and weight.grad is not None


def test_dpo_loss_never_allocates_tokens_by_vocab():
    hidden, weight, targets, ref_hidden, ref_weight = inputs()
    with TensorWatch() as watch:
        FusedDPOLoss()(weight, hidden, targets, ref_hidden=ref_hidden, ref_weight=ref_weight).loss.backward()
    assert watch.largest <= bound(ROWS * LENGTH)


def test_frozen_head_backward_has_no_pass_over_the_vocabulary():
    hidden, weight, targets, _, _ = inputs(frozen=True)
    out = linear_logprobs(hidden, weight, targets, backend="torch")
    with TensorWatch() as watch:
        out.logp.sum().backward()
    assert hidden.grad is not None and weight.grad is None
    vocab_sized = [(f, s) for f, s in watch.shapes if VOCAB in s or CHUNK_VOCAB in s]
    assert not vocab_sized, f"backward touched vocabulary-sized tensors: {vocab_sized[:3]}"


class TileWatch(TorchDispatchMode):
    """Records the bytes of the largest fresh tensor (not a view) any op returns, other than those
    [*, HIDDEN] (d hidden, d weight and their chunks, which every path must produce)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # a view of an existing tensor allocates nothing
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and (t.dim() == 0 or t.shape[-1] != HIDDEN):
                self.largest = max(self.largest, t.numel() * t.element_size())
        return out


BUDGET = 48 * 2**10  # a few tokens per chunk: a pair of 40-token rows does not fit (recompute path)


@pytest.mark.parametrize("case", ["logp", "all-stats-softcap", "pairs-recompute", "pairs-reference-recompute"])
def test_tiles_stay_within_the_budget(case):
    from prefopt.ops import FUSED_GRADIENT, PATH_COUNTS, RECOMPUTE
    from prefopt.ops.common import OpConfig
    from prefopt.ops.objective import linear_objective

    torch.manual_seed(0)
    hidden = torch.randn(2, 40, HIDDEN, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, requires_grad=True)
    targets = torch.randint(0, VOCAB, (2, 40))
    ref = dict(ref_hidden=torch.randn(2, 40, HIDDEN), ref_weight=torch.randn(VOCAB, HIDDEN))
    before = dict(PATH_COUNTS)
    with TileWatch() as forward:
        if case == "logp":
            config, reference, path = OpConfig(), False, FUSED_GRADIENT
            loss = linear_objective(hidden, weight, targets, lambda s: -s.logp, budget_bytes=BUDGET).loss
        elif case == "all-stats-softcap":
            config, reference, path = OpConfig(softcap=5.0, entropy=True, kl=True), True, FUSED_GRADIENT
            loss = linear_objective(hidden, weight, targets, lambda s: s.entropy + s.kl - s.logp, softcap=5.0,
                                    entropy=True, kl=True, budget_bytes=BUDGET, **ref).loss
        else:
            reference = case == "pairs-reference-recompute"
            config, path = OpConfig(), RECOMPUTE
            refs = ref if reference else dict(ref_logps=torch.randn(2))
            loss = FusedDPOLoss(budget_bytes=BUDGET)(weight, hidden, targets, **refs).loss
    with TileWatch() as backward:
        loss.backward()
    assert PATH_COUNTS[path] == before.get(path, 0) + 1
    # The recompute backward reads the reference tiles only for the KL gradient.
    for watch, alive in ((forward, torch_backend.tiles_alive(config, reference)),
                         (backward, torch_backend.tiles_alive(config, reference and config.kl))):
        assert watch.largest * alive <= BUDGET, f"a {watch.largest}-byte tile, {alive} alive, budget {BUDGET}"
    assert forward.largest > BUDGET // 8  # the tiles were not shrunk further than the budget asks
    assert hidden.grad is not None and weight.grad is not None
