"""The op's mean-logit and top-1 statistics, and the op's edge contracts: signed targets, no double
backward, non-finite weights. Every value against the float64 oracle, for every backend."""
import pytest
import torch

from prefopt.bench.oracle import oracle_linear_logprobs
from prefopt import linear_logprobs
from test_op import BACKENDS, assert_close, make_inputs, small_chunks  # noqa: F401 (autouse: test_op's small tiles)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_mean_logit_value_and_gradient(backend, seed, frozen, softcap):
    h, w, b, y, _ = make_inputs(frozen=frozen, reference=False)
    g_mean, g_logp = torch.randn(y.shape, dtype=torch.float64), torch.randn(y.shape, dtype=torch.float64)
    out = linear_logprobs(h, w, y, bias=b, softcap=softcap, temperature=0.8, mean_logit=True, backend=backend)
    ((out.mean_logit.double() * g_mean).sum() + (out.logp.double() * g_logp).sum()).backward()
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b)]
    want = oracle_linear_logprobs(*leaves[:2], y, bias=leaves[2], softcap=softcap, temperature=0.8)
    ((want.mean_logit * g_mean).sum() + (want.logp * g_logp).sum()).backward()
    assert_close(out.mean_logit, want.mean_logit, 2e-5, "mean_logit", seed)
    assert torch.equal(out.mean_logit[y == -100], torch.zeros(int((y == -100).sum())))
    for got, expected, name in zip((h, w, b), leaves, ("hidden", "weight", "bias")):
        if got.requires_grad:
            assert_close(got.grad, expected.grad, 2e-5, f"d {name}", seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_gradcheck_mean_logit_and_uniform_nll(backend, seed, frozen):
    # Frozen and without softcap, these gradients take the shortcut's column-sum term: checked here.
    h, w, b, y, _ = make_inputs(rows=2, length=3, hidden=6, vocab=19, dtype=torch.float64, frozen=frozen,
                                reference=False)

    def fn(*inputs):
        out = linear_logprobs(inputs[0], w if frozen else inputs[1], y, bias=b if frozen else inputs[2],
                              temperature=0.9, mean_logit=True, uniform_nll=True, backend=backend)
        return out.logp, out.mean_logit, out.uniform_nll

    assert torch.autograd.gradcheck(fn, (h,) if frozen else (h, w, b)), f"seed {seed}"


def _top1(backend, h, w, y):
    return linear_logprobs(h, w, y, top1=True, backend=backend).top1


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_matches_argmax(backend, seed):
    h, w, b, y, _ = make_inputs(reference=False, ignore_fraction=0.3)
    # Make about half of the targets the argmax, so both outcomes are exercised.
    logits = h.detach() @ w.detach().T
    y = torch.where((torch.rand(y.shape) < 0.5) & (y != -100), logits.argmax(-1), y)
    got = _top1(backend, h, w, y)
    want = oracle_linear_logprobs(h, w, y).top1
    assert torch.equal(got, want.float()), f"seed {seed}"
    assert 0 < got.sum() < (y != -100).sum()
    assert not got.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_top1_ties_go_to_the_lowest_index_across_tiles(backend, seed):
    # Rows 3 and 20 of the head are equal and dominant, so the maximum is tied between two vocabulary
    # tiles (16 wide): the target counts as top-1 only at the lower index, as argmax and TRL decide.
    hidden, vocab = 8, 37
    w = torch.randn(vocab, hidden) * 0.01
    w[3] = w[20] = torch.ones(hidden)
    h = torch.ones(1, 4, hidden)
    y = torch.tensor([[3, 20, 5, -100]])
    got = _top1(backend, h, w, y)
    assert got.tolist() == [[1.0, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.float32])
def test_targets_must_be_signed_integers(dtype):
    h, w, b, y, _ = make_inputs(reference=False)
    with pytest.raises(TypeError, match="targets: expected a signed integer"):
        linear_logprobs(h, w, y.clamp(min=0).to(dtype), backend="torch")


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_narrow_signed_targets_keep_ignore_index(seed, dtype):
    h, w, b, y, _ = make_inputs(reference=False, vocab=100)
    out = linear_logprobs(h, w, y.to(dtype), backend="torch")
    assert_close(out.logp, oracle_linear_logprobs(h, w, y).logp, 2e-5, "logp", seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_double_backward_is_refused(backend, frozen):
    h, w, b, y, _ = make_inputs(frozen=frozen, reference=False)
    loss = linear_logprobs(h, w, y, bias=b, backend=backend).logp.sum()
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, h, create_graph=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("entropy", [False, True], ids=["logp", "entropy"])
def test_infinite_weight_gives_what_float64_gives(backend, seed, entropy):
    # One head entry is +inf, so logit 7 is +inf where hidden[0] > 0 (lse = +inf, logp = -inf, NaN for
    # target 7 itself) and -inf where hidden[0] < 0 (finite results), exactly as log_softmax in float64.
    h, w, b, y, _ = make_inputs(reference=False, frozen=True)
    w = w.detach().clone()
    w[7, 0] = float("inf")
    out = linear_logprobs(h, w, y, entropy=entropy, backend=backend)
    want = oracle_linear_logprobs(h.detach(), w, y)
    assert torch.isinf(want.lse).any()
    for k in ("logp", "lse"):
        got, expected = getattr(out, k).double(), getattr(want, k)
        assert torch.equal(torch.isnan(got), torch.isnan(expected)), f"{k}: NaN pattern differs (seed {seed})"
        finite = torch.isfinite(expected)
        assert torch.equal(got[~finite & ~torch.isnan(expected)], expected[~finite & ~torch.isnan(expected)]), k
        assert_close(got[finite], expected[finite], 2e-5, k, seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float64), (torch.float64, torch.float32)],
                         ids=["fp32-policy-fp64-ref", "fp64-policy-fp32-ref"])
def test_reference_of_another_precision_runs_in_the_policys(backend, seed, dtypes):
    # One accumulator type per kernel: the reference's hidden states are brought to the policy's dtype.
    policy, reference = dtypes
    h, w, y = torch.randn(2, 5, 8, dtype=policy), torch.randn(23, 8, dtype=policy) / 3, torch.randint(0, 23, (2, 5))
    rh, rw = torch.randn(2, 5, 8, dtype=reference), torch.randn(23, 8, dtype=reference) / 3
    out = linear_logprobs(h, w, y, ref_hidden=rh, ref_weight=rw, kl=True, backend=backend)
    want = oracle_linear_logprobs(h, w, y, ref_hidden=rh.to(policy), ref_weight=rw)
    assert_close(out.kl, want.kl, 2e-5, "kl", seed)
    assert_close(out.ref_logp, want.ref_logp, 2e-5, "ref_logp", seed)
