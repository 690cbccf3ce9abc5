"""prefopt.integrations.trl against stock TRL: same data, seed and models, 3 SGD steps at lr 1e-2.

Every run of a Prefopt*Trainer has TRL's own fused head patched to raise (so every log-prob came from
prefopt's op) and counts the op's calls. Compared: per-step loss and every logged metric (rtol 1e-5,
atol 1e-6 for metrics that are differences of nearly equal log-probs, e.g. rewards), and the weight
update (the whole update vector to 1e-5 relative, each tensor to 1e-4).

Sampled parity matrix (about a minute of CI on 2 cores; the budget is 240 s), and why it covers the rest:
- DPO, tiny Llama, explicit ref_model: every TRL 1.16 loss type at once (``loss_type=[...]``, one run;
  each type reads the same policy/reference log-probs, the only thing prefopt replaces), label smoothing 0.1.
- DPO, tiny Llama, LoRA without ref_model (reference = adapters off), sigmoid.
- DPO, tiny Llama, explicit ref_model, WPO (``use_weighting=True``: weights from the head's log_sum_sq_probs).
- DPO, tiny Llama, precompute_ref_log_probs=True with LoRA (reference precomputed by prefopt's head), ipo.
- DPO, tiny LLaVA with images, explicit ref_model, sigmoid (TRL refuses precompute for vision data); the same
  on LLaVA-NeXT, Qwen3-VL, Idefics3 and Gemma 3.
- Head fields (log_probs, entropy, log_sum_sq_probs, mean_logits, is_top1, loss) against TRL's head directly, half the labels
  the argmax, plain and with softcap, logit scale and temperature.
- GRPO, tiny Llama, CPU generation: dapo with a KL term (LoRA, adapters-off reference, 2 accumulated
  micro-batches), grpo off-policy with an entropy bonus, and each other loss type of TRL 1.16 once (bnpo,
  dr_grpo, cispo, sapo, luspo, vespo).
- prefopt's own cw-dpo, sft-c and nsft (PrefoptDPOConfig) against full logits; the ZeRO-3 code path (gather,
  recompute in backward) against the direct one without DeepSpeed; unsupported options.
- share_prefix=True against the same trainer unshared (the head must have packed): DPO and GRPO (LoRA,
  adapters-off reference, 2 iterations), tiny Llama and tiny LLaVA; the refusal / fallback rules.
Real 2-process DDP and ZeRO-3 launches are in test_trl_distributed.py. Not covered: FSDP2.
"""
import contextlib
import math
import os
import tempfile

import pytest
import torch

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
peft = pytest.importorskip("peft")

import trl.trainer.utils as trl_utils  # noqa: E402
from prefopt.integrations import trl as integration  # noqa: E402
from prefopt.integrations.trl import PrefoptDPOConfig, PrefoptDPOTrainer, PrefoptGRPOTrainer  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402

os.environ.setdefault("TQDM_DISABLE", "1")
DPO_LOSS_TYPES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
# Plain SGD: the update is linear in the gradient, so comparing updates compares gradients (Adam's first
# steps are about lr * sign(g) and turn float32 noise in near-zero gradients into full-size differences).
COMMON = dict(per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, optim="sgd", logging_steps=1, report_to=[],
              save_strategy="no", seed=0, use_cpu=True, bf16=False, disable_tqdm=True)


def tiny(name="tiny-llama"):
    adapter, processor = build_model(name, seed=0)
    return adapter.hf_model, processor


def text_pairs():
    return datasets.Dataset.from_dict({
        "prompt": ["the red cube is", "a blue ball sits", "two green cones", "the small dog"],
        "chosen": [" on the table", " under the chair", " near the box", " runs fast"],
        "rejected": [" in the sky above", " on the moon", " inside the cup", " flies"],
    })


def image_pairs():
    from PIL import Image

    images = [Image.new("RGB", (32, 32), color) for color in ("red", "blue", "green", "white")]
    prompts = [[{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"what is {i}?"}]}]
               for i in ("this", "that", "it", "here")]
    answer = lambda text: [{"role": "assistant", "content": [{"type": "text", "text": text}]}]  # noqa: E731
    return datasets.Dataset.from_dict({
        "images": [[im] for im in images], "prompt": prompts,
        "chosen": [answer(t) for t in ("a red cube", "a blue ball", "a green cone", "a white box")],
        "rejected": [answer(t) for t in ("a dog", "the sky", "two cats", "nothing at all")],
    })


@contextlib.contextmanager
def prefopt_only():
    """TRL's fused head raises; yields a counter of prefopt op calls."""
    calls = {"n": 0}
    op = integration.linear_logprobs

    def counted(*args, **kwargs):
        calls["n"] += 1
        return op(*args, **kwargs)

    def refuse(*args, **kwargs):
        raise AssertionError("TRL's own fused head ran inside a prefopt trainer")

    mp = pytest.MonkeyPatch()
    mp.setattr(trl_utils._ChunkedLogProbFunction, "apply", refuse)
    mp.setattr(integration, "linear_logprobs", counted)
    try:
        yield calls
    finally:
        mp.undo()


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def train(trainer):
    """(logged steps, initial weights, final weights) of a 3-step run."""
    initial = snapshot(trainer.model)
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry], initial, snapshot(trainer.model)


def assert_same_run(stock, ours, abs_tol=None):
    """``abs_tol``: per-metric absolute tolerances beside rel 1e-5, for metrics that are sums with cancellation."""
    (stock_log, initial, stock_w), (our_log, our_initial, our_w) = stock, ours
    abs_tol = abs_tol or {}
    assert len(stock_log) == len(our_log) == 3
    for step, (a, b) in enumerate(zip(stock_log, our_log)):
        assert set(a) == set(b), f"step {step}: metric names {sorted(set(a) ^ set(b))}"
        for key, value in a.items():
            if isinstance(value, (int, float)) and not any(t in key for t in ("time", "per_second")):  # not timings
                assert math.isclose(b[key], value, rel_tol=1e-5, abs_tol=abs_tol.get(key, 1e-6)), \
                    f"step {step} {key}: {b[key]} vs {value}"
    assert all(torch.equal(initial[k], our_initial[k]) for k in initial), "the runs started from different weights"
    update = {k: stock_w[k].double() - initial[k].double() for k in stock_w}
    gap = {k: our_w[k].double() - stock_w[k].double() for k in stock_w}
    total = math.sqrt(sum(float((u ** 2).sum()) for u in update.values()))
    assert total > 1e-3, "the weights did not move: nothing compared"
    assert math.sqrt(sum(float((g ** 2).sum()) for g in gap.values())) <= 1e-5 * total
    for k in update:
        # A tensor that barely moved may differ by the float32 rounding of its values (a few ulps).
        rounding = 4 * torch.finfo(torch.float32).eps * float(stock_w[k].double().abs().max()) * stock_w[k].numel() ** 0.5
        assert float(gap[k].norm()) <= 1e-4 * float(update[k].norm()) + 1e-9 + rounding, k


def stock_and_prefopt(stock_cls, prefopt_cls, build, abs_tol=None):
    """Train ``build(stock_cls)``, then ``build(prefopt_cls)`` with prefopt's op as the only head that may
    run (and that must run), and check the two runs are the same."""
    runs = [train(build(stock_cls))]
    with prefopt_only() as calls:
        runs.append(train(build(prefopt_cls)))
    assert calls["n"] >= 3, f"prefopt's op ran {calls['n']} times in 3 steps"
    assert_same_run(*runs, abs_tol=abs_tol)


def dpo_pair(config_options, *, model="tiny-llama", data=text_pairs, ref_model=True, peft_config=None,
             config_cls=trl.DPOConfig):
    def build(trainer_cls):
        policy, processor = tiny(model)
        args = config_cls(output_dir=tempfile.mkdtemp(), **COMMON, **config_options)
        return trainer_cls(model=policy, ref_model=tiny(model)[0] if ref_model else None, args=args,
                           train_dataset=data(), processing_class=processor, peft_config=peft_config)

    stock_and_prefopt(trl.DPOTrainer, PrefoptDPOTrainer, build)


def test_dpo_every_trl_loss_type_with_ref_model():
    dpo_pair(dict(loss_type=DPO_LOSS_TYPES, loss_weights=[1.0] * len(DPO_LOSS_TYPES), label_smoothing=0.1))


def test_dpo_lora_reference_is_adapters_off():
    dpo_pair({}, ref_model=False, peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_dpo_wpo_weighting():
    # sigmoid and ipo: WPO's weights multiply each loss type's per-pair loss
    dpo_pair(dict(use_weighting=True, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5]))


def test_dpo_precomputed_reference():
    dpo_pair(dict(loss_type="ipo", precompute_ref_log_probs=True), ref_model=False,
             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def test_dpo_tiny_llava_with_images():
    dpo_pair(dict(max_length=None), model="tiny-llava", data=image_pairs)


@pytest.mark.parametrize("family", ["llava-next", "qwen3-vl", "idefics3", "gemma3"])
def test_dpo_vision_families_with_images(family, tiny_family):
    """TRL's vision format on other layouts (LLaVA-NeXT's tiles, Qwen3-VL's grids, Idefics3's image splitting,
    Gemma 3's softcapped head): tiny random models of tests/tiny_families.py."""
    dpo_pair(dict(max_length=None), model=tiny_family(family), data=image_pairs)


def prompts():
    return datasets.Dataset.from_dict({"prompt": ["the red cube is", "a blue ball sits", "two green cones",
                                                  "the small dog"]})


def reward_length(completions, **kwargs):
    """A tiny deterministic reward: longer completions score higher, with a tie-breaker on the text."""
    return [len(c) / 10 + (sum(map(ord, c)) % 7) / 7 for c in completions]


def grpo_pair(config_options, peft_config=None, abs_tol=None):
    def build(trainer_cls):
        policy, tokenizer = tiny()
        args = trl.GRPOConfig(output_dir=tempfile.mkdtemp(), **COMMON, num_generations=2, max_completion_length=6,
                              **config_options)
        return trainer_cls(model=policy, reward_funcs=reward_length, args=args, train_dataset=prompts(),
                           processing_class=tokenizer, peft_config=peft_config)

    stock_and_prefopt(trl.GRPOTrainer, PrefoptGRPOTrainer, build, abs_tol=abs_tol)


def test_grpo_dapo_with_kl_to_the_adapters_off_reference():
    """Two micro-batches per step: dapo normalises by TRL's num_items_in_batch over the generation batch."""
    grpo_pair(dict(loss_type="dapo", beta=0.1, gradient_accumulation_steps=2), peft_config=peft.LoraConfig(r=4, lora_alpha=8,
                                                                             target_modules=["q_proj", "v_proj"]))


def test_grpo_off_policy_with_entropy_bonus():
    grpo_pair(dict(loss_type="grpo", num_iterations=2, entropy_coef=0.01, temperature=0.9))


@pytest.mark.parametrize("options", [
    dict(loss_type="bnpo"), dict(loss_type="dr_grpo"), dict(loss_type="cispo", epsilon_high=1.5),
    dict(loss_type="sapo"), dict(loss_type="luspo", importance_sampling_level="sequence"), dict(loss_type="vespo"),
], ids=lambda o: o["loss_type"])
def test_grpo_other_loss_types(options):
    """The rest of TRL 1.16's GRPO loss types, two iterations per generation so that the ratio is not 1.

    VESPO's loss is ``sum -phi * A * log p`` over tokens (log p itself, not a ratio): the group's advantages
    sum to zero, so the loss is a difference of terms whose absolute sum is 37-52 here against a loss of
    0.3-1.0 (measured: 36-162 times the loss). fp32 log-probs that differ by an ulp between two exact
    implementations (prefopt's tiled log-sum-exp, TRL's log_softmax; the order depends on the CPU's kernels
    and threads) then move the loss by up to ~1e-4 relative; CI saw 4.5e-5. The bar for its loss is absolute:
    2e-6 of the summands' absolute sum. The weight update, whose gradient phi * A * grad log p has no such
    cancellation, keeps the 1e-5 bar."""
    abs_tol = {"loss": 1e-4} if options["loss_type"] == "vespo" else None
    grpo_pair(dict(num_iterations=2, **options), abs_tol=abs_tol)


def naive_log_softmax(model, batch):
    """Float64 log-probabilities over the vocabulary from the model's full logits, the completion mask."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1].double()
    return torch.log_softmax(logits, -1), batch["completion_mask"][:, 1:].bool()


def naive_sequence_logps(model, batch):
    """Per-row summed completion log-probs from the model's full logits (float64), and token counts."""
    logq, mask = naive_log_softmax(model, batch)
    logp = logq.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return torch.where(mask, logp, 0.0).sum(1), mask.sum(1)


@pytest.mark.parametrize("loss_type", ["cw-dpo", "sft-c", "nsft"])
def test_prefopt_loss_types_through_the_config(loss_type):
    policy, tokenizer = tiny()
    reference = tiny()[0]
    args = PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), **COMMON, loss_type=loss_type, beta=0.2, cw_floor=-5.0,
                            cw_tau=0.7, sftc_lam=0.5, sftc_margin=8.0, kl_coef=0.3)
    trainer = PrefoptDPOTrainer(model=policy, ref_model=reference, args=args, train_dataset=text_pairs(),
                                processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
        lp, n = naive_sequence_logps(policy, batch)
        rf, _ = naive_sequence_logps(reference, batch)
    (lc, lr), (nc, nr), (rc, rr) = lp.chunk(2), n.chunk(2), rf.chunk(2)
    if loss_type == "cw-dpo":
        weight = torch.sigmoid((lr / nr + 5.0) / 0.7)
        expected = -torch.nn.functional.logsigmoid(0.2 * ((lc - rc) - weight * (lr - rr)))
    elif loss_type == "sft-c":
        expected = -lc / nc + 0.5 * torch.relu(8.0 + lr / nr)
    else:  # nsft on the chosen rows: token-mean NLL + kl_coef * token-mean KL(pi || pi_ref)
        with torch.no_grad():
            trained = trainer.model.get_output_embeddings().weight
            trained.add_(0.05 * torch.randn_like(trained))  # so that policy and reference differ
            loss = trainer.compute_loss(trainer.model, batch)
            logq, mask = naive_log_softmax(policy, batch)
            logr, _ = naive_log_softmax(reference, batch)
            lp, n = naive_sequence_logps(policy, batch)
        half = mask.shape[0] // 2
        kl = (logq.exp() * (logq - logr)).sum(-1)[:half][mask[:half]]
        assert float(kl.mean()) > 1e-4
        expected = (-lp[:half].sum() + 0.3 * kl.sum()) / n[:half].sum()
    assert math.isclose(float(loss), float(expected.mean()), rel_tol=1e-5)
    logged = trainer._metrics["train"]
    if loss_type != "nsft":
        assert math.isclose(logged["logps/chosen"][-1], float(lc.mean()), rel_tol=1e-5)
        assert {"entropy", "logits/chosen", "mean_token_accuracy"} <= set(logged)
    assert ("cooling_weight" in logged) == (loss_type == "cw-dpo")
    assert ("kl" in logged) == (loss_type == "nsft")
    with prefopt_only():
        history, _, _ = train(trainer)
    assert len(history) == 3 and all(math.isfinite(entry["loss"]) for entry in history)


@pytest.mark.parametrize("trainer_cls,config,option", [
    (PrefoptDPOTrainer, dict(padding_free=True), "padding_free"),
    (PrefoptGRPOTrainer, dict(use_vllm=True), "use_vllm"),
])
def test_unsupported_options_are_named(trainer_cls, config, option):
    config_cls = trl.DPOConfig if trainer_cls is PrefoptDPOTrainer else trl.GRPOConfig
    args = config_cls(output_dir=tempfile.mkdtemp(), use_cpu=True, bf16=False, report_to=[], **config)
    model, tokenizer = tiny()
    other = dict(ref_model=None) if trainer_cls is PrefoptDPOTrainer else dict(reward_funcs=reward_length)
    with pytest.raises(ValueError, match=option):
        trainer_cls(model=model, args=args, train_dataset=text_pairs(), processing_class=tokenizer, **other)


def test_prefopt_loss_types_run_alone():
    with pytest.raises(ValueError, match="loss_type"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, loss_type=["cw-dpo", "sigmoid"])
    with pytest.raises(ValueError, match="precompute_ref_log_probs"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, loss_type="nsft", precompute_ref_log_probs=True)
    # Options TRL applies in its own losses that prefopt's loss types would silently ignore.
    with pytest.raises(ValueError, match="use_weighting"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, loss_type="cw-dpo", use_weighting=True)
    with pytest.raises(ValueError, match="ld_alpha"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, loss_type="cw-dpo", ld_alpha=0.5)
    with pytest.raises(ValueError, match="loss_weights"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, loss_type="sft-c", loss_weights=[2.0])


def test_zero3_path_gathers_and_recomputes_to_the_same_numbers(monkeypatch):
    """Under ZeRO-3 the head goes through _GatheredHead (gather, op; in backward gather again and recompute).
    Here without DeepSpeed (the gathers are no-ops): values and gradients equal the direct path."""
    model, _ = tiny()
    integration.add_prefopt_lm_head(model, outputs=integration.HEAD_OUTPUTS, temperature=0.7)
    ids = torch.randint(5, 300, (3, 9))
    labels = ids.masked_fill(torch.arange(9) < 3, -100)
    results = []
    for zero3 in (False, True):
        monkeypatch.setattr(integration, "_zero3_enabled", lambda: zero3)
        model.zero_grad()
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.3 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out.log_probs.detach(), out.entropy.detach(), out.mean_logits, out.is_top1,
                        out.log_sum_sq_probs, grads))
    (lp0, h0, m0, t0, s0, g0), (lp1, h1, m1, t1, s1, g1) = results
    assert torch.allclose(lp0, lp1, atol=1e-6) and torch.allclose(h0, h1, atol=1e-6)
    assert torch.allclose(s0, s1, atol=1e-6) and not s1.requires_grad
    assert torch.allclose(m0, m1, atol=1e-6) and torch.equal(t0, t1)
    assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(g0, g1))
    assert any(float(g.abs().sum()) > 0 for g in g1)


@pytest.mark.parametrize("transform", [dict(), dict(final_logit_softcapping=3.0, logit_scale=1.7, temperature=0.7)],
                         ids=["plain", "softcap-scale-temperature"])
def test_head_fields_equal_trls_head(transform):
    """Every per-token field of prefopt's head against TRL's head on the same model and labels, half of
    which are the argmax (so that ``is_top1``, hence ``mean_token_accuracy``, is not trivially 0), with
    TRL's logit transforms; values and the gradients of log_probs and entropy."""
    transform = dict(transform)
    temperature = transform.pop("temperature", 1.0)
    results = []
    for add_head in (trl_utils.add_fused_lm_head, integration.add_prefopt_lm_head):
        model, _ = tiny()
        for key, value in transform.items():
            setattr(model.config, key, value)
        add_head(model, temperature=temperature, outputs=integration.HEAD_OUTPUTS)
        torch.manual_seed(1)
        ids = torch.randint(5, 300, (3, 10))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        labels = ids.clone()
        labels[:, 1::2] = logits.argmax(-1)[:, :-1:2]  # positions 1, 3, ... get the previous position's argmax
        labels[:, :2] = -100
        out = model(input_ids=labels.clamp(min=0), labels=labels, fused_lm_head=True)
        (out.log_probs.sum() + 0.5 * out.entropy.sum()).backward()
        grads = [p.grad.clone() for p in model.parameters()]
        results.append((out, grads))
    (trl_out, trl_grads), (our_out, our_grads) = results
    assert int(trl_out.is_top1.sum()) >= 6 and torch.equal(trl_out.is_top1, our_out.is_top1)
    assert torch.equal(trl_out.label_mask, our_out.label_mask)
    assert not our_out.log_sum_sq_probs.requires_grad
    for field in ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "loss"):
        torch.testing.assert_close(getattr(our_out, field), getattr(trl_out, field), rtol=1e-5, atol=1e-5, msg=field)
    for ours, theirs in zip(our_grads, trl_grads):  # per tensor, relative to its norm
        assert float((ours - theirs).norm()) <= 1e-5 * float(theirs.norm()) + 1e-9


# -- share_prefix: the same runs with one prefix per record / per prompt's group of answers

@contextlib.contextmanager
def counted_packing():
    """Counts the batches the head packed (one row per prefix) and the decoder positions of packed rows."""
    calls = {"packed": 0, "positions": 0}
    pack = integration.pack_padded_batch

    def counted(*args, **kwargs):
        out = pack(*args, **kwargs)
        if out is not None:
            calls["packed"] += 1
            calls["positions"] += out[0]["input_ids"].numel()
        return out

    mp = pytest.MonkeyPatch()
    mp.setattr(integration, "pack_padded_batch", counted)
    try:
        yield calls
    finally:
        mp.undo()


def unshared_and_shared(build):
    """``build(share_prefix)``: the same run unshared and shared; the shared one must have packed its batches
    (policy and reference) and equal the unshared one: the losses, every logged metric, the weight update."""
    with counted_packing() as calls:
        runs = [train(build("off"))]
        assert calls["packed"] == 0
        runs.append(train(build(True)))
    assert calls["packed"] >= 6, f"{calls['packed']} packed batches in 3 steps"
    assert_same_run(*runs)


@pytest.mark.parametrize("model,data", [("tiny-llama", text_pairs), ("tiny-llava", image_pairs)], ids=["text", "llava"])
def test_dpo_share_prefix_equals_unshared(model, data):
    """A record's chosen and rejected rows in one packed row, for the policy and the explicit reference;
    several TRL loss types at once (sums, per-token means; on text WPO's weights, which TRL cannot apply to
    its in-place-expanded sft loss)."""
    text = model == "tiny-llama"
    loss_types = ["sigmoid", "ipo"] + ([] if text else ["sft"])

    def build(share):
        policy, processor = tiny(model)
        args = PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), **COMMON, max_length=None, loss_type=loss_types,
                                loss_weights=[1.0] * len(loss_types), use_weighting=text, share_prefix=share)
        return PrefoptDPOTrainer(model=policy, ref_model=tiny(model)[0], args=args, train_dataset=data(),
                                 processing_class=processor)

    unshared_and_shared(build)


def image_prompts():
    return image_pairs().remove_columns(["chosen", "rejected"])


def reward_text_length(completions, **kwargs):
    """:func:`reward_length` of plain or conversational completions (their assistant message's text)."""
    return reward_length([c if isinstance(c, str) else c[-1]["content"] for c in completions])


@pytest.mark.parametrize("model,data", [("tiny-llama", prompts), ("tiny-llava", image_prompts)], ids=["text", "llava"])
def test_grpo_share_prefix_equals_unshared(model, data):
    """A prompt's group of sampled answers (the same seeded completions in both runs) in one packed row (TRL
    left-pads prompts: positions keep their columns), for the policy, the old policy (2 iterations) and the
    LoRA's adapters-off reference."""
    from prefopt.integrations.trl import PrefoptGRPOConfig

    def build(share):
        policy, processor = tiny(model)
        args = PrefoptGRPOConfig(output_dir=tempfile.mkdtemp(), **COMMON, num_generations=2, max_completion_length=6,
                                 num_iterations=2, beta=0.1, share_prefix=share)
        return PrefoptGRPOTrainer(model=policy, reward_funcs=reward_text_length, args=args, train_dataset=data(),
                                  processing_class=processor,
                                  peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))

    unshared_and_shared(build)


def test_share_prefix_refuses_or_falls_back_in_one_line():
    """``on`` (True) refuses a family it cannot share in one line; ``auto`` trains it unshared."""
    import types

    share = integration._share_prefix
    llava = types.SimpleNamespace(model_type="llava", _attn_implementation="sdpa")
    assert share(llava, True) and share(llava, "auto") and not share(llava, False)
    for family, words in [("gemma3", "'gemma3' cannot share"), ("qwen2_vl", "'qwen2_vl' is not tested with shared "
                                                                            "prefixes in TRL's trainers")]:
        config = types.SimpleNamespace(model_type=family, _attn_implementation="sdpa")
        assert share(config, "auto") is False
        with pytest.raises(ValueError, match=f"^share_prefix='on': model family {words}") as e:
            share(config, "on")
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^share_prefix: expected one of auto, on, off or a bool, got 'yes'$"):
        PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, share_prefix="yes")
    assert PrefoptDPOConfig(output_dir=tempfile.mkdtemp(), use_cpu=True, share_prefix=True).share_prefix == "on"
