"""Held-out evaluation: ``prefopt eval`` and :func:`evaluate` (which ``prefopt train`` calls at the end).

On the held-out records (the synthetic set's held-out split, or a user's JSONL / ``heldout.jsonl``):

* ``pair_accuracy``: share of pairs with ``sum log p(chosen) > sum log p(rejected)``;
* ``logp_gap``: mean of ``sum log p(chosen) - sum log p(rejected)`` (nats per pair);
* ``generation_accuracy`` / ``hallucination_rate``: greedy answers to the synthetic set's verifiable
  questions (colour, count, position, presence), judged by an exact parse of the whole answer
  (:func:`prefopt.train.synthetic.judge`); a hallucination asserts a wrong fact of the question's type
  (a wrong colour, count or position, "yes" for an absent shape). None for user data;
* ``ece_pair``: expected calibration error of the pairwise choice with ``p = sigmoid(avg_c - avg_r)``
  (per-token mean log-probs), over the top-label confidence ``max(p, 1 - p)``;
* ``ece_token``: expected calibration error of the next-token top-1 prediction on the chosen answers:
  confidence ``max_v pi(v)``, correct when the answer's token is the argmax (the op's ``top1``);
  both with 10 equal-width confidence bins: ``ECE = sum_b (n_b / N) |accuracy_b - confidence_b|``;
* ``kl_shift``: mean per-token ``KL(pi || pi_ref)`` over the full vocabulary (the op's ``kl``) and
  ``tv_shift``: mean total variation ``(1/2) sum_v |pi(v) - pi_ref(v)|`` of the next-token distributions
  on the chosen answers, against the reference (by default the model the run started from);
* ``entropy``: mean per-token entropy of the policy on the chosen answers (the op's ``entropy``);
* ``per_type``: the pairwise and generation numbers per question type.

Nothing here computes a ``[tokens, V]`` tensor: log-probs, entropy, top-1 and KL come from the fused op,
and the total variation and the top-1 confidence from :func:`shift_and_confidence`, a loop over vocabulary
tiles. ``--shuffle-images`` deals the images out among the records at random: the grounding control (a
model that reads its images falls to chance).

The module is over 500 lines because it holds the metrics, the evaluation pass, the report (markdown,
plots) and the ``prefopt eval`` command, each small and used only here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import sys
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from .. import linear_logprobs
from .faultpoints import fault_point
from .errors import OneLineParser, first_line

__all__ = ["evaluate", "ece", "reliability_bins", "shift_and_confidence", "load_model", "EVAL_KEYS", "main"]

#: The headline numbers, in the order summaries show them.
EVAL_KEYS = ("pair_accuracy", "generation_accuracy", "hallucination_rate", "ece_pair", "ece_token", "tv_shift",
             "kl_shift", "entropy", "logp_gap")
BINS = 10
VOCAB_TILE = 256
SMALL_MODEL = 10_000_000  # parameters: below it, the command line evaluates on one CPU thread


# ------------------------------------------------------------------------------------------- calibration

def reliability_bins(confidence: Sequence[float], correct: Sequence[float], bins: int = BINS) -> List[Dict[str, Any]]:
    """Per equal-width confidence bin ``[k/bins, (k+1)/bins)`` (the last one closed): ``n``, mean
    ``confidence`` and ``accuracy`` (None for empty bins)."""
    conf = torch.as_tensor(confidence, dtype=torch.float64).flatten()
    corr = torch.as_tensor(correct, dtype=torch.float64).flatten()
    idx = (conf * bins).floor().clamp(0, bins - 1).long()
    out = []
    for b in range(bins):
        sel = idx == b
        n = int(sel.sum())
        out.append({"lo": b / bins, "hi": (b + 1) / bins, "n": n,
                    "confidence": float(conf[sel].mean()) if n else None,
                    "accuracy": float(corr[sel].mean()) if n else None})
    return out


def ece(confidence: Sequence[float], correct: Sequence[float], bins: int = BINS) -> Optional[float]:
    """Expected calibration error ``sum_b (n_b / N) |accuracy_b - confidence_b|`` over ``bins`` equal-width
    confidence bins; None without any prediction."""
    table = reliability_bins(confidence, correct, bins)
    total = sum(b["n"] for b in table)
    if total == 0:
        return None
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in table if b["n"])


# ------------------------------------------------------------------------------------ shift and confidence

def _logits(hidden, weight, bias, temperature: float, softcap: Optional[float]):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


@torch.no_grad()
def shift_and_confidence(hidden, weight, lse, *, bias=None, ref_hidden=None, ref_weight=None, ref_bias=None,
                         ref_lse=None, temperature: float = 1.0, softcap: Optional[float] = None,
                         vocab_tile: int = VOCAB_TILE) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``(max_v pi(v), TV(pi, pi_ref))`` per token, streaming over vocabulary tiles of ``vocab_tile``.

    ``hidden`` [N, H] and ``lse`` [N] (the op's log-sum-exp) give ``pi``; with ``ref_hidden`` [N, H], a
    reference head and ``ref_lse`` also ``TV = (1/2) sum_v |pi(v) - pi_ref(v)|`` (else None). Only
    ``[N, vocab_tile]`` blocks exist, never ``[N, V]``; accumulated in float64.
    """
    n, vocab = hidden.shape[0], weight.shape[0]
    max_z = torch.full((n,), -math.inf, dtype=torch.float64, device=hidden.device)
    tv = None if ref_hidden is None else torch.zeros(n, dtype=torch.float64, device=hidden.device)
    ref_weight = weight if ref_weight is None else ref_weight
    for start in range(0, vocab, vocab_tile):
        sl = slice(start, min(start + vocab_tile, vocab))
        z = _logits(hidden, weight[sl], None if bias is None else bias[sl], temperature, softcap).double()
        max_z = torch.maximum(max_z, z.max(dim=1).values)
        if tv is not None:
            zr = _logits(ref_hidden, ref_weight[sl], None if ref_bias is None else ref_bias[sl], temperature,
                         softcap).double()
            tv += ((z - lse.double()[:, None]).exp() - (zr - ref_lse.double()[:, None]).exp()).abs().sum(dim=1)
    return (max_z - lse.double()).exp(), (None if tv is None else tv / 2)


# --------------------------------------------------------------------------------------------- loading

def _adapter_and_processor(source, *, device, dtype, trust_remote_code: bool = False):
    """``(ModelAdapter, processor, start)`` of a Hugging Face folder or a run folder; ``start`` builds the
    model the run started from (None when unknown). A folder's own Python code runs only with
    ``trust_remote_code``."""
    from .export import check_finite
    from .models import build_model

    if not isinstance(source, str):
        raise TypeError(f"model: expected a folder path, got {type(source).__name__}")
    if not os.path.isdir(source):
        raise ValueError(f"--model {source}: not a folder (expected a Hugging Face model folder or a run folder)")
    run_config = os.path.join(source, "config.json")
    if os.path.isfile(run_config) and _is_run_config(run_config):
        adapter, processor, start = load_run(source, device=device, dtype=dtype)
        check_finite(adapter.model, f"--model {source}")
        return adapter, processor, start
    adapter, processor = build_model(source, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    check_finite(adapter.model, f"--model {source}")
    parent = os.path.dirname(os.path.abspath(source))  # OUT/model inside a run folder: its run's start
    start = None
    if os.path.isfile(os.path.join(parent, "config.json")) and _is_run_config(os.path.join(parent, "config.json")):
        start = lambda: _run_start(parent, device=device, dtype=dtype)[0]  # noqa: E731
    return adapter, processor, start


def _is_run_config(path: str) -> bool:
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    return isinstance(cfg, dict) and "method" in cfg and "options" in cfg


def _run_start(run: str, *, device, dtype):
    """The model a run started from (its --model or --init-from, --lora and --seed) and its processor."""
    from .export import run_model_source
    from .models import build_model

    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    return build_model(run_model_source(cfg), dtype=dtype or cfg.get("dtype"), lora=cfg.get("lora", False),
                       lora_r=cfg.get("lora_r", 8), lora_alpha=cfg.get("lora_alpha", 16), device=device,
                       seed=cfg.get("seed", 0), trust_remote_code=cfg.get("trust_remote_code", False))


def load_run(run: str, *, device="cpu", dtype=None):
    """``(ModelAdapter, processor, start)`` of a run folder: the model of its latest intact checkpoint,
    rebuilt by :func:`prefopt.train.export.load_trained_model`; ``start`` builds the model the run
    started from."""
    from . import checkpoint as ckpt
    from .export import load_trained_model

    path = ckpt.latest_checkpoint(run, warn=True)
    if path is None:
        raise ValueError(f"--model {run}: a run folder without a checkpoint")
    adapter, processor, _ = load_trained_model(path, device=device, dtype=dtype)
    return adapter, processor, lambda: _run_start(run, device=device, dtype=dtype)[0]


def load_model(source, *, device="cpu", dtype=None):
    """``(ModelAdapter, processor)`` of a Hugging Face folder (``save_pretrained``) or a run folder."""
    adapter, processor, _ = _adapter_and_processor(source, device=device, dtype=dtype)
    return adapter, processor


# --------------------------------------------------------------------------------------------- evaluate

def _records(data: str, size: Optional[int], seed: int):
    from .data import load_records

    records = load_records(data, split="heldout", seed=seed, size=size)
    records = [r for r in records if r.rejected is not None]
    if not records:
        raise ValueError(f"--data {data}: no held-out record with a rejected answer")
    return records


def _shuffle_images(records, seed: int):
    """The records with their images dealt out again at random (a permutation drawn from ``seed``)."""
    images = [r.images for r in records]
    random.Random(f"prefopt-eval-shuffle/{seed}").shuffle(images)
    return [dataclasses.replace(r, images=i) for r, i in zip(records, images)]


def _type_of(record) -> str:
    from .synthetic import question_type

    q = question_type(record.prompt)
    return q[0] if q is not None else "other"


@torch.no_grad()
def evaluate(model, *, processor=None, reference=None, data: str = "synthetic", records=None,
             size: Optional[int] = None, seed: int = 0, shuffle_images: bool = False, batch_size: int = 16,
             max_new_tokens: int = 16, max_length: int = 512, device=None, dtype=None, backend: str = "auto",
             synced_gpus: bool = False, gather=None, progress: bool = False,
             share_prefix: str = "auto") -> Dict[str, Any]:
    """Evaluate ``model`` on held-out preference records; returns the metrics dict (see the module docstring).

    ``model``: a :class:`~prefopt.train.models.ModelAdapter` (then ``processor`` is required) or a folder: a
    Hugging Face model folder (``save_pretrained``) or a run folder (its latest checkpoint).
    ``reference``: a ModelAdapter, a folder, or None: the model a run folder started from when known,
    else no shift metrics (``tv_shift`` and ``kl_shift`` None).
    ``data``: ``"synthetic"`` (its held-out split, ``size`` records from ``seed``) or a JSONL file / folder
    with ``heldout.jsonl``; ``records`` overrides it. Generation metrics only for the synthetic set's
    verifiable questions. ``shuffle_images``: the grounding control. The model is left in the mode it was in.
    ``synced_gpus`` and ``gather`` (``gather(params)``: a context in which partitioned ``params`` hold their
    full data, entered around the fused op only) are for ZeRO-3, where every rank must take part.
    ``share_prefix``: pairs are scored with one prefix per record (:mod:`prefopt.train.prefixes`).
    """
    start = None
    if not hasattr(model, "hidden_states"):
        model, processor, start = _adapter_and_processor(model, device=device or "cpu", dtype=dtype)
    elif processor is None:
        raise ValueError("evaluate: a ModelAdapter needs its processor")
    if reference is None and start is not None:
        reference = start()
    elif isinstance(reference, str):
        reference, _ = load_model(reference, device=device or "cpu", dtype=dtype)
    device = model.device
    from .prefixes import make_collator

    collator = make_collator(processor, model.config, share_prefix, method=None, max_length=max_length)
    records = list(records) if records is not None else _records(data, size, seed)
    if shuffle_images:
        records = _shuffle_images(records, seed)
    types = [_type_of(r) for r in records]
    modules = [model.model] + ([reference.model] if reference is not None else [])
    modes = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        pairs = _pairwise(model, reference, collator, records, batch_size, device, backend, gather, progress)
        gens = _generate(model, collator, records, batch_size, max_new_tokens, device, synced_gpus, progress)
    finally:
        for m, mode in zip(modules, modes):
            m.train(mode)
    return _aggregate(records, types, pairs, gens, shuffle_images, reference is not None)


def _pairwise(model, reference, collator, records, batch_size, device, backend, gather, progress):
    """Per-pair (sum_c, sum_r, n_c, n_r) and per-token (top1, confidence, entropy, kl, tv) on chosen answers."""
    import contextlib

    from tqdm import tqdm

    head = model.head()
    ref_head = reference.head() if reference is not None else None
    per_pair, tokens = [], {k: [] for k in ("top1", "confidence", "entropy", "kl", "tv")}
    for i in tqdm(range(0, len(records), batch_size), desc="eval pairs", disable=not progress, leave=False):
        part = records[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collator(part, mode="pair").items()}
        hidden = model.hidden_states(**batch)[:, :-1]
        targets = batch["labels"][:, 1:]
        ref_hidden = reference.hidden_states(**batch)[:, :-1] if reference is not None else None
        # The head's full weight only around the op (a tied head is also the embedding, which the
        # backbone's ZeRO-3 hooks gather and release on their own).
        with (gather or (lambda params: contextlib.nullcontext()))([head.weight, head.bias]):
            common = dict(temperature=head.temperature, softcap=head.softcap, backend=backend)
            stats = linear_logprobs(hidden, head.weight, targets, bias=head.bias, entropy=True, top1=True,
                                    kl=ref_hidden is not None, ref_hidden=ref_hidden,
                                    ref_weight=None if ref_head is None else ref_head.weight,
                                    ref_bias=None if ref_head is None else ref_head.bias, **common)
            mask = targets != collator.ignore_index
            sums, counts = (stats.logp.double() * mask).sum(1), mask.sum(1)
            b = len(part)
            per_pair += list(zip(sums[:b].tolist(), sums[b:].tolist(), counts[:b].tolist(), counts[b:].tolist()))
            keep = mask.clone()
            keep[b:] = False  # token metrics on the chosen answers
            h = hidden[keep]
            ref_lse, rh = None, None
            if ref_hidden is not None:
                rh = ref_hidden[keep]
                ref_lse = linear_logprobs(rh, ref_head.weight, targets[keep], bias=ref_head.bias, **common).lse
            conf, tv = shift_and_confidence(h, head.weight, stats.lse[keep], bias=head.bias, ref_hidden=rh,
                                            ref_weight=None if ref_head is None else ref_head.weight,
                                            ref_bias=None if ref_head is None else ref_head.bias, ref_lse=ref_lse,
                                            temperature=head.temperature, softcap=head.softcap)
        tokens["top1"] += stats.top1[keep].tolist()
        tokens["confidence"] += conf.tolist()
        tokens["entropy"] += stats.entropy[keep].tolist()
        if ref_hidden is not None:
            tokens["kl"] += stats.kl[keep].tolist()
            tokens["tv"] += tv.tolist()
    return per_pair, tokens


def _generate(model, collator, records, batch_size, max_new_tokens, device, synced_gpus, progress):
    """Greedy answers to the verifiable synthetic questions: {record index: text}."""
    from tqdm import tqdm

    from .synthetic import judge

    todo = [i for i, r in enumerate(records) if judge(r.prompt, r.chosen, r.chosen) is not None]
    out: Dict[int, str] = {}
    tok = collator.tokenizer
    for s in tqdm(range(0, len(todo), batch_size), desc="eval generation", disable=not progress, leave=False):
        idx = todo[s:s + batch_size]
        inputs = {k: v.to(device) for k, v in collator.generation_inputs([records[i] for i in idx]).items()}
        ids = model.model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, use_cache=True,
                                   pad_token_id=collator.pad_token_id, synced_gpus=synced_gpus)
        texts = tok.batch_decode(ids[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        out.update(zip(idx, texts))
    return out


def _mean(values) -> Optional[float]:
    values = list(values)
    return sum(values) / len(values) if values else None


def _aggregate(records, types, pairwise, gens, shuffled: bool, has_reference: bool) -> Dict[str, Any]:
    from .synthetic import judge

    pairs, tokens = pairwise

    wins = [sc > sr for sc, sr, _, _ in pairs]
    gaps = [sc - sr for sc, sr, _, _ in pairs]
    p = [1.0 / (1.0 + math.exp(-(sc / max(nc, 1) - sr / max(nr, 1)))) for sc, sr, nc, nr in pairs]
    pair_conf = [max(q, 1.0 - q) for q in p]
    pair_correct = [1.0 if q > 0.5 else 0.0 for q in p]
    judged = {i: judge(records[i].prompt, records[i].chosen, text) for i, text in gens.items()}
    per_type: Dict[str, Dict[str, Any]] = {}
    for t in sorted(set(types)):
        idx = [i for i, ti in enumerate(types) if ti == t]
        js = [judged[i] for i in idx if i in judged]
        per_type[t] = {
            "n": len(idx),
            "pair_accuracy": _mean(wins[i] for i in idx),
            "generation_accuracy": _mean(j[1] for j in js),
            "hallucination_rate": _mean(j[2] for j in js),
        }
    result = {
        "pair_accuracy": _mean(wins),
        "generation_accuracy": _mean(j[1] for j in judged.values()),
        "hallucination_rate": _mean(j[2] for j in judged.values()),
        "ece_pair": ece(pair_conf, pair_correct),
        "ece_token": ece(tokens["confidence"], tokens["top1"]),
        "tv_shift": _mean(tokens["tv"]) if has_reference else None,
        "kl_shift": _mean(tokens["kl"]) if has_reference else None,
        "entropy": _mean(tokens["entropy"]),
        "logp_gap": _mean(gaps),
        "per_type": per_type,
        "n": len(records),
        "n_generated": len(judged),
        "shuffled_images": shuffled,
        "reliability_pair": reliability_bins(pair_conf, pair_correct),
        "reliability_token": reliability_bins(tokens["confidence"], tokens["top1"]),
    }
    return result


# ---------------------------------------------------------------------------------------------- reports

def _fmt(v, spec=".3f") -> str:
    return "n/a" if v is None else format(v, spec)


def markdown(result: Dict[str, Any], title: str = "Held-out evaluation") -> str:
    """The result as a markdown report: the headline numbers, then one row per question type."""
    lines = [f"# {title}", "", f"{result['n']} held-out pairs" + (", images shuffled among records (grounding "
             "control)" if result["shuffled_images"] else "") + f"; {result['n_generated']} greedy answers judged.",
             "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(result[k], '.4f')} |" for k in EVAL_KEYS]
    lines += ["", "| type | n | pair accuracy | generation accuracy | hallucination rate |", "|---|---|---|---|---|"]
    for t, row in result["per_type"].items():
        lines.append(f"| {t} | {row['n']} | {_fmt(row['pair_accuracy'])} | {_fmt(row['generation_accuracy'])} | "
                     f"{_fmt(row['hallucination_rate'])} |")
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], out_dir: str) -> List[str]:
    """``reliability.png`` (pairwise and token reliability diagrams) and ``per_type.png`` (per-type bars)
    in ``out_dir``; returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    for ax, key, name in ((axes[0], "reliability_pair", "pairwise (ece_pair)"),
                          (axes[1], "reliability_token", "next token top-1 (ece_token)")):
        bins = [b for b in result[key] if b["n"]]
        ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
        ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=0.1, align="edge", alpha=0.7,
               edgecolor="k", label="accuracy")
        ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", c="C3", label="mean confidence")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy", title=name)
        ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "reliability.png"))
    fault_point(paths[-1])
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)

    types = list(result["per_type"])
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(types)), 4))
    for k, (key, label) in enumerate((("pair_accuracy", "pair accuracy"), ("generation_accuracy", "generation "
                                      "accuracy"), ("hallucination_rate", "hallucination rate"))):
        ax.bar([i + 0.27 * (k - 1) for i in range(len(types))],
               [result["per_type"][t][key] or 0.0 for t in types], width=0.27, label=label)
    ax.set_xticks(range(len(types)), types)
    ax.set(ylim=(0, 1), title="per question type" + (" (images shuffled)" if result["shuffled_images"] else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "per_type.png"))
    fault_point(paths[-1])
    fig.savefig(paths[-1], dpi=100)
    plt.close(fig)
    return paths


def write_report(result: Dict[str, Any], out_dir: str, whole: bool = False) -> List[str]:
    """``eval.json``, ``eval.md`` and the plots in ``out_dir``; returns their paths. They are written into a
    temporary folder beside ``out_dir`` first, then each is renamed into ``out_dir`` (replacing a link of
    that name, never writing through it), or with ``whole`` the folder replaces ``out_dir``
    (:func:`~prefopt.train.runfolder.swap_in`): an interrupted report leaves nothing half written."""
    import shutil
    import tempfile

    from .runfolder import swap_in

    path = os.path.abspath(out_dir)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
    try:
        names = [os.path.join(tmp, "eval.json"), os.path.join(tmp, "eval.md")]
        fault_point(names[0])
        with open(names[0], "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
        fault_point(names[1])
        with open(names[1], "w", encoding="utf-8") as f:
            f.write(markdown(result))
        names += plot(result, tmp)
        if whole:
            swap_in(tmp, out_dir)
        else:
            os.makedirs(out_dir, exist_ok=True)
            for name in names:
                os.replace(name, os.path.join(out_dir, os.path.basename(name)))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [os.path.join(out_dir, os.path.basename(name)) for name in names]


# ------------------------------------------------------------------------------------------ command line

def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="prefopt eval",
        description="Held-out evaluation of a model: pairwise accuracy, greedy generation accuracy and "
                    "hallucination per question type, calibration (ECE), shift from a reference (TV, KL) and "
                    "entropy, computed with the fused op.",
    )
    p.add_argument("--model", required=True, metavar="FOLDER|RUN|ORG/NAME",
                   help="a Hugging Face model folder (save_pretrained), a prefopt train run folder (its latest "
                        "checkpoint), or a hub id resolved as prefopt train --model resolves it (a local folder of "
                        "that name, else the Hugging Face cache; downloaded when online)")
    p.add_argument("--revision", default=None, help="the branch, tag or commit of a hub id given to --model "
                   "(default main)")
    p.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run; "
                   "without it such a model is refused")
    p.add_argument("--reference", default=None, metavar="FOLDER",
                   help="reference model for tv_shift / kl_shift (default: the model the run started from, when "
                        "known; otherwise no shift metrics)")
    p.add_argument("--data", default="synthetic", metavar="synthetic|PATH",
                   help="held-out records: the synthetic set's held-out split, a JSONL file or a folder with "
                        "heldout.jsonl (default %(default)s); generation metrics on the synthetic questions only")
    p.add_argument("--size", type=int, default=None, help="number of held-out records (default: all; synthetic: 200)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic records and of the image shuffle "
                   "(default %(default)s)")
    p.add_argument("--shuffle-images", action="store_true", help="deal the images out among the records at random "
                   "(the grounding control)")
    p.add_argument("--batch-size", type=int, default=16, help="records per forward pass (default %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="greedy answer length limit (default %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("--out", default=None, metavar="DIR", help="write eval.json, eval.md, reliability.png and "
                   "per_type.png here")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """``prefopt eval``; returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    from .checkpoint import CheckpointError
    from .models import check_revision, resolve_hub_id
    from .threads import keep_num_threads
    from .runfolder import FolderLock

    lock = None
    with keep_num_threads():
        try:
            if args.batch_size < 1 or args.max_new_tokens < 1:
                raise ValueError("--batch-size and --max-new-tokens: expected positive numbers")
            lock = FolderLock(args.out, "--out") if args.out else None  # one writer at a time
            check_revision(args.revision, {"--model": args.model})
            source = resolve_hub_id(args.model, revision=args.revision, trust_remote_code=args.trust_remote_code)
            model, processor, start = _adapter_and_processor(source, device=args.device, dtype=None,
                                                             trust_remote_code=args.trust_remote_code)
            if sum(p.numel() for p in model.model.parameters()) < SMALL_MODEL and "OMP_NUM_THREADS" not in os.environ \
                    and model.device.type == "cpu":
                torch.set_num_threads(1)  # as prefopt train does for the tiny models (one_thread_for_tiny_models)
            reference = args.reference if args.reference is not None else (start() if start is not None else None)
            result = evaluate(model, processor=processor, reference=reference, data=args.data, size=args.size,
                              seed=args.seed, shuffle_images=args.shuffle_images, batch_size=args.batch_size,
                              max_new_tokens=args.max_new_tokens, device=args.device)
            if args.out:
                write_report(result, args.out)
        except (ValueError, TypeError, OSError, CheckpointError) as e:
            message = first_line(e)
            print(f"prefopt eval: error: {message}", file=sys.stderr)
            return 2
        finally:
            if lock is not None:
                lock.release()
    print(json.dumps(result, indent=1) if args.json else markdown(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
