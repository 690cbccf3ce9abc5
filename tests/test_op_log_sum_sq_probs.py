"""The op's ``log_sum_sq_probs`` statistic (log sum_v p_v^2, TRL's WPO weights): values against the float64
oracle for every backend, on multi-tile, ragged and split vocabularies, huge and infinite logits, softcap and
temperature, trainable and frozen heads; and that it carries no gradient."""
import pytest
import torch

from prefopt.bench.oracle import oracle_linear_logprobs
from prefopt import linear_logprobs
from test_op import BACKENDS, assert_close, make_inputs, small_chunks  # noqa: F401 (autouse: test_op's small tiles)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("softcap", [None, 3.0], ids=["plain", "softcap"])
def test_value_and_logp_gradient_unchanged(backend, seed, frozen, softcap):
    # V = 300: 19 ragged tiles of 16 for the torch backend, 2 tiles of 256 (the second ragged) for the
    # interpreted kernel. Frozen, the log-prob gradient takes the shortcut (moments) path, which must also
    # compute the statistic.
    h, w, b, y, _ = make_inputs(vocab=300, frozen=frozen, reference=False)
    g_logp = torch.randn(y.shape, dtype=torch.float64)
    out = linear_logprobs(h, w, y, bias=b, softcap=softcap, temperature=0.8, log_sum_sq_probs=True, backend=backend)
    (out.logp.double() * g_logp).sum().backward()
    leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in (h, w, b)]
    want = oracle_linear_logprobs(*leaves[:2], y, bias=leaves[2], softcap=softcap, temperature=0.8)
    (want.logp * g_logp).sum().backward()
    assert out.log_sum_sq_probs.shape == y.shape and out.log_sum_sq_probs.dtype == torch.float32
    assert_close(out.log_sum_sq_probs, want.log_sum_sq_probs, 2e-5, "log_sum_sq_probs", seed)
    assert torch.equal(out.log_sum_sq_probs[y == -100], torch.zeros(int((y == -100).sum())))
    assert (out.log_sum_sq_probs[y != -100] < 0).all()  # sum p^2 < 1 for a spread distribution
    for got, expected, name in zip((h, w, b), leaves, ("hidden", "weight", "bias")):
        if got.requires_grad:
            assert_close(got.grad, expected.grad, 2e-5, f"d {name}", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_not_asked_is_none_and_carries_no_gradient(backend, seed):
    h, w, b, y, _ = make_inputs(reference=False)
    assert linear_logprobs(h, w, y, bias=b, backend=backend).log_sum_sq_probs is None
    out = linear_logprobs(h, w, y, bias=b, entropy=True, log_sum_sq_probs=True, backend=backend)
    assert out.logp.requires_grad and not out.log_sum_sq_probs.requires_grad
    with pytest.raises(RuntimeError, match="does not require grad"):
        out.log_sum_sq_probs.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_logits_do_not_overflow(backend, seed):
    # Every logit shifted by 150 / 0.5 = 300: exp(2 z) overflows in fp32 (and exp(z) too) unless the sum
    # of squares is kept relative to the running maximum; the distribution, and so the result, is unchanged.
    h, w, b, y, _ = make_inputs(reference=False, frozen=True)
    b = b + 150
    out = linear_logprobs(h, w, y, bias=b, temperature=0.5, log_sum_sq_probs=True, backend=backend)
    want = oracle_linear_logprobs(h.detach(), w, y, bias=b, temperature=0.5)
    assert torch.isfinite(out.log_sum_sq_probs).all()
    assert_close(out.log_sum_sq_probs, want.log_sum_sq_probs, 2e-5, "log_sum_sq_probs", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infinite_weight_gives_what_float64_gives(backend, seed):
    # Logit 7 is +inf where hidden[0] > 0 (NaN in float64: inf / inf) and -inf where hidden[0] < 0 (finite).
    h, w, b, y, _ = make_inputs(reference=False, frozen=True)
    w = w.detach().clone()
    w[7, 0] = float("inf")
    got = linear_logprobs(h, w, y, log_sum_sq_probs=True, backend=backend).log_sum_sq_probs.double()
    want = oracle_linear_logprobs(h.detach(), w, y).log_sum_sq_probs
    assert torch.isnan(want).any() and torch.isfinite(want).any()
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"NaN pattern differs (seed {seed})"
    finite = torch.isfinite(want)
    assert_close(got[finite], want[finite], 2e-5, "log_sum_sq_probs", seed)


@pytest.mark.parametrize("split", [1, 3])
def test_kernel_tiles_and_splits(seed, split):
    # The kernel itself with 16-wide tiles over V = 53 (4 tiles, the last ragged), merged from 1 or 3
    # vocabulary splits: the splits' sums of squares are rescaled by the square of their factor.
    K = pytest.importorskip("prefopt.kernels.linear_logprobs")
    h, w, b = torch.randn(21, 24), torch.randn(53, 24) / 2, torch.randn(53)
    y = torch.randint(0, 53, (21,))
    stats = K.forward(h, w, b, y, softcap=4.0, log_sum_sq_probs=True, split=split, blocks=K.Blocks(16, 16, 16, 1, 1))
    want = oracle_linear_logprobs(h, w, y, bias=b, softcap=4.0).log_sum_sq_probs
    assert_close(stats.log_sum_sq_probs, want, 2e-5, "log_sum_sq_probs", seed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_capturable_masks_ignored_positions(backend, seed):
    # capturable=True computes ignored positions (target 0) and masks them: same values, 0 there.
    h, w, b, y, _ = make_inputs(reference=False)
    want = linear_logprobs(h, w, y, bias=b, log_sum_sq_probs=True, backend=backend).log_sum_sq_probs
    got = linear_logprobs(h, w, y, bias=b, log_sum_sq_probs=True, backend=backend, capturable=True).log_sum_sq_probs
    assert (y == -100).any() and torch.equal(got[y == -100], torch.zeros(int((y == -100).sum())))
    assert_close(got, want, 1e-6, "log_sum_sq_probs", seed)
