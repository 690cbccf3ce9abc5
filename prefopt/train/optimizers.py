"""The optimizer of a run (``--optim``): torch's AdamW, or bitsandbytes' 8-bit AdamW, paged or not.

State per trainable parameter of ``n`` elements (what ``prefopt plan`` counts; measured in
tests/test_train_memory_features.py):

* ``adamw``: two moments in the parameter's dtype, ``2 * n * itemsize`` bytes (fp32: 8 bytes per element,
  bf16: 4);
* ``adamw8bit`` / ``paged_adamw8bit``: a parameter of at least :data:`MIN_8BIT_SIZE` elements keeps its two
  moments as uint8 codes with one fp32 absmax per moment and block of :data:`BLOCK_SIZE` elements,
  ``2 * n + 2 * 4 * ceil(n / 256)`` bytes (2.03 bytes per element, whatever the parameter's dtype); a smaller
  one (biases, norms) keeps fp32 moments, ``8 * n`` bytes; plus two 256-entry fp32 code maps (2 KiB) shared
  by all parameters. The paged variant allocates the state in CUDA unified memory, which the driver pages
  out to host memory under pressure; on the CPU bitsandbytes runs it unpaged (the same numbers as
  ``adamw8bit``).

Measured on a 58M Llama config in fp32: 446 MiB of AdamW state, 113 MiB of 8-bit state (2.03 bytes per
parameter).

The 8-bit state goes into checkpoints as tensors like any optimizer state (``optimizer.safetensors``: the
uint8 codes, code maps and absmax). A resumed ``paged_adamw8bit`` run continues with the same numbers, but
bitsandbytes (0.50) moves the restored state to the GPU as ordinary tensors: it is paged again only from a
fresh start (read from its code; no GPU was at hand to see it). Under DeepSpeed only ``adamw`` is accepted:
ZeRO partitions and keeps the optimizer state itself, and bitsandbytes' optimizers are untested there.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "paged_adamw8bit")
#: bitsandbytes keeps parameters with fewer elements than this in 32-bit state (its ``min_8bit_size``).
MIN_8BIT_SIZE = 4096
#: Elements per absmax block of bitsandbytes' blockwise 8-bit state.
BLOCK_SIZE = 256


def check_optim(name: str, deepspeed: bool) -> None:
    """``ValueError`` (one line naming ``--optim``) for an unknown optimizer or an 8-bit one under DeepSpeed."""
    if name not in OPTIMIZERS:
        raise ValueError(f"--optim: expected one of {', '.join(OPTIMIZERS)}, got {name!r}")
    if deepspeed and name != "adamw":
        raise ValueError(f"--optim {name}: not with --deepspeed (ZeRO keeps and partitions the optimizer state "
                         "itself; use --optim adamw)")


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], *, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """The optimizer ``name`` (:data:`OPTIMIZERS`) over ``params``, with AdamW's betas (0.9, 0.999) and eps 1e-8
    whichever it is."""
    check_optim(name, deepspeed=False)
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    import bitsandbytes as bnb

    if name == "paged_adamw8bit":
        # On the CPU bitsandbytes runs it unpaged and warns at the first step; the module docstring says so.
        warnings.filterwarnings("ignore", message="Paged optimizers are not supported on CPU")
        return bnb.optim.PagedAdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=MIN_8BIT_SIZE)
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay, min_8bit_size=MIN_8BIT_SIZE)


__all__ = ["OPTIMIZERS", "MIN_8BIT_SIZE", "BLOCK_SIZE", "build_optimizer", "check_optim"]
