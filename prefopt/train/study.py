"""``prefopt study``: the embedded comparison of the methods, from one shared SFT base, in one command.

1. The SFT base: by default (``--base train``) one trained here, SFT of ``--model`` for ``--base-steps``
   (1500, with the trainer's defaults: about a minute on a CPU core), which reads its images but is below the
   ceiling (held-out generation accuracy between 0.5 and 0.8, some hallucination: STUDY.md's first column),
   so that a preference stage can show an improvement as well as a loss. ``--base tiny-llava-sft`` takes the
   shipped base (generation accuracy 1.0, no hallucination: from there a method can only keep or lose);
   ``--base`` also names a model folder or run. The variants from a base trained here run at the trainer's
   defaults for a trained base, as from tiny-llava-sft (lr 1e-4, CW-DPO's floor -3), not at those of the
   random-weight family it came from (lr 1e-3, floor -6, which undo a trained model's grounding).
2. Every variant starts from it (``--init-from``) with the same number of optimizer steps and the same
   records per step, for each seed (the seed sets data order and sampling; the base is shared):

   =====================  ===================================================================
   dpo                    DPO (sigmoid)
   cw-dpo                 CW-DPO: SFT-C, then cooling-weighted DPO with on-policy negatives
   cw-dpo-no-cooling      the same with the cooling weight held at 1 (floor -1e9)
   nsft                   nSFT: chosen + corrections, per-token KL to the base
   nsft-no-kl             nSFT without its KL term (one model)
   simpo                  SimPO (reference-free)
   grpo                   GRPO, exact-answer reward
   =====================  ===================================================================

3. Each run ends with the trainer's held-out evaluation (its ``eval_*`` summary numbers, against the model
   it started from, i.e. the base) and its Delta-log-p probe curve. The study tabulates every metric's
   mean and spread (sample standard deviation over seeds), draws the plots (calibration, shift from the
   base, Delta-log-p curves, hallucination) and writes ``STUDY.md`` with the commit and the conditions,
   and for each paper claim it can check whether this run reproduces it. It reports; it does not advocate.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .errors import OneLineParser, first_line

#: Variant name -> (method, method options): the comparison's arms.
VARIANTS: Dict[str, Tuple[str, Dict[str, Any]]] = {
    "dpo": ("dpo", {}),
    "cw-dpo": ("cw-dpo", {}),
    # The cooling weight w = sigmoid((avg_r - floor) / tau) is 1 for any log-prob when the floor is this low.
    "cw-dpo-no-cooling": ("cw-dpo", {"cw_floor": -1e9}),
    "nsft": ("nsft", {}),
    "nsft-no-kl": ("nsft", {"kl_coef": 0.0}),
    "simpo": ("simpo", {}),
    "grpo": ("grpo", {}),
}
BASE = "sft base"
TRAIN_BASE = "train"  # --base value: train the SFT base in the study
PROBE_KEYS = ("probe/delta_logp_chosen", "probe/delta_logp_rejected")
SHIFT_KEYS = ("eval_tv_shift", "eval_kl_shift")
TRAINED_CW_FLOOR = -3.0  # FusedCWDPOLoss's default floor: the trainer's CW-DPO floor for a trained base


@dataclass
class Claim:
    """A paper's claim as this study can check it: ``metric`` of ``variant`` is lower (``"lower"``) or
    higher (``"higher"``) than ``other``'s, or within the spread or better (``"matches"``,
    ``"matches-lower"``). ``requires``: (variant, metric) pairs whose mean must be above 0 for the check
    to say anything (GRPO must have been rewarded at all; generation claims need a model that answers)."""

    paper: str
    text: str
    metric: str
    variant: str
    relation: str
    other: str
    requires: Tuple[Tuple[str, str], ...] = ()


CLAIMS = (
    Claim("CW-DPO (arXiv 2510.11978)", "CW-DPO hallucinates less than DPO", "eval_hallucination_rate", "cw-dpo",
          "lower", "dpo", requires=(("dpo", "eval_generation_accuracy"),)),
    Claim("CW-DPO (arXiv 2510.11978)", "CW-DPO is better calibrated than DPO (pairwise ECE)", "eval_ece_pair",
          "cw-dpo", "lower", "dpo"),
    Claim("CW-DPO (arXiv 2510.11978)", "cooling keeps the positives' log-probs from being squeezed down",
          "probe/delta_logp_chosen", "cw-dpo", "higher", "cw-dpo-no-cooling"),
    Claim("nSFT (arXiv 2411.14797)", "nSFT matches DPO in generation accuracy", "eval_generation_accuracy", "nsft",
          "matches", "dpo", requires=(("dpo", "eval_generation_accuracy"),)),
    Claim("nSFT (arXiv 2411.14797)", "nSFT matches DPO in hallucination", "eval_hallucination_rate", "nsft",
          "matches-lower", "dpo", requires=(("dpo", "eval_generation_accuracy"),)),
    Claim("nSFT (arXiv 2411.14797)", "nSFT's KL term keeps the model closer to the base", "eval_kl_shift", "nsft",
          "lower", "nsft-no-kl"),
    Claim("RFT vs SFT (arXiv 2506.23508)", "RFT (GRPO) moves the model less than SFT (nSFT without KL: SFT on "
          "chosen + corrections)", "eval_kl_shift", "grpo", "lower", "nsft-no-kl", requires=(("grpo", "reward"),)),
)


@dataclass
class StudyConfig:
    """The study's conditions (the command's options)."""

    out: str = "runs/study"
    model: str = "tiny-llava"
    base: str = TRAIN_BASE  # "train": train one here; or an embedded model, a model folder or run
    variants: List[str] = field(default_factory=lambda: list(VARIANTS))
    seeds: int = 3
    base_steps: int = 1500
    steps: int = 100
    batch_size: int = 4
    train_size: Optional[int] = None
    eval_size: Optional[int] = 200
    probe_every: int = 5
    probe_size: int = 16
    device: str = "cpu"
    progress: bool = True


# ------------------------------------------------------------------------------------------ running


def _train_config(study: StudyConfig, **kw):
    from .config import TrainConfig

    options = kw.pop("options", None)
    base = dict(data="synthetic", batch_size=study.batch_size, train_size=study.train_size,
                probe_every=study.probe_every, probe_size=study.probe_size, device=study.device, progress=False,
                eval_size=study.eval_size)
    base.update(kw)
    cfg = TrainConfig(**base)
    if options:
        import dataclasses

        cfg = dataclasses.replace(cfg, options=dataclasses.replace(cfg.options, **options))
    return cfg


def _curve(run_dir: str) -> List[Dict[str, float]]:
    """The run's probe rows: step and the Delta-log-p of positives and negatives."""
    rows = []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
            m = json.loads(line)
            if PROBE_KEYS[0] in m:
                rows.append({"step": m["step"], **{k: m[k] for k in PROBE_KEYS}})
    return rows


def _scalars(summary: Dict[str, Any]) -> Dict[str, float]:
    """The summary's numbers a study compares: held-out evaluation (``eval_*``), final probes, the
    training loss, GRPO's mean reward and wall time."""
    keep = {k: v for k, v in summary.items() if (k.startswith("eval_") and k != "eval_n") or k in PROBE_KEYS}
    # Not peak memory: every run of a study shares one process, whose peak only grows.
    keep.update(loss=summary.get("loss"), reward=summary.get("reward"), wall_seconds=summary.get("wall_seconds"))
    return {k: float(v) for k, v in keep.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_study(study: StudyConfig) -> Dict[str, Any]:
    """Train the base and every (variant, seed); write ``study.json``, the plots and ``STUDY.md`` to
    ``study.out`` (locked meanwhile: one writer at a time); returns the study's result."""
    from .runfolder import FolderLock, contents

    unknown = [v for v in study.variants if v not in VARIANTS]
    if unknown:
        raise ValueError(f"--methods: unknown variant {unknown[0]!r} (expected some of {', '.join(VARIANTS)})")
    if study.seeds < 1 or study.steps < 1 or study.base_steps < 1:
        raise ValueError("--seeds, --steps and --base-steps must be at least 1")
    with FolderLock(study.out):  # first: a study running there holds files (its lock names it)
        if contents(study.out):
            raise ValueError(f"--out {study.out}: already holds files; choose a new folder")
        return _study(study)


def _study(study: StudyConfig) -> Dict[str, Any]:
    from tqdm import tqdm

    from .config import TINY_BASE_LR
    from .export import quiet_transformers
    from .loop import train
    from .models import TINY_MODELS

    started = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    total = len(study.variants) * study.seeds + (study.base == TRAIN_BASE)
    with tqdm(total=total, desc="study", disable=not study.progress, dynamic_ncols=True) as bar, quiet_transformers():
        if study.base == TRAIN_BASE:
            bar.set_postfix_str("sft base")
            base_dir = os.path.join(study.out, "base")
            summary = train(_train_config(study, method="sft", model=study.model, out=base_dir, steps=study.base_steps,
                                          seed=0))
            base = summary["model_folder"]
            # Its shift and probe numbers are measured from the random init, not from the base: left out.
            metrics = {k: v for k, v in _scalars(summary).items() if k not in SHIFT_KEYS + PROBE_KEYS}
            runs.append({"variant": BASE, "seed": 0, "run": base_dir, "metrics": metrics,
                         "curve": _curve(base_dir)})
            bar.update(1)
        else:
            base = study.base
            runs.append({"variant": BASE, "seed": 0, "run": None, "metrics": evaluate_base(study, base), "curve": []})
        for variant in study.variants:
            method, options = VARIANTS[variant]
            lr = None
            if study.base == TRAIN_BASE:
                # The base keeps its family's defaults (lr 1e-3, CW-DPO floor -6), meant for random weights, which
                # undo a trained model's grounding; its variants run at a trained base's, as from tiny-llava-sft.
                lr = TINY_BASE_LR
                options = {**({"cw_floor": TRAINED_CW_FLOOR} if method == "cw-dpo" else {}), **options}
            for seed in range(study.seeds):
                bar.set_postfix_str(f"{variant} seed {seed}")
                run_dir = os.path.join(study.out, "runs", f"{variant}-seed{seed}")
                summary = train(_train_config(study, method=method, model=base,
                                              init_from=None if base in TINY_MODELS else base, out=run_dir,
                                              steps=study.steps, seed=seed, lr=lr, options=options))
                runs.append({"variant": variant, "seed": seed, "run": run_dir, "metrics": _scalars(summary),
                             "curve": _curve(run_dir)})
                bar.update(1)
    result = {
        "conditions": {**asdict(study), "base_model": base, "wall_seconds": time.perf_counter() - started,
                       **environment()},
        "runs": runs,
        "table": aggregate(runs),
    }
    result["claims"] = check_claims(result["table"])
    with open(os.path.join(study.out, "study.json"), "w", encoding="utf-8") as f:
        json.dump(result, f, indent=1)
    result["plots"] = plot(result, study.out)
    with open(os.path.join(study.out, "STUDY.md"), "w", encoding="utf-8") as f:
        f.write(markdown(result))
    return result


def evaluate_base(study: StudyConfig, base: str) -> Dict[str, float]:
    """The held-out evaluation of a given base (seed 0's records, as its seed-0 runs see them; no shift
    metrics: it is its own reference)."""
    from .eval import EVAL_KEYS, evaluate
    from .export import model_source
    from .models import TINY_MODELS, build_model

    adapter, processor = build_model(base if base in TINY_MODELS else model_source(base), device=study.device)
    result = evaluate(adapter, processor=processor, data="synthetic", size=study.eval_size, seed=0,
                      batch_size=study.batch_size)
    return {f"eval_{k}": float(result[k]) for k in EVAL_KEYS if result[k] is not None}


def environment() -> Dict[str, Any]:
    """Commit, date, software and machine of the study (what STUDY.md's figures depend on)."""
    import torch

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*args) -> Optional[str]:
        try:
            out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {
        "commit": commit or "unknown (not a git checkout)",
        "uncommitted_changes": bool(dirty) if commit else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
    }


# ------------------------------------------------------------------------------------------ analysis


def _mean_std(values: Sequence[float]) -> Tuple[Optional[float], Optional[float]]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def aggregate(runs: Sequence[Dict[str, Any]]) -> Dict[str, Dict[str, Dict[str, Optional[float]]]]:
    """``{variant: {metric: {"mean", "std", "n"}}}`` over the seeds of each variant."""
    table: Dict[str, Dict[str, Dict[str, Optional[float]]]] = {}
    for variant in dict.fromkeys(r["variant"] for r in runs):
        mine = [r["metrics"] for r in runs if r["variant"] == variant]
        keys = sorted({k for m in mine for k in m})
        table[variant] = {}
        for k in keys:
            mean, std = _mean_std([m[k] for m in mine if k in m])
            table[variant][k] = {"mean": mean, "std": std, "n": sum(k in m for m in mine)}
    return table


def check_claims(table) -> List[Dict[str, Any]]:
    """Each claim whose variants and metric were run: ``reproduced``, ``not reproduced`` (the difference
    goes the other way by more than the spread), ``inconclusive`` (within the spread; with one seed
    there is no spread and only the direction is read), or ``not testable`` (a required metric is 0)."""
    out = []
    for c in CLAIMS:
        a, b = table.get(c.variant, {}).get(c.metric), table.get(c.other, {}).get(c.metric)
        if not a or not b or a["mean"] is None or b["mean"] is None:
            continue
        diff = a["mean"] - b["mean"]
        spread = max(a["std"] or 0.0, b["std"] or 0.0)
        lower_is_better = c.relation in ("lower", "matches-lower")
        better = -diff if lower_is_better else diff  # > 0: in the claim's direction
        missing = [f"{v} {m}" for v, m in c.requires if not (table.get(v, {}).get(m, {}).get("mean") or 0) > 0]
        if missing:
            verdict = f"not testable ({', '.join(missing)} is 0)"
        elif c.relation.startswith("matches"):
            verdict = "reproduced" if better >= -spread else "not reproduced"
        elif abs(diff) <= spread:
            verdict = "inconclusive"
        else:
            verdict = "reproduced" if better > 0 else "not reproduced"
        out.append({**asdict(c), "mean": a["mean"], "other_mean": b["mean"], "difference": diff, "spread": spread,
                    "verdict": verdict})
    return out


# ------------------------------------------------------------------------------------------ reports


def _cell(entry: Optional[Dict[str, Optional[float]]]) -> str:
    if not entry or entry["mean"] is None:
        return "n/a"
    text = f"{entry['mean']:.3f}"
    return text + (f" ± {entry['std']:.3f}" if entry["std"] is not None else "")


def markdown(result: Dict[str, Any]) -> str:
    """STUDY.md: conditions, the table (mean ± sample std over seeds), the claims, the plots."""
    from .config import TINY_BASE_LR

    c, table = result["conditions"], result["table"]
    variants = list(table)
    metrics = sorted({k for v in variants for k in table[v]}, key=lambda k: (not k.startswith("eval_"), k))
    lines = [
        "# prefopt study: the embedded comparison",
        "",
        f"Commit `{c['commit']}`" + (" (with uncommitted changes)" if c.get("uncommitted_changes") else "")
        + f", {c['date']}; Python {c['python']}, torch {c['torch']}, {c['cpu_threads']} torch threads on "
        f"{c['cpu_count']} CPUs ({c['machine']}), device {c['device']}; {c['wall_seconds'] / 60:.1f} minutes in all.",
        "",
        "Conditions: synthetic visual set" + (f" ({c['train_size']} training records)" if c["train_size"] else "")
        + "; base: " + (f"SFT of {c['model']} for {c['base_steps']} steps here (the variants at a trained "
                        f"base's defaults, as from tiny-llava-sft: lr {TINY_BASE_LR:g}, CW-DPO floor {TRAINED_CW_FLOOR:g})"
                        if c["base"] == TRAIN_BASE else c["base_model"]) + "; every variant "
        f"{c['steps']} optimizer steps of {c['batch_size']} records from that base, seeds 0..{c['seeds'] - 1}; "
        f"held-out evaluation on {c['eval_size'] if c['eval_size'] is not None else 'all'} records against the "
        "base (shift metrics); probes every " + f"{c['probe_every']} steps on {c['probe_size']} held-out records. "
        "Cells: mean ± sample standard deviation over seeds (no ± with one seed). Peak memory is not compared "
        "here (all runs share one process); each `prefopt train` summary reports its own.",
        "",
        "| metric | " + " | ".join(variants) + " |",
        "|---|" + "---|" * len(variants),
    ]
    for k in metrics:
        lines.append(f"| {k} | " + " | ".join(_cell(table[v].get(k)) for v in variants) + " |")
    lines += ["", "## Paper claims", ""]
    if result["claims"]:
        lines += ["| paper | claim | metric | this study | verdict |", "|---|---|---|---|---|"]
        for cl in result["claims"]:
            lines.append(f"| {cl['paper']} | {cl['text']} | {cl['metric']} | {cl['variant']} {cl['mean']:.3f} vs "
                         f"{cl['other']} {cl['other_mean']:.3f} (spread {cl['spread']:.3f}) | {cl['verdict']} |")
        missed = [cl for cl in result["claims"] if cl["verdict"] != "reproduced"]
        lines += ["", f"{len(result['claims']) - len(missed)} of {len(result['claims'])} claims reproduced here."
                  + (" Not reproduced, inconclusive or not testable: "
                     + "; ".join(f"{cl['text']} ({cl['verdict']})" for cl in missed) + "." if missed else "")
                  + " The study is small (a tiny model, a synthetic task, few steps): a claim not reproduced here is "
                  "not refuted in general, and one reproduced is not confirmed in general."]
        at_ceiling = [k for k in ("eval_generation_accuracy", "eval_pair_accuracy")
                      if (table.get(BASE, {}).get(k, {}).get("mean") or 0) >= 0.99]
        if at_ceiling:
            lines += ["", f"The base is at the ceiling on {' and '.join(at_ceiling)}: on those metrics a preference "
                      "stage can only keep or lose, so claims of improvement cannot show there."]
    else:
        lines.append("No claim could be checked (its variants or metrics were not run).")
    if result.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in result["plots"]]
    return "\n".join(lines) + "\n"


def plot(result: Dict[str, Any], out_dir: str) -> List[str]:
    """calibration.png, shift.png, hallucination.png (bars with the spread) and delta_logp.png (the probe
    curves, mean over seeds); only the panels whose metrics exist. Returns the paths written."""
    try:
        import matplotlib
    except ImportError:
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table, paths = result["table"], []
    variants = list(table)
    panels = {
        "calibration.png": ("eval_ece_pair", "eval_ece_token"),
        "shift.png": ("eval_tv_shift", "eval_kl_shift"),
        "hallucination.png": ("eval_hallucination_rate", "eval_generation_accuracy"),
    }
    for name, keys in panels.items():
        keys = [k for k in keys if any(table[v].get(k, {}).get("mean") is not None for v in variants)]
        if not keys:
            continue
        fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(variants)), 4))
        width = 0.8 / len(keys)
        for j, k in enumerate(keys):
            entries = [table[v].get(k) or {} for v in variants]
            ax.bar([i + (j - (len(keys) - 1) / 2) * width for i in range(len(variants))],
                   [e.get("mean") or 0.0 for e in entries], width=width, yerr=[e.get("std") or 0.0 for e in entries],
                   capsize=3, label=k.replace("eval_", ""))
        ax.set_xticks(range(len(variants)), variants, rotation=30, ha="right")
        ax.set_title(name[:-4])
        ax.legend(fontsize=8)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, name))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    curves = [r for r in result["runs"] if r["curve"] and r["variant"] != BASE]
    if curves:
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, variant in enumerate(dict.fromkeys(r["variant"] for r in curves)):
            mine = [r["curve"] for r in curves if r["variant"] == variant]
            steps = [row["step"] for row in mine[0]]
            for key, style in zip(PROBE_KEYS, ("-", "--")):
                means = [sum(c[s][key] for c in mine if s < len(c)) / len(mine) for s in range(len(steps))]
                ax.plot(steps, means, style, color=f"C{i}", label=f"{variant} {'positives' if style == '-' else 'negatives'}")
        ax.axhline(0, color="grey", lw=0.8)
        ax.set(xlabel="step", ylabel="Δ log p per token since the base", title="Delta-log-p probes (mean over seeds)")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "delta_logp.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# ------------------------------------------------------------------------------------------ command


def build_parser() -> argparse.ArgumentParser:
    d = StudyConfig()
    p = OneLineParser(prog="prefopt study", description="The embedded comparison: an SFT base, then every variant from it "
                "(" + ", ".join(VARIANTS) + ") with the same steps and records per step, for several seeds; a table "
                "of the held-out evaluation (mean and spread), plots and STUDY.md with the commit and conditions.")
    p.add_argument("--out", default=d.out, help="study folder, new or empty (default %(default)s)")
    p.add_argument("--model", default=d.model, help="with --base train: the model the base is trained from "
                   "(default %(default)s)")
    p.add_argument("--base", default=d.base, metavar="MODEL|FOLDER|RUN|train",
                   help="the SFT base every variant starts from: 'train' to train one here for --base-steps from "
                        "--model (default %(default)s: a base below the ceiling, so that improvements can show), or an embedded "
                        "model, a model folder or a run (tiny-llava-sft: the shipped base, at the ceiling: "
                        "generation accuracy 1.0, no hallucination)")
    p.add_argument("--methods", default=",".join(d.variants), help="comma-separated variants (default: all)")
    p.add_argument("--seeds", type=int, default=d.seeds, help="seeds per variant (default %(default)s)")
    p.add_argument("--base-steps", type=int, default=d.base_steps, help="with --base train: SFT steps of the base "
                   "(default %(default)s)")
    p.add_argument("--steps", type=int, default=d.steps, help="optimizer steps of every variant (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="records per step (default %(default)s)")
    p.add_argument("--train-size", type=int, default=None, help="training records (default: the synthetic set's)")
    p.add_argument("--eval-size", type=int, default=d.eval_size, help="held-out records evaluated per run "
                   "(default %(default)s)")
    p.add_argument("--probe-every", type=int, default=d.probe_every, help="Delta-log-p probe cadence "
                   "(default %(default)s)")
    p.add_argument("--probe-size", type=int, default=d.probe_size, help="probe records (default %(default)s)")
    p.add_argument("--device", default=d.device, help="device of every run (default %(default)s)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    try:
        args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:
        return int(e.code or 0)
    study = StudyConfig(out=args.out, model=args.model, base=args.base,
                        variants=[v.strip() for v in args.methods.split(",") if v.strip()], seeds=args.seeds,
                        base_steps=args.base_steps, steps=args.steps, batch_size=args.batch_size,
                        train_size=args.train_size, eval_size=args.eval_size, probe_every=args.probe_every,
                        probe_size=args.probe_size, device=args.device, progress=not args.no_progress)
    from .threads import keep_num_threads, one_thread_for_tiny_models

    with keep_num_threads():
        # One thread for the tiny models, as prefopt train: faster on a shared machine, and the trained base
        # (so STUDY.md) depends on the thread count (measured: 1500 steps give generation accuracy 0.525 on 1,
        # 0.625 on 2).
        one_thread_for_tiny_models(study.model if study.base == TRAIN_BASE else study.base, study.device)
        try:
            result = run_study(study)
        except ValueError as e:
            print(f"prefopt study: error: {first_line(e)}", file=sys.stderr)
            return 2
    print(f"prefopt study: {len(result['runs'])} runs in {result['conditions']['wall_seconds'] / 60:.1f} min; "
          f"{os.path.join(study.out, 'STUDY.md')}")
    return 0


__all__ = ["run_study", "StudyConfig", "VARIANTS", "CLAIMS", "aggregate", "check_claims", "markdown", "main"]
