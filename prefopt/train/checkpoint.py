"""Checkpoints: no pickle, verified before use, resumed to the same numbers as an uninterrupted run.

A run folder ``OUT`` holds its marker ``prefopt-run.json`` and lock ``prefopt-run.lock`` (runfolder.py),
``config.json``, ``metrics.jsonl``, the reference files of the methods that need them
(``reference-<step>.safetensors``, ``reference_logps-<step>.safetensors``), the checkpoints
``checkpoint-<step>/`` and ``latest`` (a text file naming the newest complete checkpoint, a bare folder
name inside ``OUT``). A checkpoint folder holds:

* ``trainable.safetensors``: the trainable parameters (all of them for full fine-tuning, the LoRA weights
  with ``--lora``) by name as ``model.named_parameters()`` gives them, fp32 or the run's dtype, gathered
  whole under ZeRO-3 (written by rank 0);
* ``optimizer.safetensors`` + ``optimizer.json`` (one process and DDP): the optimizer's ``state_dict()``;
  its tensors in the safetensors file under the keys the JSON names (``{"__tensor__": key}``), everything
  else (param groups, hyper-parameters; tuples as ``{"__tuple__": [...]}``) in the JSON; with an 8-bit
  ``--optim`` the uint8 moments, their fp32 absmax and the shared code maps are tensors like the others;
* ``scheduler.json``: the learning-rate scheduler's ``state_dict()``;
* ``rng_state_<rank>.safetensors``: every rank's generators: tensors ``torch`` (CPU generator),
  ``cuda.<i>`` and ``numpy`` (the MT19937 key), metadata ``python`` and ``numpy`` (JSON);
* ``trainer_state.json``: ``step``, ``total_steps``, ``probe_start``, ``config`` (every option of the
  run), ``identity`` (what a resumed run must match: the options that change the numbers, world size,
  parameter dtype and the data fingerprint);
* under ``--deepspeed``, in place of the optimizer and scheduler files: ``zero_optimizer_<rank>.json`` +
  ``zero_optimizer_<rank>.safetensors`` (every rank's ZeRO optimizer partition: DeepSpeed's optimizer
  ``state_dict()`` without the loss scaler and parameter-slice maps, encoded as for the optimizer above)
  and ``scheduler.json`` holding ``{"scheduler": ..., "deepspeed": {global_steps, global_samples,
  skipped_steps}}``. DeepSpeed's own (pickled) checkpoint files are never written nor read;
* ``manifest.json``, written last: ``{"files": {relative path: sha256}}`` of every other file.

A checkpoint is written under a temporary name (``.checkpoint-<step>.tmp``) and renamed when complete (an
old entry of that name, a symbolic link included, is renamed aside and removed, never followed); ``latest``
is replaced atomically. Weights holding NaN or infinity are never written (:class:`NonFiniteWeights`). On resume the checkpoint ``latest`` names is verified against its
manifest (every file present, a regular file, with its hash; nothing else loaded); a corrupt or
incomplete one is skipped, with a one-line warning, for the newest intact older one. Nothing is ever
unpickled: ``safetensors`` and JSON only.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import sys
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from .distributed import DistState, barrier, gathered, ranks_with
from .errors import first_line
from .faultpoints import fault_point
from .runfolder import swap_in, write_text_atomic

LATEST = "latest"
STATE_FILE = "trainer_state.json"
WEIGHTS_FILE = "trainable.safetensors"
MANIFEST_FILE = "manifest.json"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_FILE = "scheduler.json"
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")



class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or used; the message is one line naming the path."""


class NonFiniteWeights(CheckpointError):
    """Weights holding NaN or infinity, which are never written to a checkpoint or a model folder."""


def nonfinite_count(tensors) -> int:
    """How many values of ``tensors`` are NaN or infinite."""
    return sum(int((~torch.isfinite(t)).sum()) for t in tensors if t.is_floating_point())


def rng_file(rank: int) -> str:
    return f"rng_state_{rank}.safetensors"


# --------------------------------------------------------------------------------------- safe encodings


def to_safe(obj: Any) -> Tuple[Any, Dict[str, torch.Tensor]]:
    """(JSON-able structure, tensors by key) of a nest of dicts, lists, tuples, tensors and scalars. A tensor that
    appears more than once (bitsandbytes' 8-bit optimizers share one code map among all parameters) is stored once
    and decoded as one tensor again."""
    tensors: Dict[str, torch.Tensor] = {}
    keys: Dict[int, str] = {}  # id of a tensor already stored -> its key

    def enc(x):
        if isinstance(x, torch.Tensor):
            if id(x) not in keys:
                keys[id(x)] = str(len(tensors))
                tensors[keys[id(x)]] = x.detach().to("cpu").contiguous()
            return {"__tensor__": keys[id(x)]}
        if isinstance(x, dict):
            return {"__dict__": [[enc(k), enc(v)] for k, v in x.items()]}
        if isinstance(x, tuple):
            return {"__tuple__": [enc(v) for v in x]}
        if isinstance(x, list):
            return [enc(v) for v in x]
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        raise TypeError(f"cannot save a {type(x).__name__} without pickle")

    return enc(obj), tensors


def from_safe(obj: Any, tensors: Dict[str, torch.Tensor]) -> Any:
    """Inverse of :func:`to_safe`."""
    if isinstance(obj, list):
        return [from_safe(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__tuple__" in obj:
            return tuple(from_safe(v, tensors) for v in obj["__tuple__"])
        return {from_safe(k, tensors): from_safe(v, tensors) for k, v in obj["__dict__"]}
    return obj


def save_state_dict(sd: Dict[str, Any], json_path: str, tensor_path: Optional[str]) -> None:
    from safetensors.torch import save_file

    structure, tensors = to_safe(sd)
    if tensors and tensor_path is None:
        raise TypeError(f"{json_path}: state holds tensors")
    if tensor_path is not None:
        fault_point(tensor_path)
        save_file(tensors, tensor_path)
    _write_json(json_path, structure)


def load_state_dict(json_path: str, tensor_path: Optional[str]) -> Dict[str, Any]:
    from safetensors.torch import load_file

    with open(json_path, encoding="utf-8") as f:
        structure = json.load(f)
    tensors = load_file(tensor_path) if tensor_path is not None else {}
    return from_safe(structure, tensors)


def _write_json(path: str, obj: Any) -> None:
    fault_point(path)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)


# --------------------------------------------------------------------------------------- RNG


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


def save_rng(path: str, s: Optional[Dict[str, Any]] = None) -> None:
    """Write the generators' state ``s`` (default: now)."""
    from safetensors.torch import save_file

    s = rng_state() if s is None else s
    version, internal, gauss = s["python"]
    name, keys, pos, has_gauss, cached = s["numpy"]
    tensors = {"torch": s["torch"], "numpy": torch.from_numpy(keys.astype(np.int64))}
    for i, t in enumerate(s.get("cuda", [])):
        tensors[f"cuda.{i}"] = t
    metadata = {"python": json.dumps([version, list(internal), gauss]),
                "numpy": json.dumps([name, int(pos), int(has_gauss), float(cached)])}
    fault_point(path)
    save_file(tensors, path, metadata=metadata)


def load_rng(path: str) -> None:
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    version, internal, gauss = json.loads(meta["python"])
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    cuda = [tensors[f"cuda.{i}"] for i in range(sum(k.startswith("cuda.") for k in tensors))]
    set_rng_state({
        "python": (version, tuple(internal), gauss),
        "numpy": (name, tensors["numpy"].numpy().astype(np.uint32), pos, has_gauss, cached),
        "torch": tensors["torch"],
        **({"cuda": cuda} if cuda else {}),
    })


# --------------------------------------------------------------------------------------- manifest


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: str) -> List[str]:
    out = []
    for root, _, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(root, n), folder))
    return sorted(out)


def write_manifest(folder: str) -> None:
    files = {rel: sha256_file(os.path.join(folder, rel)) for rel in _files(folder) if rel != MANIFEST_FILE}
    _write_json(os.path.join(folder, MANIFEST_FILE), {"files": files})


def verify(folder: str) -> Optional[str]:
    """None when ``folder`` is an intact checkpoint, else the reason it is not (one line)."""
    manifest = os.path.join(folder, MANIFEST_FILE)
    if not os.path.isfile(manifest) or os.path.islink(manifest):
        return "no manifest (incomplete)"
    try:
        with open(manifest, encoding="utf-8") as f:
            files = json.load(f)["files"]
    except (ValueError, KeyError, TypeError):
        return "unreadable manifest"
    for rel in (STATE_FILE, WEIGHTS_FILE):
        if rel not in files:
            return f"{rel} missing from the manifest"
    for rel, digest in files.items():
        path = os.path.normpath(os.path.join(folder, rel))
        if os.path.isabs(rel) or rel.startswith("..") or not path.startswith(os.path.normpath(folder) + os.sep):
            return f"manifest names {rel!r}, outside the checkpoint"
        if os.path.islink(path) or not os.path.isfile(path):
            return f"{rel} is missing or not a regular file"
        if sha256_file(path) != digest:
            return f"{rel} does not match its sha256 in the manifest"
    return None


# --------------------------------------------------------------------------------------- finding


def _warn(message: str) -> None:
    print(f"prefopt train: warning: {message}", file=sys.stderr, flush=True)


def checkpoints(out_dir: str) -> List[str]:
    """Names of the checkpoint folders in ``out_dir`` (not symbolic links), newest first."""
    if not os.path.isdir(out_dir):
        return []
    names = [d for d in os.listdir(out_dir) if CHECKPOINT_RE.match(d) and os.path.isdir(os.path.join(out_dir, d))
             and not os.path.islink(os.path.join(out_dir, d))]
    return sorted(names, key=lambda d: int(CHECKPOINT_RE.match(d).group(1)), reverse=True)


def latest_checkpoint(out_dir: str, warn: bool = False) -> Optional[str]:
    """Path of the newest intact checkpoint in ``out_dir`` (the one ``latest`` names, or an older one
    with a warning when that is corrupt or incomplete), or None when there is none.
    ``CheckpointError`` when ``latest`` is a symbolic link or names anything but a checkpoint folder inside
    ``out_dir``."""
    pointer = os.path.join(out_dir, LATEST)
    named = None
    if os.path.islink(pointer):  # not what prefopt writes (a file): its target is not read
        raise CheckpointError(f"{pointer}: a symbolic link, not the run's pointer file; remove it to resume from "
                              "the newest intact checkpoint")
    if os.path.isfile(pointer):
        with open(pointer, encoding="utf-8", errors="replace") as f:
            named = f.read(200).strip()
        if not CHECKPOINT_RE.match(named) or os.path.islink(os.path.join(out_dir, named)):
            raise CheckpointError(f"{pointer}: names {named[:60]!r}, not a checkpoint folder inside {out_dir}")
    candidates = checkpoints(out_dir)
    if named is not None:
        step = int(CHECKPOINT_RE.match(named).group(1))
        candidates = [named] + [c for c in candidates if int(CHECKPOINT_RE.match(c).group(1)) < step]
    for i, name in enumerate(candidates):
        path = os.path.join(out_dir, name)
        problem = verify(path)
        if problem is None:
            return path
        if warn:
            _warn(f"{path}: {problem}; skipped" + (f" for {candidates[i + 1]}" if i + 1 < len(candidates) else ""))
    return None


def read_trainer_state(path: str) -> Dict[str, Any]:
    file = os.path.join(path, STATE_FILE)
    try:
        with open(file, encoding="utf-8") as f:
            state = json.load(f)
        if not isinstance(state, dict) or not isinstance(state.get("step"), int):
            raise ValueError("no step")
        return state
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise CheckpointError(f"{file}: unreadable trainer state ({first_line(e)[:80]})") from None


# --------------------------------------------------------------------------------------- save / load


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


def os_error_line(e: OSError, fallback: str) -> str:
    """``PATH: cause`` of an OSError (the errno's name and text)."""
    where = e.filename if e.filename else fallback
    cause = e.strerror or str(e)
    name = errno.errorcode.get(e.errno or 0)
    return f"{where}: {cause}" + (f" ({name})" if name else "")


def save_checkpoint(out_dir: str, step: int, *, engine, trainer_state: Dict[str, Any], state: DistState,
                    keep: int = 2, rng: Optional[Dict[str, Any]] = None) -> str:
    """Write ``checkpoint-<step>`` (every rank takes part; ``rng``: the generators' state to save, default
    now); returns its path. ``CheckpointError`` (one line: path and cause) when the folder cannot be written,
    :class:`NonFiniteWeights` (on every rank, before anything is written) when a weight is NaN or infinite;
    nothing temporary is left behind."""
    from safetensors.torch import save_file

    name = f"checkpoint-{step}"
    final = os.path.join(out_dir, name)
    tmp = os.path.join(out_dir, f".{name}.tmp")
    weights = trainable_state(engine.module, state)  # collective under ZeRO-3
    bad = nonfinite_count(weights.values())
    if ranks_with(bad > 0, state):
        raise NonFiniteWeights(f"{final} not written: the weights hold {bad} non-finite values")
    try:
        if state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            os.makedirs(tmp)
        barrier(state)
        if state.backend == "deepspeed":
            save_deepspeed_state(engine, tmp, state)
        elif state.is_main:
            save_state_dict(engine.optimizer.state_dict(), os.path.join(tmp, OPTIMIZER_JSON),
                            os.path.join(tmp, OPTIMIZER_TENSORS))
            save_state_dict(engine.scheduler.state_dict(), os.path.join(tmp, SCHEDULER_FILE), None)
        save_rng(os.path.join(tmp, rng_file(state.rank)), rng)
        if state.is_main:
            fault_point(os.path.join(tmp, WEIGHTS_FILE))
            save_file(weights, os.path.join(tmp, WEIGHTS_FILE))
            _write_json(os.path.join(tmp, STATE_FILE), {"step": step, **trainer_state})
        barrier(state)
        if state.is_main:
            write_manifest(tmp)
            swap_in(tmp, final)
            write_text_atomic(os.path.join(out_dir, LATEST), name)
            _prune(out_dir, keep, current=name)
    except OSError as e:
        if state.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointError(f"cannot write checkpoint {final}: {os_error_line(e, tmp)}") from None
    barrier(state)
    return final


def _prune(out_dir: str, keep: int, current: str) -> None:
    if keep <= 0:
        return
    for name in checkpoints(out_dir)[keep:]:
        if name != current:
            shutil.rmtree(os.path.join(out_dir, name), ignore_errors=True)


def load_checkpoint(path: str, *, engine, state: DistState) -> Dict[str, Any]:
    """Restore weights, optimizer, scheduler and this rank's RNG from the verified checkpoint ``path``;
    returns the trainer state. A file that does not parse is a ``CheckpointError`` naming it."""
    try:
        return _load_checkpoint(path, engine=engine, state=state)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors, JSON and the optimizer's own checks raise many types
        reason = first_line(e)[:120]
        raise CheckpointError(f"{path}: unreadable checkpoint ({reason})") from None


def load_weights(module: torch.nn.Module, path: str, prefix: str = "") -> None:
    """Copy the checkpoint's trainable parameters into ``module`` (not partitioned), whose parameter names
    are the checkpoint's less ``prefix``."""
    from safetensors.torch import load_file

    weights = load_file(os.path.join(path, WEIGHTS_FILE))
    params = {prefix + n: p for n, p in module.named_parameters()}
    missing = [n for n, p in params.items() if p.requires_grad and n not in weights]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks trainable parameter {missing[0]} (another model or --lora?)")
    with torch.no_grad():
        for n, t in weights.items():
            if n not in params:
                raise CheckpointError(f"{path}: checkpoint parameter {n} is not in the model")
            params[n].copy_(t)


# What of DeepSpeed's ZeRO optimizer state is not saved: objects that would need pickle. The loss
# scaler is static in bf16/fp32 (prefopt refuses fp16), so the running one is the saved one; the
# parameter-slice maps are rebuilt by DeepSpeed when it loads.
DEEPSPEED_UNSAVED = ("loss_scaler", "param_slice_mappings")
DEEPSPEED_COUNTERS = ("global_steps", "global_samples", "skipped_steps")


def deepspeed_files(rank: int) -> Tuple[str, str]:
    return f"zero_optimizer_{rank}.json", f"zero_optimizer_{rank}.safetensors"


def save_deepspeed_state(engine, folder: str, state: DistState) -> None:
    """Under DeepSpeed: every rank's ZeRO optimizer partition (fp32 master weights, AdamW moments) without
    :data:`DEEPSPEED_UNSAVED`; rank 0: the scheduler and the engine's step counters (in the scheduler's
    JSON under ``"deepspeed"``)."""
    if getattr(engine.optimizer, "elastic_checkpoint", False):
        raise CheckpointError("--deepspeed: elastic_checkpoint is not supported by prefopt's checkpoints; set it false")
    sd = {k: v for k, v in engine.optimizer.state_dict().items() if k not in DEEPSPEED_UNSAVED}
    json_name, tensor_name = deepspeed_files(state.rank)
    try:
        save_state_dict(sd, os.path.join(folder, json_name), os.path.join(folder, tensor_name))
    except TypeError as e:
        raise CheckpointError(f"--deepspeed: DeepSpeed's optimizer state holds what prefopt cannot save: {e}") from None
    if state.is_main:
        counters = {k: getattr(engine.wrapped, k) for k in DEEPSPEED_COUNTERS}
        save_state_dict({"scheduler": engine.scheduler.state_dict(), "deepspeed": counters},
                        os.path.join(folder, SCHEDULER_FILE), None)


def load_deepspeed_state(engine, path: str, state: DistState) -> None:
    json_name, tensor_name = deepspeed_files(state.rank)
    if not os.path.isfile(os.path.join(path, json_name)):
        raise CheckpointError(f"{path}: no ZeRO optimizer state for rank {state.rank} (saved without --deepspeed, "
                              "or with fewer processes?)")
    sd = load_state_dict(os.path.join(path, json_name), os.path.join(path, tensor_name))
    sd["loss_scaler"] = engine.optimizer.loss_scaler
    if state.zero_stage < 3:  # ZeRO-1/2 restore their fp32 partition only; the module's weights come from here
        load_weights(engine.module, path)
    # ZeRO-3 restores the (partitioned) weights from the fp32 partition it loads.
    engine.optimizer.load_state_dict([sd if r == state.rank else None for r in range(state.world_size)],
                                     load_optimizer_states=True, load_from_fp32_weights=True)
    saved = load_state_dict(os.path.join(path, SCHEDULER_FILE), None)
    engine.scheduler.load_state_dict(saved["scheduler"])
    for k, v in saved["deepspeed"].items():
        setattr(engine.wrapped, k, v)


def _load_checkpoint(path: str, *, engine, state: DistState) -> Dict[str, Any]:
    trainer_state = read_trainer_state(path)
    rng = os.path.join(path, rng_file(state.rank))
    if not os.path.isfile(rng):
        raise CheckpointError(f"{path}: no RNG state for rank {state.rank} ({rng_file(state.rank)} is missing)")
    if state.backend == "deepspeed":
        load_deepspeed_state(engine, path, state)
    else:
        load_weights(engine.module, path)
        # On the CPU: the optimizer moves each state tensor to its parameter's device itself.
        engine.optimizer.load_state_dict(load_state_dict(os.path.join(path, OPTIMIZER_JSON),
                                                         os.path.join(path, OPTIMIZER_TENSORS)))
        engine.scheduler.load_state_dict(load_state_dict(os.path.join(path, SCHEDULER_FILE), None))
    load_rng(rng)
    return trainer_state


__all__ = ["save_checkpoint", "load_checkpoint", "latest_checkpoint", "checkpoints", "verify",
           "read_trainer_state", "trainable_state", "rng_state", "set_rng_state", "CheckpointError", "NonFiniteWeights",
           "nonfinite_count"]
