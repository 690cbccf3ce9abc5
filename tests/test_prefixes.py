"""One prefix per record (prefopt.train.prefixes): the packed rows give the unshared rows' losses, metrics and
gradients.

Tolerances: in fp32 the shared and unshared forwards differ only in the order of additions: each attention
row's softmax and value sums run over a longer key axis (the other answer's keys and the padding enter as
exact zeros, but the blocked reductions group the terms differently), and the per-row log-prob sums add the
same per-token terms in another grouping. Each is a few ulps (2^-23 ~ 1.2e-7) per layer. Measured on the
2-layer tiny models: at most 5.4e-7 relative on the losses, 1.6e-6 of a gradient tensor's largest entry.
Checked: losses at 1e-5 relative (the issue's bound; GRPO's, a sum of terms that cancel, relative to the
size of its terms), metrics at 1e-5 relative to max(1, |value|), each
gradient tensor at 2e-5 of its largest entry plus 1e-6 of the largest gradient entry of the model: a
parameter whose true gradient is zero (the vision tower's key biases: a softmax ignores a shift of all its
logits) holds rounding noise only, measured at most 3.5e-7 of the largest gradient entry.
"""
import dataclasses
import json
import os
import types

import pytest
import torch

from prefopt.train import reference as ref_mod
from prefopt.train.data import PreferenceCollator, PreferenceRecord, load_records
from prefopt.train.loop import TrainConfig, train
from prefopt.train.methods import MethodOptions, PolicyObjective, build_method
from prefopt.train.models import build_model
from prefopt.train.prefixes import SharedPrefixCollator, block_mask, make_collator, share_refusal
from prefopt.train.step import count_items
from prefopt.train.summary import METRICS_FILE
from tiny_families import FAMILIES, TEXT_FAMILIES

#: (method, options) of every objective that trains on packed rows.
OBJECTIVES = [("dpo", {"loss_type": t}) for t in ("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo")] + [
    ("cw-dpo", {"sftc_fraction": 0.0}), ("sft-c", {}), ("simpo", {}), ("orpo", {}), ("nsft", {})]


def records(with_images: bool):
    """Four records with answers of different lengths (padding in packed and logical rows), two with two
    images, corrections for nSFT."""
    base = load_records("synthetic", split="train", size=5, seed=0)
    out = []
    for k, r in enumerate(base[:4]):
        images = ([r.images[0], base[k + 1].images[0]] if k % 2 else [r.images[0]]) if with_images else []
        prompt = r.prompt if len(images) < 2 else "Compare both pictures. " + r.prompt
        out.append(PreferenceRecord(prompt=prompt, chosen=r.chosen + " Yes." * k, rejected=r.rejected,
                                    images=images, corrections=[r.chosen, "No: " + r.chosen][: 1 + k % 2]))
    return out


def run(objective, batch, method, options):
    stage = build_method(method, MethodOptions(**options), total_steps=2).stage_at(0)
    objective.model.zero_grad(set_to_none=True)
    out = objective(batch, stage=stage, num_items=count_items(stage.loss, batch["labels"]))
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in objective.model.named_parameters() if p.grad is not None}
    return out, grads


def assert_same(shared, unshared, what, terms=0.0):
    """``terms``: the size of the terms a loss that cancels adds up (GRPO's advantages sum to 0 per group)."""
    (out_s, grads_s), (out_u, grads_u) = shared, unshared
    loss_s, loss_u = float(out_s.loss.detach()), float(out_u.loss.detach())
    assert abs(loss_s - loss_u) <= 1e-5 * max(abs(loss_u), terms), f"{what}: loss {loss_s} vs {loss_u}"
    assert sorted(out_s.metrics) == sorted(out_u.metrics), what
    for k, v in out_u.metrics.items():
        assert abs(float(out_s.metrics[k]) - float(v)) <= 1e-5 * max(1.0, abs(float(v))), f"{what}: {k}"
    assert sorted(grads_s) == sorted(grads_u) and any(float(g.abs().max()) > 0 for g in grads_u.values()), what
    largest = max(float(g.abs().max()) for g in grads_u.values())
    for name, g in grads_u.items():
        atol = 2e-5 * float(g.abs().max()) + 1e-6 * largest
        torch.testing.assert_close(grads_s[name], g, rtol=0, atol=atol, msg=f"{what}: {name}")


def compare(policy, reference, processor, data, cases, max_length=512):
    objective = PolicyObjective(policy, reference)
    shared_collator = SharedPrefixCollator(processor, max_length=max_length)
    plain = PreferenceCollator(processor, max_length=max_length)
    for method, options in cases:
        mode = "nsft" if method == "nsft" else "pair"
        shared, unshared = shared_collator(data, mode=mode), plain(data, mode=mode)
        assert shared["input_ids"].shape[0] == len(data) and unshared["input_ids"].shape[0] == len(shared["labels"])
        assert int(shared["logical_tokens"]) == int(unshared["attention_mask"].sum())
        assert_same(run(objective, shared, method, options), run(objective, unshared, method, options),
                    f"{method} {options}")


def load(name, tiny_family):
    """(policy, frozen reference copy of other weights, processor) of a built-in tiny model or a tiny family."""
    source = name if name.startswith("tiny-") else str(tiny_family(name))
    policy, processor = build_model(source, dtype="fp32", device="cpu", seed=0)
    copy, _ = build_model(source, dtype="fp32", device="cpu", seed=1)
    if not name.startswith("tiny-"):  # a folder's weights are its own: move the copy away from them
        with torch.no_grad():
            for p in copy.model.parameters():
                p.add_(torch.randn_like(p), alpha=0.02)
    return policy, ref_mod.ModelReference(copy), processor


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-llava"])
def family(request, tiny_family):
    return (request.param, *load(request.param, tiny_family))


def test_block_mask_keeps_answers_apart():
    segment = torch.tensor([[0, 0, 1, 1, 2, -1]])
    expected = torch.tensor([
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # answer 2 sees the prefix, not answer 1
        [0, 0, 0, 0, 0, 1],  # padding sees itself only (no empty softmax row)
    ], dtype=torch.bool)
    assert torch.equal(block_mask(segment)[0, 0], expected)


def test_every_objective_equals_unshared(family):
    name, policy, reference, processor = family
    compare(policy, reference, processor, records(with_images=name == "tiny-llava"), OBJECTIVES)


def test_messages_prompts_keep_their_turns_and_image_places(family):
    """TRL's conversational prompts (a system turn, two user turns, the image between two texts) are rendered
    from their messages in the packed rows as in the unshared ones; two records with the same text but other
    turns never share a row."""
    name, policy, reference, processor = family
    if name != "tiny-llava":
        pytest.skip("the image placement needs the image family")
    data = []
    for k, r in enumerate(records(with_images=True)[:2]):
        text = lambda t: {"type": "text", "text": t}  # noqa: E731
        system = [{"role": "system", "content": [text(f"Answer briefly{'.' * k}")]}]
        turns = [{"role": "user", "content": [text("Look at this."), {"type": "image"}, text(r.prompt)]}]
        data.append(dataclasses.replace(r, images=r.images[:1], messages=system + turns, corrections=[]))
    data.append(dataclasses.replace(data[1], messages=data[1].messages[1:]))  # same prompt text, no system turn
    shared = SharedPrefixCollator(processor, max_length=512)(data, mode="pair")
    assert shared["input_ids"].shape[0] == 3
    compare(policy, reference, processor, data, [("dpo", {"loss_type": "sigmoid"})])


@pytest.mark.parametrize("name", ["tiny-qwen2-vl", "qwen2.5-vl"])
def test_mrope_answers_continue_from_the_prefix(name, tiny_family):
    """Qwen2-VL / Qwen2.5-VL: 3-D positions over the image, each answer's continuing from the prefix's end."""
    policy, reference, processor = load(name, tiny_family)
    shared = SharedPrefixCollator(processor, max_length=512)(records(with_images=True), mode="pair")
    assert "image_grid_thw" in shared and "mm_token_type_ids" in shared
    compare(policy, reference, processor, records(with_images=True), [("dpo", {}), ("nsft", {})])


SHARED_TINY_FAMILIES = [f for f in FAMILIES if f not in ("qwen2.5-vl", "gemma3", "paligemma")]


@pytest.mark.parametrize("name", SHARED_TINY_FAMILIES)
def test_family_equals_unshared(name, tiny_family):
    """Every family ``auto`` shares (LLaVA-1.5's folder included): DPO on packed rows equals the unshared rows."""
    policy, reference, processor = load(name, tiny_family)
    assert share_refusal(policy.config) is None
    compare(policy, reference, processor, records(with_images=name not in TEXT_FAMILIES), [("dpo", {})])


@pytest.mark.parametrize("name", ["gemma3", "paligemma"])
def test_families_with_masks_of_their_own_are_not_shared(name, tiny_family):
    """Gemma 3 (bidirectional attention inside images) and PaliGemma (prefix-LM) would give other numbers
    with the block mask: ``auto`` trains them unshared."""
    policy, _, processor = load(name, tiny_family)
    assert f"'{name}'" in share_refusal(policy.config)
    collator = make_collator(processor, policy.config, "auto", method="dpo", max_length=512)
    assert type(collator) is PreferenceCollator


@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_grpo_group_after_one_prompt_equals_unshared(family, loss_type):
    """GRPO's rows (each a copy of its record with one sampled answer, as the loop's rollouts make them)
    share one packed row per prompt; with the k3 KL to the reference."""
    from prefopt.train.methods import group_advantages

    name, policy, reference, processor = family
    answers = ["Red.", "It is blue, I think.", "Green"]
    rows = [dataclasses.replace(r, chosen=a, rejected=None) for r in records(name == "tiny-llava")[:2] for a in answers]
    batches = [c(rows, mode="sft") for c in (SharedPrefixCollator(processor), PreferenceCollator(processor))]
    assert batches[0]["input_ids"].shape[0] == 2 and batches[1]["input_ids"].shape[0] == 6
    stage = build_method("grpo", MethodOptions(grpo_beta=0.04, grpo_loss_type=loss_type, num_generations=3),
                         total_steps=2).stage_at(0)
    objective = PolicyObjective(policy, reference)
    results = []
    advantages = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0]), 3)
    for batch in batches:
        batch["advantages"] = advantages
        policy.model.zero_grad(set_to_none=True)
        out = objective(batch, stage=stage, num_items=count_items(stage.loss, batch["labels"]))
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}))
    assert "kl" in results[0][0].metrics
    # With rho = 1 the loss is -mean(A) + beta * k3: terms of size |A| ~ 1 that cancel to ~1e-3.
    assert_same(*results, f"grpo {loss_type}", terms=float(advantages.abs().mean()))


def test_max_length_cuts_each_logical_row(family):
    name, policy, reference, processor = family
    data = records(with_images=name == "tiny-llava")
    plain = PreferenceCollator(processor, max_length=512)(data, mode="pair")
    prompts = (plain["labels"] == -100).int().argmin(-1)  # each row's first answer position
    cut = int(prompts.max()) + 2  # leaves every prompt whole and two answer tokens of its longest
    assert int(plain["attention_mask"].sum(-1).max()) > cut  # answers are cut
    shared = SharedPrefixCollator(processor, max_length=cut)(data, mode="pair")
    assert shared["input_ids"].shape[1] > cut  # a packed row holds more than one logical row
    compare(policy, reference, processor, data, [("dpo", {})], max_length=cut)


def test_lora_adapters_off_reference_and_gradient_checkpointing():
    policy, processor = build_model("tiny-llava", dtype="fp32", device="cpu", seed=0, lora=True,
                                    gradient_checkpointing=True)
    policy.model.train()
    with torch.no_grad():  # adapters that change the function, so the reference differs from the policy
        for n, p in policy.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    compare(policy, ref_mod.AdapterReference(policy), processor, records(with_images=True), [("dpo", {})])


def test_share_prefix_choices_refuse_in_one_line():
    _, processor = build_model("tiny-llama", dtype="fp32", device="cpu", seed=0)
    llama = types.SimpleNamespace(model_type="llama", _attn_implementation="sdpa")
    assert type(make_collator(processor, llama, "auto", method="dpo", max_length=64)) is SharedPrefixCollator
    assert type(make_collator(processor, llama, "off", method="dpo", max_length=64)) is PreferenceCollator
    assert type(make_collator(processor, llama, "on", method="grpo", max_length=64)) is SharedPrefixCollator
    qwen = types.SimpleNamespace(model_type="qwen2_5_vl", _attn_implementation="sdpa")
    assert type(make_collator(processor, qwen, "auto", method="nsft", max_length=64)) is SharedPrefixCollator
    for config, method, words in [
        (types.SimpleNamespace(model_type="gemma3", _attn_implementation="sdpa"), "dpo", "'gemma3'"),
        (types.SimpleNamespace(model_type="paligemma", _attn_implementation="sdpa"), "dpo", "'paligemma'"),
        (types.SimpleNamespace(model_type="fuyu", _attn_implementation="sdpa"), "dpo", "'fuyu' is not tested"),
        (types.SimpleNamespace(model_type="llama", _attn_implementation="eager"), "dpo", "SDPA"),
        (llama, "sft", "one answer"),
    ]:
        assert type(make_collator(processor, config, "auto", method=method, max_length=64)) is PreferenceCollator
        with pytest.raises(ValueError, match=f"^--share-prefix on: .*{words}") as e:
            make_collator(processor, config, "on", method=method, max_length=64)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^--share-prefix: expected one of auto, on, off, got 'yes'$"):
        make_collator(processor, llama, "yes", method="dpo", max_length=64)


def test_training_step_metrics_equal_unshared(tmp_path):
    """One step of ``prefopt train`` (precomputed reference, probes) with and without shared prefixes."""
    runs = {}
    for share in ("on", "off"):
        out = tmp_path / share
        train(TrainConfig(method="dpo", model="tiny-llava", data="synthetic", train_size=4, out=str(out), steps=1,
                          batch_size=2, probe_every=1, probe_size=2, eval_size=0, progress=False, device="cpu",
                          reference="precompute", share_prefix=share))
        with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as f:
            runs[share] = [json.loads(line) for line in f]
    for shared, unshared in zip(runs["on"], runs["off"]):
        assert sorted(shared) == sorted(unshared)
        for k, v in unshared.items():
            if k in ("tokens_per_second", "step_seconds", "peak_memory_mb", "decoder_tokens"):
                continue
            if isinstance(v, float):
                assert abs(shared[k] - v) <= 1e-5 * max(1.0, abs(v)), k
            else:
                assert shared[k] == v, k
    step_on, step_off = runs["on"][-1], runs["off"][-1]
    assert step_on["step_seconds"] > 0 and step_off["step_seconds"] > 0
    assert 0 < step_on["decoder_tokens"] < step_off["decoder_tokens"]


def test_held_out_pair_scoring_equals_unshared():
    from prefopt.train.eval import EVAL_KEYS, evaluate

    policy, processor = build_model("tiny-llava", dtype="fp32", device="cpu", seed=0)
    start, _ = build_model("tiny-llava", dtype="fp32", device="cpu", seed=1)
    data = load_records("synthetic", split="heldout", size=4, seed=0)
    results = {share: evaluate(policy, processor=processor, reference=start, records=data, batch_size=4,
                               max_new_tokens=2, share_prefix=share) for share in ("on", "off")}
    for k in EVAL_KEYS:
        on, off = results["on"][k], results["off"][k]
        assert (on is None and off is None) or abs(on - off) <= 1e-5 * max(1.0, abs(off)), k


def test_padded_batch_packs_rows_with_the_same_prompt_and_images():
    """TRL's padded layout (left-padded prompts, -100 outside the answers): rows with the same prompt tokens,
    first column and image share a packed row; ``index`` finds every logical position that predicts a label."""
    from prefopt.train.prefixes import pack_padded_batch

    IMG = 9
    ids = torch.tensor([[0, 5, IMG, 6, 7, 8, 0], [0, 5, IMG, 6, 3, 0, 0], [5, IMG, 4, 4, 2, 2, 2], [0, 5, IMG, 6, 1, 1, 0]])
    attention = (torch.arange(7) >= torch.tensor([1, 1, 0, 1])[:, None]) & (ids != 0)
    answer_from = torch.tensor([4, 4, 3, 4])
    labels = ids.masked_fill((torch.arange(7) < answer_from[:, None]) | ~attention, -100)
    pixels = torch.tensor([[1.0], [1.0], [1.0], [2.0]])  # row 3: the same prompt as rows 0 and 1, another image
    packed, index = pack_padded_batch({"input_ids": ids, "attention_mask": attention.long(), "pixel_values": pixels},
                                      labels, image_token_ids=[IMG])
    assert packed["input_ids"].shape[0] == 3 and torch.equal(packed["pixel_values"], pixels[[0, 2, 3]])
    assert packed["input_ids"][0].tolist()[:6] == [5, IMG, 6, 7, 8, 3]  # prefix once, then both answers
    assert packed["attention_mask"].dtype == torch.bool and packed["prefix_lengths"].tolist() == [3, 3, 3]
    assert packed["position_ids"][0].tolist()[:6] == [1, 2, 3, 4, 5, 4]  # each token's column in its own row
    flat = torch.cat([packed["input_ids"].flatten(), torch.tensor([-1])])
    predicts = labels[:, 1:] != -100  # position t predicts labels[t + 1]: the same token sits there, packed
    assert torch.equal(flat[index][:, :-1][predicts], ids[:, :-1][predicts])
    several = torch.tensor([[5, IMG, IMG, 6, 7], [5, IMG, IMG, 6, 8]])  # pixel rows per row: not one image each
    batch = {"input_ids": several, "attention_mask": torch.ones_like(several), "pixel_values": torch.ones(4, 1)}
    assert pack_padded_batch(batch, several.masked_fill(torch.arange(5) < 4, -100), image_token_ids=[IMG]) is None
