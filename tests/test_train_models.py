"""Model adapters and the embedded tiny models (prefopt.train.models)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")

from prefopt.train.data import PreferenceCollator, PreferenceRecord, load_records, model_inputs  # noqa: E402
from prefopt.train.models import (  # noqa: E402
    IMAGE_PAD,
    TINY_MODELS,
    VIDEO_PAD,
    VISION_END,
    VISION_START,
    HeadSpec,
    ModelAdapter,
    build_model,
)

TINY = list(TINY_MODELS)


def _records(name, n=2):
    recs = load_records("synthetic", size=n, seed=3)
    if name == "tiny-llama":  # text-only: drop the images
        recs = [PreferenceRecord(r.prompt, r.chosen, r.rejected, [], r.corrections) for r in recs]
    return recs


def _logits_from_head(hidden, head: HeadSpec):
    z = hidden @ head.weight.T
    if head.bias is not None:
        z = z + head.bias
    if head.softcap is not None:
        z = head.softcap * torch.tanh(z / head.softcap)
    return z / head.temperature


@pytest.fixture(scope="module")
def tiny():
    """name -> (adapter, processor, batch), built once for the module."""
    out = {}
    for name in TINY:
        adapter, processor = build_model(name, seed=0)
        batch = PreferenceCollator(processor)(_records(name), mode="pair")
        out[name] = (adapter, processor, batch)
    return out


@pytest.mark.parametrize("name", TINY)
def test_hidden_states_shape_and_match_model_logits(tiny, name):
    adapter, _, batch = tiny[name]
    R, T = batch["input_ids"].shape
    head = adapter.head()
    # hidden_states must never run the output head.
    head_module = adapter.hf_model.get_output_embeddings()

    def refuse(*_):
        raise AssertionError("hidden_states ran the output head")

    hook = head_module.register_forward_hook(refuse)
    try:
        hidden = adapter.hidden_states(**batch)
    finally:
        hook.remove()
    assert hidden.shape == (R, T, adapter.hf_model.config.get_text_config().hidden_size)
    assert head.softcap is None and head.temperature == 1.0
    logits = adapter.model(**model_inputs(batch)).logits  # a test may compute logits
    torch.testing.assert_close(_logits_from_head(hidden, head), logits, rtol=1e-5, atol=1e-5)


def test_tied_embeddings_honoured(tiny):
    for name in ("tiny-llama", "tiny-qwen2-vl"):  # tied
        adapter = tiny[name][0]
        assert adapter.head().weight is adapter.hf_model.get_input_embeddings().weight
    adapter = tiny["tiny-llava"][0]  # untied
    head = adapter.head()
    assert head.weight is adapter.hf_model.lm_head.weight
    assert head.weight is not adapter.hf_model.get_input_embeddings().weight
    assert head.bias is None


def test_tiny_models_deterministic_from_seed():
    state = torch.random.get_rng_state()
    a, _ = build_model("tiny-llava", seed=5)
    assert torch.equal(torch.random.get_rng_state(), state), "building must not move the global RNG"
    b, _ = build_model("tiny-llava", seed=5)
    c, _ = build_model("tiny-llava", seed=6)
    sa, sb, sc = a.model.state_dict(), b.model.state_dict(), c.model.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)
    assert not a.has_adapters and a.model.training
    assert all(p.dtype == torch.float32 for p in a.model.parameters())  # fp32 on CPU by default


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2-vl"])
def test_lora_freezes_head_and_disable_adapters_gives_base(tiny, name):
    base, _, batch = tiny[name]
    adapter, _ = build_model(name, lora=True, lora_r=4, seed=0)
    assert adapter.has_adapters
    head = adapter.head()
    assert not head.weight.requires_grad
    trainable = [n for n, p in adapter.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert not any("visual" in n or "vision" in n for n in trainable)  # LoRA on the language model only
    with torch.no_grad():  # make the adapters matter (peft starts lora_B at zero)
        for n, p in adapter.model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    hidden = adapter.hidden_states(**batch)
    with torch.no_grad():
        base_hidden = base.hidden_states(**batch)
        with adapter.disable_adapters():
            off = adapter.hidden_states(**batch)
    assert (hidden - base_hidden).abs().max() > 1e-2
    torch.testing.assert_close(off, base_hidden)
    hidden.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in adapter.trainable_parameters())
    assert head.weight.grad is None


def test_disable_adapters_without_lora_raises(tiny):
    with pytest.raises(ValueError, match="no LoRA adapters"):
        tiny["tiny-llama"][0].disable_adapters()


def test_unsupported_model_errors():
    base = transformers.LlamaModel(
        transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2)
    )
    with pytest.raises(ValueError, match="unsupported model LlamaModel.*no head"):
        ModelAdapter(base)
    with pytest.raises(ValueError, match="unsupported model Linear.*get_output_embeddings"):
        ModelAdapter(torch.nn.Linear(2, 2))


def test_build_model_bad_names(tmp_path):
    with pytest.raises(ValueError, match="model not found: 'tiny-gpt'"):
        build_model("tiny-gpt")
    with pytest.raises(ValueError, match="model not found"):
        build_model(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="cannot read a model config"):
        build_model(str(tmp_path))  # a folder without a config


def test_softcap_and_other_text_models(tiny):
    tok = tiny["tiny-llama"][1]
    batch = tiny["tiny-llama"][2]
    common = dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    gemma = transformers.Gemma2ForCausalLM._from_config(
        transformers.Gemma2Config(head_dim=8, final_logit_softcapping=30.0, **common), attn_implementation="eager"
    )
    qwen = transformers.Qwen2ForCausalLM._from_config(transformers.Qwen2Config(tie_word_embeddings=False, **common))
    for model, softcap in ((gemma, 30.0), (qwen, None)):
        adapter = ModelAdapter(model)
        head = adapter.head()
        assert head.softcap == softcap
        hidden = adapter.hidden_states(**batch)
        logits = model(**model_inputs(batch)).logits
        torch.testing.assert_close(_logits_from_head(hidden, head), logits, rtol=1e-5, atol=1e-5)


def test_qwen2_5_vl_adapter(tiny):
    _, processor, batch = tiny["tiny-qwen2-vl"]
    tok = processor.tokenizer
    text = tiny["tiny-qwen2-vl"][0].hf_model.config.text_config.to_dict()
    text.pop("model_type", None)
    config = transformers.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, window_size=56,
                           fullatt_block_indexes=[1]),
        image_token_id=tok.convert_tokens_to_ids(IMAGE_PAD), video_token_id=tok.convert_tokens_to_ids(VIDEO_PAD),
        vision_start_token_id=tok.convert_tokens_to_ids(VISION_START),
        vision_end_token_id=tok.convert_tokens_to_ids(VISION_END),
    )
    torch.manual_seed(0)
    model = transformers.Qwen2_5_VLForConditionalGeneration._from_config(config, attn_implementation="sdpa")
    adapter = ModelAdapter(model)
    hidden = adapter.hidden_states(**batch)
    assert hidden.shape == batch["input_ids"].shape + (64,)
    logits = model(**model_inputs(batch)).logits
    torch.testing.assert_close(_logits_from_head(hidden, adapter.head()), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", TINY)
def test_local_path_roundtrip(tiny, tmp_path, name):
    adapter, processor, batch = tiny[name]
    adapter.model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded, proc2 = build_model(str(tmp_path))
    assert type(loaded.hf_model) is type(adapter.hf_model)
    if name != "tiny-llama":
        assert proc2.image_processor is not None
    batch2 = PreferenceCollator(proc2)(_records(name), mode="pair")
    assert all(torch.equal(batch[k], batch2[k]) for k in batch)
    with torch.no_grad():
        torch.testing.assert_close(loaded.hidden_states(**batch2), adapter.hidden_states(**batch))


def test_gradient_checkpointing_and_dtype(tiny):
    adapter, _ = build_model("tiny-llava", gradient_checkpointing=True, seed=0)
    batch = tiny["tiny-llava"][2]
    hidden = adapter.hidden_states(**batch)
    with torch.no_grad():
        torch.testing.assert_close(hidden, tiny["tiny-llava"][0].hidden_states(**batch))
    hidden.pow(2).mean().backward()
    assert adapter.hf_model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None
    bf16, _ = build_model("tiny-llava", dtype="bf16")
    assert all(p.dtype == torch.bfloat16 for p in bf16.model.parameters())
    assert bf16.hidden_states(**batch).dtype == torch.bfloat16  # fp32 pixel values are cast
    lora_gc, _ = build_model("tiny-llama", lora=True, gradient_checkpointing=True)
    lora_gc.hidden_states(**tiny["tiny-llama"][2]).pow(2).mean().backward()
    assert all(p.grad is not None for p in lora_gc.trainable_parameters())
    with pytest.raises(ValueError, match="dtype"):
        build_model("tiny-llama", dtype="int7")


def test_tiny_generate_runs(tiny):
    adapter, processor, _ = tiny["tiny-qwen2-vl"]
    collator = PreferenceCollator(processor)
    recs = _records("tiny-qwen2-vl", 2)
    inputs = collator.generation_inputs(recs)
    assert (inputs["attention_mask"][:, -1] == 1).all()  # left padded
    adapter.model.eval()
    try:
        out = adapter.model.generate(**inputs, max_new_tokens=3, do_sample=False)
    finally:
        adapter.model.train()
    assert out.shape[0] == 2 and inputs["input_ids"].shape[1] < out.shape[1] <= inputs["input_ids"].shape[1] + 3


def test_tiny_tokenizer_roundtrip(tiny):
    tok = tiny["tiny-llama"][1]
    text = "What colour is the circle? Zebra ü 42 \u2603"
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert len(tok("The circle is red.", add_special_tokens=False)["input_ids"]) == 5  # whole words


def test_attention_choice(monkeypatch):
    from prefopt.train import models

    assert models._attn_implementation("cpu", torch.float32) == "sdpa"
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name: object() if name == "flash_attn" else None)
    assert models._attn_implementation("cuda", torch.bfloat16) == "flash_attention_2"
    assert models._attn_implementation("cuda", torch.float32) == "sdpa"
    assert models._attn_implementation("cpu", torch.bfloat16) == "sdpa"
