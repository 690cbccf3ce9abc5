"""The memory features of ``prefopt train``: ``--optim`` (bitsandbytes' 8-bit AdamW), ``--qlora`` and
``--offload-activations``, on the CPU with the embedded tiny models, a few steps each.

What a CPU shows: the 8-bit state is what is checkpointed and a resumed run continues to the same numbers; the
optimizer state's and the 4-bit weights' sizes follow the formulas ``prefopt plan`` counts (optimizers.py,
quantize.py); QLoRA trains the adapters alone and its export merges them into the unquantised source weights.
"""
import dataclasses
import json
import math
import os

import pytest
import torch

pytest.importorskip("bitsandbytes")
pytest.importorskip("transformers")

from safetensors import safe_open  # noqa: E402

from prefopt.train import checkpoint as ckpt  # noqa: E402
from prefopt.train.loop import TrainConfig, prepare, train  # noqa: E402
from prefopt.train.optimizers import BLOCK_SIZE, MIN_8BIT_SIZE, build_optimizer  # noqa: E402
from prefopt.train.quantize import BLOCK_SIZE as BLOCK_4BIT  # noqa: E402
from test_train_loop import assert_same_weights, final_weights, metrics, write_text_data  # noqa: E402

TEXT = "tiny-llama"


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("text_data"), train=16, heldout=2)


def config(out, data, **kw):
    base = dict(model=TEXT, data=data, out=str(out), steps=3, batch_size=2, probe_every=0, probe_size=2,
                progress=False, device="cpu", eval_size=0, save_minutes=0)
    base.update(kw)
    return TrainConfig(**base)


def timeless_metrics(out):
    """metrics.jsonl without the lines' timings and memory, which differ between runs of the same numbers."""
    drop = ("tokens_per_second", "step_seconds", "peak_memory_mb")
    return [{k: v for k, v in m.items() if k not in drop} for m in metrics(out)]


# ------------------------------------------------------------------------------------------ --optim


def test_8bit_optimizer_state_is_checkpointed_and_resumes_to_the_same_numbers(tmp_path, text_data):
    """3 steps of full fine-tuning with adamw8bit straight vs 2 + resume + 1: the same losses and weights (bit for
    bit: the same operations in the same order on the restored uint8 state); the checkpoint holds 8-bit state."""
    common = dict(method="sft", optim="adamw8bit")
    straight = train(config(tmp_path / "straight", text_data, **common))
    part = config(tmp_path / "resumed", text_data, stop_after=2, **common)
    assert train(part)["steps"] == 2
    with safe_open(os.path.join(tmp_path / "resumed", "checkpoint-2", ckpt.OPTIMIZER_TENSORS), "pt") as f:
        dtypes = [f.get_slice(k).get_dtype() for k in f.keys()]
    assert "U8" in dtypes and "F32" in dtypes  # codes, and code maps / absmax / small parameters' 32-bit state
    resumed = train(dataclasses.replace(part, resume=True, stop_after=None))
    assert resumed["steps"] == 3
    a, b = timeless_metrics(tmp_path / "straight"), timeless_metrics(tmp_path / "resumed")
    assert a == b and len(a) == 3
    assert_same_weights(final_weights(straight), final_weights(resumed))
    with pytest.raises(ValueError, match="--resume: --optim is 'adamw' but the run in .* used 'adamw8bit'"):
        prepare(dataclasses.replace(part, resume=True, optim="adamw"))


def test_8bit_optimizer_state_bytes_follow_the_formula():
    """adamw: 8 bytes per fp32 element; adamw8bit: 2 bytes per element of a tensor of MIN_8BIT_SIZE elements or more
    plus two fp32 absmax per BLOCK_SIZE elements, 8 bytes per element below that size, and two 256-entry fp32 code
    maps shared by all parameters.
    paged_adamw8bit on the CPU is the same optimizer unpaged: the same numbers."""
    torch.manual_seed(0)
    shapes = [(256, 512), (512,), (64, 64), (100, 40)]  # 8-bit, 32-bit, 8-bit at exactly 4096, 32-bit (4000)
    results = {}
    for name in ("adamw", "adamw8bit", "paged_adamw8bit"):
        params = [torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i)))
                  for i, s in enumerate(shapes)]
        opt = build_optimizer(name, params, lr=1e-2, weight_decay=0.0)
        for step in range(2):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(100 * step + i))
            opt.step()
        unique = {id(v): v for s in opt.state.values() for k, v in s.items() if isinstance(v, torch.Tensor)
                  and k != "step"}  # torch's step counter: a 4-byte scalar per parameter, left out of the formula
        state = sum(v.numel() * v.element_size() for v in unique.values())
        results[name] = (state, [p.detach().clone() for p in params])

    def eight_bit(n):
        return 2 * n + 2 * 4 * math.ceil(n / BLOCK_SIZE) if n >= MIN_8BIT_SIZE else 8 * n

    sizes = [math.prod(s) for s in shapes]
    assert results["adamw"][0] == sum(8 * n for n in sizes)
    assert results["adamw8bit"][0] == sum(eight_bit(n) for n in sizes) + 2 * 256 * 4
    assert results["paged_adamw8bit"][0] == results["adamw8bit"][0]
    for p, q in zip(results["paged_adamw8bit"][1], results["adamw8bit"][1]):
        assert torch.equal(p, q)
    for p, q in zip(results["adamw8bit"][1], results["adamw"][1]):
        # Quantised moments: another update than AdamW's, of the same size (an Adam step moves an element by about lr;
        # measured: at most 0.79 lr apart after 2 steps).
        assert not torch.equal(p, q) and (p - q).abs().max() < 2 * 1e-2


@pytest.mark.parametrize("change,message", [
    ({"optim": "sgd"}, "--optim: expected one of adamw, adamw8bit, paged_adamw8bit, got 'sgd'"),
    ({"optim": "adamw8bit", "deepspeed": "zero2"}, "--optim adamw8bit: not with --deepspeed"),
])
def test_optim_refusals(tmp_path, change, message):
    with pytest.raises(ValueError) as e:
        prepare(TrainConfig(out=str(tmp_path / "run"), **change))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ --qlora


def lora_delta(weights, layer, scale):
    """B @ A * scale of ``layer``'s adapters in a checkpoint's trainable weights."""
    a = weights[f"model.base_model.model.{layer}.lora_A.default.weight"]
    b = weights[f"model.base_model.model.{layer}.lora_B.default.weight"]
    return (b.double() @ a.double() * scale).float()


def test_qlora_trains_the_adapters_on_a_4bit_backbone_and_exports_onto_the_source_weights(tmp_path):
    """tiny-llava, DPO with the adapters-off reference, 2 steps: the language model's linear layers are bnb 4-bit,
    the head and the vision tower are not; gradients reach the adapters and only them; OUT/model holds the source
    weights (rebuilt unquantised) plus B @ A * alpha / r, computed here from the checkpoint."""
    import bitsandbytes as bnb
    from transformers import LlavaForConditionalGeneration

    from prefopt.train.models import build_model

    run = prepare(config(tmp_path / "run", "synthetic", model="tiny-llava", method="dpo", qlora=True, steps=2,
                         train_size=8, lr=1e-2))
    assert run.cfg.lora and run.ref_mode == "adapters"
    hf = run.policy.hf_model
    quantized = {n for n, m in hf.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized and all(".language_model." in n for n in quantized)
    assert not isinstance(hf.get_output_embeddings(), bnb.nn.Linear4bit)
    assert run.policy.head().weight.dtype == torch.float32
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in run.policy.vision_tower.modules())
    trainable = [n for n, p in run.policy.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    for n in quantized:  # quantize.py's bytes: n/2 of codes, a uint8 absmax per 64 elements, a fp32 one per 256 blocks
        weight = hf.get_submodule(n).weight
        elements = math.prod(weight.quant_state.shape)
        blocks = math.ceil(elements / BLOCK_4BIT)
        assert weight.dtype == torch.uint8 and weight.numel() == elements // 2
        assert weight.quant_state.absmax.dtype == torch.uint8 and weight.quant_state.absmax.numel() == blocks
        assert weight.quant_state.state2.absmax.dtype == torch.float32
        assert weight.quant_state.state2.absmax.numel() == math.ceil(blocks / 256)
    codes = {n: hf.get_submodule(n).weight.detach().clone() for n in quantized}
    summary = run.execute()
    assert summary["steps"] == 2 and math.isfinite(summary["loss"])
    assert all(torch.equal(codes[n], hf.get_submodule(n).weight) for n in quantized)  # the 4-bit base is frozen
    weights = final_weights(summary)
    assert set(weights) == {"model." + n for n in trainable}
    assert all(weights[k].abs().max() > 0 for k in weights if ".lora_B." in k)  # B starts at zero: it was trained

    source = build_model("tiny-llava", seed=0)[0].hf_model.state_dict()
    exported = LlavaForConditionalGeneration.from_pretrained(summary["model_folder"]).state_dict()
    assert exported.keys() == source.keys()
    merged = {n.removesuffix(".base_layer") for n in quantized}
    assert merged and merged <= {n.removesuffix(".weight") for n in source}
    for name, value in exported.items():
        assert value.dtype == torch.float32
        layer = name.removesuffix(".weight")
        expected = source[name] + lora_delta(weights, layer, 16 / 8) if layer in merged else source[name]
        torch.testing.assert_close(value, expected, rtol=0, atol=1e-6, msg=name)
    with open(os.path.join(summary["model_folder"], "prefopt.json"), encoding="utf-8") as f:
        assert json.load(f)["qlora"] is True


def test_qlora_gradients_are_those_of_the_dequantised_model_even_after_an_inference_forward():
    """The adapters' gradients on the 4-bit backbone equal those on a plain model holding the dequantised NF4
    weights (the same adapters, B random so that every layer's gradient flows through the later ones); also after
    an eval-mode forward without gradients (a probe's), which on CPUs with AVX512-BF16 made bitsandbytes repack the
    weights into a layout with no backward (every gradient changed before quantize.keep_trainable_layout)."""
    import bitsandbytes as bnb

    from prefopt.train.models import build_model

    quantized, _ = build_model(TEXT, qlora=True, seed=0)
    plain, _ = build_model(TEXT, lora=True, seed=0)
    g = torch.Generator().manual_seed(5)
    plain_modules = dict(plain.model.named_modules())
    with torch.no_grad():
        for name, module in quantized.model.named_modules():
            if isinstance(module, bnb.nn.Linear4bit):
                weight = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
                plain_modules[name].weight.copy_(weight)
        plain_params = dict(plain.model.named_parameters())
        for name, p in quantized.model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                plain_params[name].copy_(p)
    ids = torch.randint(0, 300, (2, 12), generator=g)

    def adapter_grads(adapter):
        adapter.model.train()
        adapter.model.zero_grad()
        adapter.hidden_states(input_ids=ids, attention_mask=torch.ones_like(ids)).pow(2).sum().backward()
        return {n: p.grad for n, p in adapter.model.named_parameters() if p.requires_grad}

    expected = adapter_grads(plain)
    quantized.model.eval()
    with torch.no_grad():
        quantized.hidden_states(input_ids=ids, attention_mask=torch.ones_like(ids))
    got = adapter_grads(quantized)
    assert got.keys() == expected.keys() and len(got) == 28
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6, msg=name)


def test_qlora_loads_a_model_folder_in_4bit_and_keeps_the_adapter_apart(tmp_path):
    """A model folder quantised as it loads (from_pretrained with a BitsAndBytesConfig); --keep-adapter: OUT/model
    holds the folder's own weights, unchanged and in the dtype they are saved in (bf16, where the run computed in
    fp32), and the trained adapter beside them."""
    import bitsandbytes as bnb
    from safetensors.torch import load_file

    from prefopt.train.models import build_model

    folder = tmp_path / "source"
    adapter, tok = build_model(TEXT, seed=3)
    adapter.hf_model.to(torch.bfloat16).save_pretrained(folder)
    tok.save_pretrained(folder)
    run = prepare(config(tmp_path / "run", write_text_data(tmp_path, train=4, heldout=1), model=str(folder),
                         method="sft", qlora=True, steps=1, keep_adapter=True))
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in run.policy.hf_model.modules())
    summary = run.execute()
    out = summary["model_folder"]
    assert os.path.isfile(os.path.join(out, "adapter_model.safetensors"))
    base, source = load_file(os.path.join(out, "model.safetensors")), load_file(folder / "model.safetensors")
    assert base.keys() == source.keys() and all(torch.equal(base[k], source[k]) for k in source)
    assert {t.dtype for t in base.values()} == {t.dtype for t in source.values()} == {torch.bfloat16}


@pytest.mark.parametrize("change,message", [
    ({"reference": "model"}, "--reference model: not with --qlora"),
    ({"deepspeed": "zero3"}, "--qlora: not with --deepspeed"),
    ({"method": "cw-dpo", "options": None}, "--qlora: cw-dpo takes its reference at step 1"),
])
def test_qlora_refusals(tmp_path, text_data, change, message):
    from prefopt.train.methods import MethodOptions

    change = {k: MethodOptions(sftc_fraction=0.5) if k == "options" else v for k, v in change.items()}
    with pytest.raises(ValueError) as e:
        prepare(config(tmp_path / "run", text_data, **{"method": "dpo", "qlora": True, "steps": 2, **change}))
    assert str(e.value).startswith(message) and "\n" not in str(e.value)
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ --offload-activations


def test_offloaded_activations_change_no_number(tmp_path, text_data, monkeypatch):
    """2 steps with checkpointing, and with --offload-activations (which implies it): torch's save_on_cpu packs every
    decoder layer's checkpointed input (hidden-sized) in each training forward, and the losses, gradient norms and
    weights are the same, bit for bit (on the CPU the tensors stay where they are: what a CPU can show)."""
    packed = []

    class CountingSaveOnCpu(torch.autograd.graph.save_on_cpu):
        def __init__(self, pin_memory=False, device_type="cuda"):
            super().__init__(pin_memory, device_type)
            pack = self.pack_hook

            def count(tensor):
                packed.append(tuple(tensor.shape))
                return pack(tensor)

            self.pack_hook = count

    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    common = dict(method="dpo", steps=2, probe_every=0)
    plain = train(config(tmp_path / "plain", text_data, gradient_checkpointing=True, **common))
    assert not packed
    run = prepare(config(tmp_path / "offloaded", text_data, offload_activations=True, **common))
    assert run.cfg.gradient_checkpointing
    offloaded = run.execute()
    layers = run.policy.config.num_hidden_layers
    assert sum(len(s) == 3 and s[-1] == run.policy.config.hidden_size for s in packed) >= 2 * layers
    a, b = timeless_metrics(tmp_path / "plain"), timeless_metrics(tmp_path / "offloaded")
    assert a == b and len(a) == 2
    assert_same_weights(final_weights(plain), final_weights(offloaded))


def test_offload_activations_refused_under_deepspeed(tmp_path):
    with pytest.raises(ValueError) as e:
        prepare(TrainConfig(out=str(tmp_path / "run"), offload_activations=True, deepspeed="zero2"))
    assert str(e.value).startswith("--offload-activations: not with --deepspeed") and "\n" not in str(e.value)
