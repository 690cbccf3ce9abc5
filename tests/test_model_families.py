"""Every tested Hugging Face family, from a tiny random model and a processor made in the test (no downloads):
one step of training through ``prefopt.train.loop.train``, images that matter, and an export that keeps
every tensor and loads back with its class's ``from_pretrained`` to the same logits.

The folders come from the session fixture ``tiny_family`` (tests/conftest.py), built once each.
"""
import dataclasses
import json
import math
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from tiny_families import FAMILIES, OUTSIDE_FAMILY, TEXT_FAMILIES, VLM_FAMILIES  # noqa: E402

from prefopt.train.data import PreferenceCollator, _load_image, model_inputs  # noqa: E402
from prefopt.train.export import load_trained_model  # noqa: E402
from prefopt.train.loop import TrainConfig, train  # noqa: E402
from prefopt.train.methods import MethodOptions  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from prefopt.train.synthetic import make_synthetic_records  # noqa: E402


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    """A data folder of text-only records (the synthetic set without its images)."""
    folder = tmp_path_factory.mktemp("text-data")
    with open(folder / "train.jsonl", "w", encoding="utf-8") as f:
        for r in make_synthetic_records(split="train", size=4, seed=0):
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected,
                                "corrections": r.corrections}) + "\n")
    return str(folder)


def run(out, model, data, method="dpo", **kw):
    options = kw.pop("options", {})
    base = dict(method=method, model=model, data=data, out=str(out), steps=1, batch_size=2, train_size=2,
                probe_every=0, probe_size=2, eval_size=0, progress=False, max_new_tokens=4, device="cpu",
                warmup_ratio=0.0)
    base.update(kw)
    return train(TrainConfig(options=MethodOptions(**options), **base))


def tensors(folder):
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(folder, name), "pt") as f:
                out.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_family_trains_and_exports(family, tiny_family, text_data, tmp_path):
    """dpo --lora --reference adapters, one step: a fresh reference gives the loss log 2, the LoRA weights
    move, nothing is skipped; OUT/model holds every tensor of the source (vision tower included) and its
    class's from_pretrained gives the logits of the trained model."""
    source = tiny_family(family)
    data = text_data if family in TEXT_FAMILIES else "synthetic"
    summary = run(tmp_path / "run", source, data, lora=True, reference="adapters")
    assert summary["skipped_records"] == 0 and summary["steps"] == 1
    assert math.isclose(summary["loss"], math.log(2), rel_tol=1e-4), summary["loss"]
    exported = summary["model_folder"]
    assert tensors(exported) == tensors(source)

    trained, processor, _ = load_trained_model(summary["checkpoint"])
    moved = [n for n, p in trained.model.named_parameters() if "lora_B" in n and p.abs().max() > 0]
    assert moved, "one step must move the LoRA weights"
    cls = type(trained.hf_model)
    loaded = cls.from_pretrained(exported, dtype=torch.float32)
    records = make_synthetic_records(split="heldout", size=2, seed=1)
    if family in TEXT_FAMILIES:
        records = [dataclasses.replace(r, images=[]) for r in records]
    batch = model_inputs(PreferenceCollator(processor)(records, mode="pair"))
    with torch.no_grad():
        expected = trained.model(**batch).logits
        got = loaded.eval()(**batch).logits
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", VLM_FAMILIES + (OUTSIDE_FAMILY,))
def test_images_matter(family, tiny_family):
    """The vision tower is found, and dealing the images out differently changes the answers' hidden states."""
    adapter, processor = build_model(tiny_family(family))
    assert adapter.vision_tower is not None
    records = make_synthetic_records(split="heldout", size=2, seed=4)
    assert records[0].images != records[1].images
    swapped = [dataclasses.replace(r, images=o.images) for r, o in zip(records, records[::-1])]
    collator = PreferenceCollator(processor)
    batch, other = collator(records, mode="sft"), collator(swapped, mode="sft")
    assert torch.equal(batch["labels"], other["labels"])
    answers = batch["labels"] != -100
    with torch.no_grad():
        change = (adapter.hidden_states(**batch) - adapter.hidden_states(**other))[answers].abs().max()
    assert change > 1e-4, f"{family}: images do not reach the answers ({change})"


@pytest.mark.parametrize("family", ["llava", "qwen2-vl", "mllama"])
@pytest.mark.parametrize("method,kw,expect", [
    ("dpo", {}, {"loss": math.log(2)}),  # a fresh reference (a full copy): DPO starts at log 2
    ("cw-dpo", dict(lora=True, steps=2, options=dict(sftc_fraction=0.5, onpolicy_fraction=0.5)),
     {"loss": math.log(2), "onpolicy/negatives": 1}),  # step 2: stage 2, its reference the stage-1 policy
    ("nsft", {}, {"kl": 0.0}),
    ("grpo", dict(options=dict(num_generations=2)), {}),  # sampling, rewards and the loss on rollouts
], ids=["dpo-full", "cw-dpo", "nsft", "grpo"])
def test_method_matrix(family, method, kw, expect, tiny_family, tmp_path):
    """Every method family on the three image layouts (LLaVA's image tokens, Qwen2-VL's grids, Mllama's
    cross-attention): the run trains, every loss it logs is finite, and its last step logs what the method
    must (a fresh reference's log 2, sampled negatives, no KL to itself)."""
    summary = run(tmp_path / "run", tiny_family(family), "synthetic", method=method, **kw)
    assert summary["skipped_records"] == 0 and summary["steps"] == kw.get("steps", 1)
    with open(summary["metrics"], encoding="utf-8") as f:
        steps = [m for m in map(json.loads, f) if "loss" in m]
    assert len(steps) == summary["steps"] and all(math.isfinite(m["loss"]) for m in steps)
    for key, value in expect.items():
        assert math.isclose(steps[-1][key], value, rel_tol=1e-5, abs_tol=1e-6), (key, steps[-1])


def test_paligemma_answers_are_causal(tiny_family):
    """PaliGemma's prefix (image + prompt) attends both ways, its answer causally: token_type_ids are 1 exactly
    on the answer, the processor's own labels stay out, and changing the last answer token leaves every
    earlier position's hidden state as it was."""
    adapter, processor = build_model(tiny_family("paligemma"))
    records = make_synthetic_records(split="heldout", size=1, seed=2)
    batch = PreferenceCollator(processor)(records, mode="sft")
    answer = batch["token_type_ids"][0] == 1
    assert answer.any() and torch.equal(answer, batch["labels"][0] != -100)
    last = int(batch["attention_mask"][0].sum()) - 1
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    red, blue = processor.tokenizer("red blue", add_special_tokens=False)["input_ids"][:2]
    changed["input_ids"][0, last] = red if changed["input_ids"][0, last] != red else blue
    with torch.no_grad():
        a, b = adapter.hidden_states(**batch), adapter.hidden_states(**changed)
    torch.testing.assert_close(a[0, :last], b[0, :last])
    assert (a[0, last] - b[0, last]).abs().max() > 1e-4


def test_per_token_keys_padded_by_shape(tiny_family):
    """Mllama's per-token cross_attention_mask [R, T, images, tiles] is collated across rows of different
    lengths and image counts, zero where a row has no token or no such image (as the processor pads its own
    batches): a row's answer has the same hidden states in the batch as alone. (Mllama's positions before
    the image token attend to no image and differ in a batch with its own processor's padding too.)"""
    adapter, processor = build_model(tiny_family("mllama"))
    one, two = make_synthetic_records(split="heldout", size=2, seed=5)
    two = dataclasses.replace(two, images=two.images + one.images, chosen=two.chosen + " " + two.chosen)
    collator = PreferenceCollator(processor)
    batch = collator([one, two], mode="sft")
    alone = collator([one], mode="sft")
    mask = batch["cross_attention_mask"]
    assert mask.shape[:3] == (2, batch["input_ids"].shape[1], 2)
    assert not mask[0, :, 1].any() and not mask[0][batch["attention_mask"][0] == 0].any()
    with torch.no_grad():
        together, single = adapter.hidden_states(**batch), adapter.hidden_states(**alone)
    answer = alone["labels"][0] != -100
    L = alone["input_ids"].shape[1]
    torch.testing.assert_close(together[0, :L][answer], single[0][answer], rtol=1e-4, atol=1e-5)
    texts = [collator.render(r.prompt, r.chosen, len(r.images))[1] for r in (one, two)]
    own = processor(text=texts, images=[[_load_image(i) for i in r.images] for r in (one, two)], padding=True,
                    return_tensors="pt", add_special_tokens=False)
    tokens = batch["attention_mask"].bool()  # the processor's padded positions hold what it likes
    assert torch.equal(own["input_ids"], batch["input_ids"])
    assert torch.equal(own["cross_attention_mask"][tokens], mask[tokens])


def test_folder_of_an_earlier_prefopt_loads(tiny_family, tmp_path):
    """Model folders that prefopt wrote before (processor_class "ImageOnlyQwen2VLProcessor", a name transformers
    does not have) load through the model type's processor class; folders written now name the real class."""
    import shutil

    folder = tmp_path / "old"
    shutil.copytree(tiny_family("qwen2-vl"), folder)
    for name in ("processor_config.json", "tokenizer_config.json"):
        with open(folder / name, encoding="utf-8") as f:
            config = json.load(f)
        assert config["processor_class"] == "Qwen2VLProcessor"
        config["processor_class"] = "ImageOnlyQwen2VLProcessor"
        with open(folder / name, "w", encoding="utf-8") as f:
            json.dump(config, f)
    _, processor = build_model(str(folder))
    assert type(processor).__name__ == "Qwen2VLProcessor" and processor.image_processor is not None
