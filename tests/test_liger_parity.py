"""prefopt.liger against the installed liger-kernel: same arguments, same outputs, same gradients.

Every case builds fresh random inputs (``seed`` fixture), runs Liger's chunked loss (``compiled=False``:
eager torch on CPU) and prefopt's shim with the same arguments, and compares the loss, every aux output
and the gradients of input, weight and bias with the tolerances of Liger's own tests
(fp32: atol 1e-5, rtol 5e-4; bf16: atol 5e-2, rtol 5e-1).

The matrices are sampled, not crossed: every loss type appears in fp32 and bf16, and each option
(bias, reference model or not, ``average_log_prob``, the NLL term with ``alpha``, ``ignore_index``,
label smoothing, ...) is on in some cases and off in others, which keeps this file within its share of
CI time (about a minute on 2 cores) while every option is exercised against Liger.
"""
import math

import pytest
import torch

from test_op import assert_close

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
from liger_kernel.chunked_loss import functional as liger_functional  # noqa: E402
from liger_kernel.chunked_loss.dpo_loss import LigerFusedLinearDPOFunction  # noqa: E402

import prefopt.liger as ours  # noqa: E402
from prefopt.ops import objective  # noqa: E402
from prefopt.liger import functional as ours_functional  # noqa: E402

TOLERANCES = {torch.float32: (1e-5, 5e-4), torch.bfloat16: (5e-2, 5e-1)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def assert_all_close(ours_out, theirs_out, dtype, what, seed):
    """Recursively compare (loss, (aux, ...)) structures: same nesting, shapes and values."""
    atol, rtol = TOLERANCES[dtype]
    if isinstance(theirs_out, (tuple, list)):
        assert isinstance(ours_out, (tuple, list)), f"{what}: expected a tuple, got {type(ours_out)} (seed {seed})"
        assert len(ours_out) == len(theirs_out), f"{what}: {len(ours_out)} outputs, Liger {len(theirs_out)} ({seed})"
        for i, (a, b) in enumerate(zip(ours_out, theirs_out)):
            assert_all_close(a, b, dtype, f"{what}[{i}]", seed)
        return
    assert ours_out.shape == theirs_out.shape, f"{what}: shape {ours_out.shape}, Liger {theirs_out.shape} ({seed})"
    torch.testing.assert_close(ours_out.float(), theirs_out.float(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{what} (seed {seed}): {m}")


def leaves(tensors, frozen_weight=False):
    """Fresh leaves; with ``frozen_weight`` the head (second tensor) takes no gradient, as under LoRA."""
    return [None if t is None else t.detach().clone().requires_grad_(not (frozen_weight and i == 1))
            for i, t in enumerate(tensors)]


def grads(tensors):
    return [None if t is None else t.grad for t in tensors]


def run_both(call_liger, call_ours, trainable, dtype, seed, what, frozen_weight=False):
    """``call_*(input, weight, bias)`` -> (loss, aux); compares outputs, then gradients of the trainable leaves."""
    theirs_leaves, ours_leaves = leaves(trainable, frozen_weight), leaves(trainable, frozen_weight)
    theirs = call_liger(*theirs_leaves)
    mine = call_ours(*ours_leaves)
    assert_all_close(mine, theirs, dtype, f"{what} outputs", seed)
    theirs[0].backward()
    mine[0].backward()
    for name, a, b in zip(("d input", "d weight", "d bias"), grads(ours_leaves), grads(theirs_leaves)):
        if frozen_weight and name == "d weight":
            assert a is None and b is None, f"{what}: a frozen head got a gradient (seed {seed})"
        if b is not None:
            assert a is not None, f"{what}: no {name} (seed {seed})"
            assert a.dtype == b.dtype, f"{what}: {name} dtype {a.dtype} vs Liger {b.dtype}"
            assert_all_close(a, b, dtype, f"{what} {name}", seed)
    return mine


def head(vocab, hidden_size, dtype, with_bias, scale=1.0):
    weight = (torch.randn(vocab, hidden_size) * scale / hidden_size**0.5).to(dtype)
    bias = (torch.randn(vocab) * 0.5).to(dtype) if with_bias else None
    return weight, bias


def targets(rows, length, vocab, ignore_index):
    """Random targets with a random share of ignored positions; every row keeps at least one scored token."""
    target = torch.randint(0, vocab, (rows, length))
    ignored = torch.rand(rows, length) < 0.35
    ignored[:, 0] = False
    target[ignored] = ignore_index
    return target


# ---------------------------------------------------------------------------------------------- DPO
# (loss_type, dtype, options): each loss type in fp32 and bf16; options rotate over the cases.
DPO_CASES = [
    ("sigmoid", "fp32", dict(bias=True)),
    ("sigmoid", "bf16", dict(compute_nll_loss=True, alpha=0.7)),
    ("sigmoid", "fp32", dict(use_ref_model=False, average_log_prob=True, label_smoothing=0.2)),
    ("sigmoid", "fp32", dict(chunk_size=2, frozen=True, bias=True)),
    ("sigmoid", "bf16", dict(frozen=True, compute_nll_loss=True)),
    ("hinge", "fp32", dict(average_log_prob=True, ignore_index=42)),
    ("hinge", "bf16", dict(bias=True, chunk_size=3)),
    ("robust", "fp32", dict(label_smoothing=0.1, compute_nll_loss=True)),
    ("robust", "bf16", dict(label_smoothing=0.2, bias=True)),
    ("exo_pair", "fp32", dict(label_smoothing=1e-3, bias=True)),
    ("exo_pair", "bf16", dict(label_smoothing=0.1, average_log_prob=True)),
    ("nca_pair", "fp32", dict(compute_nll_loss=True, alpha=0.5, bias=True)),
    ("nca_pair", "bf16", dict(use_ref_model=False)),
    ("bco_pair", "fp32", dict(average_log_prob=True, bias=True)),
    ("bco_pair", "bf16", dict()),
    ("sppo_hard", "fp32", dict(average_log_prob=True)),
    ("sppo_hard", "bf16", dict(average_log_prob=True, bias=True)),
    ("apo_zero", "fp32", dict(ignore_index=42, bias=True)),
    ("apo_zero", "bf16", dict(compute_nll_loss=True)),
    ("apo_down", "fp32", dict(use_ref_model=False, bias=True)),
    ("apo_down", "bf16", dict(average_log_prob=True)),
    ("discopop", "fp32", dict(discopop_tau=0.05, average_log_prob=True)),
    ("discopop", "bf16", dict(discopop_tau=0.3, compute_nll_loss=True, alpha=2.0, bias=True)),
]


@pytest.mark.parametrize("loss_type, dtype_name, options", DPO_CASES,
                         ids=[f"{t}-{d}-{i}" for i, (t, d, _) in enumerate(DPO_CASES)])
def test_dpo_module(loss_type, dtype_name, options, seed):
    dtype = DTYPES[dtype_name]
    options = dict(options)
    with_bias = options.pop("bias", False)
    frozen = options.pop("frozen", False)
    ignore_index = options.get("ignore_index", -100)
    pairs, length, hidden_size, vocab = 3, 9, 16, 67
    hidden = torch.randn(2 * pairs, length, hidden_size).to(dtype)
    weight, bias = head(vocab, hidden_size, dtype, with_bias)
    ref_input = torch.randn(2 * pairs, length, hidden_size).to(dtype)
    ref_weight, ref_bias = head(vocab, hidden_size, dtype, with_bias)
    target = targets(2 * pairs, length, vocab, ignore_index)
    kwargs = dict(beta=0.2, loss_type=loss_type, **options)
    theirs_fn = liger_chunked.LigerFusedLinearDPOLoss(compiled=False, **kwargs)
    ours_fn = ours.LigerFusedLinearDPOLoss(**kwargs)
    run_both(lambda x, w, b: theirs_fn(w, x, target, b, ref_input, ref_weight, ref_bias),
             lambda x, w, b: ours_fn(w, x, target, b, ref_input, ref_weight, ref_bias),
             (hidden, weight, bias), dtype, seed, f"DPO {loss_type}", frozen)


@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
def test_dpo_function_and_functional_positional(dtype_name, seed):
    """Liger's own functional test calls ``.apply`` positionally up to ``compute_nll_loss``; go further, to alpha."""
    dtype = DTYPES[dtype_name]
    pairs, length, hidden_size, vocab = 2, 7, 12, 41
    hidden = torch.randn(2 * pairs, length, hidden_size).to(dtype)
    weight, bias = head(vocab, hidden_size, dtype, True)
    ref_input = torch.randn(2 * pairs, length, hidden_size).to(dtype)
    ref_weight, ref_bias = head(vocab, hidden_size, dtype, False)
    target = targets(2 * pairs, length, vocab, -100)
    tail = (-100, 0.1, True, False, True, True, 1, "apo_down", 0.0, 0.05, 0.5)
    run_both(lambda x, w, b: LigerFusedLinearDPOFunction.apply(x, w, target, b, ref_input, ref_weight,
                                                                             ref_bias, *tail),
             lambda x, w, b: ours.LigerFusedLinearDPOFunction.apply(x, w, target, b, ref_input, ref_weight,
                                                                    ref_bias, *tail),
             (hidden, weight, bias), dtype, seed, "DPO Function.apply")
    tail = (-100, 0.1, False, False)  # ..., compute_nll_loss, compiled=False (eager Liger on CPU)
    run_both(lambda x, w, b: liger_functional.liger_fused_linear_dpo(x, w, target, b, ref_input, ref_weight, ref_bias,
                                                                     *tail),
             lambda x, w, b: ours_functional.liger_fused_linear_dpo(x, w, target, b, ref_input, ref_weight, ref_bias,
                                                                    *tail),
             (hidden, weight, bias), dtype, seed, "liger_fused_linear_dpo")


def test_dpo_frozen_head_and_upstream_gradient(seed):
    """A frozen head (no weight gradient) and a loss scaled downstream: Liger scales its saved gradients."""
    pairs, length, hidden_size, vocab = 2, 6, 8, 29
    hidden = torch.randn(2 * pairs, length, hidden_size)
    weight, _ = head(vocab, hidden_size, torch.float32, False)
    ref_input = torch.randn(2 * pairs, length, hidden_size)
    target = targets(2 * pairs, length, vocab, -100)
    results = []
    for module in (liger_chunked.LigerFusedLinearDPOLoss(compiled=False), ours.LigerFusedLinearDPOLoss()):
        x = hidden.clone().requires_grad_()
        loss, _ = module(weight, x, target, None, ref_input, weight)
        (3.0 * loss).backward()
        results.append(x.grad)
    assert_all_close(results[1], results[0], torch.float32, "d input of 3 * loss", seed)


# ---------------------------------------------------------------------------------------------- ORPO, SimPO, CPO
PAIRED_CASES = [
    ("ORPO", "fp32", dict(bias=True)),
    ("ORPO", "bf16", dict(beta=0.3)),
    ("ORPO", "fp32", dict(compute_nll_loss=False, ignore_index=42)),
    ("ORPO", "fp32", dict(nll_target=True, bias=True)),
    ("ORPO", "bf16", dict(nll_target=True)),
    ("SimPO", "fp32", dict(bias=True)),
    ("SimPO", "bf16", dict(label_smoothing=0.1, gamma=0.8)),
    ("SimPO", "fp32", dict(compute_nll_loss=False, label_smoothing=0.2, beta=2.0, gamma=1.0)),
    ("SimPO", "fp32", dict(alpha=0.3, ignore_index=42, bias=True)),
    ("SimPO", "fp32", dict(chunk_size=2, frozen=True, bias=True)),
    ("ORPO", "fp32", dict(chunk_size=3, frozen=True)),
    ("CPO", "fp32", dict(bias=True)),
    ("CPO", "bf16", dict(label_smoothing=0.1)),
    ("CPO", "fp32", dict(average_log_prob=True, alpha=0.5, label_smoothing=0.3)),
    ("CPO", "bf16", dict(compute_nll_loss=False, average_log_prob=True, bias=True)),
]


@pytest.mark.parametrize("name, dtype_name, options", PAIRED_CASES,
                         ids=[f"{n}-{d}-{i}" for i, (n, d, _) in enumerate(PAIRED_CASES)])
def test_reference_free_paired_modules(name, dtype_name, options, seed):
    dtype = DTYPES[dtype_name]
    options = dict(options)
    with_bias = options.pop("bias", False)
    with_nll_target = options.pop("nll_target", False)
    frozen = options.pop("frozen", False)
    ignore_index = options.get("ignore_index", -100)
    pairs, length, hidden_size, vocab = 3, 8, 16, 53
    hidden = torch.randn(2 * pairs, length, hidden_size).to(dtype)
    weight, bias = head(vocab, hidden_size, dtype, with_bias)
    target = targets(2 * pairs, length, vocab, ignore_index)
    extra = ()
    if with_nll_target:
        # NLL on other labels for some chosen positions (ORPO's nll_target), keeping the rest.
        nll_target = torch.where(torch.rand(2 * pairs, length) < 0.5, targets(2 * pairs, length, vocab, ignore_index),
                                 target)
        extra = (nll_target,)
    theirs_fn = getattr(liger_chunked, f"LigerFusedLinear{name}Loss")(compiled=False, **options)
    ours_fn = getattr(ours, f"LigerFusedLinear{name}Loss")(**options)
    run_both(lambda x, w, b: theirs_fn(w, x, target, b, *extra), lambda x, w, b: ours_fn(w, x, target, b, *extra),
             (hidden, weight, bias), dtype, seed, name, frozen)


@pytest.mark.parametrize("name", ["orpo", "simpo", "cpo"])
def test_reference_free_functional(name, seed):
    pairs, length, hidden_size, vocab = 2, 7, 12, 37
    hidden = torch.randn(2 * pairs, length, hidden_size)
    weight, bias = head(vocab, hidden_size, torch.float32, True)
    target = targets(2 * pairs, length, vocab, -100)
    theirs_fn = getattr(liger_functional, f"liger_fused_linear_{name}")
    ours_fn = getattr(ours_functional, f"liger_fused_linear_{name}")
    # Positional through compiled=False: (ignore_index, beta, compute_nll_loss, nll_target, compiled) for ORPO,
    # (ignore_index, beta, alpha, label_smoothing, compute_nll_loss, compiled) for SimPO and CPO.
    tail = (-100, 0.2, True, None, False) if name == "orpo" else (-100, 0.2, 0.5, 0.1, True, False)
    run_both(lambda x, w, b: theirs_fn(x, w, target, b, *tail), lambda x, w, b: ours_fn(x, w, target, b, *tail),
             (hidden, weight, bias), torch.float32, seed, f"liger_fused_linear_{name}")


# ---------------------------------------------------------------------------------------------- KTO
KTO_CASES = [
    ("fp32", dict(use_ref_model=True, kl="scalar", bias=True)),
    ("bf16", dict(use_ref_model=True, kl="scalar")),
    ("fp32", dict(use_ref_model=False)),
    ("bf16", dict(use_ref_model=False, average_log_prob=True, bias=True)),
    ("fp32", dict(use_ref_model=True, average_log_prob=True, ignore_index=42)),
    ("fp32", dict(use_ref_model=True, kl="per-row", bias=True)),
    ("fp32", dict(use_ref_model=True, kl="scalar", chunk_size=4, frozen=True)),
]


@pytest.mark.parametrize("dtype_name, options", KTO_CASES, ids=[f"{d}-{i}" for i, (d, _) in enumerate(KTO_CASES)])
def test_kto_module(dtype_name, options, seed):
    dtype = DTYPES[dtype_name]
    options = dict(options)
    with_bias = options.pop("bias", False)
    kl_kind = options.pop("kl", None)
    frozen = options.pop("frozen", False)
    ignore_index = options.get("ignore_index", -100)
    rows, length, hidden_size, vocab = 6, 8, 16, 53
    hidden = torch.randn(rows, length, hidden_size).to(dtype)
    weight, bias = head(vocab, hidden_size, dtype, with_bias)
    ref_input = torch.randn(rows, length, hidden_size).to(dtype)
    ref_weight, ref_bias = head(vocab, hidden_size, dtype, with_bias)
    target = targets(rows, length, vocab, ignore_index)
    labels = torch.rand(rows) < 0.5
    labels[0], labels[1] = True, False
    kl = {None: None, "scalar": torch.rand(()) * 2, "per-row": torch.rand(rows) * 2}[kl_kind]
    # Liger applies kl inside each row chunk: a per-row kl [B] broadcasts against a chunk of 1 row and
    # sums B losses per row (a Liger bug). One chunk of all rows (chunk_size=B) gives the documented
    # meaning, one reference point per row, which is what prefopt computes for any chunk_size.
    if kl_kind == "per-row":
        options["chunk_size"] = rows
    theirs_fn = liger_chunked.LigerFusedLinearKTOLoss(compiled=False, **options)
    ours_fn = ours.LigerFusedLinearKTOLoss(**options)
    run_both(lambda x, w, b: theirs_fn(x, w, target, b, labels, ref_input, ref_weight, ref_bias, kl),
             lambda x, w, b: ours_fn(x, w, target, b, labels, ref_input, ref_weight, ref_bias, kl),
             (hidden, weight, bias), dtype, seed, "KTO", frozen)


def test_kto_functional_positional(seed):
    rows, length, hidden_size, vocab = 4, 7, 12, 37
    hidden = torch.randn(rows, length, hidden_size)
    weight, bias = head(vocab, hidden_size, torch.float32, True)
    ref_input = torch.randn(rows, length, hidden_size)
    target = targets(rows, length, vocab, -100)
    labels = torch.tensor([True, False, True, False])
    tail = (labels, None, ref_input, weight, None, torch.tensor(0.3), -100, 0.5, False)
    run_both(lambda x, w, b: liger_functional.liger_fused_linear_kto(x, w, target, *tail),
             lambda x, w, b: ours_functional.liger_fused_linear_kto(x, w, target, *tail),
             (hidden, weight, None), torch.float32, seed, "liger_fused_linear_kto")


# ---------------------------------------------------------------------------------------------- GRPO
# Each loss type in fp32 and bf16, with the options rotated over the cases: reference from
# precomputed log-probs / reference hidden states / none, old log-probs or on-policy, beta 0 or not,
# sequence-level importance sampling, delta, vLLM ratios of each shape, the bias-corrected KL,
# temperature and num_items_in_batch.
GRPO_CASES = [
    ("dapo", "fp32", dict(ref="hidden", old=True, bias=True)),
    ("dapo", "bf16", dict(ref="logps", old=True)),
    ("dapo", "fp32", dict(ref="hidden", num_items_in_batch=40, delta=1.1, old=True)),
    ("grpo", "fp32", dict(ref="logps", old=True, temperature=0.7, bias=True)),
    ("grpo", "bf16", dict(ref="hidden", importance_sampling_level="sequence", old=True)),
    ("bnpo", "fp32", dict(ref=None, beta=0.0, old=True, vllm="row")),
    ("bnpo", "bf16", dict(ref="hidden", use_bias_correction_kl=True, old=True, bias=True)),
    ("dr_grpo", "fp32", dict(ref="hidden", max_completion_length=12, vllm="token", old=True, bias=True)),
    ("dr_grpo", "fp32", dict(ref="logps", max_completion_length=10, importance_sampling_level="sequence", old=True)),
    ("dr_grpo", "bf16", dict(ref="logps", max_completion_length=9)),
    ("cispo", "fp32", dict(ref="hidden", epsilon_high=1.05, old=True, bias=True)),
    ("cispo", "bf16", dict(ref="logps", epsilon_high=1.1, old=True, vllm="row1")),
    ("sapo", "fp32", dict(ref="hidden", old=True, sapo_temperature_neg=1.3)),
    ("sapo", "bf16", dict(ref=None, old=True, bias=True)),
    ("luspo", "fp32", dict(ref=None, beta=0.0, importance_sampling_level="sequence", old=True, bias=True)),
    ("luspo", "bf16", dict(ref=None, beta=0.0, importance_sampling_level="sequence", old=True)),
    ("vespo", "fp32", dict(ref="hidden", old=True, vllm="token")),
    ("vespo", "fp32", dict(ref=None, beta=0.0, old=True, vespo_k_pos=1.5, vespo_lambda_neg=2.5, vespo_k_neg=2.0,
                           vespo_lambda_pos=2.0, bias=True)),
    ("vespo", "bf16", dict(ref="logps", old=True, bias=True)),
    ("dapo", "fp32", dict(ref="hidden", importance_sampling_level="sequence", use_bias_correction_kl=True,
                          old=True, temperature=1.3)),
    ("dapo", "fp32", dict(ref="hidden", old=True, chunk_size=3, frozen=True, bias=True)),
    ("grpo", "bf16", dict(ref="logps", old=True, chunk_size=2, frozen=True, delta=1.5)),
]


def grpo_inputs(dtype, with_bias, rows=4, length=8, hidden_size=16, vocab=53, pad=True):
    hidden = torch.randn(rows, length, hidden_size).to(dtype)
    weight, bias = head(vocab, hidden_size, dtype, with_bias)
    ids = torch.randint(0, vocab, (rows, length))
    mask = torch.ones(rows, length)
    if pad:
        mask[torch.rand(rows, length) < 0.3] = 0
        mask[:, 0] = 1
    advantages = torch.randn(rows).to(dtype)
    with torch.no_grad():
        logits = (hidden.float() @ weight.float().T + (0 if bias is None else bias.float()))
        logps = torch.log_softmax(logits, -1).gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    return hidden, weight, bias, ids, mask, advantages, logps


@pytest.mark.parametrize("loss_type, dtype_name, options", GRPO_CASES,
                         ids=[f"{t}-{d}-{i}" for i, (t, d, _) in enumerate(GRPO_CASES)])
def test_grpo_module(loss_type, dtype_name, options, seed):
    dtype = DTYPES[dtype_name]
    options = dict(options)
    with_bias = options.pop("bias", False)
    ref_kind = options.pop("ref")
    with_old = options.pop("old", False)
    vllm_kind = options.pop("vllm", None)
    num_items = options.pop("num_items_in_batch", None)
    frozen = options.pop("frozen", False)
    hidden, weight, bias, ids, mask, advantages, logps = grpo_inputs(dtype, with_bias)
    rows, length = ids.shape
    # Old and reference log-probs near the policy's, so that some ratios clip and some do not.
    old = (logps + torch.randn(rows, length) * 0.15) if with_old else None
    ref_logps = logps + torch.randn(rows, length) * 0.1 if ref_kind == "logps" else None
    ref_input = hidden + (torch.randn_like(hidden.float()) * 0.1).to(dtype) if ref_kind == "hidden" else None
    ref_weight = (weight.float() + torch.randn_like(weight.float()) * 0.02).to(dtype)
    vllm = {None: None, "row": torch.rand(rows) + 0.5, "row1": torch.rand(rows, 1) + 0.5,
            "token": torch.rand(rows, length) + 0.5}[vllm_kind]
    kwargs = dict(loss_type=loss_type, use_ref_model=ref_kind is not None, **options)
    kwargs.setdefault("beta", 0.1)
    theirs_fn = liger_chunked.LigerFusedLinearGRPOLoss(compiled=False, **kwargs)
    ours_fn = ours.LigerFusedLinearGRPOLoss(**kwargs)
    tail = (ref_logps, old, ref_input, ref_weight, None, vllm, num_items)
    objective.PATH_COUNTS.clear()
    run_both(lambda x, w, b: theirs_fn(x, w, ids, mask, advantages, b, *tail),
             lambda x, w, b: ours_fn(x, w, ids, mask, advantages, b, *tail),
             (hidden, weight, bias), dtype, seed, f"GRPO {loss_type}", frozen)
    # Token-level importance weights: the gradient is formed in the forward pass; sequence-level ones
    # (GSPO) and vespo's need whole sequences and recompute.
    per_token = options.get("importance_sampling_level", "token") == "token" and loss_type != "vespo"
    assert objective.PATH_COUNTS == {objective.FUSED_GRADIENT if per_token else objective.RECOMPUTE: 1}


def test_grpo_functional_positional(seed):
    hidden, weight, bias, ids, mask, advantages, logps = grpo_inputs(torch.float32, True)
    ref_input = hidden + torch.randn_like(hidden) * 0.1
    tail = (None, logps + 0.1, ref_input, weight, bias, 0.04, 0.2, 0.25, "grpo", None, "token", 1.0, 1.05, 0.9, False)
    run_both(lambda x, w, b: liger_functional.liger_fused_linear_grpo(x, w, ids, mask, advantages, b, *tail),
             lambda x, w, b: ours_functional.liger_fused_linear_grpo(x, w, ids, mask, advantages, b, *tail),
             (hidden, weight, bias), torch.float32, seed, "liger_fused_linear_grpo")


def test_grpo_luspo_token_level_without_padding_matches(seed):
    """Token-level luspo agrees with Liger where there is no padding (see the next test for padding)."""
    hidden, weight, bias, ids, mask, advantages, logps = grpo_inputs(torch.float32, False, pad=False)
    old = logps + torch.randn_like(logps) * 0.15
    kwargs = dict(loss_type="luspo", beta=0.1, use_ref_model=True)
    theirs_fn = liger_chunked.LigerFusedLinearGRPOLoss(compiled=False, **kwargs)
    ours_fn = ours.LigerFusedLinearGRPOLoss(**kwargs)
    ref_input = hidden + torch.randn_like(hidden) * 0.1
    run_both(lambda x, w, b: theirs_fn(x, w, ids, mask, advantages, b, None, old, ref_input, weight),
             lambda x, w, b: ours_fn(x, w, ids, mask, advantages, b, None, old, ref_input, weight),
             (hidden, weight, None), torch.float32, seed, "GRPO luspo token level")


@pytest.mark.parametrize("loss_type, level", [("luspo", "token"), ("dapo", "token"), ("grpo", "sequence")])
def test_grpo_padding_never_reaches_the_loss(loss_type, level, seed):
    """Departure from Liger, on purpose: padded positions (attention_mask 0) are never scored.

    Liger scores every position and multiplies by the mask afterwards, so (1) an old / reference log-prob
    of -inf at a padded position (TRL and Liger pass such values) makes Liger's loss NaN, and (2) Liger's
    token-level luspo weights every position, padding included, by the sequence length; TRL's luspo
    (``(per_token_loss * mask).sum(-1).mean()``) and prefopt's count completion tokens only. prefopt's
    result must not depend on what the padded positions hold.
    """
    hidden, weight, bias, ids, mask, advantages, logps = grpo_inputs(torch.float32, False)
    old = logps + torch.randn_like(logps) * 0.15
    ref = logps + torch.randn_like(logps) * 0.1
    padded = mask == 0
    module = ours.LigerFusedLinearGRPOLoss(loss_type=loss_type, importance_sampling_level=level, beta=0.1)
    x1, x2 = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    clean, _ = module(x1, weight, ids, mask, advantages, None, ref, old)
    garbage_ids = torch.where(padded, (ids + 7) % weight.shape[0], ids)
    dirty, _ = module(x2, weight, garbage_ids, mask, advantages, None, ref.masked_fill(padded, -math.inf),
                      old.masked_fill(padded, -math.inf))
    clean.backward()
    dirty.backward()
    assert torch.isfinite(dirty), f"loss {dirty} with -inf at padded positions (seed {seed})"
    assert_close(dirty, clean, 1e-6, "loss with garbage at padded positions", seed)
    assert_close(x2.grad, x1.grad, 1e-6, "d input with garbage at padded positions", seed)
    assert float(x2.grad[padded].abs().max()) == 0.0, f"padded positions got a gradient (seed {seed})"


# ---------------------------------------------------------------------------------------------- float64 oracle
def test_paired_statistics_against_float64_oracle(seed):
    """In float64 the shim's statistics equal materialised logits to 1e-10: per-row log-prob sums and the
    logits means over every position (prefopt: the op's mean logit at scored positions, one product with
    the mean head row at the others), the chosen NLL over nll_target, the loss and its input gradient."""
    pairs, length, hidden_size, vocab = 2, 7, 10, 23
    hidden = torch.randn(2 * pairs, length, hidden_size, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, dtype=torch.float64)
    bias = torch.randn(vocab, dtype=torch.float64)
    ref_input = torch.randn(2 * pairs, length, hidden_size, dtype=torch.float64)
    target = targets(2 * pairs, length, vocab, -100)
    nll_target = torch.randint(0, vocab, (2 * pairs, length))
    nll_target[:, :2] = -100
    loss, (chosen, rejected, chosen_mean, rejected_mean, nll, *_) = ours.LigerFusedLinearDPOFunction.apply(
        hidden, weight, target, bias, ref_input, weight, bias, -100, 0.3, True, False, True, False, 1, "sigmoid",
        0.0, 0.05, 0.7)
    orpo_nll = ours.LigerFusedLinearORPOLoss()(weight, hidden, target, bias, nll_target)[1][4]

    logits = hidden @ weight.T + bias
    logq = torch.log_softmax(logits, -1)
    valid = target != -100
    token = torch.where(valid, logq.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    ref_logq = torch.log_softmax(ref_input @ weight.T + bias, -1)
    ref_token = torch.where(valid, ref_logq.gather(-1, target.clamp(min=0)[..., None]).squeeze(-1), 0.0)
    logps, ref_logps = token.sum(-1), ref_token.sum(-1)
    expected_nll = -token[:pairs].sum() / valid[:pairs].sum()
    z = 0.3 * ((logps[:pairs] - ref_logps[:pairs]) - (logps[pairs:] - ref_logps[pairs:]))
    expected_loss = 0.7 * expected_nll - torch.nn.functional.logsigmoid(z).mean()
    nll_valid = nll_target[:pairs] != -100
    orpo_expected = -torch.where(nll_valid, logq[:pairs].gather(-1, nll_target[:pairs].clamp(min=0)[..., None])
                                 .squeeze(-1), 0.0).sum() / nll_valid.sum()
    for got, want, what in ((chosen, logps[:pairs], "chosen_logps"), (rejected, logps[pairs:], "rejected_logps"),
                            (chosen_mean, logits[:pairs].mean(), "chosen_logits_mean"),
                            (rejected_mean, logits[pairs:].mean(), "rejected_logits_mean"),
                            (nll, expected_nll, "nll_loss"), (orpo_nll, orpo_expected, "ORPO nll_target"),
                            (loss, expected_loss, "loss")):
        assert_close(got, want.detach(), 1e-10, what, seed)
    (grad,) = torch.autograd.grad(loss, hidden)
    (expected_grad,) = torch.autograd.grad(expected_loss, hidden)
    assert_close(grad, expected_grad, 1e-10, "d input", seed)


# ---------------------------------------------------------------------------------------------- prefopt's own API
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
def test_prefopt_fused_dpo_matches_liger(with_bias, seed):
    """prefopt's own FusedDPOLoss (positional order of Liger's module, its own return type) gives Liger's DPO."""
    import prefopt

    pairs, length, hidden_size, vocab = 2, 9, 16, 67
    hidden = torch.randn(2 * pairs, length, hidden_size)
    weight, bias = head(vocab, hidden_size, torch.float32, with_bias)
    ref_input = torch.randn(2 * pairs, length, hidden_size)
    ref_weight, ref_bias = head(vocab, hidden_size, torch.float32, with_bias)
    target = targets(2 * pairs, length, vocab, -100)
    theirs_fn = liger_chunked.LigerFusedLinearDPOLoss(beta=0.3, compiled=False)
    ours_fn = prefopt.FusedDPOLoss(beta=0.3)

    def ours_as_liger(x, w, b):
        out = ours_fn(w, x, target, b, ref_input, ref_weight, ref_bias)
        return out.loss, (out.metrics["rewards/chosen"], out.metrics["rewards/rejected"])

    def liger_rewards(x, w, b):
        loss, aux = theirs_fn(w, x, target, b, ref_input, ref_weight, ref_bias)
        return loss, (aux[5].mean(), aux[6].mean())

    run_both(liger_rewards, ours_as_liger, (hidden, weight, bias), torch.float32, seed, "FusedDPOLoss")
