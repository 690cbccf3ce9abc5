"""Models and data for comparing ``prefopt plan --device cpu --dtype fp32`` with ``prefopt train``'s measured peak:
a Llama text model of about 50M parameters and a LLaVA with LLaVA-1.5's image geometry (336 px, patch 14: 576
image tokens) on a small decoder, each with a JSONL set whose answers fill every row to --max-length. The weights
are saved in bf16, so that an fp32 run holds a copy of every one, as a GPU run does: weights loaded in the file's
own dtype on a CPU stay pages of the memory-mapped file, resident only where read (a frozen embedding's unused
rows never are), which no plan of a GPU run should model."""
import json
import os

import torch
import transformers
from PIL import Image

from tiny_families import save_model, text_config, tokenizer

WORDS = "the red square sits left of two small blue circles near a green line".split()


def save_text_model(folder):
    """A Llama of 58M parameters (32,000-token vocabulary, untied head, 8 layers of width 512)."""
    tok = tokenizer()
    config = text_config(tok, vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False)
    return save_model(transformers.LlamaForCausalLM, config, tok, folder, dtype=torch.bfloat16)


def save_llava_model(folder):
    """LLaVA-1.5's geometry (CLIP tower at 336 px, patch 14: 576 image tokens) on a 4-layer decoder of width 256."""
    T = transformers
    tok = tokenizer("<image>", extra=["<image>"])
    vision = T.CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=2,
                                image_size=336, patch_size=14, projection_dim=64)
    config = T.LlavaConfig(vision_config=vision, image_seq_length=576,
                           text_config=text_config(tok, vocab_size=32000, hidden_size=256, intermediate_size=704,
                                                   num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4),
                           image_token_id=tok.convert_tokens_to_ids("<image>"), vision_feature_select_strategy="default",
                           vision_feature_layer=-1)
    image_processor = T.CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336})
    processor = T.LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                 chat_template=tok.chat_template, image_token="<image>")
    return save_model(T.LlavaForConditionalGeneration, config, processor, folder, dtype=torch.bfloat16)


def write_data(folder, n=16, image=False):
    """``folder/train.jsonl``: ``n`` records with a short prompt, answers far longer than any row, a correction."""
    os.makedirs(folder, exist_ok=True)
    if image:
        Image.new("RGB", (336, 336), (200, 30, 30)).save(os.path.join(folder, "red.png"))
    with open(os.path.join(folder, "train.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            long = " ".join(WORDS[(i + k) % len(WORDS)] for k in range(3000))
            record = {"prompt": f"Describe picture {i}.", "chosen": "yes " + long, "rejected": "no " + long,
                      "corrections": ["maybe " + long]}
            if image:
                record["images"] = ["red.png"]
            f.write(json.dumps(record) + "\n")
    return str(folder)


#: (name, model, the options of prefopt train and of the plan): the pairwise subset of methods x full / LoRA / QLoRA
#: x reference modes x checkpointing measured by tests/test_plan.py.
CASES = [
    ("text dpo full model-ref", "text", dict(method="dpo", reference="model")),
    ("text dpo lora adapters ckpt", "text", dict(method="dpo", lora=True, reference="adapters",
                                                 gradient_checkpointing=True)),
    ("text nsft full model-ref ckpt", "text", dict(method="nsft", reference="model", gradient_checkpointing=True)),
    ("text grpo lora adapters", "text", dict(method="grpo", lora=True, reference="adapters", grpo_beta=0.04)),
    ("text dpo qlora precompute ckpt", "text", dict(method="dpo", qlora=True, reference="precompute",
                                                    gradient_checkpointing=True)),
    ("llava cw-dpo full model-ref", "llava", dict(method="cw-dpo", reference="model")),
    ("llava dpo lora precompute ckpt", "llava", dict(method="dpo", lora=True, reference="precompute",
                                                    gradient_checkpointing=True)),
    ("llava nsft qlora adapters", "llava", dict(method="nsft", qlora=True, reference="adapters")),
]
#: Every case's micro-batch and row length (LLaVA's rows hold the 576 image tokens).
BATCH, MAX_LENGTH = 2, {"text": 256, "llava": 704}
PROMPT_TOKENS = 16  # the prompt and the chat template's tokens around it


def train_argv(model_folder, data_folder, out, kind, options):
    argv = ["--model", model_folder, "--data", data_folder, "--out", out, "--steps", "2", "--batch-size", str(BATCH),
            "--max-length", str(MAX_LENGTH[kind]), "--eval-size", "0", "--probe-every", "0", "--no-progress",
            "--json", "--dtype", "fp32", "--device", "cpu", "--max-new-tokens", "16", "--num-generations", "2",
            "--sftc-fraction", "0.5", "--onpolicy-fraction", "0.5"]
    for key, value in options.items():
        flag = "--" + key.replace("_", "-")
        argv += [flag] if value is True else [flag, str(value)]
    return argv


def plan_options(kind, options):
    from prefopt.train.plan import PlanOptions

    return PlanOptions(device="cpu", dtype="fp32", batch_size=BATCH, max_length=MAX_LENGTH[kind],
                       prompt_tokens=PROMPT_TOKENS, max_new_tokens=16, num_generations=2, onpolicy_fraction=0.5,
                       evaluation=False, **options)
