"""Hugging Face model folders from checkpoints, and the model a run starts from (``--init-from``).

``prefopt export CHECKPOINT OUT [--keep-adapter]`` (and the end of every run, into ``RUN/model/``)
rebuilds the run's model as the run built it (the same source, seed, dtype and LoRA structure), puts
the checkpoint's trainable weights in (``trainable.safetensors``, whole even under ZeRO-3), and writes
``OUT`` with the model class's ``save_pretrained`` and the processor's (or tokenizer's): ``config.json``,
``model.safetensors``, the processor and tokenizer files. LoRA adapters are merged into the weights,
or with ``keep_adapter`` kept as a peft adapter (``adapter_config.json``, ``adapter_model.safetensors``)
beside the base weights they apply to, whose ``base_model_name_or_path`` is ``OUT`` itself (the class's
``from_pretrained(OUT)`` then loads base and adapter; transformers' peft integration).

``OUT/prefopt.json`` records where the weights come from and the model *family*: ``"tiny"`` for the
embedded tiny models with random weights, ``"tiny-sft"`` for the shipped tiny-llava-sft, each with
everything trained from them, ``"hf"`` otherwise. The trainer keys its model-dependent defaults on the
family (learning rate, CW-DPO's floor), so a run started from an exported model keeps its family's
defaults.

``--init-from`` takes such a folder (any Hugging Face model folder), a run folder (its newest intact
checkpoint) or a checkpoint folder; a checkpoint is exported to a temporary folder first, removed when
the process exits.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import sys
import tempfile
from typing import Any, Dict, List, Optional, Tuple

from . import checkpoint as ckpt
from .faultpoints import fault_point
from .errors import OneLineParser, first_line

METADATA_FILE = "prefopt.json"
#: The trainable parameters' names in a checkpoint carry the prefix of the module the loop wraps.
CHECKPOINT_PREFIX = "model."

_exported: Dict[str, str] = {}  # checkpoint path -> temporary export (this process)


# ------------------------------------------------------------------------------------------ sources


def is_model_folder(path: str) -> bool:
    """A Hugging Face model folder: ``config.json`` with a ``model_type``."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    try:
        with open(config, encoding="utf-8") as f:
            return "model_type" in json.load(f)
    except ValueError:
        return False


def resolve_init_from(path: str, option: str = "--init-from") -> Tuple[str, str]:
    """``("folder", path)`` for a model folder, ``("checkpoint", path)`` for a checkpoint folder or a run
    folder's newest intact checkpoint; ``ValueError`` (one line, naming ``option``) for anything else."""
    if not os.path.isdir(path):
        raise ValueError(f"{option} {path}: not a folder (expected a model folder, a run folder or a checkpoint)")
    if is_model_folder(path):
        return "folder", path
    if os.path.isfile(os.path.join(path, ckpt.STATE_FILE)):
        problem = ckpt.verify(path)
        if problem is not None:
            raise ValueError(f"{option} {path}: {problem}")
        return "checkpoint", path
    try:
        latest = ckpt.latest_checkpoint(path, warn=True)
    except ckpt.CheckpointError as e:
        raise ValueError(f"{option} {path}: {e}") from None
    if latest is None:
        raise ValueError(f"{option} {path}: no model folder (config.json) and no intact checkpoint")
    return "checkpoint", latest


def model_source(init_from: str) -> str:
    """The model folder a run started ``--init-from init_from`` builds its model from (a checkpoint is
    exported to a temporary folder, once per process)."""
    kind, path = resolve_init_from(init_from)
    if kind == "folder":
        return path
    key = os.path.realpath(path)
    if key not in _exported:
        folder = tempfile.mkdtemp(prefix="prefopt-init-")
        atexit.register(shutil.rmtree, folder, True)
        export_checkpoint(path, folder)
        _exported[key] = folder
    return _exported[key]


def run_model_source(config: Dict[str, Any]) -> str:
    """What a run (its saved config) built its model from: its ``--init-from`` source, or ``--model``."""
    return model_source(config["init_from"]) if config.get("init_from") else config["model"]


def model_family(model: str, init_from: Optional[str] = None) -> str:
    """The family of the model a run trains, which its defaults are keyed on: ``"tiny-sft"`` for the
    shipped tiny-llava-sft, ``"tiny"`` for the other embedded tiny models (random weights), ``"hf"``
    otherwise; a model trained from one of them keeps its family (read from ``prefopt.json``, or from the
    run a checkpoint belongs to)."""
    from .models import TINY_BASE, TINY_MODELS

    if init_from is None:
        if model == TINY_BASE:
            return "tiny-sft"
        if model in TINY_MODELS:
            return "tiny"
        return read_metadata(model).get("family", "hf") if os.path.isdir(model) else "hf"
    kind, path = resolve_init_from(init_from)
    if kind == "folder":
        return read_metadata(path).get("family", "hf")
    config = ckpt.read_trainer_state(path)["config"]
    return model_family(config["model"], config.get("init_from"))


def read_metadata(folder: str) -> Dict[str, Any]:
    path = os.path.join(folder, METADATA_FILE)
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


# ------------------------------------------------------------------------------------------ restore


def load_trained_model(checkpoint: str, *, device: str = "cpu", dtype: Optional[str] = None):
    """``(ModelAdapter, processor, run config)`` of the model saved in ``checkpoint``, rebuilt as the run
    built it: the same source and LoRA structure, the base weights as the reference point left them
    (``--reference adapters`` merges the adapters there), the checkpoint's trainable weights; in the
    run's dtype unless ``dtype`` is given. A ``--qlora`` run's adapters are put on the source weights
    reloaded unquantised in the dtype they are saved in (never a dequantised copy of the 4-bit ones, whatever
    dtype the 4-bit run computed in), so an export merges into those."""
    from .models import build_model, saved_dtype
    from .reference import load_tensors, merge_adapters

    problem = ckpt.verify(checkpoint)
    if problem is not None:
        raise ValueError(f"{checkpoint}: {problem}")
    state = ckpt.read_trainer_state(checkpoint)
    config = state["config"]
    source = run_model_source(config)
    remote = dict(revision=config.get("revision"), trust_remote_code=config.get("trust_remote_code", False))
    if dtype is None and config.get("qlora"):
        dtype = saved_dtype(source, **remote)
    adapter, processor = build_model(source, dtype=dtype or config.get("dtype"), lora=config["lora"],
                                     lora_r=config["lora_r"], lora_alpha=config["lora_alpha"], device=device,
                                     seed=config["seed"], **remote)
    point = _adapters_reference_point(config, state)
    if point is not None and state["step"] > point:
        path = os.path.join(os.path.dirname(os.path.abspath(checkpoint)), f"reference-{point}.safetensors")
        snapshot = load_tensors(path)
        if snapshot is None:
            raise ValueError(f"{checkpoint}: the run's adapters were merged at step {point}, but {path} is missing")
        from .distributed import DistState

        merge_adapters(adapter.model, snapshot, DistState())
    try:
        ckpt.load_weights(adapter.model, checkpoint, prefix=CHECKPOINT_PREFIX)
    except ckpt.CheckpointError as e:  # the callers' one-line errors are ValueErrors
        raise ValueError(str(e)) from None
    adapter.model.eval()
    return adapter, processor, config


def _adapters_reference_point(config: Dict[str, Any], state: Dict[str, Any]) -> Optional[int]:
    """The step at which a ``--reference adapters`` run merged its adapters into the base, or None."""
    from .methods import MethodOptions, build_method

    if not config["lora"] or config["reference"] not in ("adapters", "auto"):
        return None  # "auto" is adapters with --lora
    method = build_method(config["method"], MethodOptions(**config["options"]), total_steps=state["total_steps"])
    return method.reference_point or None


# ------------------------------------------------------------------------------------------ export


def export_model(adapter, processor, out: str, *, keep_adapter: bool = False,
                 metadata: Optional[Dict[str, Any]] = None, final: Optional[str] = None) -> str:
    """Write ``adapter``'s model to the folder ``out`` with ``save_pretrained`` (LoRA merged unless
    ``keep_adapter``), the processor's files and, last, ``prefopt.json`` (``metadata``); returns ``out``.
    ``final``: the name ``out`` will have once complete (a kept adapter's base path names it; default ``out``).
    ``ValueError`` before anything is written when a weight is not finite."""
    model = adapter.model
    check_finite(model, out)
    os.makedirs(out, exist_ok=True)
    if adapter.has_adapters:
        if keep_adapter:
            _save_base(model.get_base_model(), out, lora_layers=True)
            model.peft_config["default"].base_model_name_or_path = os.path.abspath(final or out)
            model.save_pretrained(out)
        else:
            _save_base(model.merge_and_unload(), out)
    else:
        _save_base(model, out)
    processor.save_pretrained(out)
    fault_point(os.path.join(out, METADATA_FILE))
    with open(os.path.join(out, METADATA_FILE), "w", encoding="utf-8") as f:
        json.dump(metadata or {}, f, indent=1)
    return out


def check_finite(model, where: str) -> None:
    """``ValueError`` (one line naming ``where``) when ``model`` holds a NaN or infinite weight: a diverged
    model is never written nor evaluated."""
    bad = ckpt.nonfinite_count(p.detach() for p in model.parameters())
    if bad:
        raise ValueError(f"{where}: the model holds {bad} non-finite weights (a diverged run?)")


def _save_base(model, out: str, *, lora_layers: bool = False) -> None:
    """``save_pretrained`` of the transformers model itself; with ``lora_layers`` (the base of a kept
    adapter) the base layers' weights under their plain names, the adapters' left out."""
    if lora_layers:
        state = {name.replace(".base_layer.", "."): value for name, value in model.state_dict().items()
                 if ".lora_" not in name}
        model.save_pretrained(out, state_dict=state)
    else:
        model.save_pretrained(out)


def export_checkpoint(checkpoint: str, out: str, *, keep_adapter: bool = False, replace: bool = False) -> str:
    """Export the model saved in ``checkpoint`` to the Hugging Face folder ``out``; returns ``out``. The folder
    is built under a temporary name beside ``out`` and renamed to ``out`` once complete, so an interrupted
    export leaves no folder that could be taken for a whole model. ``out`` must be missing or empty, or with
    ``replace`` it is swapped out (:func:`~prefopt.train.runfolder.swap_in`: never written through)."""
    from .runfolder import swap_in

    path = os.path.abspath(out)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        with quiet_transformers():
            _export_checkpoint(checkpoint, tmp, keep_adapter, final=path)
        if replace:
            swap_in(tmp, out)
        else:
            os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _export_checkpoint(checkpoint: str, out: str, keep_adapter: bool, final: str) -> str:
    from .models import TINY_MODELS

    adapter, processor, config = load_trained_model(checkpoint)
    state = ckpt.read_trainer_state(checkpoint)
    metadata = {
        "family": model_family(config["model"], config.get("init_from")),
        "base_model": config.get("init_from") or config["model"],
        "embedded_base": config["model"] if config["model"] in TINY_MODELS and not config.get("init_from") else None,
        "method": config["method"],
        "checkpoint": os.path.abspath(checkpoint),
        "step": state["step"],
        "lora": "adapter" if config["lora"] and keep_adapter else ("merged" if config["lora"] else None),
        "qlora": bool(config.get("qlora")),  # trained on a 4-bit backbone; exported onto the source weights
    }
    return export_model(adapter, processor, out, keep_adapter=keep_adapter, metadata=metadata, final=final)


@contextlib.contextmanager
def quiet_transformers():
    """Without transformers' per-file progress bars (loading and writing weights), restored after; and
    anything printed meanwhile goes to stderr (save_pretrained imports DeepSpeed, whose logger prints to
    stdout, which belongs to the trainer's summary and its --json)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------ command


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="prefopt export", description="Write a Hugging Face model folder (config.json, "
                "model.safetensors, processor files) from a checkpoint of prefopt train (also one saved under "
                "DeepSpeed ZeRO-3: its weights are saved whole).")
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="a checkpoint folder (RUN/checkpoint-N) or a run folder "
                   "(its newest intact checkpoint)")
    p.add_argument("out", metavar="OUT", help="the folder to write (must be new or empty)")
    p.add_argument("--keep-adapter", action="store_true", help="keep LoRA adapters as a peft adapter beside the "
                   "base weights instead of merging them")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    try:
        if os.path.isdir(args.out) and os.listdir(args.out):
            raise ValueError(f"{args.out}: already holds files; choose a new folder")
        kind, path = resolve_init_from(args.checkpoint, option="CHECKPOINT")
        if kind != "checkpoint":
            raise ValueError(f"{args.checkpoint}: already a model folder, nothing to export")
        out = export_checkpoint(path, args.out, keep_adapter=args.keep_adapter)
    except KeyboardInterrupt:
        print(f"prefopt export: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as e:
        print(f"prefopt export: error: {first_line(e)}", file=sys.stderr)
        return 2
    print(f"prefopt export: {path} -> {out}")
    return 0


__all__ = ["export_checkpoint", "export_model", "load_trained_model", "model_family", "model_source",
           "run_model_source", "resolve_init_from", "METADATA_FILE"]
