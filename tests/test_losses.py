"""Every fused loss against an independent float64 reference written on materialised logits."""
import pytest
import torch
import torch.nn.functional as F

import prefopt
import prefopt.ops.objective as objective
import prefopt.ops.torch_backend as torch_backend
from prefopt.bench.oracle import oracle_linear_logprobs
from test_op import BACKENDS, assert_close

ROWS, LENGTH, HIDDEN, VOCAB = 4, 6, 12, 31  # 2 pairs
PATHS = [objective.FUSED_GRADIENT, objective.RECOMPUTE]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setitem(torch_backend.CHUNK_SIZES, "cpu", (4, 8))
    monkeypatch.setattr(objective, "DEFAULT_BUDGET_BYTES", 1)  # one token per chunk on the fused-gradient path
    objective.PATH_COUNTS.clear()


def ran(path):
    """Every call of the op took ``path`` (on either backend: both have the fused-gradient path)."""
    return set(objective.PATH_COUNTS) == {path}


def batch(rows=ROWS, length=LENGTH, hidden_size=HIDDEN, vocab=VOCAB):
    hidden = torch.randn(rows, length, hidden_size, requires_grad=True)
    weight = (torch.randn(vocab, hidden_size) / hidden_size**0.5).requires_grad_()
    bias = (torch.randn(vocab) * 0.1).requires_grad_()
    targets = torch.randint(0, vocab, (rows, length))
    targets[:, :2] = -100  # the prompt
    targets[0, -1] = -100  # padding
    ref = dict(ref_hidden=torch.randn(rows, length, hidden_size),
               ref_weight=torch.randn(vocab, hidden_size) / hidden_size**0.5)
    return hidden, weight, bias, targets, ref


def small_batch():
    """Few enough inputs for a numerical Jacobian, still several tiles of the small chunks."""
    return batch(length=4, hidden_size=5, vocab=11)


def pair_terms(h, w, b, y, ref):
    """Per-pair float64 sums from materialised logits: the quantities of DESIGN.md's table."""
    s = oracle_linear_logprobs(h, w, y, bias=b, **ref)
    n = (y != -100).sum(-1).double()
    half = y.shape[0] // 2
    lp, rf, uni = s.logp.sum(-1), s.ref_logp.sum(-1), s.uniform_nll.sum(-1)
    return dict(lc=lp[:half], lr=lp[half:], rc=rf[:half], rr=rf[half:], nc=n[:half], nr=n[half:], uc=uni[:half])


def logsig(x):
    return F.logsigmoid(x)


def cooling(t):
    return torch.sigmoid((t["lr"] / t["nr"] - (-2.0)) / 0.7).detach()


PAIRED = {
    "dpo": (prefopt.FusedDPOLoss(beta=0.3),
            lambda t: -logsig(0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))),
    "cdpo": (prefopt.FusedDPOLoss(beta=0.3, loss_type="cdpo", label_smoothing=0.2),
             lambda t: -0.8 * logsig(0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))
             - 0.2 * logsig(-0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))),
    "robust": (prefopt.FusedDPOLoss(beta=0.3, loss_type="robust", label_smoothing=0.2),
               lambda t: (-0.8 * logsig(0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))
                          + 0.2 * logsig(-0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))) / 0.6),
    "hinge": (prefopt.FusedDPOLoss(beta=0.3, loss_type="hinge"),
              lambda t: torch.relu(1 - 0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"])))),
    "ipo": (prefopt.FusedDPOLoss(beta=0.3, loss_type="ipo"),
            lambda t: ((t["lc"] - t["rc"]) / t["nc"] - (t["lr"] - t["rr"]) / t["nr"] - 1 / 0.6) ** 2),
    "rpo": (prefopt.FusedDPOLoss(beta=0.3, loss_type="rpo", rpo_alpha=0.5),
            lambda t: -logsig(0.3 * ((t["lc"] - t["rc"]) - (t["lr"] - t["rr"]))) + 0.5 * (-t["lc"] / t["nc"])),
    "simpo": (prefopt.FusedSimPOLoss(beta=2.0, gamma=0.4),
              lambda t: -logsig(2.0 * t["lc"] / t["nc"] - 2.0 * t["lr"] / t["nr"] - 0.4)),
    "orpo": (prefopt.FusedORPOLoss(beta=0.2),
             lambda t: -t["lc"] / t["nc"] - 0.2 * logsig(
                 (t["lc"] / t["nc"] - torch.log1p(-torch.exp(t["lc"] / t["nc"])))
                 - (t["lr"] / t["nr"] - torch.log1p(-torch.exp(t["lr"] / t["nr"]))))),
    "cwdpo": (prefopt.FusedCWDPOLoss(beta=0.3, floor=-2.0, tau=0.7),
              lambda t: -logsig(0.3 * ((t["lc"] - t["rc"]) - cooling(t) * (t["lr"] - t["rr"])))),
    "cwdpo-live-weight": (prefopt.FusedCWDPOLoss(beta=0.3, floor=-2.0, tau=0.7, detach_weight=False),
                          lambda t: -logsig(0.3 * ((t["lc"] - t["rc"]) - torch.sigmoid(
                              (t["lr"] / t["nr"] + 2.0) / 0.7) * (t["lr"] - t["rr"])))),
    "sftc": (prefopt.FusedSFTCLoss(lam=0.5, margin=4.0, label_smoothing=0.1),
             lambda t: 0.9 * (-t["lc"] / t["nc"]) + 0.1 * t["uc"] / t["nc"] + 0.5 * torch.relu(4.0 + t["lr"] / t["nr"])),
}


# About one pair's tokens (8 at most) per chunk of the test shapes: whole pairs, several chunks.
PAIR_BUDGET = 8 * VOCAB * 4 * 3


def on_path(module, path, budget=PAIR_BUDGET):
    """Set a paired loss up for ``path``: the fused gradient with whole pairs per chunk, or a budget no
    pair fits (which recomputes, as fused_gradient=False does)."""
    module.fused_gradient = True
    module.budget_bytes = budget if path == objective.FUSED_GRADIENT else 1
    return module


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(PAIRED))
@pytest.mark.parametrize("reference", ["hidden", "logps"])
def test_paired_loss_matches_reference(name, backend, reference, path, seed):
    module, formula = PAIRED[name]
    module.backend = backend
    on_path(module, path)
    h, w, b, y, ref = batch()
    if reference == "hidden":
        out = module(w, h, y, b, **ref)
    else:
        ref_logps = oracle_linear_logprobs(ref["ref_hidden"], ref["ref_weight"], y).logp.sum(-1).float()
        out = module(w, h, y, b, ref_logps=ref_logps)
    out.loss.backward()
    assert ran(path)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref64 = {k: v.double() for k, v in ref.items()}
    expected = formula(pair_terms(h64, w64, b64, y, ref64)).mean()
    expected.backward()
    assert_close(out.loss, expected, 2e-5, f"{name} loss", seed)
    for got, want, what in ((h.grad, h64.grad, "hidden"), (w.grad, w64.grad, "weight"), (b.grad, b64.grad, "bias")):
        assert_close(got, want, 2e-5, f"{name} d {what}", seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", ["dpo", "ipo", "orpo", "cwdpo-live-weight", "sftc"])
def test_paired_loss_gradcheck(name, path, seed):
    module, _ = PAIRED[name]
    module.backend = "torch"
    on_path(module, path, budget=4 * 11 * 8 * 3)  # one pair (4 tokens) of small_batch per float64 chunk
    h, w, b, y, ref = small_batch()
    inputs = tuple(t.detach().double().requires_grad_() for t in (h, w, b))
    ref64 = {k: v.double() for k, v in ref.items()}
    assert torch.autograd.gradcheck(lambda *x: module(x[1], x[0], y, x[2], **ref64).loss, inputs), f"seed {seed}"
    assert ran(path)


@pytest.mark.parametrize("name", ["dpo", "simpo", "sftc"])
def test_paired_loss_with_an_empty_pair(name, seed):
    """A pair without any scored token never reaches the per-chunk objective; its (constant) loss still
    counts, as on the recompute path."""
    module, _ = PAIRED[name]
    module.backend = "torch"
    h, w, b, y, ref = batch()
    y[[1, 3]] = -100  # pair 1: both rows unscored
    results = []
    for path in PATHS:
        objective.PATH_COUNTS.clear()
        out = on_path(module, path)(w, h, y, b, **ref)
        results.append((out.loss, torch.autograd.grad(out.loss, (h, w, b))))
        assert ran(path)
    (fused, fused_grads), (recomputed, recomputed_grads) = results
    assert_close(fused, recomputed, 1e-6, f"{name} loss", seed)
    for got, want in zip(fused_grads, recomputed_grads):
        assert_close(got, want, 1e-6, f"{name} gradient", seed)


def test_dpo_metrics_use_trl_names(seed):
    h, w, b, y, ref = batch()
    out = prefopt.FusedDPOLoss(beta=0.3)(w, h, y, b, **ref)
    t = pair_terms(*(x.detach().double() for x in (h, w, b)), y, {k: v.double() for k, v in ref.items()})
    chosen, rejected = 0.3 * (t["lc"] - t["rc"]), 0.3 * (t["lr"] - t["rr"])
    expected = {
        "rewards/chosen": chosen.mean(), "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(), "rewards/accuracies": (chosen > rejected).double().mean(),
        "logps/chosen": t["lc"].mean(), "logps/rejected": t["lr"].mean(),
    }
    assert set(expected) <= set(out.metrics)
    for key, value in expected.items():
        assert_close(out.metrics[key], value, 1e-5, key, seed)
        assert not out.metrics[key].requires_grad


@pytest.mark.parametrize("name", ["simpo", "orpo"])
def test_reference_free_losses_report_average_logps(name, seed):
    """Under TRL's and Liger's names ``logps/*`` are per-token averages for SimPO and ORPO."""
    h, w, b, y, ref = batch()
    module, _ = PAIRED[name]
    module.backend = "torch"
    out = module(w, h, y, b)
    t = pair_terms(*(x.detach().double() for x in (h, w, b)), y, {k: v.double() for k, v in ref.items()})
    assert_close(out.metrics["logps/chosen"], (t["lc"] / t["nc"]).mean(), 1e-5, "logps/chosen", seed)
    assert_close(out.metrics["logps/rejected"], (t["lr"] / t["nr"]).mean(), 1e-5, "logps/rejected", seed)


def test_cwdpo_reports_its_cooling_weight(seed):
    h, w, b, y, ref = batch()
    module, _ = PAIRED["cwdpo"]
    out = module(w, h, y, b, **ref)
    t = pair_terms(*(x.detach().double() for x in (h, w, b)), y, {k: v.double() for k, v in ref.items()})
    assert_close(out.metrics["cooling_weight"], cooling(t).mean(), 1e-5, "cooling_weight", seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_sft_loss(backend, label_smoothing, path, seed):
    h, w, b, y, _ = batch()
    module = prefopt.FusedSFTLoss(label_smoothing=label_smoothing, backend=backend,
                                  fused_gradient=path == objective.FUSED_GRADIENT)
    out = module(w, h, y, b)
    out.loss.backward()
    assert ran(path)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    s = oracle_linear_logprobs(h64, w64, y, bias=b64)
    expected = ((1 - label_smoothing) * -s.logp + label_smoothing * s.uniform_nll).sum() / (y != -100).sum()
    expected.backward()
    assert_close(out.loss, expected, 2e-5, "loss", seed)
    assert_close(h.grad, h64.grad, 2e-5, "d hidden", seed)
    assert_close(w.grad, w64.grad, 2e-5, "d weight", seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nsft_loss(backend, path, seed):
    h, w, b, y, ref = batch()
    module = prefopt.FusedNSFTLoss(kl_coef=0.3, backend=backend, fused_gradient=path == objective.FUSED_GRADIENT)
    out = module(w, h, y, b, **ref)
    out.loss.backward()
    assert ran(path)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    s = oracle_linear_logprobs(h64, w64, y, bias=b64, **{k: v.double() for k, v in ref.items()})
    n = (y != -100).sum()
    expected = (-s.logp.sum() + 0.3 * s.kl.sum()) / n
    expected.backward()
    assert_close(out.loss, expected, 2e-5, "loss", seed)
    assert_close(out.metrics["kl"], s.kl.sum() / n, 2e-5, "kl metric", seed)
    assert_close(h.grad, h64.grad, 2e-5, "d hidden", seed)
    assert_close(w.grad, w64.grad, 2e-5, "d weight", seed)


def grpo_reference(logp, old, ref, adv, mask, beta, lo, hi, loss_type, max_len=None, delta=None, bias_kl=False,
                   num_items=None):
    """TRL 1.16's GRPOTrainer._compute_loss formulas, written out in float64 (token-level sampling)."""
    ratio = torch.exp(logp - old)
    a = adv[:, None]
    if loss_type == "cispo":
        per_token = -ratio.clamp(max=hi).detach() * a * logp
    elif loss_type == "sapo":
        t = torch.where(a > 0, 1.0, 1.05)
        per_token = -torch.sigmoid(t * (ratio - 1)) * 4 / t * a
    else:
        capped = ratio if delta is None else ratio.clamp(max=delta)
        per_token = -torch.minimum(capped * a, ratio.clamp(1 - lo, 1 + hi) * a)
    k3 = torch.exp(ref - logp) - (ref - logp) - 1
    per_token = per_token + beta * (k3 * ratio if bias_kl else k3)
    per_token = per_token * mask
    if loss_type in ("grpo", "sapo"):
        return (per_token.sum(-1) / mask.sum(-1).clamp(min=1)).mean()
    if loss_type == "bnpo":
        return per_token.sum() / mask.sum()
    if loss_type == "dr_grpo":
        return per_token.sum() / (mask.shape[0] * max_len)
    return per_token.sum() / (mask.sum() if num_items is None else num_items)


GRPO_CASES = {  # loss_type: extra options; the default grpo/dapo cases also run on the Triton backend
    "grpo": {}, "dapo": {}, "bnpo": {}, "dr_grpo": dict(max_completion_length=9),
    "cispo": dict(epsilon_high=1.2), "sapo": {}, "dapo-delta-biaskl": dict(delta=1.1, use_bias_correction_kl=True),
}


def grpo_inputs(padding_old=None, padding_ref=None):
    h, w, b, y, ref = batch()
    mask = (y != -100).double()
    old = oracle_linear_logprobs(h.detach(), w.detach(), y, bias=b.detach()).logp + 0.3 * torch.randn(y.shape)
    ref_logps = oracle_linear_logprobs(ref["ref_hidden"], ref["ref_weight"], y).logp
    if padding_old is not None:  # what Liger and TRL pass at padded positions
        old = torch.where(y == -100, torch.tensor(padding_old, dtype=old.dtype), old)
        ref_logps = torch.where(y == -100, torch.tensor(padding_ref, dtype=old.dtype), ref_logps)
    return h, w, b, y, ref, mask, old, ref_logps


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_loss_types(backend, case, path, seed):
    if backend != "torch" and case not in ("grpo", "dapo"):
        pytest.skip("the Triton backend runs the two aggregations; the formulas are backend-independent")
    options = GRPO_CASES[case]
    loss_type = case.split("-")[0]
    h, w, b, y, ref, mask, old, _ = grpo_inputs()
    advantages = torch.randn(ROWS)
    module = prefopt.FusedGRPOLoss(beta=0.1, epsilon_low=0.2, epsilon_high=options.pop("epsilon_high", 0.28),
                                   loss_type=loss_type, backend=backend,
                                   fused_gradient=path == objective.FUSED_GRADIENT, **options)
    out = module(w, h, y, advantages, b, old_logps=old.float(), **ref)
    out.loss.backward()
    assert ran(path)
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    s = oracle_linear_logprobs(h64, w64, y, bias=b64, **{k: v.double() for k, v in ref.items()})
    expected = grpo_reference(s.logp, old.double(), s.ref_logp, advantages.double(), mask, 0.1, 0.2,
                              module.epsilon_high, loss_type, max_len=9, delta=module.delta,
                              bias_kl=module.use_bias_correction_kl)
    expected.backward()
    assert_close(out.loss, expected, 2e-5, f"{case} loss", seed)
    assert_close(h.grad, h64.grad, 2e-5, f"{case} d hidden", seed)
    assert_close(w.grad, w64.grad, 2e-5, f"{case} d weight", seed)
    if case in ("grpo", "dapo"):
        ratio = torch.exp(s.logp.detach() - old.double())
        clipped = ((ratio < 0.8) & (advantages[:, None] < 0)) | ((ratio > 1.28) & (advantages[:, None] > 0))
        assert_close(out.metrics["clip_fraction"], (clipped.double() * mask).sum() / mask.sum(), 1e-6, "clip", seed)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("padding", [float("-inf"), -1e4])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_padding_never_reaches_the_loss(padding, loss_type, path, seed):
    """Old and reference log-probs of -inf or -1e4 at ignored positions: finite loss and gradients, the
    oracle's values (which never reads those positions)."""
    h, w, b, y, ref, mask, old, ref_logps = grpo_inputs(padding, padding)
    advantages = torch.randn(ROWS)
    module = prefopt.FusedGRPOLoss(beta=0.1, loss_type=loss_type, fused_gradient=path == objective.FUSED_GRADIENT)
    out = module(w, h, y, advantages, b, old_logps=old.float(), ref_logps=ref_logps.float())
    out.loss.backward()
    assert ran(path)
    assert torch.isfinite(out.loss) and all(torch.isfinite(v) for v in out.metrics.values()), f"seed {seed}"
    assert torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all() and torch.isfinite(b.grad).all()
    assert torch.equal(h.grad[y == -100], torch.zeros_like(h.grad[y == -100])), "gradient at padding"
    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    s = oracle_linear_logprobs(h64, w64, y, bias=b64)
    valid = y != -100
    zero = torch.zeros((), dtype=torch.float64)
    expected = grpo_reference(s.logp, torch.where(valid, old.double(), zero), torch.where(valid, ref_logps, zero),
                              advantages.double(), mask, 0.1, 0.2, 0.2, loss_type)
    expected.backward()
    assert_close(out.loss, expected, 2e-5, "loss", seed)
    assert_close(h.grad, h64.grad, 2e-5, "d hidden", seed)
    assert_close(w.grad, w64.grad, 2e-5, "d weight", seed)


@pytest.mark.parametrize("loss_type", prefopt.objectives.POLICY_LOSS_TYPES)
@pytest.mark.parametrize("given", [False, True], ids=["own-counts", "num-items"])
def test_policy_token_weights_sum_to_the_aggregation(loss_type, given, seed):
    """The per-token weights the fused-gradient path uses give aggregate_policy_loss's reduction."""
    mask = (torch.rand(5, 7) < 0.7).double()
    mask[2] = 0  # an empty row
    counts = dict(num_sequences=8, num_tokens=40) if given else {}
    weights = prefopt.objectives.policy_token_weights(mask, loss_type=loss_type, max_completion_length=9, **counts)
    for per_token in (torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 1, dtype=torch.float64)):
        expected = prefopt.objectives.aggregate_policy_loss(per_token, mask, loss_type=loss_type,
                                                            max_completion_length=9, **counts)
        assert_close((per_token * weights).sum(), expected, 1e-12, f"{loss_type} {list(per_token.shape)}", seed)


def test_grpo_accumulation_matches_the_whole_batch(seed):
    h, w, b, y, ref, mask, old, ref_logps = grpo_inputs(float("-inf"), float("-inf"))
    advantages = torch.randn(ROWS)
    for loss_type in ("dapo", "grpo", "cispo"):
        module = prefopt.FusedGRPOLoss(beta=0.1, loss_type=loss_type, epsilon_high=1.3)
        kwargs = lambda rows: dict(old_logps=old[rows].float(), ref_logps=ref_logps[rows].float())  # noqa: E731
        full = module(w, h, y, advantages, b, **kwargs(slice(None))).loss
        parts = [slice(0, 1), slice(1, ROWS)]
        total = sum(module.count_items(y[p]) for p in parts)
        accumulated = sum(module(w, h[p], y[p], advantages[p], b, num_items_in_batch=total, **kwargs(p)).loss
                          for p in parts)
        assert_close(accumulated, full, 1e-6, f"{loss_type} loss", seed)


@pytest.mark.parametrize("module", [prefopt.FusedGRPOLoss(beta=0.1), prefopt.FusedGRPOLoss(beta=0.1, loss_type="grpo"),
                                    prefopt.FusedNSFTLoss(kl_coef=0.3), prefopt.FusedSFTLoss(label_smoothing=0.2)],
                         ids=["grpo-dapo", "grpo-grpo", "nsft", "sft-smoothed"])
def test_token_losses_gradcheck(module, seed):
    """float64 gradcheck of the losses on the fused-gradient path (the recompute backward has test_op's)."""
    h, w, b, y, ref = small_batch()
    old = torch.randn(y.shape, dtype=torch.float64) - 3.0
    adv = torch.randn(ROWS, dtype=torch.float64)
    inputs = tuple(t.detach().double().requires_grad_() for t in (h, w, b))
    ref64 = {k: v.double() for k, v in ref.items()}
    if isinstance(module, prefopt.FusedGRPOLoss):
        fn = lambda *x: module(x[1], x[0], y, adv, x[2], old_logps=old, **ref64).loss  # noqa: E731
    elif isinstance(module, prefopt.FusedNSFTLoss):
        fn = lambda *x: module(x[1], x[0], y, x[2], **ref64).loss  # noqa: E731
    else:
        fn = lambda *x: module(x[1], x[0], y, x[2]).loss  # noqa: E731
    assert torch.autograd.gradcheck(fn, inputs), f"seed {seed}"
    assert ran(objective.FUSED_GRADIENT)


def test_gradient_accumulation_matches_the_whole_batch(seed):
    h, w, b, y, ref = batch(rows=8)  # 4 pairs: chosen rows 0-3, rejected rows 4-7
    module = prefopt.FusedDPOLoss(beta=0.3)
    full = module(w, h, y, b, **ref).loss
    full_grads = torch.autograd.grad(full, (h, w, b))
    micro = [[0, 1, 4, 5], [2, 3, 6, 7]]  # two micro-batches of two pairs each
    total = sum(module.count_items(y[i]) for i in micro)
    assert total == 4
    accumulated = sum(
        module(w, h[i], y[i], b, ref_hidden=ref["ref_hidden"][i], ref_weight=ref["ref_weight"],
               num_items_in_batch=total).loss for i in micro)
    grads = torch.autograd.grad(accumulated, (h, w, b))
    assert_close(accumulated, full, 1e-6, "loss", seed)
    for got, want in zip(grads, full_grads):
        assert_close(got, want, 1e-6, "grad", seed)


def test_token_normalised_accumulation(seed):
    h, w, b, y, _ = batch(rows=6)
    y[0, 2:] = -100  # uneven token counts between micro-batches
    module = prefopt.FusedSFTLoss()
    full = module(w, h, y, b).loss
    parts = [slice(0, 2), slice(2, 6)]
    total = sum(module.count_items(y[p]) for p in parts)
    accumulated = sum(module(w, h[p], y[p], b, num_items_in_batch=total).loss for p in parts)
    assert_close(accumulated, full, 1e-6, "loss", seed)


def test_shift_takes_hugging_face_labels(seed):
    h, w, b, y, ref = batch()
    aligned = torch.cat([y[:, 1:], torch.full((ROWS, 1), -100)], dim=1)
    shifted = prefopt.FusedDPOLoss(shift=True)(w, h, y, b, **ref)
    plain = prefopt.FusedDPOLoss()(w, h, aligned, b, **ref)
    assert_close(shifted.loss, plain.loss, 1e-6, "loss", seed)
    sums, counts = prefopt.sequence_logps(w, h, y, bias=b, shift=True)
    assert torch.equal(counts, (aligned != -100).sum(-1))
    assert_close(sums, oracle_linear_logprobs(h, w, aligned, bias=b).logp.sum(-1), 2e-5, "sequence_logps", seed)


def test_functional_forms_equal_modules(seed):
    h, w, b, y, ref = batch()
    module = prefopt.FusedCWDPOLoss(beta=0.2, floor=-1.0)(w, h, y, b, **ref)
    functional = prefopt.fused_cwdpo_loss(w, h, y, b, beta=0.2, floor=-1.0, **ref)
    assert torch.equal(module.loss, functional.loss)
    grpo = prefopt.fused_grpo_loss(w, h, y, torch.ones(ROWS), beta=0.0, loss_type="bnpo")
    assert torch.isfinite(grpo.loss)


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo"])
def test_grpo_loss_types_match_installed_trl(loss_type, seed):
    """FusedGRPOLoss against the installed TRL's own GRPOTrainer._compute_loss, run on the oracle's float64
    log-probs (a stand-in trainer object gives it the attributes it reads): loss and gradients. Padding
    carries finite old/reference log-probs here: TRL masks after the exponential, so -inf there is NaN in TRL."""
    trl = pytest.importorskip("trl")
    from collections import defaultdict
    from types import SimpleNamespace

    h, w, b, y, ref, mask, old, ref_logps = grpo_inputs()
    advantages = torch.randn(ROWS)
    eps_high = 1.5 if loss_type == "cispo" else 0.28
    options = dict(beta=0.1, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=9)
    out = prefopt.FusedGRPOLoss(**options, use_bias_correction_kl=True)(
        w, h, y, advantages, b, old_logps=old.float(), ref_logps=ref_logps.float())
    out.loss.backward()

    h64, w64, b64 = (t.detach().double().requires_grad_() for t in (h, w, b))
    logps = oracle_linear_logprobs(h64, w64, y, bias=b64).logp
    config = trl.GRPOConfig(output_dir="unused", use_cpu=True, bf16=False, use_bias_correction_kl=True,
                            steps_per_generation=1)
    stand_in = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=0.1, epsilon_low=0.2, epsilon_high=eps_high, loss_type=loss_type, max_completion_length=9,
        use_vllm=False, aux_loss_enabled=False, _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1,
        model=SimpleNamespace(training=True), args=config, _metrics={"train": defaultdict(list)},
        accelerator=SimpleNamespace(num_processes=1, gather=lambda t: t, reduce=lambda t, reduction: t),
    )
    inputs = dict(prompt_ids=y[:, :0].clamp(min=0), prompt_mask=y[:, :0], completion_ids=y.clamp(min=0),
                  completion_mask=mask, advantages=advantages.double(), old_per_token_logps=old.double(),
                  ref_per_token_logps=ref_logps, num_items_in_batch=mask.sum())
    expected = trl.GRPOTrainer._compute_loss(stand_in, None, inputs)
    expected.backward()
    assert_close(out.loss, expected, 2e-5, f"{loss_type} loss", seed)
    assert_close(h.grad, h64.grad, 2e-5, f"{loss_type} d hidden", seed)
    assert_close(w.grad, w64.grad, 2e-5, f"{loss_type} d weight", seed)
    if loss_type in ("grpo", "dapo"):
        trl_clip = stand_in._metrics["train"]["clip_ratio/region_mean"][-1]
        assert_close(out.metrics["clip_fraction"], torch.tensor(trl_clip), 1e-6, "clip_fraction", seed)


def test_orpo_log_odds_ratio_is_finite_at_a_certain_answer():
    # A per-token mean log-prob of 0 (p = 1) gives infinite odds; ORPO's loss and its log odds ratio (an
    # aux output of prefopt.liger's ORPO) share one clamped formula, so both stay finite.
    chosen, rejected = torch.tensor([0.0, -0.5]), torch.tensor([-1.0, -1.0])
    from prefopt import objectives

    ratio = objectives.orpo_log_odds_ratio(chosen, rejected)
    assert torch.isfinite(ratio).all()
    expected = (chosen[1] - rejected[1]) - (torch.log1p(-chosen[1].exp()) - torch.log1p(-rejected[1].exp()))
    torch.testing.assert_close(ratio[1], expected)
    loss = objectives.orpo_loss(chosen, rejected, torch.zeros(2), beta=0.1)
    torch.testing.assert_close(loss, -0.1 * torch.nn.functional.logsigmoid(ratio))


TOKEN_LOSSES = {
    "sft": lambda **o: (prefopt.FusedSFTLoss(label_smoothing=0.1, **o), lambda m, w, h, y, b, ref: m(w, h, y, b)),
    "nsft": lambda **o: (prefopt.FusedNSFTLoss(kl_coef=0.3, **o), lambda m, w, h, y, b, ref: m(w, h, y, b, **ref)),
    "grpo": lambda **o: (prefopt.FusedGRPOLoss(beta=0.1, loss_type="grpo", **o),
                         lambda m, w, h, y, b, ref: m(w, h, y, torch.linspace(-1, 1, y.shape[0]), b, **ref)),
}
EDGE_CASES = {
    "all-ignored": dict(ignore=1.0), "one-token": dict(rows=1, length=1), "ragged-vocab": dict(vocab=17),
    "huge-logits": dict(scale=2e3), "frozen-head": dict(frozen=True), "non-contiguous": dict(transposed=True),
}


@pytest.mark.parametrize("case", list(EDGE_CASES))
@pytest.mark.parametrize("name", list(TOKEN_LOSSES))
def test_token_losses_edge_cases_on_both_paths(name, case, seed):
    """The fused-gradient path gives the recompute path's loss and gradients (that path is checked against
    the oracle above and in test_op) on every edge case of the op."""
    o = EDGE_CASES[case]
    rows, length = o.get("rows", ROWS), o.get("length", LENGTH)
    h, w, b, y, ref = batch(rows=rows, length=length, vocab=o.get("vocab", VOCAB))
    if rows * length == 1:
        y.fill_(3)
    if o.get("ignore"):
        y.fill_(-100)
    h = (h.detach() * o.get("scale", 1.0)).requires_grad_()
    if o.get("transposed"):
        h = h.detach().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
        w = w.detach().T.contiguous().T.requires_grad_()
        assert not (h.is_contiguous() or w.is_contiguous())
    w.requires_grad_(not o.get("frozen"))
    b.requires_grad_(not o.get("frozen"))
    leaves = [t for t in (h, w, b) if t.requires_grad]
    results = []
    for path in PATHS:
        objective.PATH_COUNTS.clear()
        module, call = TOKEN_LOSSES[name](fused_gradient=path == objective.FUSED_GRADIENT)
        if name == "grpo" and "scale" in o:
            module.beta, ref = 0.0, {}  # k3 = exp(rf - lp) overflows at |lp| ~ 1e3 on either path
        out = call(module, w, h, y, b, ref)
        results.append((out.loss, torch.autograd.grad(out.loss, leaves, allow_unused=True)))
        assert ran(path)
    (fused, fused_grads), (recomputed, recomputed_grads) = results
    tol = 3e-3 if "scale" in o else 2e-5
    assert torch.isfinite(fused) and all(torch.isfinite(g).all() for g in fused_grads)
    assert_close(fused, recomputed, tol, f"{name} {case} loss", seed)
    for got, want in zip(fused_grads, recomputed_grads):
        assert_close(got, want, tol, f"{name} {case} gradient", seed)
    if o.get("ignore"):
        assert fused.item() == 0.0 and all(float(g.abs().max()) == 0.0 for g in fused_grads)
