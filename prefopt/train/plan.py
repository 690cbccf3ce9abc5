"""The memory model of a training step, from the model's config alone (``prefopt plan``).

The model is built on the meta device (no weights read, nothing allocated) to count its parameters per part:
vision tower, projector, decoder, head, and what trains (everything, ``--lora`` adapters, or ``--qlora``
adapters over a 4-bit decoder). The per-device peak is a sum of named terms, each from shapes:

==============  ============================================================================================
weights         parameters in ``--dtype``; ``--qlora``: the decoder's linear layers in NF4 (4 bits a weight,
                double-quantised absmax per block of 64: 0.516 bytes a weight), LoRA adapters in fp32 (peft
                keeps them there); ZeRO-3 divides them by ``--world`` and adds two gathered decoder layers and the
                head (gathered for the fused op)
gradients       one per trainable parameter, in its dtype (ZeRO-2/3: divided by ``--world``)
optimizer       AdamW: two states per trainable parameter in its dtype; ``adamw8bit`` / ``paged_adamw8bit``:
                2.03 bytes a parameter for tensors of 4096 elements or more, 8 below (bitsandbytes keeps small
                ones in 32 bits); under DeepSpeed an fp32 master copy and fp32 AdamW states (12 bytes a
                parameter) divided by ``--world``
activations     what autograd keeps for backward, per token of a layer (:func:`layer_elements`: norms,
                q/k/v/output of SDPA with the key/value heads repeated, the o_proj input, the MLP), for every
                decoder layer and, when it trains, every vision layer; with ``--gradient-checkpointing``
                each layer's input plus one layer recomputed; with ``--offload-activations`` the layer
                inputs live in host memory and only the recomputed layer stays
head            prefopt's fused op: its logits tiles (the torch backend's, an upper bound for Triton's),
                the scored hidden states and their gradient in fp32, the head's fp32 weight gradient when it
                trains; the same step with materialised logits (``[tokens, vocab]`` in fp32 and their
                gradient) is reported beside it for comparison, never added
reference       ``model``: a second copy of the weights and its hidden states; ``adapters``: its hidden
                states only; ``precompute``: nothing during training (its pass is a phase of its own)
framework       the batch's pixel values and, on CPU, the objects a run creates after the model is built
                (:data:`CPU_FRAMEWORK_BYTES`)
==============  ============================================================================================

The training step has two high points, and the plan takes the larger: backward (every kept activation, the
gradients that come first -- those outside the layers: head, embeddings, norms, projector -- and the larger of
the head's working memory and one layer's backward: its recomputed activations and the gradients in flight)
and the optimizer step (every gradient, and a temporary the size of the trainable parameters).

Phases that can raise the peak are modelled beside the training step: sampling (GRPO's generations, CW-DPO's
on-policy negatives: the key/value cache and one step's logits), the reference's precompute pass and the
end-of-run evaluation (the model the run started from is built again beside the policy). ``peak_bytes`` is
the largest phase: the quantity ``torch.cuda.max_memory_allocated`` reports on CUDA and the resident set above
the process's baseline on CPU (``peak_memory_mb`` of ``prefopt train``). Whether it fits ``--gpu-memory`` adds
:data:`CUDA_MARGIN_BYTES` for what ``max_memory_allocated`` does not see.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..ops.objective import DEFAULT_BUDGET_BYTES, MIN_BUDGET_BYTES

MiB, GiB = 2**20, 2**30
#: What ``max_memory_allocated`` does not see on a GPU, added before comparing with ``--gpu-memory``: the CUDA
#: context with torch's kernels (about 0.5 GiB), cuBLAS's workspace and the caching allocator's fragmentation.
CUDA_MARGIN_BYTES = 3 * GiB // 2
#: On CPU, what a run allocates after its baseline besides the step's tensors: the optimizer's, the collator's
#: and the run's Python objects (the libraries the model needs are imported before the baseline).
CPU_FRAMEWORK_BYTES = 16 * MiB
#: The config files a plan reads (a hub id resolves these only: no weights are downloaded).
CONFIG_FILES = ["*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken"]
#: bitsandbytes' NF4 as ``--qlora`` stores it (double quantisation): 4 bits a weight, an 8-bit absmax per block of
#: 64 weights and an fp32 scale per 256 of those.
NF4_BYTES_PER_WEIGHT = 0.5 + 1 / 64 + 4 / (64 * 256)
#: bitsandbytes' 8-bit optimizers keep tensors below this many elements in 32-bit state (8 bytes an element) ...
EIGHT_BIT_MIN_ELEMENTS = 4096
#: ... and larger ones in two 8-bit states with an fp32 absmax per block of 256.
EIGHT_BIT_STATE_BYTES = 2 * (1 + 4 / 256)
#: Config-only folders written from the published configs (the README's table): llava-1.5-7b, qwen2.5-vl-3b,
#: qwen2.5-vl-7b.
SHIPPED_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "configs")
OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
#: Answers per record in a step: pairs, nSFT's chosen + one correction, SFT's one; GRPO: --num-generations.
ANSWERS = {"sft": 1, "sft-c": 2, "dpo": 2, "cw-dpo": 2, "simpo": 2, "orpo": 2, "nsft": 2}
#: The changes tried, in this order, when a plan does not fit (the first that fits is proposed).
CHANGES = ("checkpointing", "micro-batch", "reference", "lora", "qlora", "offload", "zero")


@dataclass
class PlanOptions:
    """What a step's memory depends on: ``prefopt train``'s options of the same names, plus the token counts
    a plan assumes (``prompt_tokens`` of text per prompt; every row at ``max_length``)."""

    method: str = "dpo"
    lora: bool = False
    qlora: bool = False
    lora_r: int = 8
    reference: str = "auto"
    kl_coef: float = 0.1
    grpo_beta: float = 0.0
    num_generations: int = 4
    onpolicy_fraction: float = 0.25
    max_new_tokens: int = 24
    batch_size: int = 4
    grad_accum: int = 1
    max_length: int = 512
    prompt_tokens: int = 64
    image_size: Optional[Tuple[int, int]] = None
    image_tokens: Optional[int] = None
    images: int = 1
    gradient_checkpointing: bool = False
    offload_activations: bool = False
    optim: str = "adamw"
    deepspeed: Optional[str] = None
    world: int = 1
    dtype: Optional[str] = None
    device: str = "cuda"
    share_prefix: str = "auto"
    evaluation: bool = True
    fused_head: bool = True

    def resolved_dtype(self) -> str:
        return self.dtype or ("fp32" if self.device == "cpu" else "bf16")

    def reference_mode(self) -> str:
        """"none", "model", "adapters" or "precompute", as a run resolves ``--reference``."""
        if self.method in ("sft", "sft-c", "simpo", "orpo") or (self.method == "nsft" and self.kl_coef == 0) \
                or (self.method == "grpo" and self.grpo_beta == 0):
            return "none"
        if self.reference == "auto":
            return "adapters" if self.lora or self.qlora else "model"
        return self.reference


@dataclass
class Linear:
    in_features: int
    out_features: int


@dataclass
class Tower:
    """A stack of transformer layers: how many, their width, MLP width and kind, and per-layer parameters."""

    layers: int
    hidden: int
    intermediate: int
    q_width: int
    kv_width: int
    gated_mlp: bool
    layer_params: int


@dataclass
class ModelShape:
    """Parameter counts per part and the shapes the activations follow, from a meta-device model."""

    model_type: str
    params: Dict[str, int]  # vision, projector, decoder, head (0 when tied to the embeddings)
    decoder: Tower
    vision: Optional[Tower]
    vocab: int
    decoder_linears: List[Linear]  # LoRA's targets (and QLoRA's quantised layers)
    small_tensor_params: int  # parameters in tensors under EIGHT_BIT_MIN_ELEMENTS elements
    image_tokens: int = 0  # decoder positions per image
    vision_tokens: int = 0  # vision-tower positions per image
    image_pixels: Tuple[int, int] = (0, 0)
    notes: List[str] = field(default_factory=list)

    @property
    def total_params(self) -> int:
        return sum(self.params.values())


class PlanError(ValueError):
    """A plan that cannot be made from these options or files (one line)."""


# ------------------------------------------------------------------------------------------ the model's shape


def config_folder(model: str, *, revision: Optional[str] = None, trust_remote_code: bool = False) -> str:
    """The folder of ``model``'s config files: a local folder, one of :data:`SHIPPED_CONFIGS` by name, else a
    hub id's from the Hugging Face cache (or downloaded when online: config and processor files only)."""
    from .models import TINY_MODELS, resolve_model

    if model in TINY_MODELS:
        raise PlanError(f"--model {model}: an embedded model has no config folder to plan from; give a folder, a hub "
                        f"id or a shipped config ({', '.join(sorted(os.listdir(SHIPPED_CONFIGS)))})")
    shipped = os.path.join(SHIPPED_CONFIGS, model)
    if not os.path.exists(model) and os.path.isdir(shipped):
        return shipped
    return resolve_model(model, revision=revision, trust_remote_code=trust_remote_code, files=CONFIG_FILES)


def _largest_module_list(module):
    from torch import nn

    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList) and len(m)]
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()), default=None)


def _tower(module, config) -> Tower:
    """The layer stack of ``module`` with the widths of ``config`` (a text or vision config)."""
    from torch import nn

    layers = _largest_module_list(module)
    if layers is None:
        raise PlanError(f"{type(module).__name__}: no layer stack found")
    hidden = int(getattr(config, "hidden_size", None) or getattr(config, "embed_dim"))
    heads = int(getattr(config, "num_attention_heads", None) or getattr(config, "num_heads"))
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    linears = [m for m in layers[0].modules() if isinstance(m, nn.Linear)]
    widest = max((m.out_features for m in linears), default=4 * hidden)
    intermediate = int(getattr(config, "intermediate_size", None) or widest)
    names = [n for n, _ in layers[0].named_modules()]
    return Tower(layers=len(layers), hidden=hidden, intermediate=intermediate, q_width=heads * head_dim,
                 kv_width=int(getattr(config, "num_key_value_heads", None) or heads) * head_dim,
                 gated_mlp=any(n.endswith("gate_proj") for n in names),
                 layer_params=sum(p.numel() for p in layers[0].parameters()))


def model_shape(folder: str, *, trust_remote_code: bool = False) -> ModelShape:
    """:class:`ModelShape` of the model whose config is in ``folder``, built on the meta device."""
    import torch
    from transformers import AutoConfig

    from .errors import first_line
    from .models import ModelAdapter, _lora_targets, _model_auto_class

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:  # transformers' own errors for a folder without a readable config
        raise PlanError(f"--model {folder}: no readable config.json ({first_line(e)})") from None
    auto = _model_auto_class(config, trust_remote_code)
    if auto is None:
        raise PlanError(f"--model {folder}: model type {getattr(config, 'model_type', None)!r} is neither an "
                        "image-text nor a causal language model transformers knows")
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=trust_remote_code)
    adapter = ModelAdapter(model)
    head = model.get_output_embeddings()
    tied = head.weight is model.get_input_embeddings().weight

    def count(module) -> int:
        return sum(p.numel() for p in module.parameters()) if module is not None else 0

    total = sum(p.numel() for p in model.parameters())
    vision = count(adapter.vision_tower)
    decoder = count(adapter.language_model)
    head_params = 0 if tied else count(head)
    text_config = config.get_text_config()
    targets = set(_lora_targets(model))
    linears = [Linear(m.in_features, m.out_features) for n, m in model.named_modules() if n in targets]
    shape = ModelShape(
        model_type=config.model_type,
        params={"vision tower": vision, "projector": total - vision - decoder - head_params, "decoder": decoder,
                "head": head_params},
        decoder=_tower(adapter.language_model, text_config),
        vision=_tower(adapter.vision_tower, config.vision_config) if adapter.vision_tower is not None else None,
        vocab=int(head.weight.shape[0]), decoder_linears=linears,
        small_tensor_params=sum(p.numel() for p in model.parameters() if p.numel() < EIGHT_BIT_MIN_ELEMENTS),
    )
    if tied:
        shape.notes.append("the head is tied to the input embeddings (counted once, in the decoder)")
    return shape


def image_geometry(folder: str, shape: ModelShape, image_size: Optional[Tuple[int, int]],
                   image_tokens: Optional[int]) -> Tuple[int, int, Tuple[int, int]]:
    """(decoder positions, vision-tower positions, pixels (width, height)) of one image: from the processor's
    config and ``image_size`` (Qwen2-VL-style processors resize to a multiple of the patch grid), or the
    vision config's fixed size (LLaVA-style towers resize every image to it); ``image_tokens`` overrides."""
    if shape.vision is None:
        return 0, 0, (0, 0)
    from transformers import AutoConfig

    vision = AutoConfig.from_pretrained(folder, local_files_only=True).vision_config
    merge = int(getattr(vision, "spatial_merge_size", 1) or 1)
    patch = int(getattr(vision, "patch_size", 14))
    processor = _image_processor(folder)
    if hasattr(processor, "get_number_of_image_patches"):  # a dynamic-resolution tower
        width, height = image_size or (448, 448)
        patches = int(processor.get_number_of_image_patches(height, width, {}))
        tokens = patches // (merge * merge)
        if image_tokens is not None:
            tokens, patches = image_tokens, image_tokens * merge * merge
        return tokens, patches, (width, height)
    side = int(getattr(vision, "image_size", 336))
    grid = (side // patch) ** 2
    tokens = grid if image_tokens is None else image_tokens
    return tokens, grid + 1, (side, side)  # the tower also runs its class token


def _image_processor(folder: str):
    from transformers import AutoImageProcessor

    from .errors import first_line

    try:
        return AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # a folder without the processor's files
        raise PlanError(f"--model {folder}: the image processor's config does not load ({first_line(e)}); pass "
                        "--image-tokens") from None


# ------------------------------------------------------------------------------------------------ the terms


def layer_elements(tower: Tower, dtype_bytes: int, lora_r: int = 0) -> int:
    """Elements autograd keeps per token of one layer: each norm's input and output (a half-precision norm
    also keeps its fp32 upcast), SDPA's query, key, value (key/value heads repeated to the query's) and output,
    the o_proj input, the MLP's inputs (gated: gate, its activation, up, their product; else fc1's output,
    the activation's two factors) and each adapted linear's rank-r intermediate."""
    norm = 2 if dtype_bytes == 4 else 3
    mlp = 4 if tower.gated_mlp else 3
    return 2 * norm * tower.hidden + 5 * tower.q_width + mlp * tower.intermediate + 7 * lora_r


@dataclass
class StepShape:
    rows: int  # rows the decoder runs per micro-batch (packed rows when the prefix is shared)
    row_length: int  # positions per row
    scored: int  # answer tokens the head scores per micro-batch
    images: int  # images the vision tower runs per micro-batch
    answer_length: int
    prefix_length: int


def step_shape(opts: PlanOptions, shape: ModelShape) -> StepShape:
    """Rows and positions of one micro-batch: every logical row is ``max_length`` (prefix: the images' tokens
    and ``prompt_tokens`` of text; answer: the rest); with a shared prefix one packed row per record holds the
    prefix once and every answer after it."""
    images = opts.images if shape.vision is not None else 0
    prefix = images * shape.image_tokens + opts.prompt_tokens
    if opts.method == "grpo":
        answer, answers = opts.max_new_tokens, opts.num_generations
    else:
        answer, answers = opts.max_length - prefix, ANSWERS[opts.method]
    if answer < 1:
        raise PlanError(f"--max-length {opts.max_length}: leaves no answer after the prefix of {prefix} tokens "
                        f"({images} x {shape.image_tokens} image tokens + {opts.prompt_tokens} of text)")
    b = opts.batch_size
    if shares_prefix(opts, shape) and answers > 1:
        return StepShape(b, prefix + answers * answer, b * answers * answer, b * images, answer, prefix)
    return StepShape(b * answers, prefix + answer, b * answers * answer, b * answers * images, answer, prefix)


def shares_prefix(opts: PlanOptions, shape: ModelShape) -> bool:
    from .prefixes import SHARED_FAMILIES, SHARED_METHODS

    if opts.share_prefix == "off":
        return False
    return opts.share_prefix == "on" or (opts.method in SHARED_METHODS and shape.model_type in SHARED_FAMILIES)


def activation_bytes(tower: Tower, tokens: int, dtype_bytes: int, *, checkpointing: bool, offload: bool,
                     lora_r: int = 0) -> Tuple[int, int]:
    """(bytes a tower keeps for backward over ``tokens`` positions, bytes a recomputed layer adds in backward):
    every layer's activations and nothing; or with checkpointing each layer's input (none with offloading)
    and one layer's activations."""
    one_layer = layer_elements(tower, dtype_bytes, lora_r) * tokens * dtype_bytes
    if not checkpointing and not offload:
        return tower.layers * one_layer, 0
    return (0 if offload else tower.layers * tower.hidden * tokens * dtype_bytes), one_layer


def plan(shape: ModelShape, opts: PlanOptions) -> Dict:
    """The plan of ``opts`` on ``shape``: ``peak_bytes``, ``breakdown`` (the largest phase's terms, name ->
    bytes), ``phases`` (each phase's peak), ``terms`` (each phase's terms), the head's working memory fused and
    materialised, and the step's shape."""
    check_options(opts)
    nbytes = DTYPE_BYTES[opts.resolved_dtype()]
    adapters = opts.lora or opts.qlora
    zero = int(opts.deepspeed[-1]) if opts.deepspeed else 0
    world = opts.world if zero else 1
    step = step_shape(opts, shape)
    dec = shape.decoder
    p = shape.params

    # weights
    linear_params = sum(l.in_features * l.out_features for l in shape.decoder_linears)
    lora_params = sum(opts.lora_r * (l.in_features + l.out_features) for l in shape.decoder_linears) if adapters else 0
    dense = shape.total_params - (linear_params if opts.qlora else 0)
    model_weights = dense * nbytes + (linear_params * NF4_BYTES_PER_WEIGHT if opts.qlora else 0) + lora_params * 4
    weights = model_weights
    if zero == 3:
        gathered = 2 * dec.layer_params + max(p["head"], dec.hidden * shape.vocab)  # two layers, the head
        weights = model_weights / world + gathered * nbytes

    # what trains: its gradients and optimizer state
    trainable = lora_params if adapters else shape.total_params
    grad_bytes = 4 if adapters else nbytes
    gradients = trainable * grad_bytes / (world if zero else 1)
    if zero:
        optimizer = trainable * 12 / world
    elif opts.optim == "adamw":
        optimizer = trainable * 2 * grad_bytes
    else:
        if adapters:
            small = sum(n for l in shape.decoder_linears for n in (opts.lora_r * l.in_features,
                                                                   opts.lora_r * l.out_features)
                        if n < EIGHT_BIT_MIN_ELEMENTS)
        else:
            small = shape.small_tensor_params
        optimizer = (trainable - small) * EIGHT_BIT_STATE_BYTES + small * 8

    # activations: what is kept for backward, and what one layer's backward adds (recomputed layer, gradients)
    tokens = step.rows * step.row_length
    # offloaded activations live in host memory: on a CPU device that is the same memory
    ckpt = opts.gradient_checkpointing or opts.offload_activations
    offload = opts.offload_activations and opts.device != "cpu"
    act, recompute = activation_bytes(dec, tokens, nbytes, checkpointing=ckpt, offload=offload,
                                      lora_r=opts.lora_r if adapters else 0)
    act += 3 * dec.hidden * tokens * nbytes  # the final norm and the answers' hidden states gathered for the head
    vision_trains = not adapters and shape.vision is not None
    vision_tokens = step.images * shape.vision_tokens
    vision_act, vision_recompute = activation_bytes(shape.vision, vision_tokens, nbytes, checkpointing=ckpt,
                                                    offload=offload) if vision_trains and vision_tokens else (0, 0)
    largest = max([dec] + ([shape.vision] if vision_trains else []), key=lambda t: t.hidden + t.intermediate)
    layer_backward = max(recompute, vision_recompute) \
        + 2 * (largest.hidden + largest.intermediate) * max(tokens, vision_tokens) * nbytes

    # the head: prefopt's fused op, and materialised logits for comparison
    # its logits tiles stay within the op's default budget (prefopt.ops.objective.default_budget_bytes: a quarter
    # of the head's fp32 gradient, 1-64 MiB), whichever path runs
    budget = min(DEFAULT_BUDGET_BYTES, max(MIN_BUDGET_BYTES, shape.vocab * dec.hidden))
    head_fused = min(budget, 3 * step.scored * shape.vocab * 4) + 2 * step.scored * dec.hidden * 4
    head_materialised = 2 * step.scored * shape.vocab * 4 + 2 * step.scored * dec.hidden * 4
    head = head_fused if opts.fused_head else head_materialised

    # the reference
    mode = opts.reference_mode()
    ref_hidden = tokens * dec.hidden * nbytes
    ref_weights = model_weights if mode == "model" else 0

    # the framework
    pixels = step.images * 3 * shape.image_pixels[0] * shape.image_pixels[1] * 4
    framework = pixels + (CPU_FRAMEWORK_BYTES if opts.device == "cpu" else 0)

    # The training step's two high points (module docstring); a layer's activations are freed as its
    # gradients come, and the optimizer step's temporary is torch's multi-tensor AdamW's.
    layered = dec.layers * dec.layer_params + (shape.vision.layers * shape.vision.layer_params if vision_trains else 0)
    early_gradients = 0 if adapters else (shape.total_params - layered) * grad_bytes / (world if zero else 1)
    held = {"weights": weights, "optimizer": optimizer, "reference": ref_weights, "framework": framework}
    kept_ref_hidden = ref_hidden if mode in ("model", "adapters") else 0  # the reference's hidden states
    backward = {**held, "gradients": early_gradients, "activations (decoder)": act,
                "activations (vision tower)": vision_act, "reference": ref_weights + kept_ref_hidden,
                "head": head, "layer backward": max(0, layer_backward - head)}
    optimizer_step = {**held, "gradients": gradients, "optimizer step": gradients}
    phases = {"backward": backward, "optimizer step": optimizer_step}
    one_layer = layer_elements(dec, nbytes) * nbytes
    sampled_rows = _sampled_rows(opts)
    if sampled_rows:
        length = step.prefix_length + opts.max_new_tokens
        kv_cache = 2 * dec.layers * dec.kv_width * length * sampled_rows * nbytes
        phases["sampling"] = {**held, "key/value cache": kv_cache,
                              "sampling transients": sampled_rows * (2 * shape.vocab * 4 + length * one_layer)}
    if mode == "precompute":
        phases["precompute pass"] = {"weights": weights, "framework": framework,
                                     "forward transients": tokens * (one_layer + dec.hidden * nbytes)}
    if opts.evaluation:
        phases["evaluation"] = {**held, "model at the start": model_weights,
                                "forward transients": (tokens // step.rows) * 2 * (one_layer + 2 * shape.vocab * 4)}
    totals = {name: sum(terms.values()) for name, terms in phases.items()}
    worst = max(totals, key=totals.get)
    return {
        "peak_bytes": int(totals[worst]),
        "peak_phase": worst,
        "breakdown": {k: int(v) for k, v in phases[worst].items()},
        "phases": {k: int(v) for k, v in totals.items()},
        "terms": {phase: {k: int(v) for k, v in terms.items()} for phase, terms in phases.items()},
        "head_fused_bytes": int(head_fused),
        "head_materialised_bytes": int(head_materialised),
        "reference_mode": mode,
        "step": dataclasses.asdict(step),
        "trainable_params": int(trainable),
    }


def _sampled_rows(opts: PlanOptions) -> int:
    """Rows sampled per micro-batch: GRPO's generations, CW-DPO's on-policy negatives."""
    if opts.method == "grpo":
        return opts.batch_size * opts.num_generations
    if opts.method == "cw-dpo" and opts.onpolicy_fraction > 0:
        return max(1, math.ceil(opts.batch_size * opts.onpolicy_fraction))
    return 0


def check_options(opts: PlanOptions) -> None:
    """``PlanError`` naming the first option a plan cannot take."""
    from .methods import METHODS
    from .reference import MODES

    if opts.method not in METHODS:
        raise PlanError(f"--method: expected one of {', '.join(METHODS)}, got {opts.method!r}")
    for name in ("batch_size", "grad_accum", "max_length", "lora_r", "world", "num_generations", "max_new_tokens",
                 "images"):
        if getattr(opts, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')}: expected a whole number >= 1, got {getattr(opts, name)}")
    if opts.prompt_tokens < 0:
        raise PlanError(f"--prompt-tokens: expected a whole number >= 0, got {opts.prompt_tokens}")
    if opts.lora and opts.qlora:
        raise PlanError("--lora and --qlora: give one (--qlora trains LoRA adapters over a 4-bit decoder)")
    if opts.reference not in MODES + ("auto",):
        raise PlanError(f"--reference: expected one of {', '.join(MODES + ('auto',))}, got {opts.reference!r}")
    mode = opts.reference_mode()
    if mode == "adapters" and not (opts.lora or opts.qlora):
        raise PlanError("--reference adapters needs --lora or --qlora (the reference is the policy with its adapters off)")
    if mode == "precompute" and (opts.method in ("nsft", "grpo") or opts.method == "cw-dpo" and opts.onpolicy_fraction):
        raise PlanError(f"--reference precompute: {opts.method} needs the reference during training (per-token KL or "
                        "on-policy answers), which no precompute pass can score")
    if opts.qlora and mode == "model":
        raise PlanError("--qlora: the reference is the adapters-off model (--reference adapters), not a copy")
    if opts.optim not in OPTIMIZERS:
        raise PlanError(f"--optim: expected one of {', '.join(OPTIMIZERS)}, got {opts.optim!r}")
    if opts.deepspeed not in (None, "zero2", "zero3"):
        raise PlanError(f"--deepspeed: expected zero2 or zero3, got {opts.deepspeed!r}")
    if opts.world > 1 and not opts.deepspeed:
        raise PlanError(f"--world {opts.world}: divides nothing without --deepspeed zero2|zero3")
    if opts.qlora and opts.deepspeed:
        raise PlanError("--qlora: not with --deepspeed (prefopt train refuses it)")
    if opts.qlora and opts.method == "cw-dpo" and mode == "adapters":
        raise PlanError("--qlora: cw-dpo's adapters-off reference merges its adapters at the reference point, which 4-bit "
                        "weights cannot take (give --reference precompute)")
    if opts.offload_activations and opts.deepspeed:
        raise PlanError("--offload-activations: not with --deepspeed (prefopt train refuses it)")
    if opts.dtype not in (None, *DTYPE_BYTES):
        raise PlanError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got {opts.dtype!r}")


# --------------------------------------------------------------------------------------- fitting a budget


def _fits(shape: ModelShape, opts: PlanOptions, budget: float, margin: int) -> bool:
    try:
        return plan(shape, opts)["peak_bytes"] + margin <= budget
    except PlanError:
        return False


def _largest(shape: ModelShape, opts: PlanOptions, budget: float, margin: int, name: str, low: int,
             high: int) -> Optional[int]:
    """The largest value of option ``name`` in [low, high] whose plan fits (the peak grows with it), or None."""
    if not _fits(shape, dataclasses.replace(opts, **{name: low}), budget, margin):
        return None
    while low < high:
        mid = (low + high + 1) // 2
        if _fits(shape, dataclasses.replace(opts, **{name: mid}), budget, margin):
            low = mid
        else:
            high = mid - 1
    return low


def cheapest_change(shape: ModelShape, opts: PlanOptions, budget: float, margin: int) -> Optional[Tuple[str, PlanOptions]]:
    """(what to change, the options changed) for the first change of :data:`CHANGES` that fits on its own,
    else the first run of them taken together that fits, with a smaller micro-batch (and more accumulation)
    only where the run needs one; None when nothing does."""
    global_batch = opts.batch_size * opts.grad_accum

    def apply(change: str, o: PlanOptions) -> Optional[Tuple[str, PlanOptions]]:
        if change == "checkpointing" and not o.gradient_checkpointing:
            return "--gradient-checkpointing", dataclasses.replace(o, gradient_checkpointing=True)
        if change == "micro-batch" and o.batch_size > 1:
            for b in range(o.batch_size - 1, 0, -1):
                if global_batch % b == 0 and _fits(shape, dataclasses.replace(o, batch_size=b), budget, margin):
                    break
            accum = global_batch // b
            return f"--batch-size {b} --grad-accum {accum}", dataclasses.replace(o, batch_size=b, grad_accum=accum)
        if change == "reference" and o.reference_mode() == "model":
            if o.lora or o.qlora:
                return "--reference adapters", dataclasses.replace(o, reference="adapters")
            if o.method != "nsft" and not (o.method == "cw-dpo" and o.onpolicy_fraction):
                return "--reference precompute", dataclasses.replace(o, reference="precompute")
        if change == "lora" and not (o.lora or o.qlora):
            ref = "adapters" if o.reference_mode() == "model" else o.reference
            return "--lora", dataclasses.replace(o, lora=True, reference=ref)
        if change == "qlora" and not o.qlora:
            ref = "adapters" if o.reference_mode() == "model" else o.reference
            return "--qlora", dataclasses.replace(o, lora=False, qlora=True, reference=ref)
        if change == "offload" and not o.offload_activations and not o.deepspeed:
            return "--offload-activations", dataclasses.replace(o, offload_activations=True)
        if change == "zero" and not o.qlora and not o.offload_activations:
            for world in (2, 4, 8):
                changed = dataclasses.replace(o, deepspeed="zero3", world=world)
                if _fits(shape, changed, budget, margin) or world == 8:
                    return f"--deepspeed zero3 --world {world}", changed
        return None

    for change in CHANGES:
        found = apply(change, opts)
        if found and _fits(shape, found[1], budget, margin):
            return found
    words, current = [], opts  # none alone: the changes in order, each with a smaller micro-batch where needed
    for change in CHANGES:
        found = apply(change, current) if change != "micro-batch" else None
        if found:
            words = [w for w in words if not (change == "qlora" and w == "--lora")] + [found[0]]
            current = found[1]
            candidates = [(words, current)]
            smaller = apply("micro-batch", current)
            if smaller:
                candidates.append((words + [smaller[0]], smaller[1]))
            for words_now, candidate in candidates:
                if _fits(shape, candidate, budget, margin):
                    return " ".join(words_now), candidate
    return None


def parse_bytes(text: str) -> int:
    """``24GB``, ``24GiB``, ``80G``, ``16000MB``: bytes (GB and GiB alike are 2**30: GPUs are sold in GiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m or float(m.group(1)) <= 0:
        raise PlanError(f"--gpu-memory: expected a size such as 24GB or 80GiB, got {text!r}")
    return int(float(m.group(1)) * 2 ** (10 * " KMGT".index(m.group(2) or " ")))


def make_plan(model: str, opts: PlanOptions, *, gpu_memory: Optional[int] = None, revision: Optional[str] = None,
              trust_remote_code: bool = False) -> Dict:
    """The plan of ``opts`` for ``model`` (a folder or hub id; configs only), with, given ``gpu_memory`` in
    bytes: ``fits``, ``max_batch_size``, ``max_length`` and the cheapest ``change`` that fits when it does not."""
    return plan_for_shape(load_shape(model, opts, revision=revision, trust_remote_code=trust_remote_code), opts,
                          gpu_memory=gpu_memory)


def load_shape(model: str, opts: PlanOptions, *, revision: Optional[str] = None,
               trust_remote_code: bool = False) -> ModelShape:
    """:func:`model_shape` of ``model`` (a folder, shipped name or hub id) with its images' geometry."""
    folder = config_folder(model, revision=revision, trust_remote_code=trust_remote_code)
    shape = model_shape(folder, trust_remote_code=trust_remote_code)
    shape.image_tokens, shape.vision_tokens, shape.image_pixels = image_geometry(
        folder, shape, opts.image_size, opts.image_tokens)
    return shape


def fit_gpu_memory(cfg, source: str, state, saved_identity: Optional[Dict]):
    """``cfg`` (a run's :class:`~prefopt.train.config.TrainConfig`) with the micro-batch, accumulation and gradient
    checkpointing ``--gpu-memory`` picks for the model in folder ``source`` on ``state``'s device: the largest
    micro-batch that divides the global batch (``batch_size x grad_accum``, kept) and fits without checkpointing,
    else with it (prompts of 64 text tokens, at most a quarter of ``--max-length``). A resumed run reuses what
    its checkpoint's identity recorded. Prints the choice (main rank); ``PlanError`` (one line) when nothing
    fits or no plan can be made."""
    from .config import GPU_MEMORY_CHOICE
    from .models import TINY_MODELS

    budget = parse_bytes(cfg.gpu_memory)
    saved = (saved_identity or {}).get(GPU_MEMORY_CHOICE)
    if saved is not None:
        chosen, how = dataclasses.replace(cfg, **saved), "as the run being resumed chose"
    else:
        if source in TINY_MODELS or not os.path.isdir(source):
            raise PlanError(f"--gpu-memory: a plan needs a model folder or hub id, and {source} is an embedded model")
        preset = cfg.deepspeed if cfg.deepspeed in ("zero2", "zero3") else None
        o = cfg.options
        opts = PlanOptions(method=cfg.method, lora=cfg.lora, qlora=cfg.qlora, lora_r=cfg.lora_r, reference=cfg.reference,
                           optim=cfg.optim, offload_activations=cfg.offload_activations,
                           kl_coef=o.kl_coef, grpo_beta=o.grpo_beta, num_generations=o.num_generations,
                           onpolicy_fraction=o.onpolicy_fraction, max_new_tokens=cfg.max_new_tokens,
                           max_length=cfg.max_length, prompt_tokens=min(PlanOptions.prompt_tokens, cfg.max_length // 4),
                           dtype=cfg.dtype, device=state.device.type,
                           share_prefix=cfg.share_prefix, deepspeed=preset, world=state.world_size if preset else 1,
                           evaluation=cfg.eval_size != 0)
        shape = load_shape(source, opts, trust_remote_code=cfg.trust_remote_code)
        margin = 0 if opts.device == "cpu" else CUDA_MARGIN_BYTES
        global_batch = cfg.batch_size * cfg.grad_accum
        tried = []
        for checkpointing in sorted({cfg.gradient_checkpointing, True}):
            for b in (d for d in range(global_batch, 0, -1) if global_batch % d == 0):
                candidate = dataclasses.replace(opts, batch_size=b, grad_accum=global_batch // b,
                                                gradient_checkpointing=checkpointing)
                tried.append(plan(shape, candidate)["peak_bytes"])
                if tried[-1] + margin <= budget:
                    break
            else:
                continue
            break
        else:
            raise PlanError(f"--gpu-memory {cfg.gpu_memory}: even micro-batch 1 with gradient checkpointing is planned "
                            f"at {gib(tried[-1] + margin)} (prefopt plan --model {source} ... names the cheapest change)")
        chosen = dataclasses.replace(cfg, batch_size=b, grad_accum=global_batch // b,
                                     gradient_checkpointing=checkpointing)
        how = f"planned peak {gib(tried[-1])}" + (f" + {gib(margin)} margin" if margin else "")
    if state.is_main:
        print(f"prefopt train: --gpu-memory {gib(budget)}: micro-batch {chosen.batch_size} x accumulation "
              f"{chosen.grad_accum}, gradient checkpointing {'on' if chosen.gradient_checkpointing else 'off'} "
              f"({how})", file=sys.stderr, flush=True)
    return chosen


def plan_for_shape(shape: ModelShape, opts: PlanOptions, *, gpu_memory: Optional[int] = None) -> Dict:
    result = plan(shape, opts)
    margin = 0 if opts.device == "cpu" else CUDA_MARGIN_BYTES
    result.update(model_type=shape.model_type, params=dict(shape.params), image_tokens=shape.image_tokens,
                  notes=list(shape.notes), margin_bytes=margin, gpu_memory=gpu_memory, fits=None,
                  max_batch_size=None, max_length=None, change=None, covers=covered_phases(opts))
    if gpu_memory is None:
        return result
    result["fits"] = result["peak_bytes"] + margin <= gpu_memory
    result["max_batch_size"] = _largest(shape, opts, gpu_memory, margin, "batch_size", 1, 4096)
    shortest = opts.images * shape.image_tokens * (shape.vision is not None) + opts.prompt_tokens + 1
    result["max_length"] = _largest(shape, opts, gpu_memory, margin, "max_length", shortest, 1 << 20)
    if not result["fits"]:
        found = cheapest_change(shape, opts, gpu_memory, margin)
        if found:
            words, changed = found
            result["change"] = {"options": words, "peak_bytes": plan(shape, changed)["peak_bytes"]}
    return result


def covered_phases(opts: PlanOptions) -> List[str]:
    covers = ["the training step (forward, backward, optimizer step)"]
    if _sampled_rows(opts):
        covers.append("sampling (" + ("GRPO's generations" if opts.method == "grpo" else "on-policy negatives") + ")")
    if opts.reference_mode() == "precompute":
        covers.append("the reference's precompute pass")
    if opts.evaluation:
        covers.append("the end-of-run evaluation (the starting model built again)")
    return covers


# ------------------------------------------------------------------------------------------ the command


def gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB"


def format_plan(model: str, opts: PlanOptions, result: Dict) -> str:
    step = result["step"]
    p = result["params"]
    lines = [
        f"prefopt plan: {opts.method} on {model} ({result['model_type']}), {opts.device}, {opts.resolved_dtype()}, "
        f"micro-batch {opts.batch_size} x accumulation {opts.grad_accum}"
        + (f", {opts.deepspeed} over {opts.world}" if opts.deepspeed else ""),
        "  parameters: " + ", ".join(f"{k} {v / 1e6:,.1f}M" for k, v in p.items())
        + f"; training {result['trainable_params'] / 1e6:,.2f}M",
        f"  step: {step['rows']} decoder rows of {step['row_length']} positions ({result['image_tokens']} image tokens "
        f"an image, prefix {step['prefix_length']}, answers {step['answer_length']}), {step['scored']} scored tokens; "
        f"reference: {result['reference_mode']}",
        "",
        f"  {'term (' + result['peak_phase'] + ')':<36}{'bytes':>14}",
    ]
    lines += [f"  {name:<36}{gib(v):>14}" for name, v in result["breakdown"].items() if v]
    lines.append(f"  {'peak':<36}{gib(result['peak_bytes']):>14}")
    if len(result["phases"]) > 1:
        lines.append("  phases: " + ", ".join(f"{k} {gib(v)}" for k, v in result["phases"].items()))
    if result["peak_phase"] == "evaluation":
        rest = max(v for k, v in result["phases"].items() if k != "evaluation")
        lines.append(f"  the end-of-run evaluation (the starting model built beside the policy) is the peak; without it "
                     f"(--eval-size 0, or prefopt eval afterwards) the peak is {gib(rest)}")
    lines.append(f"  output head: prefopt's fused op {gib(result['head_fused_bytes'])}; materialised logits would "
                 f"take {gib(result['head_materialised_bytes'])}")
    lines += [f"  note: {n}" for n in result["notes"]]
    lines.append("  covers: " + "; ".join(result["covers"]))
    if result["gpu_memory"] is not None:
        lines.append(f"  --gpu-memory {gib(result['gpu_memory'])}: "
                     + ("fits" if result["fits"] else "does not fit")
                     + f" (peak + {gib(result['margin_bytes'])} margin for the CUDA context, cuBLAS and fragmentation)")
        lines.append(f"  largest micro-batch that fits: {result['max_batch_size'] or 'none'}; longest --max-length "
                     f"that fits: {result['max_length'] or 'none'}")
        if result["change"]:
            lines.append(f"  cheapest change that fits: {result['change']['options']} "
                         f"(peak {gib(result['change']['peak_bytes'])})")
        elif not result["fits"]:
            lines.append("  no change of the documented order (checkpointing, micro-batch, reference, LoRA, QLoRA, "
                         "offloading, ZeRO-3 over up to 8 GPUs) fits")
    lines.append("  (a plan from shapes, not a measurement)")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig
    from .errors import OneLineParser
    from .methods import METHODS, MethodOptions
    from .reference import MODES

    d, m, o = TrainConfig(), MethodOptions(), PlanOptions()
    p = OneLineParser(prog="prefopt plan", description="Will it fit? The per-device peak memory of a training step "
                      "of prefopt train, term by term, from the model's config alone (no weights read).")
    p.add_argument("--model", required=True, metavar="PATH|ORG/NAME|NAME", help="a folder with config.json and the "
                   "processor's files, a hub id (config files from the Hugging Face cache or the hub), or a shipped "
                   f"config: {', '.join(sorted(os.listdir(SHIPPED_CONFIGS)))}")
    p.add_argument("--revision", default=None, help="the branch, tag or commit of a hub id (default main)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a config's own Python code to run")
    p.add_argument("--method", default="dpo", choices=METHODS, help="training method (default %(default)s)")
    p.add_argument("--lora", action="store_true", help="train LoRA adapters on the language model's linear layers")
    p.add_argument("--qlora", action="store_true", help="LoRA adapters over the decoder's linear layers in 4-bit NF4")
    p.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default %(default)s)")
    p.add_argument("--reference", default=d.reference, choices=MODES + ("auto",),
                   help="reference policy: model, adapters, precompute or auto (default %(default)s)")
    p.add_argument("--kl-coef", type=float, default=m.kl_coef, help="nSFT's KL weight; 0: no reference")
    p.add_argument("--grpo-beta", type=float, default=m.grpo_beta, help="GRPO's KL weight; 0: no reference")
    p.add_argument("--num-generations", type=int, default=m.num_generations, help="GRPO: answers per prompt")
    p.add_argument("--onpolicy-fraction", type=float, default=m.onpolicy_fraction,
                   help="CW-DPO: share of the negatives sampled from the policy")
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length limit of sampled answers")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per micro-batch (default %(default)s)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step")
    p.add_argument("--max-length", type=int, default=d.max_length, help="tokens of a logical row (prefix + one "
                   "answer; image tokens included; default %(default)s)")
    p.add_argument("--prompt-tokens", type=int, default=o.prompt_tokens, help="text tokens of a prompt besides its "
                   "images (default %(default)s)")
    images = p.add_mutually_exclusive_group()
    images.add_argument("--image-size", type=int, nargs=2, metavar=("W", "H"), help="image width and height in "
                        "pixels (default: the tower's own size, 448 x 448 for dynamic-resolution towers)")
    images.add_argument("--image-tokens", type=int, help="decoder tokens per image (instead of --image-size)")
    p.add_argument("--images", type=int, default=o.images, help="images per prompt (default %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder-layer activations")
    p.add_argument("--offload-activations", action="store_true", help="checkpointed activations in host memory")
    p.add_argument("--optim", choices=OPTIMIZERS, default=o.optim, help="optimizer (default %(default)s)")
    p.add_argument("--deepspeed", choices=("zero2", "zero3"), default=None, help="DeepSpeed ZeRO stage")
    p.add_argument("--world", type=int, default=1, help="processes (GPUs) ZeRO partitions over (default 1)")
    p.add_argument("--dtype", choices=tuple(DTYPE_BYTES), default=None, help="parameter dtype (default bf16 on "
                   "cuda, fp32 on cpu)")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda", help="the device planned for "
                   "(default %(default)s; cpu predicts prefopt train's peak resident set there)")
    p.add_argument("--share-prefix", choices=("auto", "on", "off"), default=d.share_prefix,
                   help="one prefix per record for all its answers (default %(default)s)")
    p.add_argument("--eval-size", type=int, default=None, help="0: the run has no end-of-run evaluation")
    p.add_argument("--gpu-memory", default=None, metavar="SIZE", help="the device's memory, e.g. 24GB: whether it "
                   "fits, the largest micro-batch and length that do, the cheapest change when it does not")
    p.add_argument("--materialised-logits", action="store_true", help="plan the head as materialised logits "
                   "instead of prefopt's fused op (for comparison)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    return p


def options_from_args(args) -> PlanOptions:
    return PlanOptions(
        method=args.method, lora=args.lora, qlora=args.qlora, lora_r=args.lora_r, reference=args.reference,
        kl_coef=args.kl_coef, grpo_beta=args.grpo_beta, num_generations=args.num_generations,
        onpolicy_fraction=args.onpolicy_fraction, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
        grad_accum=args.grad_accum, max_length=args.max_length, prompt_tokens=args.prompt_tokens,
        image_size=tuple(args.image_size) if args.image_size else None, image_tokens=args.image_tokens,
        images=args.images, gradient_checkpointing=args.gradient_checkpointing,
        offload_activations=args.offload_activations, optim=args.optim, deepspeed=args.deepspeed, world=args.world,
        dtype=args.dtype, device=args.device, share_prefix=args.share_prefix, evaluation=args.eval_size != 0,
        fused_head=not args.materialised_logits)


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``prefopt plan`` with ``argv``; returns the exit code (2 for bad input, one line on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line already on stderr)
        return int(e.code or 0)
    from .errors import first_line

    try:
        opts = options_from_args(args)
        budget = parse_bytes(args.gpu_memory) if args.gpu_memory is not None else None
        result = make_plan(args.model, opts, gpu_memory=budget, revision=args.revision,
                           trust_remote_code=args.trust_remote_code)
    except (ValueError, OSError) as e:  # PlanError included: the user's input
        print(f"prefopt plan: error: {first_line(e)}", file=sys.stderr)
        return 2
    keys = ("peak_bytes", "breakdown", "fits", "max_batch_size", "max_length", "peak_phase", "phases",
            "head_fused_bytes", "head_materialised_bytes", "margin_bytes", "change", "covers", "step")
    print(json.dumps({k: result[k] for k in keys}, indent=1) if args.json else format_plan(args.model, opts, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
