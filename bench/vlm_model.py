"""A FLOP and activation-memory model of one prefix per record at 7B shapes (``--preset vlm-step`` prints it).

Per record: its image(s) and prompt (the prefix, ``P`` decoder positions) and ``answers`` answers of ``A``
tokens (DPO 2, GRPO's group 4). Unshared, every answer's row repeats the prefix: the vision tower runs once
per row and the decoder on ``answers * (P + A)`` positions; shared, the vision tower runs once and the decoder
on ``P + answers * A`` positions. Counted per record, forward, 2 FLOPs per multiply-add:

- vision tower: its layers' linear maps per patch, their attention (full, or Qwen2.5-VL's windows), the
  projector (LLaVA's 2-layer MLP, Qwen2.5-VL's patch merger);
- decoder linear maps (q, k, v with grouped heads, o, the gated MLP) per position;
- decoder attention: query-key pairs that attend (causal; shared: the prefix causal, each answer the prefix
  and its own earlier tokens), 4 x head_dim x heads FLOPs per pair (scores and weighted values), which is
  what a kernel that skips masked blocks computes (SDPA's CPU kernels compute the whole padded T x T);
- head: 2 x H x V per scored answer token, the same in both.

Activations: what one decoder layer keeps for the backward per position (its two norms' inputs, q, k, v,
the attention output, the MLP's gate, up and product), in bf16; the attention's own T x T probabilities are
not kept (flash / memory-efficient attention recomputes them).

The shapes are the published configs' (Hugging Face ``config.json`` of llava-hf/llava-1.5-7b-hf and
Qwen/Qwen2.5-VL-7B-Instruct), written out here: :data:`SHAPES`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict


@dataclass(frozen=True)
class VisionShape:
    layers: int
    hidden: int
    intermediate: int
    patches: int  # per image, as the tower sees them (LLaVA: 576 + the class token)
    gated_mlp: bool  # SwiGLU (3 matrices) or a plain MLP (2)
    window: int = 0  # patches per attention window (0: full attention in every layer)
    full_layers: int = 0  # layers with full attention when windowed
    projector: int = 0  # FLOPs per decoder image token of the projector / merger (forward)


@dataclass(frozen=True)
class DecoderShape:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int


@dataclass(frozen=True)
class ModelShape:
    name: str
    vision: VisionShape
    decoder: DecoderShape
    image_tokens: int  # decoder positions per image


def _llava_projector(hidden_v: int, hidden: int) -> int:
    return 2 * (hidden_v * hidden + hidden * hidden)  # linear(1024 -> 4096), GELU, linear(4096 -> 4096)


def _qwen_merger(hidden_v: int, out: int, merge: int = 4) -> int:
    return 2 * (merge * hidden_v * merge * hidden_v + merge * hidden_v * out)  # MLP over 2x2 merged patches


SHAPES = {
    # CLIP ViT-L/14 at 336 px (24 layers, all run by transformers; LLaVA reads the second-to-last), Vicuna-7B.
    "llava-1.5-7b": ModelShape(
        "LLaVA-1.5-7B", VisionShape(layers=24, hidden=1024, intermediate=4096, patches=577, gated_mlp=False,
                                    projector=_llava_projector(1024, 4096)),
        DecoderShape(layers=32, hidden=4096, intermediate=11008, heads=32, kv_heads=32, vocab=32064), image_tokens=576),
    # Qwen2.5-VL-7B: 32 vision layers of width 1280 (windows of 112 px = 8 x 8 patches, full attention in 4),
    # 1,280 decoder image tokens = 5,120 patches merged 2 x 2; Qwen2.5-7B decoder (GQA 28 / 4 heads).
    "qwen2.5-vl-7b": ModelShape(
        "Qwen2.5-VL-7B", VisionShape(layers=32, hidden=1280, intermediate=3420, patches=5120, gated_mlp=True,
                                     window=64, full_layers=4, projector=_qwen_merger(1280, 3584)),
        DecoderShape(layers=28, hidden=3584, intermediate=18944, heads=28, kv_heads=4, vocab=152064),
        image_tokens=1280),
}


def vision_flops(v: VisionShape, image_tokens: int) -> int:
    """Forward FLOPs of the vision tower and projector for one image."""
    mlp = (3 if v.gated_mlp else 2) * v.hidden * v.intermediate
    linear = v.layers * v.patches * 2 * (4 * v.hidden * v.hidden + mlp)
    windowed = v.layers - v.full_layers if v.window else 0
    pairs = windowed * v.patches * v.window + (v.layers - windowed) * v.patches ** 2
    return linear + 4 * v.hidden * pairs + image_tokens * v.projector


def decoder_linear_flops(d: DecoderShape) -> int:
    """Forward FLOPs of one position through the decoder's linear maps (all layers)."""
    kv = d.hidden // d.heads * d.kv_heads
    return d.layers * 2 * (d.hidden * (d.hidden + 2 * kv) + d.hidden * d.hidden + 3 * d.hidden * d.intermediate)


def attention_pairs(prefix: int, answers: int, answer_tokens: int, shared: bool) -> int:
    """Query-key pairs that attend per record (causal rows; shared: one packed row with a block mask)."""
    if shared:
        return prefix * (prefix + 1) // 2 + answers * (answer_tokens * prefix + answer_tokens * (answer_tokens + 1) // 2)
    row = prefix + answer_tokens
    return answers * row * (row + 1) // 2


def activation_values_per_position(d: DecoderShape) -> int:
    """Values one decoder layer keeps per position for its backward (see the module's docstring)."""
    kv = d.hidden // d.heads * d.kv_heads
    return 2 * d.hidden + (d.hidden + 2 * kv) + d.hidden + 3 * d.intermediate


def step_model(shape: ModelShape, prompt_tokens: int, answer_tokens: int, answers: int,
               bytes_per_value: int = 2) -> Dict[str, Dict[str, float]]:
    """Per record, unshared and shared: decoder positions, forward FLOPs (vision, decoder linear, decoder
    attention, head, total), activation bytes per decoder layer; and the shared / unshared ratios."""
    d = shape.decoder
    prefix = shape.image_tokens + prompt_tokens
    out: Dict[str, Dict[str, float]] = {}
    for variant, shared in (("unshared", False), ("shared", True)):
        positions = prefix + answers * answer_tokens if shared else answers * (prefix + answer_tokens)
        flops = {
            "vision": (1 if shared else answers) * vision_flops(shape.vision, shape.image_tokens),
            "decoder_linear": positions * decoder_linear_flops(d),
            "decoder_attention": d.layers * 4 * d.hidden * attention_pairs(prefix, answers, answer_tokens, shared),
            "head": answers * answer_tokens * 2 * d.hidden * d.vocab,
        }
        out[variant] = {"decoder_positions": positions, **flops, "total": sum(flops.values()),
                        "activation_bytes_per_layer": positions * activation_values_per_position(d) * bytes_per_value}
    out["ratio"] = {k: out["shared"][k] / out["unshared"][k] for k in out["shared"]}
    return out


def table(prompt_tokens: int = 32, answer_tokens: int = 64) -> str:
    """The model's comparison at :data:`SHAPES`, DPO (2 answers) and GRPO (4), as a Markdown table."""
    lines = [f"FLOP and activation model per record ({prompt_tokens}-token prompt, {answer_tokens}-token answers; "
             "forward GFLOPs; bf16 activations of one decoder layer):", "",
             "| model | method | variant | decoder positions | vision | decoder linear | decoder attention | head | "
             "total | activations per layer (MiB) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in SHAPES.values():
        for method, answers in (("DPO", 2), ("GRPO", 4)):
            model = step_model(shape, prompt_tokens, answer_tokens, answers)
            for variant in ("unshared", "shared", "ratio"):
                m = model[variant]
                if variant == "ratio":
                    cells = [f"{m[k]:.2f}x" for k in ("decoder_positions", "vision", "decoder_linear",
                                                      "decoder_attention", "head", "total",
                                                      "activation_bytes_per_layer")]
                else:
                    cells = [f"{m['decoder_positions']:.0f}"] + [f"{m[k] / 1e9:.0f}" for k in (
                        "vision", "decoder_linear", "decoder_attention", "head", "total")] + [
                        f"{m['activation_bytes_per_layer'] / 2**20:.1f}"]
                lines.append(f"| {shape.name} | {method} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
