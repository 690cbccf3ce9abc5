"""Tiny random models of every tested Hugging Face family, each with a processor made here (no downloads).

``save_family(name, folder)`` writes ``folder`` as a Hugging Face model folder (``config.json``,
``model.safetensors``, the processor's and tokenizer's files), as a user's downloaded model would be; the
tests load it through ``prefopt.train.models.build_model(folder)`` like any other. Every family uses one
byte-level BPE vocabulary (prefopt's tiny tokenizer) plus the special tokens its processor expects.
"""
import functools

import torch
import transformers
from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerFast

from prefopt.train.models import IM_END, PAD, _chat_template, image_only_processor_class, tiny_tokenizer

TEXT_FAMILIES = ("llama", "qwen2")
VLM_FAMILIES = ("llava", "llava-next", "llava-onevision", "qwen2-vl", "qwen2.5-vl", "qwen3-vl", "gemma3", "paligemma",
                "idefics3", "smolvlm", "mllama", "internvl")
#: A family prefopt has no code or test of its own for (shows that loading is generic).
OUTSIDE_FAMILY = "aya-vision"
FAMILIES = TEXT_FAMILIES + VLM_FAMILIES + (OUTSIDE_FAMILY,)

QWEN_IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@functools.lru_cache(maxsize=1)
def _bpe() -> str:
    return tiny_tokenizer()._tokenizer.to_str()


def tokenizer(image_text="", named=None, extra=(), bos=None):
    """The tiny vocabulary with ``named`` special tokens (attributes such as ``boi_token``) and ``extra`` ones."""
    named = dict(named or {})
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_bpe()), pad_token=PAD, eos_token=IM_END, bos_token=bos,
        extra_special_tokens=named, chat_template=_chat_template(image_text), padding_side="right",
        model_max_length=4096,
    )
    new = [t for t in [*named.values(), *extra, *([bos] if bos else [])] if t not in tok.get_vocab()]
    tok.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return tok


def text_config(tok, cls=transformers.LlamaConfig, **kw):
    base = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=4096, pad_token_id=tok.pad_token_id,
                eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    base.update(kw)
    return cls(**base)


def _siglip(image_size=32, patch_size=16, **kw):
    return transformers.SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=image_size, patch_size=patch_size, **kw)


def _clip(image_size=32, patch_size=16):
    return transformers.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                                         projection_dim=32)


def _pil(name):
    return getattr(transformers, name)


def build(name):
    """(model class, config, processor) of the tiny ``name``."""
    T = transformers
    if name == "llama":
        tok = tokenizer()
        return T.LlamaForCausalLM, text_config(tok, tie_word_embeddings=True), tok
    if name == "qwen2":
        tok = tokenizer()
        return T.Qwen2ForCausalLM, text_config(tok, T.Qwen2Config, tie_word_embeddings=False), tok
    if name in ("llava", "llava-next"):
        tok = tokenizer("<image>", extra=["<image>"])
        common = dict(vision_config=_clip(), text_config=text_config(tok), image_token_id=tok.convert_tokens_to_ids("<image>"),
                      vision_feature_select_strategy="default", vision_feature_layer=-1)
        size = {"shortest_edge": 32}
        if name == "llava":
            config = T.LlavaConfig(image_seq_length=4, **common)
            image_processor = _pil("CLIPImageProcessorPil")(size=size, crop_size={"height": 32, "width": 32})
            processor_cls, model_cls = T.LlavaProcessor, T.LlavaForConditionalGeneration
        else:
            grid = [[32, 32], [32, 64], [64, 32]]
            config = T.LlavaNextConfig(image_grid_pinpoints=grid, **common)
            image_processor = _pil("LlavaNextImageProcessorPil")(size=size, crop_size={"height": 32, "width": 32},
                                                                 image_grid_pinpoints=grid)
            processor_cls, model_cls = T.LlavaNextProcessor, T.LlavaNextForConditionalGeneration
        processor = processor_cls(image_processor=image_processor, tokenizer=tok, patch_size=16,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=tok.chat_template, image_token="<image>")
        return model_cls, config, processor
    if name == "llava-onevision":
        tok = tokenizer("<image>", extra=["<image>", "<video>"])
        grid = [[32, 32], [32, 64], [64, 32]]
        config = T.LlavaOnevisionConfig(
            vision_config=_siglip(), text_config=text_config(tok, T.Qwen2Config),
            image_token_id=tok.convert_tokens_to_ids("<image>"), video_token_id=tok.convert_tokens_to_ids("<video>"),
            image_grid_pinpoints=grid, vision_feature_select_strategy="full", vision_feature_layer=-1)
        image_processor = _pil("LlavaOnevisionImageProcessorPil")(size={"height": 32, "width": 32},
                                                                  image_grid_pinpoints=grid)
        processor = image_only_processor_class(T.LlavaOnevisionProcessor)(
            image_processor=image_processor, tokenizer=tok, num_image_tokens=4, vision_feature_select_strategy="full",
            chat_template=tok.chat_template, image_token="<image>", video_token="<video>")
        return T.LlavaOnevisionForConditionalGeneration, config, processor
    if name in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):
        tok = tokenizer(QWEN_IMAGE, extra=["<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>"])
        ids = dict(image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
                   video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
                   vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
                   vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"))
        text = text_config(tok, T.Qwen2Config, head_dim=16).to_dict()
        text.pop("model_type")
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        patch = 16 if name == "qwen3-vl" else 14
        image_processor = _pil("Qwen2VLImageProcessorPil")(min_pixels=(4 * patch) ** 2, max_pixels=(4 * patch) ** 2,
                                                           patch_size=patch, temporal_patch_size=2, merge_size=2)
        if name == "qwen2-vl":
            config = T.Qwen2VLConfig(text_config=text, vision_config=dict(
                depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14, spatial_merge_size=2,
                temporal_patch_size=2), tie_word_embeddings=True, **ids)
            model_cls, processor_cls = T.Qwen2VLForConditionalGeneration, T.Qwen2VLProcessor
        elif name == "qwen2.5-vl":
            config = T.Qwen2_5_VLConfig(text_config=text, vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=14,
                spatial_merge_size=2, temporal_patch_size=2, window_size=56, fullatt_block_indexes=[1]), **ids)
            model_cls, processor_cls = T.Qwen2_5_VLForConditionalGeneration, T.Qwen2_5_VLProcessor
        else:
            text["rope_parameters"]["mrope_interleaved"] = True
            config = T.Qwen3VLConfig(text_config=text, vision_config=dict(
                depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16, deepstack_visual_indexes=[1]),
                **ids)
            model_cls, processor_cls = T.Qwen3VLForConditionalGeneration, T.Qwen3VLProcessor
        processor = image_only_processor_class(processor_cls)(image_processor=image_processor, tokenizer=tok,
                                                              chat_template=tok.chat_template)
        return model_cls, config, processor
    if name == "gemma3":
        named = {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"}
        tok = tokenizer("<start_of_image>", named=named, bos="<bos>")
        config = T.Gemma3Config(
            text_config=text_config(tok, T.Gemma3TextConfig, head_dim=16, sliding_window=64, final_logit_softcapping=30.0),
            vision_config=_siglip(), mm_tokens_per_image=4, boi_token_index=tok.convert_tokens_to_ids("<start_of_image>"),
            eoi_token_index=tok.convert_tokens_to_ids("<end_of_image>"),
            image_token_index=tok.convert_tokens_to_ids("<image_soft_token>"))
        image_processor = _pil("Gemma3ImageProcessorPil")(size={"height": 32, "width": 32})
        processor = T.Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                      chat_template=tok.chat_template)
        return T.Gemma3ForConditionalGeneration, config, processor
    if name == "paligemma":
        tok = tokenizer(named={"image_token": "<image>"}, bos="<bos>")
        tok.chat_template = None  # PaliGemma has none: the processor puts the image tokens before the prompt
        config = T.PaliGemmaConfig(vision_config=_siglip(projection_dim=64), text_config=text_config(
            tok, T.GemmaConfig, head_dim=16), image_token_id=tok.convert_tokens_to_ids("<image>"), projection_dim=64)
        config.text_config.num_image_tokens = 4
        image_processor = _pil("SiglipImageProcessorPil")(size={"height": 32, "width": 32})
        image_processor.image_seq_length = 4
        processor = T.PaliGemmaProcessor(image_processor=image_processor, tokenizer=tok)
        return T.PaliGemmaForConditionalGeneration, config, processor
    if name in ("idefics3", "smolvlm"):
        extra = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>"]
        extra += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
        tok = tokenizer("<image>", extra=extra, bos="<|begin_of_text|>")
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                      patch_size=16)
        common = dict(text_config=text_config(tok), image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=1)
        image_processor_kw = dict(size={"longest_edge": 32}, max_image_size={"longest_edge": 32}, do_image_splitting=False)
        if name == "idefics3":
            config = T.Idefics3Config(vision_config=vision, **common)
            processor = T.Idefics3Processor(image_processor=_pil("Idefics3ImageProcessorPil")(**image_processor_kw),
                                            tokenizer=tok, image_seq_len=4, chat_template=tok.chat_template)
            return T.Idefics3ForConditionalGeneration, config, processor
        config = T.SmolVLMConfig(vision_config=vision, **common)
        processor = image_only_processor_class(T.SmolVLMProcessor)(
            image_processor=_pil("SmolVLMImageProcessorPil")(**image_processor_kw), tokenizer=tok, image_seq_len=4,
            chat_template=tok.chat_template)
        return T.SmolVLMForConditionalGeneration, config, processor
    if name == "mllama":
        tok = tokenizer("<|image|>", extra=["<|image|>", "<|python_tag|>"], bos="<|begin_of_text|>")
        text = text_config(tok, T.MllamaTextConfig, cross_attention_layers=[1], rope_parameters={
            "rope_type": "default", "rope_theta": 10000.0})
        vision = T.MllamaVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                      attention_heads=2, image_size=32, patch_size=16, max_num_tiles=2,
                                      intermediate_layers_indices=[0], vision_output_dim=64,
                                      supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]])
        config = T.MllamaConfig(vision_config=vision, text_config=text,
                                image_token_index=tok.convert_tokens_to_ids("<|image|>"))
        image_processor = _pil("MllamaImageProcessorPil")(size={"height": 32, "width": 32}, max_image_tiles=2)
        processor = T.MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=tok.chat_template)
        return T.MllamaForConditionalGeneration, config, processor
    if name == "internvl":
        named = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                 "video_token": "<video>"}
        tok = tokenizer("<IMG_CONTEXT>", named=named)
        config = T.InternVLConfig(
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=[32, 32], patch_size=[16, 16]),
            text_config=text_config(tok, T.Qwen2Config), image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"),
            downsample_ratio=1.0, projector_hidden_act="gelu")
        image_processor = _pil("GotOcr2ImageProcessorPil")(size={"height": 32, "width": 32}, crop_to_patches=False)
        processor = image_only_processor_class(T.InternVLProcessor)(
            image_processor=image_processor, tokenizer=tok, image_seq_length=4, chat_template=tok.chat_template)
        return T.InternVLForConditionalGeneration, config, processor
    if name == "aya-vision":
        extra = ["<image>", "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "TILE",
                 "TILE_GLOBAL"]
        tok = tokenizer("<image>", extra=extra, bos="<BOS_TOKEN>")
        config = T.AyaVisionConfig(
            vision_config=_siglip(),
            text_config=text_config(tok, T.Cohere2Config, head_dim=16, sliding_window=64, logit_scale=0.5,
                                    layer_types=["sliding_attention", "full_attention"]),
            image_token_index=tok.convert_tokens_to_ids("<|IMG_PATCH|>"), downsample_factor=1, adapter_layer_norm_eps=1e-5)
        image_processor = _pil("GotOcr2ImageProcessorPil")(size={"height": 32, "width": 32}, crop_to_patches=False)
        processor = T.AyaVisionProcessor(image_processor=image_processor, tokenizer=tok, patch_size=16, img_size=32,
                                         downsample_factor=1, chat_template=tok.chat_template)
        return T.AyaVisionForConditionalGeneration, config, processor
    raise ValueError(f"unknown family {name!r}")


def save_family(name, folder, seed=0):
    """Write the tiny ``name`` (random weights from ``seed``) with its processor to ``folder``; returns it."""
    return save_model(*build(name), folder, seed=seed)


def save_model(model_cls, config, processor, folder, seed=0, dtype=torch.float32):
    """Write a ``model_cls`` of ``config`` (random weights from ``seed``, saved in ``dtype``) with ``processor`` to
    ``folder``; returns it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_cls._from_config(config, attn_implementation="sdpa", dtype=torch.float32)
        # Weights a fresh model starts at zero (Mllama's cross-attention gates, Gemma 3's image projection) would
        # keep the images out: draw them like the others (biases stay at zero).
        with torch.no_grad():
            for p in model.parameters():
                if (p.dim() >= 2 or p.numel() == 1) and not p.any():
                    p.normal_(0.0, 0.5)
    tok = getattr(processor, "tokenizer", processor)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.to(dtype).save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)
