"""``python -m bench --preset vlm-step``: whole optimizer steps of a LLaVA-like and a Qwen2-VL-like VLM,
unshared rows against one prefix per record (prefopt.train.prefixes), DPO and GRPO, and stock TRL.

The models are built from configs (no download): LLaVA-1.5's geometry (CLIP at 336 px, patch 14: 576 image
tokens) with a 1-layer vision tower of width 256, and Qwen2-VL's (patch 14, 2x2 merge, a 1120 x 896 image:
1,280 image tokens) with a 1-layer vision tower of width 128; each with a 4-layer decoder of width 512 and a
32,000-token vocabulary; a frozen copy is the reference. Each record: one image, a 32-token prompt, 64-token chosen
and rejected answers. Variants, per model:

- ``unshared`` / ``shared``: a DPO step as ``prefopt train`` runs it per optimizer step: the reference forward
  (no grad), the policy forward and backward, the fused DPO loss on the head, AdamW;
- ``grpo-unshared`` / ``grpo-shared``: a GRPO step (k3 KL to the reference, beta 0.04) on 4 fixed answers per
  record (its chosen and rejected and two more of 64 tokens) with fixed advantages; no sampling;
- ``trl``: stock TRL ``DPOTrainer.training_step`` (its own collator, every image repeated for the chosen and
  the rejected row, its own fused head and loss) on its own copy of the same weights, then AdamW;
  ``trl-prefopt-shared`` (LLaVA-like only): the same through ``PrefoptDPOTrainer(share_prefix="on")``.

Every batch is collated once before the steps (the collation is not timed). All variants run in one fresh
process per model, one warm-up step each, then their timed steps interleaved (the order alternating), so
that a change of the machine's load hits all alike; per variant the median step time and the largest peak
resident set of a step above the resident set just before it (bench/worker.py's CpuMemory: VmHWM reset
through /proc/self/clear_refs). Each variant's loss on the first weights is printed as a check. Then the
FLOP and activation model of the same comparison at 7B shapes (bench/vlm_model.py).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

IMAGE_SIZE, PATCH = 336, 14  # LLaVA-1.5: (336 / 14)^2 = 576 image tokens
QWEN_IMAGE = (1120, 896)  # Qwen2-VL: (80 x 64 patches of 14) / (2 x 2 merge) = 1,280 image tokens
IMAGE_TOKENS = {"llava": 576, "qwen2-vl": 1280}
PROMPT_TOKENS, ANSWER_TOKENS = 32, 64
GRPO_ANSWERS = 4
#: Families whose TRL batches prefopt's head shares (prefopt.integrations.trl.TRL_SHARED_FAMILIES).
TRL_SHARED = ("llava",)


def make_processor(family: str):
    """The processor of ``family`` ("llava": LLaVA-1.5's geometry, 336 px, patch 14, 576 image tokens;
    "qwen2-vl": Qwen2-VL's, patch 14, 2x2 merge, a 1120 x 896 image: 1,280 image tokens) on prefopt's tiny
    tokenizer."""
    from prefopt.train.models import (IMAGE_PAD, LLAVA_IMAGE, VISION_END, VISION_START, _chat_template,
                                      image_only_processor_class, tiny_tokenizer)

    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        return LlavaProcessor(
            image_processor=CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIZE},
                                                  crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE}),
            tokenizer=tiny_tokenizer(LLAVA_IMAGE), patch_size=PATCH, vision_feature_select_strategy="default",
            num_additional_image_tokens=1, chat_template=_chat_template(LLAVA_IMAGE), image_token=LLAVA_IMAGE)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    image_text = VISION_START + IMAGE_PAD + VISION_END
    pixels = QWEN_IMAGE[0] * QWEN_IMAGE[1]
    return image_only_processor_class("Qwen2VLProcessor")(
        image_processor=Qwen2VLImageProcessorPil(min_pixels=pixels, max_pixels=pixels, patch_size=PATCH,
                                                 temporal_patch_size=2, merge_size=2),
        tokenizer=tiny_tokenizer(image_text), chat_template=_chat_template(image_text))


def build(family: str, seed: int):
    """(ModelAdapter, processor) of the ``family``-like model: its vision geometry with 1 vision layer of
    reduced width, a 4-layer decoder of width 512, a 32,000-token untied head; weights from ``seed``."""
    import torch
    import transformers

    from prefopt.train.models import IMAGE_PAD, LLAVA_IMAGE, VIDEO_PAD, VISION_END, VISION_START, ModelAdapter

    processor = make_processor(family)
    tok = processor.tokenizer
    text = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
        num_key_value_heads=8, max_position_embeddings=4096, tie_word_embeddings=False,
        pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if family == "llava":
        cls = transformers.LlavaForConditionalGeneration
        config = transformers.LlavaConfig(
            vision_config=transformers.CLIPVisionConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=1,
                                                        num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH,
                                                        projection_dim=256),
            text_config=text, image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
            image_seq_length=(IMAGE_SIZE // PATCH) ** 2, vision_feature_select_strategy="default",
            vision_feature_layer=-1, tie_word_embeddings=False)
    else:
        cls = transformers.Qwen2VLForConditionalGeneration
        text = text.to_dict()
        text.pop("model_type", None)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [8, 12, 12]}
        ids = {name: tok.convert_tokens_to_ids(t) for name, t in (
            ("image_token_id", IMAGE_PAD), ("video_token_id", VIDEO_PAD), ("vision_start_token_id", VISION_START),
            ("vision_end_token_id", VISION_END))}
        config = transformers.Qwen2VLConfig(
            text_config=text, vision_config=dict(depth=1, embed_dim=128, hidden_size=512, num_heads=4, mlp_ratio=2,
                                                 patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2),
            tie_word_embeddings=False, **ids)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    return ModelAdapter(model), processor


def text_of(tok, n: int, seed: int) -> str:
    """A text of exactly ``n`` tokens of the tiny vocabulary (words drawn from ``seed``)."""
    import random

    words = ["red", "blue", "green", "circle", "square", "left", "right", "top", "the", "is", "a", "of"]
    rng = random.Random(seed)
    text = ""
    while len(tok(text + " " + words[0], add_special_tokens=False)["input_ids"]) <= n:
        text += " " + rng.choice(words)
    ids = tok(text, add_special_tokens=False)["input_ids"][:n]
    return tok.decode(ids)


def records(processor, n: int, family: str):
    from PIL import Image

    from prefopt.train.data import PreferenceRecord

    tok = processor.tokenizer
    image = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE) if family == "llava" else QWEN_IMAGE, (120, 30, 200))
    return [PreferenceRecord(prompt=text_of(tok, PROMPT_TOKENS, 3 * i), chosen=text_of(tok, ANSWER_TOKENS, 3 * i + 1),
                             rejected=text_of(tok, ANSWER_TOKENS, 3 * i + 2), images=[image]) for i in range(n)]


def trl_dpo(family: str, processor, data, share_prefix=None):
    """(trainer, its first batch from its own collator) of stock TRL ``DPOTrainer`` (``share_prefix`` None), or
    of ``PrefoptDPOTrainer`` with that ``share_prefix``, on a fresh copy of the policy (weights seed 0) and of
    the reference (seed 1): TRL wraps each model's forward with its head. The records in TRL's
    conversational vision format (one image, the prompt after it); TRL's collator repeats every image for the
    chosen and the rejected row."""
    import tempfile

    import datasets
    from trl import DPOConfig, DPOTrainer

    from prefopt.integrations.trl import PrefoptDPOConfig, PrefoptDPOTrainer

    def message(role, *content):
        return [{"role": role, "content": list(content)}]

    text = lambda t: {"type": "text", "text": t}  # noqa: E731
    rows = datasets.Dataset.from_dict({
        "images": [list(r.images) for r in data],
        "prompt": [message("user", {"type": "image"}, text(r.prompt)) for r in data],
        "chosen": [message("assistant", text(r.chosen)) for r in data],
        "rejected": [message("assistant", text(r.rejected)) for r in data]})
    common = dict(output_dir=tempfile.mkdtemp(prefix="vlm-step-trl-"), per_device_train_batch_size=len(data),
                  max_length=None, use_cpu=True, bf16=False, report_to=[], save_strategy="no", seed=0,
                  disable_tqdm=True, beta=0.1)
    if share_prefix is None:
        cls, args = DPOTrainer, DPOConfig(**common)
    else:
        cls, args = PrefoptDPOTrainer, PrefoptDPOConfig(**common, share_prefix=share_prefix)
    trainer = cls(model=build(family, 0)[0].hf_model, ref_model=build(family, 1)[0].hf_model, args=args,
                  train_dataset=rows, processing_class=processor)
    trainer.current_gradient_accumulation_steps = 1  # what Trainer's loop sets, without accumulation
    return trainer, next(iter(trainer.get_train_dataloader()))


def trl_decoder_tokens(batch, share_prefix, config) -> int:
    """The positions the decoder runs on a TRL batch: its padded rows, or packed (prefopt's head with
    ``share_prefix``) one row per prefix."""
    if share_prefix is None:
        return batch["input_ids"].numel()
    from prefopt.train.prefixes import pack_padded_batch

    labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
    inputs = {k: v for k, v in batch.items() if k != "completion_mask"}
    return pack_padded_batch(inputs, labels, image_token_ids=[config.image_token_id])[0]["input_ids"].numel()


def grpo_rows(processor, data):
    """GRPO's group of 4 fixed answers per record (its chosen and rejected, two more of the same length), each
    row a copy of its record as the loop's rollouts make them; and the group-normalised advantages of fixed
    rewards."""
    import dataclasses

    import torch

    from prefopt.train.methods import group_advantages

    tok = processor.tokenizer
    rows = [dataclasses.replace(r, chosen=answer, rejected=None) for i, r in enumerate(data) for answer in (
        r.chosen, r.rejected, text_of(tok, ANSWER_TOKENS, 1000 + 2 * i), text_of(tok, ANSWER_TOKENS, 1001 + 2 * i))]
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.25] * len(data))
    return rows, group_advantages(rewards, GRPO_ANSWERS)


def measure(family: str, batch_records: int, steps: int) -> dict:
    """Every variant's step times and per-step peak memory, in this process, their steps interleaved."""
    import torch

    from prefopt.train.data import PreferenceCollator
    from prefopt.train.step import count_items
    from prefopt.train.methods import MethodOptions, PolicyObjective, build_method
    from prefopt.train.prefixes import SharedPrefixCollator, decoder_tokens, logical_tokens
    from prefopt.train.reference import ModelReference

    from .worker import CpuMemory

    torch.manual_seed(0)
    policy, processor = build(family, 0)
    copy, _ = build(family, 1)
    data = records(processor, batch_records, family)
    objective = PolicyObjective(policy, ModelReference(copy))
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-5)
    collators = {"unshared": PreferenceCollator(processor, max_length=4096),
                 "shared": SharedPrefixCollator(processor, max_length=4096)}
    dpo = build_method("dpo", MethodOptions(), total_steps=10 * steps).stage_at(0)
    grpo = build_method("grpo", MethodOptions(num_generations=GRPO_ANSWERS, grpo_beta=0.04),
                        total_steps=10 * steps).stage_at(0)
    rows, advantages = grpo_rows(processor, data)
    batches, stages = {}, {}
    for variant, collator in collators.items():
        batches[variant], stages[variant] = collator(data, mode="pair"), dpo
        batches[f"grpo-{variant}"], stages[f"grpo-{variant}"] = collator(rows, mode="sft"), grpo
        batches[f"grpo-{variant}"]["advantages"] = advantages

    def prefopt_loss(variant) -> torch.Tensor:
        batch, stage = batches[variant], stages[variant]
        return objective(batch, stage=stage, num_items=count_items(stage.loss, batch["labels"])).loss

    def prefopt_step(variant):
        def step() -> float:
            loss = prefopt_loss(variant)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    def trl_step(trainer, batch):
        trl_optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad], lr=1e-5)

        def step() -> float:
            loss = trainer.training_step(trainer.model, batch)
            trl_optimizer.step()
            trl_optimizer.zero_grad(set_to_none=True)
            return float(loss.detach())
        return step

    variants = {v: prefopt_step(v) for v in batches}
    with torch.no_grad():  # the same weights: every variant's loss
        losses = {v: float(prefopt_loss(v)) for v in batches}
    tokens = {v: (decoder_tokens(b), logical_tokens(b)) for v, b in batches.items()}
    for name, share in [("trl", None)] + ([("trl-prefopt-shared", "on")] if family in TRL_SHARED else []):
        trainer, batch = trl_dpo(family, processor, data, share)
        variants[name] = trl_step(trainer, batch)
        losses[name] = variants[name]()  # its own copy's first step: on the same weights; also its warm-up
        tokens[name] = (trl_decoder_tokens(batch, share, trainer.model.config), int(batch["attention_mask"].sum()))
    memory = CpuMemory()
    for variant in batches:  # warm-up (AdamW's state is allocated here)
        variants[variant]()
    times = {v: [] for v in variants}
    peaks = {v: [] for v in variants}
    order = list(variants)
    for k in range(steps):
        for variant in (order if k % 2 == 0 else order[::-1]):
            baseline = memory.current()
            memory.reset_peak()
            start = time.perf_counter()
            variants[variant]()
            times[variant].append(time.perf_counter() - start)
            peaks[variant].append((memory.peak() - baseline) / 2**20)
    return {"family": family, "image_tokens": IMAGE_TOKENS[family], "records": batch_records,
            "memory_method": memory.method, "variants": [
        {"variant": v, "steps_s": times[v], "median_s": statistics.median(times[v]), "peak_extra_mib": max(peaks[v]),
         "loss": losses[v], "decoder_tokens": tokens[v][0], "logical_tokens": tokens[v][1]}
        for v in variants]}


def run(out: str, batch_records: int = 2, steps: int = 3) -> int:
    """Each model family in a fresh process; the tables (measured steps, then the 7B FLOP model) to stdout,
    the figures to ``OUT/results.json``."""
    import torch

    from .vlm_model import table

    os.makedirs(out, exist_ok=True)
    results = []
    for family in IMAGE_TOKENS:
        print(f"vlm-step: {family} ...", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, "-m", "bench.vlm_step", family, str(batch_records), str(steps)],
                              capture_output=True, text=True, timeout=900)
        if proc.returncode != 0:
            print(f"vlm-step: {family} failed: {(proc.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            return 2
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    load = os.getloadavg()
    lines = [f"vlm-step: {PROMPT_TOKENS}-token prompt, {ANSWER_TOKENS}-token answers, {batch_records} records per step "
             f"(GRPO: {GRPO_ANSWERS} fixed answers each), {steps} timed steps per variant (interleaved) after 1 "
             f"warm-up, fp32 CPU, torch threads {torch.get_num_threads()}, load average at the end "
             f"{load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", "",
             "| model | image tokens | variant | median step (s) | vs unshared | peak extra memory in a step (MiB) | "
             "decoder tokens | logical tokens | loss (first weights) |", "|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        medians = {r["variant"]: r["median_s"] for r in result["variants"]}
        for r in result["variants"]:
            base = medians["grpo-unshared" if r["variant"].startswith("grpo") else "unshared"]
            lines.append(f"| {result['family']}-like | {result['image_tokens']} | {r['variant']} | {r['median_s']:.2f} | "
                         f"{r['median_s'] / base:.2f}x | {r['peak_extra_mib']:.0f} | {r['decoder_tokens']} | "
                         f"{r['logical_tokens']} | {r['loss']:.6f} |")
    model = table(PROMPT_TOKENS, ANSWER_TOKENS)
    print("\n".join(lines) + "\n\n" + model)
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results, "loadavg": load, "torch_threads": torch.get_num_threads(), "flop_model": model},
                  f, indent=1)
    return 0


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))))
