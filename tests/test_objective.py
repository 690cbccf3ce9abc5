"""linear_objective (gradients formed in the forward pass) against the float64 oracle and the recompute path."""
import pytest
import torch

from prefopt.bench.oracle import oracle_linear_logprobs
from prefopt.ops import TokenStats, linear_logprobs, triton_available
from prefopt.ops.objective import FUSED_GRADIENT, PATH_COUNTS, RECOMPUTE, linear_objective
from test_op import assert_close, make_inputs, small_chunks  # noqa: F401  (small_chunks: the recompute tiles)

STATS = ("logp", "lse", "entropy", "kl", "uniform_nll")
TINY_BUDGET = 1  # one token per chunk: every chunk boundary is crossed


@pytest.fixture(params=["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not triton_available(), reason="triton is not installed"))])
def backend(request):
    """Both backends of the fused-gradient path (Triton under the interpreter on CPU)."""
    return request.param


def rule(stats: TokenStats, *weights):
    """A per-token loss using every differentiable statistic, linearly and not (as GRPO's ratio does)."""
    loss = 0.5 * torch.exp(stats.logp) * weights[0]
    for name, w in zip(STATS, weights[1:]):
        value = getattr(stats, name)
        if value is not None:
            loss = loss + w * value
    return loss


def oracle_objective(h, w, b, y, flags, weights, common):
    stats = oracle_linear_logprobs(h, w, y, bias=b, **common)
    stats = stats._replace(**{k: None for k, on in flags.items() if not on})
    valid = y != -100
    packed = TokenStats(*(None if s is None else s[valid] for s in stats))
    return rule(packed, *(x[valid] for x in weights)).sum()


def check(seed, dtype, tol, *, backend="torch", budget=TINY_BUDGET, temperature=1.0, softcap=None, frozen=False,
          all_stats=True, scale_output=1.0, **shape):
    h, w, b, y, ref = make_inputs(dtype=dtype, frozen=frozen, **shape)
    flags = dict(entropy=all_stats, kl=all_stats, uniform_nll=all_stats)
    weights = [torch.randn(y.shape, dtype=torch.float64) for _ in range(len(STATS) + 1)]
    common = dict(temperature=temperature, softcap=softcap, **ref)
    leaves = [t for t in (h, w, b) if t is not None and t.requires_grad]
    results = {}
    for fused in (True, False):
        out = linear_objective(h, w, y, rule, token_inputs=[x.to(torch.float32 if dtype != torch.float64 else dtype)
                                                             for x in weights],
                               bias=b, backend=backend, budget_bytes=budget, fused_gradient=fused, **flags, **common)
        grads = torch.autograd.grad(out.loss * scale_output, leaves)
        results[out.path] = (out, grads)
    assert set(results) == {FUSED_GRADIENT, RECOMPUTE}
    leaves64 = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None for t in (h, w, b)]
    loss64 = oracle_objective(*leaves64, y, flags, weights, common)
    grads64 = torch.autograd.grad(loss64 * scale_output, [t for t in leaves64 if t is not None and t.requires_grad])
    h64, w64, b64 = leaves64
    oracle_stats = oracle_linear_logprobs(h64, w64, y, bias=b64, **common)
    for path, (out, grads) in results.items():
        assert_close(out.loss, loss64, tol, f"{path} loss", seed)
        for name in STATS + ("ref_logp",):
            got = getattr(out.stats, name)
            if got is not None:
                assert got.shape == y.shape and not got.requires_grad
                assert_close(got, getattr(oracle_stats, name), tol, f"{path} {name}", seed)
        for got, want in zip(grads, grads64):
            assert got.dtype == next(t for t in leaves if t.shape == got.shape).dtype
            assert_close(got, want, tol, f"{path} gradient {list(got.shape)}", seed)
    return results


@pytest.mark.parametrize("all_stats", [False, True], ids=["logp", "all-stats"])
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_matches_oracle_and_recompute(backend, seed, frozen, all_stats):
    check(seed, torch.float32, 2e-5, backend=backend, frozen=frozen, all_stats=all_stats)


@pytest.mark.parametrize("budget", [TINY_BUDGET, 10**9], ids=["chunked", "one-chunk"])
def test_temperature_softcap_and_scaled_output(backend, seed, budget):
    check(seed, torch.float32, 2e-5, backend=backend, budget=budget, temperature=0.7, softcap=2.5, scale=3.0,
          scale_output=2.5)


def test_bf16_inputs(backend, seed):
    results = check(seed, torch.bfloat16, 3e-2, backend=backend)
    assert results[FUSED_GRADIENT][0].loss.dtype == torch.float32


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_gradcheck_float64(backend, seed, frozen):
    # The interpreter runs each kernel launch in Python: a smaller problem under Triton.
    shape = dict(rows=2, length=3, hidden=6, vocab=19)
    if backend == "triton":
        shape = dict(rows=1, length=3, hidden=3, vocab=7)
    h, w, b, y, ref = make_inputs(dtype=torch.float64, frozen=frozen, **shape)
    weights = [torch.randn(y.shape, dtype=torch.float64) for _ in range(len(STATS) + 1)]

    def fn(*inputs):
        out = linear_objective(inputs[0], w if frozen else inputs[1], y, rule, token_inputs=weights,
                               bias=b if frozen else inputs[2], softcap=4.0, temperature=0.9, backend=backend,
                               entropy=True, kl=True, uniform_nll=True, budget_bytes=TINY_BUDGET, **ref)
        assert out.path == FUSED_GRADIENT
        return out.loss

    assert torch.autograd.gradcheck(fn, (h,) if frozen else (h, w, b)), f"seed {seed}"


@pytest.mark.parametrize("vocab", [1, 17])
def test_ragged_and_single_entry_vocabulary(backend, seed, vocab):
    check(seed, torch.float32, 2e-5, backend=backend, vocab=vocab)


def test_one_token(backend, seed):
    check(seed, torch.float32, 2e-5, backend=backend, rows=1, length=1, ignore_fraction=0.0)


def test_huge_logits(backend, seed):
    results = check(seed, torch.float32, 3e-3, backend=backend, scale=2e3)
    stats = results[FUSED_GRADIENT][0].stats
    assert stats.lse.abs().max() > 1e3 and torch.isfinite(stats.kl).all()


def test_all_tokens_ignored(backend, seed):
    h, w, b, y, ref = make_inputs(ignore_fraction=1.1)
    out = linear_objective(h, w, y, lambda s: -s.logp + s.kl, bias=b, kl=True, backend=backend, **ref)
    assert out.path == FUSED_GRADIENT and out.loss.item() == 0.0
    assert torch.equal(out.stats.logp, torch.zeros(y.shape))
    out.loss.backward()
    for t in (h, w, b):
        assert torch.equal(t.grad, torch.zeros_like(t))


def test_non_contiguous_inputs(backend, seed):
    rows, length, hidden, vocab = 3, 6, 10, 29
    h_t = torch.randn(length, rows, hidden, requires_grad=True)
    w_t = torch.randn(hidden, vocab, requires_grad=True)
    h, w = h_t.transpose(0, 1), w_t.T
    y = torch.randint(0, vocab, (length, rows)).T
    upstream = torch.randn(length, rows).T
    assert not (h.is_contiguous() or w.is_contiguous() or y.is_contiguous() or upstream.is_contiguous())
    out = linear_objective(h, w, y, lambda s, u: u * s.logp + s.entropy, token_inputs=[upstream], entropy=True,
                           backend=backend, budget_bytes=TINY_BUDGET)
    out.loss.backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    e = oracle_linear_logprobs(h64, w64, y)
    (upstream.double() * e.logp + e.entropy).sum().backward()
    assert_close(h_t.grad.transpose(0, 1), h64.grad, 2e-5, "d hidden", seed)
    assert_close(w_t.grad.T, w64.grad, 2e-5, "d weight", seed)


def test_extreme_values_in_ignored_positions(backend, seed):
    # Padding may carry -inf or huge per-position inputs: they never reach the rule.
    h, w, b, y, _ = make_inputs(reference=False)
    old = torch.randn(y.shape)
    old[y == -100] = float("-inf")
    seen = []

    def ratio_loss(stats, old_logp):
        seen.append(old_logp)
        return -torch.exp(stats.logp - old_logp)

    out = linear_objective(h, w, y, ratio_loss, token_inputs=[old], bias=b, backend=backend)
    out.loss.backward()
    assert torch.isfinite(torch.cat(seen)).all() and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()


def test_frozen_head_gets_no_gradient(backend, seed):
    h, w, b, y, _ = make_inputs(frozen=True, reference=False)
    out = linear_objective(h, w, y, lambda s: -s.logp, bias=b, backend=backend)
    out.loss.backward()
    assert out.path == FUSED_GRADIENT and w.grad is None and b.grad is None and h.grad is not None


def test_path_choice_is_counted():
    h, w, b, y, _ = make_inputs(reference=False)
    PATH_COUNTS.clear()
    with torch.no_grad():
        assert linear_objective(h, w, y, lambda s: -s.logp, backend="torch").path == RECOMPUTE
    w.ds_id = 0  # how DeepSpeed ZeRO-3 marks a partitioned parameter
    assert linear_objective(h, w, y, lambda s: -s.logp, backend="torch").path == RECOMPUTE
    del w.ds_id
    assert linear_objective(h, w, y, lambda s: -s.logp, backend="torch").path == FUSED_GRADIENT
    assert PATH_COUNTS == {RECOMPUTE: 2, FUSED_GRADIENT: 1}


def test_double_backward_is_refused():
    h, w, b, y, _ = make_inputs(reference=False)
    out = linear_objective(h, w, y, lambda s: -s.logp, backend="torch")
    (grad,) = torch.autograd.grad(out.loss, h, create_graph=False)
    assert torch.isfinite(grad).all()
    out = linear_objective(h, w, y, lambda s: -s.logp, backend="torch")
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(out.loss, h, create_graph=True)


def test_bad_arguments_name_themselves():
    h, w, b, y, _ = make_inputs(reference=False)
    with pytest.raises(ValueError, match=r"token_inputs\[0\]"):
        linear_objective(h, w, y, lambda s, x: x, token_inputs=[torch.zeros(2)])
    with pytest.raises(ValueError, match="budget_bytes"):
        linear_objective(h, w, y, lambda s: -s.logp, budget_bytes=0)
    with pytest.raises(ValueError, match="budget_bytes: expected None or a positive int"):
        linear_logprobs(h, w, y, budget_bytes=2.5)
    with pytest.raises(TypeError, match="token_loss"):
        linear_objective(h, w, y, None)
    with pytest.raises(ValueError, match="token_loss: expected a tensor of shape"):
        linear_objective(h, w, y, lambda s: s.logp.sum(), backend="torch")


def test_default_budget_is_a_quarter_of_the_head_gradient_within_bounds():
    from prefopt.ops.objective import DEFAULT_BUDGET_BYTES, MIN_BUDGET_BYTES, default_budget_bytes

    assert default_budget_bytes(torch.empty(1000, 256)) == MIN_BUDGET_BYTES  # a 1 MiB gradient: the floor
    assert default_budget_bytes(torch.empty(8192, 256)) == 8192 * 256  # the quick bench's head: 2 MiB
    assert default_budget_bytes(torch.empty(32000, 1024)) == 32000 * 1024  # issue 2's: 31 MiB
    assert default_budget_bytes(torch.empty(128000, 4096)) == DEFAULT_BUDGET_BYTES


def test_groups_stay_whole_and_must_be_integers(seed):
    h, w, b, y, _ = make_inputs(rows=4, length=5, ignore_fraction=0.0, reference=False)
    rows = torch.arange(4)[:, None].expand(y.shape)
    seen = []

    def row_loss(stats, row):
        seen.append(row.clone())
        return -stats.logp

    # 2 rows (10 tokens) per chunk (one [tokens, 53] fp32 tile for a log-prob-only loss), rows 0 and 2
    # grouped: chunks hold {0, 2} and {1, 3}.
    budget = 10 * 53 * 4
    out = linear_objective(h, w, y, row_loss, token_inputs=[rows], groups=rows % 2, backend="torch",
                           budget_bytes=budget)
    assert out.path == FUSED_GRADIENT
    assert [sorted(set(r.tolist())) for r in seen] == [[0, 2], [1, 3]]
    h64, w64 = h.detach().double(), w.detach().double()
    assert_close(out.stats.logp, oracle_linear_logprobs(h64, w64, y).logp, 2e-5, "logp", seed)
    assert linear_objective(h, w, y, row_loss, token_inputs=[rows], groups=rows, backend="torch",
                            budget_bytes=4 * 53 * 4).path == RECOMPUTE  # a 5-token group over a 4-token budget
    with pytest.raises(ValueError, match="groups: expected an integer tensor"):
        linear_objective(h, w, y, row_loss, token_inputs=[rows], groups=rows.float())
