"""Build the shipped grounded base of the embedded VLM: ``python -m prefopt.train.build_base``.

``tiny-llava-sft`` is ``tiny-llava`` (random weights from seed 0) after supervised fine-tuning on the
synthetic set's chosen answers, so that it answers from the image: the default ``prefopt train`` run starts
from it, and preference methods are compared from one SFT base as in the papers. Training it takes longer
than the main job's budget on 2 CPU cores, so it ships with the package (``prefopt/assets/``, about 1 MB).

The recipe: AdamW at a constant learning rate of 3e-4 (at 1e-3 the tiny model locks onto the text and
never learns to read its image tokens), batches of 32 chosen answers of the training split, the fused SFT
loss on the backbone's hidden states (see ``RECIPE``). Every ``check_every`` steps the greedy answers to a
validation set (the held-out split drawn with another seed, so the shipped numbers are measured on records
the stopping rule never saw) are judged and the weights are written; training stops once every verifiable
question type reaches ``target`` (or after ``max_steps``), and the last write also records the held-out
numbers (seed 0, the split ``prefopt train`` evaluates on).

The file's metadata holds the SHA-256 of this script, of the synthetic set's module and of the model
config (``tests/test_shipped_base.py`` checks them, so a change to any of them without a rebuild fails CI)
and the held-out numbers measured here (CI measures them again on the shipped weights; no training in CI).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import time
from typing import Dict, Optional

import torch

RECIPE = {"model": "tiny-llava", "seed": 0, "lr": 3e-4, "batch_size": 32, "train_size": 4000, "max_steps": 6000,
          "target": 0.9, "check_every": 250, "validation_seed": 1, "validation_size": 100}


def _sha256_file(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def fingerprint() -> Dict[str, str]:
    """SHA-256 of this script, of the synthetic set's module and of tiny-llava's config (what a rebuild follows)."""
    from . import synthetic
    from .models import tiny_llava_config

    config = tiny_llava_config().to_dict()
    config.pop("transformers_version", None)
    return {
        "script_sha256": _sha256_file(os.path.abspath(__file__)),
        "synthetic_sha256": _sha256_file(os.path.abspath(synthetic.__file__)),
        "config_sha256": hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest(),
    }


def grounding_check(adapter, processor, *, size: int = 200, seed: int = 0) -> Dict[str, Dict[str, float]]:
    """Greedy generation accuracy per verifiable type on the held-out split, with the images in place and
    shuffled among the records (:func:`prefopt.train.eval.evaluate`, pairwise metrics included)."""
    from .eval import evaluate

    out = {}
    for name, shuffle in (("heldout", False), ("shuffled", True)):
        result = evaluate(adapter, processor=processor, size=size, seed=seed, shuffle_images=shuffle,
                          batch_size=50, max_new_tokens=12)
        out[name] = {t: row["generation_accuracy"] for t, row in result["per_type"].items()
                     if row["generation_accuracy"] is not None}
        out[name]["pair_accuracy"] = result["pair_accuracy"]
    return out


def build(out: Optional[str] = None, *, max_steps: Optional[int] = None, progress: bool = True) -> Dict[str, object]:
    """Train the base and write ``out`` (at every check; the last write measures the held-out numbers);
    returns its metadata."""
    from .. import FusedSFTLoss
    from .data import PreferenceCollator
    from .models import build_model, shipped_base_path
    from .synthetic import VERIFIABLE_TYPES, make_synthetic_records

    r = RECIPE
    out = shipped_base_path() if out is None else out
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    max_steps = r["max_steps"] if max_steps is None else max_steps
    adapter, processor = build_model(r["model"], seed=r["seed"])
    collator = PreferenceCollator(processor)
    records = make_synthetic_records("train", r["train_size"], seed=r["seed"])
    loss_fn = FusedSFTLoss(shift=True)
    optimizer = torch.optim.AdamW(adapter.trainable_parameters(), lr=r["lr"], weight_decay=0.0)
    order = random.Random(r["seed"])
    started = time.perf_counter()
    step = 0
    while step < max_steps:
        batch = collator([records[i] for i in order.sample(range(len(records)), r["batch_size"])], mode="sft")
        head = adapter.head()
        loss = loss_fn(head.weight, adapter.hidden_states(**batch), batch["labels"], head.bias).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if progress and step % 50 == 0:
            print(f"step {step} ({time.perf_counter() - started:.0f} s) loss {loss.item():.3f}", file=sys.stderr,
                  flush=True)
        if step % r["check_every"] == 0 or step == max_steps:
            val = grounding_check(adapter, processor, size=r["validation_size"], seed=r["validation_seed"])["heldout"]
            if progress:
                print(f"step {step} validation " + " ".join(f"{k} {v:.2f}" for k, v in val.items()), file=sys.stderr,
                      flush=True)
            done = all(val[t] >= r["target"] for t in VERIFIABLE_TYPES)
            # Written at every check, so that a build stopped early leaves a complete file behind.
            metadata = _save(adapter, processor, out, step, started, measure=done or step == max_steps)
            if done:
                break
    return metadata


def _save(adapter, processor, out: str, step: int, started: float, measure: bool) -> Dict[str, str]:
    """Write the weights with their metadata (the held-out numbers measured now when ``measure``)."""
    from safetensors.torch import save_file

    measured = grounding_check(adapter, processor) if measure else None
    metadata = {**fingerprint(), "recipe": json.dumps(RECIPE, sort_keys=True), "steps": str(step),
                "heldout": json.dumps(measured, sort_keys=True),
                "train_seconds": f"{time.perf_counter() - started:.0f}"}
    tmp = out + ".tmp"
    save_file({k: v.detach().contiguous() for k, v in adapter.model.state_dict().items()}, tmp, metadata=metadata)
    os.replace(tmp, out)
    return metadata


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m prefopt.train.build_base", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="where to write the base (default: the package's assets)")
    p.add_argument("--max-steps", type=int, default=None, help=f"step limit (default {RECIPE['max_steps']})")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # the tiny model gains nothing from a second thread on a shared machine
    meta = build(args.out, max_steps=args.max_steps)
    print(json.dumps(meta, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
