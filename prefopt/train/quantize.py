"""QLoRA's 4-bit backbone (``--qlora``): the language model's linear layers in NF4 through bitsandbytes.

What is quantised: every ``nn.Linear`` of the language model (the layers LoRA targets,
:func:`~prefopt.train.models.build_model`), to bitsandbytes' ``Linear4bit`` with NF4 codes, double-quantised
absmax (QLoRA's recipe) and the run's dtype as compute dtype. What is not: the output head (prefopt's fused
op reads its weight directly, in its own dtype), the embeddings, the norms, and the vision tower and
projector of a VLM: they are frozen with no adapter on them to make up for quantisation error in the image
features, and they are a small share of a VLM's weights (Qwen2.5-VL-7B: about 0.7B of 8.3B parameters).

Bytes per quantised weight element (what ``prefopt plan`` counts; measured in
tests/test_train_memory_features.py): 0.5 for the 4-bit codes, plus per block of :data:`BLOCK_SIZE` (64)
elements one uint8 absmax, plus per 256 blocks one fp32 second-level absmax: ``n / 2 + n / 64 + 4 * n / 16384``
(about 0.516 bytes per element, against 2 in bf16 and 4 in fp32), plus 1,092 bytes per layer for the code
tables (the 16-entry NF4 code, the second level's 256-entry code and its offset, fp32). Measured on a 58M
Llama config's decoder (25.7M weights in 56 layers): 12.70 MiB, 0.518 bytes per weight, against 98 MiB in fp32.

A model folder is quantised while it loads (``from_pretrained`` with a ``BitsAndBytesConfig``: the whole
weights are never in memory at once); an embedded tiny model, built from its config, is quantised after
building with transformers' ``replace_with_bnb_linear`` and bitsandbytes' ``Params4bit``, which quantises a
weight when it is placed on a device.
"""
from __future__ import annotations

from typing import List

import torch
from torch import nn

#: Weight elements per absmax of bitsandbytes' NF4 (its default ``blocksize``).
BLOCK_SIZE = 64


def bnb_config(dtype: torch.dtype, keep: List[str]):
    """The ``BitsAndBytesConfig`` of ``--qlora``: NF4, double quantisation, ``dtype`` as compute dtype; the
    modules named in ``keep`` (full names) stay as they are."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=keep)


def kept_linears(model: nn.Module, targets: List[str]) -> List[str]:
    """Full names of ``model``'s linear layers that are not in ``targets`` (the head, the vision tower's, the
    projector's): what ``--qlora`` keeps in the run's dtype."""
    chosen = set(targets)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in chosen]


def quantize_linears(model: nn.Module, targets: List[str], dtype: torch.dtype, device) -> None:
    """Replace the linear layers named in ``targets`` by NF4 ``Linear4bit`` layers holding their weights,
    quantised on ``device`` (a model built in memory; a folder is quantised by ``from_pretrained``)."""
    import bitsandbytes as bnb
    from transformers.integrations.bitsandbytes import replace_with_bnb_linear

    originals = {name: model.get_submodule(name) for name in targets}
    replace_with_bnb_linear(model, modules_to_not_convert=kept_linears(model, targets),
                            quantization_config=bnb_config(dtype, []))
    for name, old in originals.items():
        new = model.get_submodule(name)
        # The meta Params4bit made by replace_with_bnb_linear carries the quantisation options (as transformers'
        # own loading does); moving the real weight to a device quantises it.
        new.weight = bnb.nn.Params4bit(old.weight.detach(), requires_grad=False, **new.weight.__dict__).to(device)
        if old.bias is not None:
            new.bias = nn.Parameter(old.bias.detach().to(device), requires_grad=False)
    model.is_loaded_in_4bit = True


def keep_trainable_layout(model: nn.Module) -> None:
    """Stop bitsandbytes from repacking ``model``'s 4-bit weights for CPU inference. On a CPU with AVX512-BF16
    the first forward of a ``Linear4bit`` in eval mode without gradients (a probe, the precompute pass)
    converts its weight, for good, to a layout whose kernel has no backward: every later training step's
    gradient through that layer would be wrong, silently (measured: every LoRA gradient of tiny-llama changed
    after one such forward). Training keeps the layout it can differentiate; inference is slower on the CPU."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


__all__ = ["BLOCK_SIZE", "bnb_config", "keep_trainable_layout", "kept_linears", "quantize_linears"]
