"""The fused op against the float64 oracle, for every backend: values, gradients, edge cases."""
import importlib.util

import pytest
import torch

import prefopt.ops.torch_backend as torch_backend
from prefopt.bench.oracle import oracle_linear_logprobs
from prefopt import linear_logprobs

BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(
        importlib.util.find_spec("prefopt.ops.triton_backend") is None or importlib.util.find_spec("triton") is None,
        reason="Triton backend not installed")),
]
STATS = ("logp", "lse", "entropy", "ref_logp", "kl", "uniform_nll")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    # Tiles much smaller than the test shapes, so every multi-tile path (online softmax across vocab
    # tiles, token chunks, a ragged last tile) runs.
    monkeypatch.setitem(torch_backend.CHUNK_SIZES, "cpu", (5, 16))


def make_inputs(rows=3, length=7, hidden=24, vocab=53, dtype=torch.float32, bias=True, reference=True,
                frozen=False, scale=1.0, ignore_fraction=0.3):
    h = (torch.randn(rows, length, hidden) * scale).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype).requires_grad_(not frozen)
    b = (torch.randn(vocab) * 0.1).to(dtype).requires_grad_(not frozen) if bias else None
    y = torch.randint(0, vocab, (rows, length))
    y[torch.rand(rows, length) < ignore_fraction] = -100
    ref = {}
    if reference:
        ref = dict(ref_hidden=(torch.randn(rows, length, hidden) * scale).to(dtype),
                   ref_weight=(torch.randn(vocab, hidden) / hidden**0.5).to(dtype),
                   ref_bias=(torch.randn(vocab) * 0.1).to(dtype) if bias else None)
    return h, w, b, y, ref


def run_and_grad(fn, h, w, b, upstream):
    """Sum of every statistic times a fixed random upstream gradient; returns values and input grads."""
    out = fn(h, w, b)
    total = sum((getattr(out, k).double() * upstream[k]).sum() for k in STATS
                if getattr(out, k) is not None and k != "ref_logp")
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    grads = torch.autograd.grad(total, leaves, allow_unused=True)
    return out, grads


def assert_close(actual, expected, tol, what, seed):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() + 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g}, seed {seed})"


def check_against_oracle(backend, seed, dtype, tol, *, temperature=1.0, softcap=None, frozen=False,
                         all_stats=True, **shape):
    h, w, b, y, ref = make_inputs(dtype=dtype, frozen=frozen, **shape)
    upstream = {k: torch.randn(y.shape, dtype=torch.float64) for k in STATS}
    flags = dict(entropy=all_stats, kl=all_stats, uniform_nll=all_stats)
    common = dict(temperature=temperature, softcap=softcap, **ref)
    out, grads = run_and_grad(lambda h, w, b: linear_logprobs(h, w, y, bias=b, backend=backend, **flags, **common),
                              h, w, b, upstream)
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (h, w, b)]
    expected, expected_grads = run_and_grad(
        lambda h, w, b: _masked(oracle_linear_logprobs(h, w, y, bias=b, **common), flags), *leaves, upstream)
    for k in STATS:
        if getattr(expected, k) is not None:
            assert getattr(out, k) is not None, f"{k} missing"
            assert getattr(out, k).shape == y.shape
            assert_close(getattr(out, k), getattr(expected, k), tol, k, seed)
    for got, want, name in zip(grads, expected_grads, ("hidden", "weight", "bias")):
        assert_close(got, want, tol, f"d {name}", seed)
    return out


def _masked(stats, flags):
    return stats._replace(**{k: None for k, on in flags.items() if not on})


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("all_stats", [False, True], ids=["logp", "all-stats"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_matches_oracle_fp32(backend, seed, all_stats, frozen):
    check_against_oracle(backend, seed, torch.float32, 2e-5, all_stats=all_stats, frozen=frozen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_temperature_and_softcap(backend, seed, frozen):
    check_against_oracle(backend, seed, torch.float32, 2e-5, temperature=0.7, softcap=2.5, frozen=frozen, scale=3.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs(backend, seed):
    out = check_against_oracle(backend, seed, torch.bfloat16, 3e-2, all_stats=True)
    assert out.logp.dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_inputs_whatever_uninitialised_memory_holds(backend, monkeypatch):
    # Seed 11 made test_bf16_inputs[triton] flaky: its NaN came from uninitialised memory (a buffer's unwritten
    # columns read by torch's CPU bf16 matmul), so every empty tensor is filled with NaN here to make it certain.
    def poisoned(make):
        def empty(*args, **kwargs):
            out = make(*args, **kwargs)
            return out.fill_(float("nan")) if out.is_floating_point() else out
        return empty

    monkeypatch.setattr(torch, "empty", poisoned(torch.empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(torch.empty_like))
    torch.manual_seed(11)
    check_against_oracle(backend, 11, torch.bfloat16, 3e-2, all_stats=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("all_stats", [False, True], ids=["logp", "all-stats"])
def test_gradcheck_float64(backend, seed, frozen, all_stats):
    h, w, b, y, ref = make_inputs(rows=2, length=3, hidden=6, vocab=19, dtype=torch.float64, frozen=frozen)
    flags = dict(entropy=all_stats, kl=all_stats, uniform_nll=all_stats)

    def fn(*inputs):
        out = linear_logprobs(inputs[0], w if frozen else inputs[1], y, bias=b if frozen else inputs[2],
                              softcap=4.0, temperature=0.9, backend=backend, **flags, **ref)
        return tuple(getattr(out, k) for k in STATS if getattr(out, k) is not None and k != "ref_logp")

    inputs = (h,) if frozen else (h, w, b)
    assert torch.autograd.gradcheck(fn, inputs), f"seed {seed}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [1, 16, 17, 37])
def test_vocab_sizes_not_multiple_of_tile(backend, seed, vocab):
    check_against_oracle(backend, seed, torch.float32, 2e-5, vocab=vocab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_tokens_ignored(backend, seed):
    h, w, b, y, ref = make_inputs(ignore_fraction=1.1)
    out = linear_logprobs(h, w, y, bias=b, backend=backend, entropy=True, kl=True, **ref)
    for k in ("logp", "lse", "entropy", "ref_logp", "kl"):
        assert torch.equal(getattr(out, k), torch.zeros(y.shape)), k
    (out.logp.sum() + out.kl.sum()).backward()
    assert torch.equal(h.grad, torch.zeros_like(h))
    assert torch.equal(w.grad, torch.zeros_like(w))
    assert torch.equal(b.grad, torch.zeros_like(b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_sequence_ignored_others_not(backend, seed):
    h, w, b, y, ref = make_inputs()
    y[1] = -100
    out = check_against_oracle(backend, seed, torch.float32, 2e-5)
    assert out.logp.shape == y.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_token(backend, seed):
    check_against_oracle(backend, seed, torch.float32, 2e-5, rows=1, length=1, ignore_fraction=0.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits(backend, seed):
    # Logits of magnitude ~1e4: the online softmax must not overflow, gradients must stay finite. fp32
    # rounds such logits by ~1e-3 absolute, so probabilities (and gradients) carry ~1e-3 relative error.
    out = check_against_oracle(backend, seed, torch.float32, 3e-3, scale=2e3)
    assert out.lse.abs().max() > 1e3
    assert torch.isfinite(out.logp).all() and torch.isfinite(out.kl).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, seed):
    rows, length, hidden, vocab = 3, 6, 10, 29
    h_t = torch.randn(length, rows, hidden, requires_grad=True)
    w_t = torch.randn(hidden, vocab, requires_grad=True)
    h, w = h_t.transpose(0, 1), w_t.T
    y = torch.randint(0, vocab, (length, rows)).T
    assert not (h.is_contiguous() or w.is_contiguous() or y.is_contiguous())
    out = linear_logprobs(h, w, y, backend=backend, entropy=True)
    expected = oracle_linear_logprobs(h, w, y)
    assert_close(out.logp, expected.logp, 2e-5, "logp", seed)
    assert_close(out.entropy, expected.entropy, 2e-5, "entropy", seed)
    (out.logp.sum() + out.entropy.sum()).backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    e = oracle_linear_logprobs(h64, w64, y)
    (e.logp.sum() + e.entropy.sum()).backward()
    assert_close(h_t.grad.transpose(0, 1), h64.grad, 2e-5, "d hidden", seed)
    assert_close(w_t.grad.T, w64.grad, 2e-5, "d weight", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_head_gets_no_gradient(backend, seed):
    h, w, b, y, _ = make_inputs(frozen=True)
    linear_logprobs(h, w, y, bias=b, backend=backend).logp.sum().backward()
    assert w.grad is None and b.grad is None and h.grad is not None


@pytest.mark.parametrize("backend", BACKENDS)
def test_reference_defaults_to_policy_head(backend, seed):
    h, w, b, y, _ = make_inputs(reference=False)
    out = linear_logprobs(h, w, y, bias=b, ref_hidden=h, kl=True, backend=backend)
    assert_close(out.ref_logp, out.logp.detach(), 1e-5, "ref_logp", seed)
    assert_close(out.kl, torch.zeros_like(out.kl), 1e-5, "kl", seed)
    assert not out.ref_logp.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_low_precision_hidden_with_fp32_head(backend, seed, frozen):
    # Autocast-style: bf16 activations, fp32 master head; gradients come back in each input's dtype.
    h = torch.randn(3, 5, 16).bfloat16().requires_grad_()
    w = (torch.randn(41, 16) / 4).requires_grad_(not frozen)
    y = torch.randint(0, 41, (3, 5))
    out = linear_logprobs(h, w, y, backend=backend)
    out.logp.sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    expected = oracle_linear_logprobs(h64, w64.bfloat16().double(), y)
    expected.logp.sum().backward()
    assert_close(out.logp, expected.logp, 2e-2, "logp", seed)
    assert h.grad.dtype == torch.bfloat16
    assert_close(h.grad, h64.grad, 3e-2, "d hidden", seed)
    if not frozen:
        assert w.grad.dtype == torch.float32
        assert_close(w.grad, w64.grad, 3e-2, "d weight", seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_capturable_gives_the_same_values_and_gradients(backend, seed, frozen):
    # capturable=True computes the ignored positions and masks them instead of removing them first
    h, w, b, y, ref = make_inputs(frozen=frozen)
    opts = dict(bias=b, entropy=not frozen, kl=not frozen, uniform_nll=True, top1=True, backend=backend, **ref)
    upstream = {k: torch.randn(y.shape, dtype=torch.float64) for k in STATS}
    outs = []
    for capturable in (False, True):
        outs.append(run_and_grad(lambda h, w, b: linear_logprobs(h, w, y, capturable=capturable, **opts), h, w, b,
                                 upstream))
    (plain, plain_grads), (capt, capt_grads) = outs
    for k in STATS + ("top1",):
        if getattr(plain, k) is not None:
            assert_close(getattr(capt, k), getattr(plain, k), 1e-6, k, seed)
            assert torch.equal(getattr(capt, k)[y == -100], torch.zeros(int((y == -100).sum()))), k
    for got, want in zip(capt_grads, plain_grads):
        assert_close(got, want, 1e-6, "gradient", seed)


def test_capturable_makes_no_host_synchronisation(seed):
    # The op under capturable=True with the Triton backend: no aten op that reads a device value back to
    # the host (.item(), bool(), nonzero) runs, forward or backward, so a CUDA graph can capture it.
    # (The torch backend, the CPU default, finds the target columns with nonzero and is not capturable.)
    pytest.importorskip("triton")
    from torch.utils._python_dispatch import TorchDispatchMode

    syncing = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default"}

    class Watch(TorchDispatchMode):
        seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if str(func) in syncing:
                Watch.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    h, w, b, y, ref = make_inputs(frozen=True)
    with Watch():
        out = linear_logprobs(h, w, y, bias=b, top1=True, backend="triton", capturable=True, **ref)
    with Watch():
        out.logp.sum().backward()
    assert not Watch.seen, Watch.seen


def test_capturable_checks_the_target_range_on_the_device():
    h, w, b, y, _ = make_inputs(reference=False)
    y[0, 0] = 53
    with pytest.raises(RuntimeError, match="targets: expected values in"):
        linear_logprobs(h, w, y, backend="torch", capturable=True)
