"""Model adapters: run a Hugging Face causal LM / VLM to its final normed hidden states, never its logits.

:class:`ModelAdapter` wraps a model (optionally a peft LoRA model) and gives the trainer what the fused op
needs: ``hidden_states(**inputs)`` (the backbone's ``last_hidden_state``, after the final norm, with the
head not run) and ``head()`` (the output-embedding weight, bias, final logit softcap and temperature, so
that ``logits = softcap(hidden @ weight.T + bias) / temperature`` would be the model's own logits).

:func:`build_model` loads a model from a local folder (no downloads) or builds one of the embedded tiny
models (``"tiny-llava"``, ``"tiny-qwen2-vl"``, ``"tiny-llama"``) from a config with random weights, or
``"tiny-llava-sft"`` (tiny-llava with the shipped weights of its SFT on the synthetic set), with a
locally made tokenizer and the real processor classes, for the default run and the tests.

The module is long (about 730 lines) because :func:`build_model` ties three parts together: the adapter,
the embedded tiny models, and the loading of a user's folder or hub id; a new family touches all three.
"""
from __future__ import annotations

import importlib.util
import json
import os
import types
import warnings
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from .data import EXTRA_BATCH_KEYS
from .errors import first_line

__all__ = ["HeadSpec", "ModelAdapter", "build_model", "resolve_model", "TINY_MODELS", "SUPPORTED_MODELS"]

TINY_MODELS = ("tiny-llava", "tiny-llava-sft", "tiny-qwen2-vl", "tiny-llama")
TINY_BASE = "tiny-llava-sft"  # the tiny model with trained weights: the main job's base


@dataclass
class HeadSpec:
    """The output head as the fused op takes it.

    ``weight``: [V, H], the output-embedding weight (the input-embedding matrix itself when tied);
    ``bias``: [V] or None; ``softcap``: the config's ``final_logit_softcapping`` (logits ->
    ``softcap * tanh(logits / softcap)``) or None; ``temperature``: logits are divided by it (1.0 unless the
    config scales logits: Granite's ``logits_scaling``, Cohere's ``1 / logit_scale``).
    """

    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    softcap: Optional[float]
    temperature: float


def _unwrap(model: nn.Module) -> Tuple[nn.Module, bool]:
    """(the transformers model inside ``model``, whether ``model`` is a peft model)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency of the train extra
        PeftModel = ()
    if PeftModel and isinstance(model, PeftModel):
        return model.get_base_model(), True
    return model, False


def _config_value(config, names) -> Any:
    """The first of ``names`` set (not None) in ``config`` or its text config."""
    configs = [config]
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        try:
            text = get_text()
        except Exception:  # pragma: no cover
            text = None
        if text is not None and text is not config:
            configs.insert(0, text)
    for cfg in configs:
        for name in names:
            val = getattr(cfg, name, None)
            if val is not None:
                return val
    return None


#: Where a transformers model keeps its parts (checked in this order); the families' own names, not their classes.
LANGUAGE_MODEL_NAMES = ("language_model", "text_model")
VISION_TOWER_NAMES = ("vision_tower", "visual", "vision_model", "vision_encoder")


def _first_attribute(module: nn.Module, names) -> Optional[nn.Module]:
    for name in names:
        found = getattr(module, name, None)
        if isinstance(found, nn.Module):
            return found
    return None


class ModelAdapter:
    """Wrap a causal LM or VLM for the fused losses.

    ``ModelAdapter(model)``: ``model`` is a transformers ``PreTrainedModel`` with an output head
    (``get_output_embeddings()``) and a backbone (``model.model`` or the ``base_model_prefix`` module) that
    returns ``last_hidden_state``, or a peft model around one. Otherwise ``ValueError`` naming what is
    missing. The language model and the vision tower are found by attribute name (``LANGUAGE_MODEL_NAMES``,
    ``VISION_TOWER_NAMES``), the head by ``get_output_embeddings()`` and the config (softcap, logit scaling):
    any model of ``AutoModelForImageTextToText`` / ``AutoModelForCausalLM``; tested on the families of
    ``SUPPORTED_MODELS``.
    """

    def __init__(self, model: nn.Module):
        if not isinstance(model, nn.Module):
            raise ValueError(f"ModelAdapter needs a torch nn.Module, got {type(model).__name__}")
        hf, is_peft = _unwrap(model)
        name = type(hf).__name__
        get_out = getattr(hf, "get_output_embeddings", None)
        if not callable(get_out):
            raise ValueError(f"unsupported model {name}: it has no get_output_embeddings() (not a transformers model?)")
        head = get_out()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
            raise ValueError(
                f"unsupported model {name}: get_output_embeddings() returned no head with a weight "
                "(a base model without an LM head? load it with AutoModelForCausalLM / the ...ForConditionalGeneration class)"
            )
        backbone = self._find_backbone(hf)
        if backbone is None:
            raise ValueError(
                f"unsupported model {name}: no backbone module found (expected 'model' or the "
                f"base_model_prefix attribute {getattr(hf, 'base_model_prefix', '')!r} returning last_hidden_state)"
            )
        self.model = model
        self.hf_model = hf
        self.backbone = backbone
        self.has_adapters = bool(is_peft)
        self.config = hf.config

    @staticmethod
    def _find_backbone(hf: nn.Module) -> Optional[nn.Module]:
        candidates = [getattr(hf, "model", None)]
        prefix = getattr(hf, "base_model_prefix", None)
        if prefix:
            candidates.append(getattr(hf, prefix, None))
        for c in candidates:
            if isinstance(c, nn.Module) and c is not hf:
                return c
        return None

    @property
    def language_model(self) -> nn.Module:
        """The decoder stack: the backbone's ``language_model`` / ``text_model`` (a VLM), else the backbone."""
        return _first_attribute(self.backbone, LANGUAGE_MODEL_NAMES) or self.backbone

    @property
    def vision_tower(self) -> Optional[nn.Module]:
        """The image encoder (``vision_tower``, ``visual``, ``vision_model``, ...) or None (a text model)."""
        return _first_attribute(self.backbone, VISION_TOWER_NAMES) or _first_attribute(self.hf_model, VISION_TOWER_NAMES)

    # -- forward

    def hidden_states(self, **inputs) -> torch.Tensor:
        """The final normed hidden states [R, T, H] of the language model, the head not run.

        Takes the collator's / processor's batch as keyword arguments (``input_ids``, ``attention_mask``,
        ``pixel_values``, ``image_grid_thw``, ...); the collator's extra keys (``labels``, ``num_images``,
        ``row_record``, ``correction_rows``) are dropped. A shared-prefix batch
        (:mod:`prefopt.train.prefixes`) gives the hidden states of its logical rows, ``[R, A, H]``. Runs
        under the caller's grad mode and inside ``disable_adapters()`` when the caller enters it.
        """
        kwargs = {k: v for k, v in inputs.items() if k not in EXTRA_BATCH_KEYS}
        dtype = self.head().weight.dtype
        for k, v in kwargs.items():  # pixel values come from the processor in fp32
            if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype != dtype:
                kwargs[k] = v.to(dtype)
        if "answer_positions" in inputs:  # packed rows of shared prefixes
            from .prefixes import packed_positions

            kwargs["position_ids"] = packed_positions(self.backbone, kwargs, inputs["prefix_lengths"])
        kwargs.setdefault("use_cache", False)
        kwargs["return_dict"] = True
        out = self.backbone(**kwargs)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is None:
            hidden = out[0]
        if "answer_positions" in inputs:  # packed rows of shared prefixes: the logical rows' positions
            hidden = hidden.reshape(-1, hidden.shape[-1])[inputs["answer_positions"]]
        return hidden

    def head(self) -> HeadSpec:
        """The output head: weight/bias of ``get_output_embeddings()`` (tied: the embedding matrix), the
        config's final logit softcap and temperature."""
        lm_head = self.hf_model.get_output_embeddings()
        softcap = _config_value(self.config, ("final_logit_softcapping",))
        temperature = 1.0
        scaling = _config_value(self.config, ("logits_scaling",))  # Granite: logits / logits_scaling
        if scaling is not None:
            temperature = float(scaling)
        scale = _config_value(self.config, ("logit_scale",))  # Cohere: logits * logit_scale
        if scale is not None and isinstance(scale, (int, float)):
            temperature = 1.0 / float(scale)
        return HeadSpec(
            weight=lm_head.weight,
            bias=getattr(lm_head, "bias", None),
            softcap=float(softcap) if softcap else None,
            temperature=float(temperature),
        )

    def disable_adapters(self):
        """Context manager: inside it the LoRA adapters are off (the reference "policy with adapters off").
        ``ValueError`` if the model has no adapters."""
        if not self.has_adapters:
            raise ValueError("disable_adapters(): the model has no LoRA adapters (build it with lora=True)")
        return self.model.disable_adapter()

    # -- conveniences

    @property
    def device(self) -> torch.device:
        return self.head().weight.device

    def trainable_parameters(self):
        return [p for p in self.model.parameters() if p.requires_grad]

    def __repr__(self) -> str:
        return f"ModelAdapter({type(self.hf_model).__name__}, adapters={self.has_adapters})"


# ------------------------------------------------------------------------------------------ building


def _attn_implementation(device, dtype) -> str:
    """flash_attention_2 on CUDA in bf16/fp16 when flash-attn is installed, else sdpa."""
    dev = torch.device(device)
    half = dtype in (torch.bfloat16, torch.float16)
    if dev.type == "cuda" and half and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _default_dtype(device, dtype):
    if dtype is not None:
        if isinstance(dtype, str):
            try:
                return {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16,
                        "float16": torch.float16, "fp32": torch.float32, "float32": torch.float32}[dtype]
            except KeyError:
                raise ValueError(f"dtype: expected bf16, fp16 or fp32, got {dtype!r}") from None
        return dtype
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


# Special tokens of the tiny models' tokenizer (ChatML-style chat template).
PAD, EOS, IM_START, IM_END = "<pad>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
LLAVA_IMAGE = "<image>"
VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD = "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"
SPECIAL_TOKENS = [PAD, EOS, IM_START, IM_END, LLAVA_IMAGE, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]
TINY_VOCAB_SIZE = 640
# tiny-llava's vision tower: the synthetic set's image size, one patch per grid cell.
TINY_IMAGE_SIZE, TINY_PATCH_SIZE, TINY_VISION_HIDDEN = 32, 16, 64


def _chat_template(image_text: str) -> str:
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for c in message['content'] %}"
        "{% if c['type'] == 'image' %}" + image_text + "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


def tiny_tokenizer(image_text: str = ""):
    """A byte-level BPE tokenizer trained (deterministically) on the synthetic set's sentences, so any
    text encodes (byte fallback) and the synthetic words are single tokens; ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from .synthetic import corpus_sentences

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = corpus_sentences() + ["user", "assistant", "system"]
    tok.train_from_iterator(corpus * 2, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in (PAD, IM_END)],
        chat_template=_chat_template(image_text),
        padding_side="right",
        model_max_length=2048,
    )
    return fast


def _tiny_text_config(tok, *, tie: bool):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
    )


def _tiny_llava():
    """(config, processor) of tiny-llava: a CLIP vision tower with one 16x16 patch per cell of the synthetic
    set's 32x32 2x2 grid (four image tokens, each an object slot), LLaVA's projector and the tiny Llama."""
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tok = tiny_tokenizer(LLAVA_IMAGE)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=TINY_VISION_HIDDEN, intermediate_size=2 * TINY_VISION_HIDDEN, num_hidden_layers=2,
            num_attention_heads=2, image_size=TINY_IMAGE_SIZE, patch_size=TINY_PATCH_SIZE,
            projection_dim=TINY_VISION_HIDDEN,
        ),
        text_config=_tiny_text_config(tok, tie=False),
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        image_seq_length=(TINY_IMAGE_SIZE // TINY_PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",
        vision_feature_layer=-1,
        tie_word_embeddings=False,
    )
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE_SIZE}, crop_size={"height": TINY_IMAGE_SIZE, "width": TINY_IMAGE_SIZE},
        do_center_crop=True,
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=TINY_PATCH_SIZE,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=_chat_template(LLAVA_IMAGE), image_token=LLAVA_IMAGE,
    )
    return config, processor


def tiny_llava_config():
    """tiny-llava's model config (what the shipped base's fingerprint hashes)."""
    return _tiny_llava()[0]


def shipped_base_path() -> str:
    """Where the shipped tiny-llava-sft weights live (``prefopt/assets``; built by ``prefopt.train.build_base``)."""
    return os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                        "tiny_llava_sft.safetensors")


def _load_shipped_base(model) -> None:
    from safetensors.torch import load_file

    path = shipped_base_path()
    if not os.path.isfile(path):
        raise ValueError(f"tiny-llava-sft: {path} is missing (build it with python -m prefopt.train.build_base)")
    missing, unexpected = model.load_state_dict(load_file(path), strict=False)
    if missing or unexpected:
        raise ValueError(f"tiny-llava-sft: {path} does not fit tiny-llava's config (rebuild it with "
                         f"python -m prefopt.train.build_base): {(missing or unexpected)[0]}")


_IMAGE_ONLY_CLASSES: Dict[type, type] = {}


def image_only_processor_class(base) -> type:
    """The processor class ``base`` (a class or its name in transformers) without its video processor.

    In transformers 5 several processors (Qwen2-VL, Qwen3-VL, LLaVA-OneVision, SmolVLM, InternVL, ...) insist on
    a video processor, and every video processor needs torchvision, which does not install beside every torch.
    This subclass leaves ``video_processor`` out of the sub-processors the processor checks and loads, and
    lets the constructor (the real one's code) take None for it, which it hands on to the base class
    positionally, where it is dropped (true of every processor named above). Text and image processing are
    the real class's, and ``from_pretrained`` loads a folder's image processor, tokenizer and options as the
    real class does.
    """
    if isinstance(base, str):
        import transformers

        base = getattr(transformers, base)
    if base not in _IMAGE_ONLY_CLASSES:
        attributes = [a for a in base.get_attributes() if a != "video_processor"]
        init = base.__init__
        # The same code with a default for every positional parameter (None where it had none): transformers
        # reads the accepted options from the code's argument names, so a wrapper would lose them.
        names = init.__code__.co_varnames[1:init.__code__.co_argcount]
        given = dict(zip(names[len(names) - len(init.__defaults__ or ()):], init.__defaults__ or ()))
        init = types.FunctionType(init.__code__, init.__globals__, init.__name__,
                                  tuple(given.get(n) for n in names), init.__closure__)
        init.__kwdefaults__ = base.__init__.__kwdefaults__
        # The real class's name: what save_pretrained records as the folder's processor_class.
        _IMAGE_ONLY_CLASSES[base] = type(base.__name__, (base,), {"get_attributes": classmethod(lambda cls: attributes),
                                                                  "__init__": init})
    return _IMAGE_ONLY_CLASSES[base]


def _build_tiny(name: str, *, dtype, attn: str, seed: int):
    """(model, processor) of an embedded tiny model, weights drawn from ``seed`` (global RNG untouched)."""
    from transformers import (LlamaForCausalLM, LlavaForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    if name == "tiny-llama":
        tok = tiny_tokenizer()
        config = _tiny_text_config(tok, tie=True)
        cls, processor = LlamaForCausalLM, tok
    elif name in ("tiny-llava", "tiny-llava-sft"):
        config, processor = _tiny_llava()
        tok = processor.tokenizer
        cls = LlavaForConditionalGeneration
    elif name == "tiny-qwen2-vl":
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        image_text = VISION_START + IMAGE_PAD + VISION_END
        tok = tiny_tokenizer(image_text)
        text = _tiny_text_config(tok, tie=True).to_dict()
        text.pop("model_type", None)
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        config = Qwen2VLConfig(
            text_config=text,
            vision_config=dict(
                depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
            ),
            image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD),
            video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
            vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
            vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
            tie_word_embeddings=True,
        )
        image_processor = Qwen2VLImageProcessorPil(
            min_pixels=56 * 56, max_pixels=56 * 56, patch_size=14, temporal_patch_size=2, merge_size=2
        )
        processor = image_only_processor_class("Qwen2VLProcessor")(
            image_processor=image_processor, tokenizer=tok, chat_template=_chat_template(image_text)
        )
        cls = Qwen2VLForConditionalGeneration
    else:  # pragma: no cover - checked by the caller
        raise ValueError(f"unknown tiny model {name!r}")
    config._attn_implementation = attn
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls._from_config(config, attn_implementation=attn, dtype=torch.float32)
    if name == "tiny-llava-sft":
        _load_shipped_base(model)
    model = model.to(dtype)
    for cfg in (model.config, getattr(model, "generation_config", None)):
        if cfg is not None:
            cfg.pad_token_id = tok.pad_token_id
            cfg.eos_token_id = tok.eos_token_id
    return model, processor


# ------------------------------------------------------------------------------------------ local folders and hub ids

#: What prefopt trains, for the one-line refusal of anything else; README "Your model" lists the same.
SUPPORTED_MODELS = ("models that transformers' AutoModelForImageTextToText or AutoModelForCausalLM loads (tested: "
                    "LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, Gemma 3, PaliGemma, "
                    "Idefics3, SmolVLM, Mllama, InternVL, Aya Vision, Llama, Qwen2)")
#: The files a model folder is read from (weights, configs, tokenizer, processor, chat template); the remote
#: code's ``*.py`` only with ``trust_remote_code``.
MODEL_FILE_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt", "*.tiktoken"]
PICKLED_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def is_hub_id(name: str) -> bool:
    """``org/name`` that is no existing path: a Hugging Face hub id."""
    return name.count("/") == 1 and not os.path.exists(name) and not name.startswith((".", "/", "~"))


def resolve_hub_ids(cfg):
    """``cfg`` (a run's options: ``model``, ``init_from``, ``revision``, ``trust_remote_code``) with a hub id in
    ``model`` or ``init_from`` replaced by its folder in the Hugging Face cache (:func:`resolve_hub_id`), once
    per run: every model the run builds, and a resumed run, use the same snapshot."""
    import dataclasses

    check_revision(cfg.revision, {"--model": cfg.model, "--init-from": cfg.init_from})
    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    return dataclasses.replace(cfg, model=resolve_hub_id(cfg.model, option="--model", **kw),
                               init_from=resolve_hub_id(cfg.init_from, option="--init-from", **kw))


def check_revision(revision: Optional[str], named: Dict[str, Optional[str]]) -> None:
    """``ValueError`` when ``revision`` is given and none of ``named`` (``{option: name}``) is a hub id."""
    if revision is not None and not any(n is not None and is_hub_id(n) for n in named.values()):
        which = f"neither {' nor '.join(named)} is" if len(named) > 1 else f"{next(iter(named))} is not"
        raise ValueError(f"--revision {revision}: applies to a hub id (org/name), and {which} one here")


def resolve_hub_id(name: Optional[str], *, revision: Optional[str] = None, trust_remote_code: bool = False,
                   option: str = "--model") -> Optional[str]:
    """``name`` as it is unless it is a hub id, else its folder at ``revision`` (:func:`resolve_model`)."""
    if name is None or not is_hub_id(name):
        return name
    return resolve_model(name, revision=revision, trust_remote_code=trust_remote_code, option=option)


def saved_dtype(name: str, *, revision: Optional[str] = None, trust_remote_code: bool = False) -> Optional[torch.dtype]:
    """The dtype a model's weights are saved in (its config's ``dtype``), or None for the embedded tiny models and
    for a config that does not say."""
    if name in TINY_MODELS:
        return None
    from transformers import AutoConfig

    path = resolve_model(name, revision=revision, trust_remote_code=trust_remote_code)
    dtype = getattr(AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code), "dtype", None)
    return getattr(torch, dtype) if isinstance(dtype, str) else dtype


def resolve_model(name: str, *, revision: Optional[str] = None, trust_remote_code: bool = False,
                  option: str = "--model", files: Optional[List[str]] = None) -> str:
    """The local folder of ``name``, as Hugging Face tools resolve it: a local folder of that name first, else a
    hub id (``org/name``) looked up in the cache of huggingface_hub (``HF_HOME``, ``HF_HUB_CACHE``) at
    ``revision`` (a branch, tag or commit; default ``main``) and downloaded when missing and online
    (``HF_HUB_OFFLINE=1``: the cache only); ``files``: the file patterns fetched (default
    :data:`MODEL_FILE_PATTERNS`, weights included). ``ValueError`` (one line naming ``option``) when neither."""
    if os.path.isdir(name):
        return name
    if not is_hub_id(name):
        raise ValueError(f"{option}: model not found: {name!r} (expected a local model folder, a hub id org/name or "
                         f"one of {', '.join(TINY_MODELS)})")
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError

    patterns = (MODEL_FILE_PATTERNS if files is None else files) + (["*.py"] if trust_remote_code else [])
    try:
        return snapshot_download(name, revision=revision, allow_patterns=patterns)
    except HFValidationError as e:
        raise ValueError(f"{option} {name}: not a local folder nor a valid hub id ({first_line(e)})") from None
    except Exception as e:  # offline without a cached copy, unknown repo or revision, no network
        at = f" at revision {revision}" if revision else ""
        raise ValueError(f"{option} {name}: no local folder of that name, and the hub id{at} is neither in the "
                         f"Hugging Face cache nor downloadable ({first_line(e)})") from None


def check_model_files(path: str) -> None:
    """``ValueError`` naming the file when ``path`` holds a model file prefopt will not read: a JSON file
    (config, tokenizer, processor) that does not parse, a safetensors file whose header does not describe
    it, or pickled weights without safetensors beside them (prefopt unpickles nothing)."""
    from safetensors import safe_open

    names = sorted(os.listdir(path))
    for name in names:
        full = os.path.join(path, name)
        if name.endswith(".json") and os.path.isfile(full):
            try:
                with open(full, encoding="utf-8") as f:
                    json.load(f)
            except (ValueError, UnicodeDecodeError) as e:
                raise ValueError(f"{full}: not valid JSON ({first_line(e)})") from None
        elif name.endswith(".safetensors"):
            try:
                with safe_open(full, "pt") as f:
                    f.keys()
            except Exception as e:  # safetensors' own error types
                raise ValueError(f"{full}: not a valid safetensors file ({first_line(e)})") from None
    if not any(n.endswith(".safetensors") for n in names):
        pickled = [n for n in names if n.endswith(PICKLED_WEIGHTS)]
        if pickled:
            raise ValueError(f"{os.path.join(path, pickled[0])}: pickled weights, which prefopt does not read; convert "
                             "them to safetensors (e.g. load the model once and save_pretrained it)")


def _remote_code_refusal(path: str, e: Exception) -> ValueError:
    return ValueError(f"{path} needs the Python code it ships to load (remote code); prefopt runs it only with "
                      f"--trust-remote-code ({first_line(e)})")


def _needs_remote_code(e: Exception) -> bool:
    text = str(e)
    return "trust_remote_code" in text or "custom code" in text


def _model_auto_class(config, trust_remote_code: bool):
    """AutoModelForImageTextToText or AutoModelForCausalLM, whichever maps ``config`` (remote code: its
    ``auto_map``); None when neither."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    autos = (AutoModelForImageTextToText, AutoModelForCausalLM)
    for auto in autos:
        if type(config) in auto._model_mapping:
            return auto
    auto_map = getattr(config, "auto_map", None) or {}
    if trust_remote_code:
        for auto in autos:
            if auto.__name__ in auto_map:
                return auto
    return None


def _processor_class(path: str, config):
    """The processor class a folder names (``processor_config.json`` or the model type's), or None."""
    import transformers
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING_NAMES

    name = None
    for file in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        full = os.path.join(path, file)
        if os.path.isfile(full):
            with open(full, encoding="utf-8") as f:
                name = json.load(f).get("processor_class")
            if name:
                break
    for candidate in (name, PROCESSOR_MAPPING_NAMES.get(getattr(config, "model_type", None))):
        if candidate and hasattr(transformers, candidate):
            return getattr(transformers, candidate)
    return None


def _load_processor(path: str, config, *, vlm: bool, trust_remote_code: bool):
    """The folder's processor (``AutoProcessor``); for an image-text model whose processor does not load that
    way (its video processor needs torchvision), the folder's processor class without the video processor
    (:func:`image_only_processor_class`); a text model's tokenizer otherwise. ``ValueError`` naming the
    folder when none loads."""
    from transformers import AutoProcessor, AutoTokenizer

    kwargs = dict(local_files_only=True, trust_remote_code=trust_remote_code)
    first_error = None
    try:
        processor = AutoProcessor.from_pretrained(path, **kwargs)
        if not vlm or getattr(processor, "image_processor", None) is not None:
            return processor
    except Exception as e:  # a missing video processor, torchvision, a sub-processor's own error types
        if _needs_remote_code(e):
            raise _remote_code_refusal(path, e) from None
        first_error = e
    if vlm:
        cls = _processor_class(path, config)
        if cls is not None:
            try:
                return image_only_processor_class(cls).from_pretrained(path, **kwargs)
            except Exception as e:
                first_error = e
        raise ValueError(f"{path}: the processor of this image-text model does not load ({first_line(first_error)})")
    try:
        return AutoTokenizer.from_pretrained(path, **kwargs)
    except Exception as e:
        if _needs_remote_code(e):
            raise _remote_code_refusal(path, e) from None
        raise ValueError(f"{path}: the tokenizer does not load ({first_line(e)})") from None


def _load_local(path: str, *, dtype, attn: str, trust_remote_code: bool = False, quantize_on=None):
    """(model, processor) of a model folder; ``quantize_on``: a device to load the language model's linear layers
    to in 4-bit NF4 (:mod:`.quantize`), else None."""
    from transformers import AutoConfig

    check_model_files(path)
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)
    except Exception as e:
        if _needs_remote_code(e):
            raise _remote_code_refusal(path, e) from None
        raise ValueError(f"cannot read a model config in {path!r}: {first_line(e)}") from None
    auto = _model_auto_class(config, trust_remote_code)
    if auto is None:
        raise ValueError(f"{path}: unsupported model type {getattr(config, 'model_type', None)!r}; prefopt trains "
                         + SUPPORTED_MODELS)
    quantized = {}
    if quantize_on is not None:
        from .quantize import bnb_config, kept_linears

        with torch.device("meta"):  # the module names, without weights
            skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
        quantized = dict(quantization_config=bnb_config(dtype, kept_linears(skeleton, _lora_targets(skeleton))),
                         device_map={"": torch.device(quantize_on)})
    try:
        model = auto.from_pretrained(path, local_files_only=True, dtype=dtype, attn_implementation=attn,
                                     use_safetensors=True, trust_remote_code=trust_remote_code, **quantized)
    except Exception as e:  # transformers' own errors for a folder it cannot load
        if _needs_remote_code(e):
            raise _remote_code_refusal(path, e) from None
        raise ValueError(f"cannot load {path!r} with {auto.__name__}: {first_line(e)}") from None
    vlm = auto.__name__ == "AutoModelForImageTextToText"
    processor = _load_processor(path, config, vlm=vlm, trust_remote_code=trust_remote_code)
    tok = getattr(processor, "tokenizer", processor)
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return model, processor


def import_model_code(name_or_path: str, *, trust_remote_code: bool = False) -> None:
    """Import the code :func:`build_model` runs for a local folder (its model class, peft), so that a memory
    baseline taken after it counts the model, not the libraries (about 200 MiB)."""
    from transformers import AutoConfig

    if name_or_path in TINY_MODELS or not os.path.isdir(name_or_path):
        return
    try:
        config = AutoConfig.from_pretrained(name_or_path, local_files_only=True, trust_remote_code=trust_remote_code)
        auto = _model_auto_class(config, trust_remote_code)
        if auto is not None and type(config) in auto._model_mapping:
            auto._model_mapping[type(config)]  # imports the family's modeling module
    except Exception:  # build_model reports whatever is wrong with the folder, in its own words
        return
    import peft  # noqa: F401  (building the model imports it)


def _lora_targets(hf: nn.Module) -> list:
    """Full names of the language model's nn.Linear layers (not the head, not the vision tower)."""
    decoder = ModelAdapter(hf).language_model
    head = hf.get_output_embeddings()
    prefix = next(n for n, m in hf.named_modules() if m is decoder)
    names = []
    for n, m in decoder.named_modules():
        if isinstance(m, nn.Linear) and m is not head:
            names.append(f"{prefix}.{n}" if prefix else n)
    if not names:
        raise ValueError(f"LoRA: no linear layers found in the language model of {type(hf).__name__}")
    return names


def build_model(
    name_or_path: str,
    *,
    dtype=None,
    lora: bool = False,
    lora_r: int = 8,
    lora_alpha: int = 16,
    qlora: bool = False,
    gradient_checkpointing: bool = False,
    device="cpu",
    seed: int = 0,
    revision: Optional[str] = None,
    trust_remote_code: bool = False,
) -> Tuple[ModelAdapter, Any]:
    """Build ``(ModelAdapter, processor)``.

    ``name_or_path``: one of ``TINY_MODELS`` (random weights from ``seed``, except tiny-llava-sft: the shipped
    grounded base, see :mod:`prefopt.train.build_base`; tiny-llava and tiny-qwen2-vl
    with their real processor classes and PIL image processors, tiny-llama text-only with a tokenizer as
    its processor), or a local folder or hub id (:func:`resolve_model`, at ``revision``) of any model that
    ``AutoModelForImageTextToText`` or ``AutoModelForCausalLM`` loads, safetensors only (processor from
    ``AutoProcessor``, without its video processor when that one does not load; a text model's tokenizer).
    The Python code a folder ships runs only with ``trust_remote_code``. Unknown name, missing path,
    unsupported model, unreadable file: ``ValueError``, one line.

    ``dtype``: torch dtype or "bf16"/"fp16"/"fp32"; default bf16 on CUDA, fp32 on CPU.
    Attention: flash_attention_2 when flash-attn is importable, ``device`` is CUDA and the dtype is bf16/fp16,
    else sdpa.
    ``lora``: wrap with peft LoRA on the language model's linear layers (rank ``lora_r``, ``lora_alpha``);
    everything else, the head included, is frozen. ``qlora``: the same with the language model's linear layers
    in 4-bit NF4 under the adapters (:mod:`.quantize`; implies ``lora``). ``gradient_checkpointing``:
    non-reentrant checkpointing of the decoder layers (and ``use_cache`` off). The model is returned in train
    mode on ``device``.
    """
    dtype = _default_dtype(device, dtype)
    attn = _attn_implementation(device, dtype)
    if name_or_path in TINY_MODELS:
        model, processor = _build_tiny(name_or_path, dtype=dtype, attn=attn, seed=seed)
        if qlora:
            from .quantize import quantize_linears

            quantize_linears(model, _lora_targets(model), dtype, device)
    else:
        path = resolve_model(name_or_path, revision=revision, trust_remote_code=trust_remote_code)
        model, processor = _load_local(path, dtype=dtype, attn=attn, trust_remote_code=trust_remote_code,
                                       quantize_on=device if qlora else None)
    if qlora:
        from .quantize import keep_trainable_layout

        keep_trainable_layout(model)
    model.config.use_cache = False
    if gradient_checkpointing:
        kw = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
        else:  # pragma: no cover - older transformers
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
    if lora or qlora:
        from peft import LoraConfig, get_peft_model

        cfg = LoraConfig(
            r=lora_r, lora_alpha=lora_alpha, lora_dropout=0.0, bias="none", target_modules=_lora_targets(model)
        )
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # peft reads a deprecated transformers property
            torch.manual_seed(seed + 1)
            model = get_peft_model(model, cfg)
        hf, _ = _unwrap(model)
        for p in hf.get_output_embeddings().parameters():
            p.requires_grad_(False)
    model.to(device)
    model.train()
    return ModelAdapter(model), processor
