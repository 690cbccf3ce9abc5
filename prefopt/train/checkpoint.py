"""Checkpoints: written atomically, resumed to the same numbers as an uninterrupted run.

A checkpoint is a folder ``checkpoint-<step>`` in the run folder:

* ``trainable.safetensors``: the trainable parameters (all of them for full fine-tuning, the LoRA
  weights with ``--lora``) by name, gathered whole under ZeRO-3;
* ``optimizer.pt``, ``scheduler.pt`` (one process and DDP) or ``deepspeed/`` (DeepSpeed's own
  partitioned optimizer and scheduler states, written by every rank);
* ``rng_state_<rank>.pt``: Python, NumPy, torch CPU and CUDA generator states of every rank;
* ``trainer_state.json``: the step, the probe start values, the options the run was started with.

It is written under a temporary name (``.checkpoint-<step>.tmp``) and renamed when complete; the file
``latest`` (itself replaced atomically) names the newest complete checkpoint. A run killed while
writing leaves the previous checkpoint intact. Older checkpoints beyond ``keep`` are deleted.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from typing import Any, Dict, Optional

import numpy as np
import torch

from .distributed import DistState, barrier, gathered

LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"


def rng_state() -> Dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def trainable_state(module: torch.nn.Module, state: DistState, everywhere: bool = False) -> Dict[str, torch.Tensor]:
    """Whole CPU copies of the trainable parameters by name, on rank 0 (empty elsewhere unless
    ``everywhere``); under ZeRO-3 every rank takes part in gathering them one by one."""
    out = {}
    for name, p in module.named_parameters():
        if p.requires_grad:
            with gathered([p], state):
                if everywhere or state.is_main:
                    out[name] = p.detach().to("cpu", copy=True).contiguous()
    return out


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """Path of the newest complete checkpoint in ``out_dir``, or None."""
    pointer = os.path.join(out_dir, LATEST)
    if not os.path.isfile(pointer):
        return None
    with open(pointer, encoding="utf-8") as f:
        name = f.read().strip()
    path = os.path.join(out_dir, name)
    return path if os.path.isfile(os.path.join(path, STATE_FILE)) else None


def _write_text_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def save_checkpoint(out_dir: str, step: int, *, engine, trainer_state: Dict[str, Any], state: DistState,
                    keep: int = 2) -> str:
    """Write ``checkpoint-<step>`` atomically on every rank's behalf; returns its path."""
    from safetensors.torch import save_file

    name = f"checkpoint-{step}"
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    if state.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    barrier(state)
    module = engine.module
    weights = trainable_state(module, state)  # collective under ZeRO-3
    if state.backend == "deepspeed":
        engine.wrapped.save_checkpoint(os.path.join(tmp, "deepspeed"), tag="state", save_latest=False)
    elif state.is_main:
        torch.save(engine.optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
        torch.save(engine.scheduler.state_dict(), os.path.join(tmp, "scheduler.pt"))
    torch.save(rng_state(), os.path.join(tmp, f"rng_state_{state.rank}.pt"))
    if state.is_main:
        save_file(weights, os.path.join(tmp, WEIGHTS_FILE))
        with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
            json.dump({"step": step, **trainer_state}, f, indent=1)
    barrier(state)
    if state.is_main:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        _write_text_atomic(os.path.join(out_dir, LATEST), name)
        _prune(out_dir, keep, current=name)
    barrier(state)
    return final


def _prune(out_dir: str, keep: int, current: str) -> None:
    if keep <= 0:
        return
    steps = sorted(
        int(d.split("-", 1)[1]) for d in os.listdir(out_dir)
        if d.startswith("checkpoint-") and d.split("-", 1)[1].isdigit()
    )
    for s in steps[:-keep]:
        if f"checkpoint-{s}" != current:
            shutil.rmtree(os.path.join(out_dir, f"checkpoint-{s}"), ignore_errors=True)


def load_checkpoint(path: str, *, engine, state: DistState) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from ``path``; returns the trainer state."""
    from safetensors.torch import load_file

    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        trainer_state = json.load(f)
    if state.backend == "deepspeed":
        load_path, _ = engine.wrapped.load_checkpoint(os.path.join(path, "deepspeed"), tag="state",
                                                      load_module_strict=False)
        if load_path is None:
            raise ValueError(f"{path}: no DeepSpeed state in this checkpoint (saved without --deepspeed?)")
    else:
        weights = load_file(os.path.join(path, WEIGHTS_FILE))
        params = dict(engine.module.named_parameters())
        missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
        if missing:
            raise ValueError(f"{path}: checkpoint lacks trainable parameter {missing[0]} (another model or --lora?)")
        with torch.no_grad():
            for n, t in weights.items():
                if n not in params:
                    raise ValueError(f"{path}: checkpoint parameter {n} is not in the model")
                params[n].copy_(t)
        engine.optimizer.load_state_dict(torch.load(os.path.join(path, "optimizer.pt"), map_location=state.device))
        engine.scheduler.load_state_dict(torch.load(os.path.join(path, "scheduler.pt")))
    rng_file = os.path.join(path, f"rng_state_{state.rank}.pt")
    if os.path.isfile(rng_file):
        set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "trainable_state", "rng_state",
           "set_rng_state"]
