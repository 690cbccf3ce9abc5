"""``prefopt train``: the command line of the lean trainer.

With no arguments it runs the embedded default: CW-DPO on the tiny LLaVA-style VLM with the built-in
synthetic visual preference set, on the CPU in a couple of minutes, and prints a summary. Launched with
``torchrun`` or ``deepspeed`` the same command trains on every process (DDP, or ZeRO-2/3 with
``--deepspeed``). A bad option, path or model/data mismatch is a one-line error and exit code 2, with
nothing written to ``--out``; a run stopped as diverged (README: "Divergence") exits with 3.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import signal
import sys
import time
from typing import List, Optional

from .errors import DIVERGED_EXIT, Diverged, OneLineParser, RankFailed, StepNotRedone, first_line

EXAMPLES = """\
examples:
  prefopt train                                   # the embedded default (tiny VLM, synthetic data, CW-DPO)
  prefopt train --method dpo --loss-type ipo --model /models/llava-1.5-7b-hf --data prefs.jsonl --out runs/ipo \\
      --lora --reference adapters
  torchrun --nproc_per_node 8 -m prefopt.train.cli --method cw-dpo --model /models/Qwen2-VL-7B-Instruct \\
      --data prefs.jsonl --out runs/cw --deepspeed zero3 --gradient-checkpointing
  prefopt train --out runs/cw --resume             # continue a run from its latest checkpoint
  prefopt train --method sft --out runs/sft && prefopt train --method dpo --init-from runs/sft --out runs/dpo
  prefopt train --method grpo --num-generations 8 --grpo-loss-type dr_grpo --init-from runs/sft --out runs/grpo

Data: JSONL records {"images": [paths], "prompt": ..., "chosen": ..., "rejected": ..., "corrections": [...]}
(images relative to the file's folder), a folder with train.jsonl (and heldout.jsonl for the probes), or
"synthetic". Metrics (TRL names, peak memory, tokens/s) go to OUT/metrics.jsonl, one line per step; the
trained model to OUT/model/, a Hugging Face folder (prefopt export CHECKPOINT OUT writes one from any checkpoint)."""


def build_parser() -> argparse.ArgumentParser:
    from .config import TrainConfig
    from .methods import GRPO_LOSS_TYPES, METHODS, MethodOptions
    from .models import TINY_MODELS
    from .optimizers import OPTIMIZERS
    from .reference import MODES

    d, m = TrainConfig(), MethodOptions()
    p = OneLineParser(
        prog="prefopt train",
        description="Preference-train a Hugging Face causal LM or VLM with prefopt's fused losses (logits are "
                    "never materialised): SFT, SFT-C, DPO (every loss type), CW-DPO, nSFT, SimPO, ORPO, GRPO; one "
                    "process, DDP, or DeepSpeed ZeRO-2/3.",
        epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("what to train")
    g.add_argument("--method", default=d.method, choices=METHODS,
                   help="training method (default %(default)s): sft = NLL of the chosen answers; sft-c = NLL(y+) + "
                        "lam*relu(C - NLL(y-)); dpo = DPO with --loss-type; cw-dpo = SFT-C for --sftc-fraction of the "
                        "steps, then cooling-weighted DPO with on-policy negatives; nsft = NLL of chosen and "
                        "corrections + per-token KL to the reference; simpo, orpo = reference-free; grpo = group-relative "
                        "policy optimisation on answers sampled per prompt with an exact-answer reward")
    g.add_argument("--model", default=None, metavar="PATH|ORG/NAME|" + "|".join(TINY_MODELS),
                   help="a Hugging Face image-text or causal LM (any that AutoModelForImageTextToText or "
                        "AutoModelForCausalLM loads): a local folder, else a hub id from the Hugging Face cache "
                        "(downloaded when online; HF_HUB_OFFLINE=1: the cache only); an embedded tiny model with random "
                        "weights, or tiny-llava-sft: tiny-llava with the shipped weights of its SFT on the synthetic "
                        f"set, which reads its images (default {d.model})")
    g.add_argument("--init-from", default=None, metavar="FOLDER|RUN|ORG/NAME",
                   help="start from a model folder (e.g. an earlier run's RUN/model) or hub id, a run folder (its "
                        "newest intact checkpoint) or a checkpoint folder, with the defaults of the model family it "
                        "came from (instead of --model)")
    g.add_argument("--revision", default=None, help="the branch, tag or commit of a hub id given to --model or "
                   "--init-from (default main)")
    g.add_argument("--trust-remote-code", action="store_true", help="allow a model folder's own Python code to run "
                   "(needed by models transformers does not ship); without it such a model is refused")
    g.add_argument("--data", default=d.data, metavar="PATH|ID|synthetic",
                   help="preference data: a JSONL file or a folder with train.jsonl; a .parquet or .arrow file or a "
                        "folder of them; a datasets save_to_disk folder; a hub dataset id; or 'synthetic' (the "
                        "built-in visual set; default %(default)s). Records: prefopt's fields or TRL's preference "
                        "format (strings or messages, images column)")
    g.add_argument("--data-split", default=d.data_split, help="the split of a folder, save_to_disk DatasetDict or "
                   "hub dataset to train on (default %(default)s)")
    g.add_argument("--data-revision", default=None, help="the branch, tag or commit of a hub dataset id given to "
                   "--data (default main)")
    g.add_argument("--data-columns", default=None, metavar="FIELD=COLUMN,...",
                   help="the columns holding the record fields, e.g. prompt=question,images=image,chosen=chosen,"
                        "rejected=rejected (fields: prompt, chosen, rejected, images, corrections; default: the "
                        "fields' own names, images or image)")
    g.add_argument("--out", default=None, metavar="DIR",
                   help="run folder for metrics.jsonl, checkpoints and precomputed reference log-probs; must be new "
                        "or empty unless --resume (default runs/train-<date>-<time>)")
    g.add_argument("--reference", default=d.reference, choices=MODES + ("auto",),
                   help="reference policy: model = a separate frozen copy; adapters = the policy with its LoRA "
                        "adapters off (needs --lora, one model in memory); precompute = a pass before training writes "
                        "per-sequence reference log-probs to OUT/reference_logps.safetensors (not for nsft or "
                        "on-policy negatives); auto = adapters with --lora, else model (default %(default)s)")

    g = p.add_argument_group("model")
    g.add_argument("--lora", action="store_true", help="train LoRA adapters on the language model's linear layers "
                   "(head and everything else frozen)")
    g.add_argument("--qlora", action="store_true", help="QLoRA: the language model's linear layers in 4-bit NF4 "
                   "(bitsandbytes, double-quantised: 0.52 bytes per weight) under LoRA adapters (implies --lora); the "
                   "head, embeddings, norms and vision tower stay in --dtype; the reference is the policy with its "
                   "adapters off (or precompute); the exported model merges the adapters into the source weights "
                   "reloaded in --dtype; not with --deepspeed (default off)")
    g.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (default %(default)s)")
    g.add_argument("--lora-alpha", type=int, default=d.lora_alpha, help="LoRA alpha (default %(default)s)")
    g.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="parameter dtype (default bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", default=d.device, help="auto (this rank's GPU if any, else CPU), cpu, cuda or "
                   "cuda:N (default %(default)s)")
    g.add_argument("--gradient-checkpointing", action="store_true", help="recompute decoder-layer activations in "
                   "backward to save memory")
    g.add_argument("--offload-activations", action="store_true", help="keep the activations the backward needs "
                   "in host memory (torch's save_on_cpu; pinned on CUDA): under checkpointing, each decoder layer's "
                   "input, (batch x length x hidden) per layer; implies --gradient-checkpointing; not with "
                   "--deepspeed (default off)")
    g.add_argument("--share-prefix", choices=("auto", "on", "off"), default=d.share_prefix,
                   help="run each record's images and prompt once for all its answers (one packed row with a "
                   "block mask; see prefopt.train.prefixes): auto where the method and model family are tested "
                   "with it, on (refuse where it cannot apply), off (default %(default)s)")
    g.add_argument("--op-backend", choices=("auto", "torch", "triton"), default=d.op_backend,
                   help="backend of the fused op (default %(default)s: Triton on CUDA when installed, else torch)")

    g = p.add_argument_group("data")
    g.add_argument("--train-size", type=int, default=None, help="use only the first N training records (synthetic: "
                   "generate N; default all)")
    g.add_argument("--max-length", type=int, default=d.max_length, help="longest row in tokens, image tokens "
                   "included; longer answers are cut (default %(default)s)")
    g.add_argument("--strict-data", action="store_true", help="a bad record fails the run (default: it is skipped, "
                   "reported as one line FILE:LINE: reason and counted in the summary). Checked before training: UTF-8, "
                   "JSON, duplicate keys, fields, chosen != rejected, a rejected answer for pairwise methods, images "
                   "(decode, regular file inside the data folder, pixel limit), literal image tokens, prompt within "
                   "--max-length")
    g.add_argument("--allow-outside-images", action="store_true", help="accept image paths (or symbolic links) "
                   "that lead outside the data file's folder")
    g.add_argument("--max-image-pixels", type=int, default=d.max_image_pixels, help="largest image (width x height) "
                   "accepted; larger ones are skipped as decompression bombs (default %(default)s)")
    g.add_argument("--max-record-bytes", type=int, default=d.max_record_bytes, help="largest record (a JSONL line, "
                   "or a row's text and embedded images) in bytes; a larger one is skipped (a JSONL line without being "
                   "read whole), as is one nested deeper than 32 levels (default %(default)s)")
    g.add_argument("--probe-data", default=None, metavar="PATH|synthetic",
                   help="records for the Delta-log-p probes (default: the held-out split of 'synthetic' or of a "
                        "folder with heldout.jsonl, else the first training records)")
    g.add_argument("--probe-size", type=int, default=d.probe_size, help="number of probe records "
                   "(default %(default)s)")
    g.add_argument("--eval-size", type=int, default=None, help="held-out records of the final evaluation (the "
                   "held-out split of 'synthetic' or of a folder with heldout.jsonl; default all, 0 for none)")

    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=d.steps, help="optimizer steps (default: from --epochs)")
    g.add_argument("--epochs", type=float, default=d.epochs, help="passes over the data when --steps is 0 "
                   "(default %(default)s)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="records (pairs) per micro-batch per "
                   "process (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="micro-batches per optimizer step; the loss "
                   "is normalised by the item count of the whole accumulated batch (default %(default)s)")
    g.add_argument("--gpu-memory", default=None, metavar="SIZE",
                   help="the device's memory, e.g. 24GB: prefopt plan picks the micro-batch and accumulation (the global "
                        "batch --batch-size x --grad-accum kept) and gradient checkpointing that fit, prints them and saves "
                        "them with the run (a resume reuses them)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default 1e-3 for the tiny "
                   "models with random weights, 1e-4 for tiny-llava-sft and with --lora, 5e-6 otherwise)")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay "
                   "(default %(default)s)")
    g.add_argument("--optim", choices=OPTIMIZERS, default=d.optim,
                   help="adamw = torch's AdamW (fp32 moments with fp32 weights: 8 bytes per trained parameter); "
                        "adamw8bit = bitsandbytes' 8-bit AdamW (about 2 bytes per parameter of tensors of 4096 "
                        "elements or more); paged_adamw8bit = the same in CUDA unified memory, paged to host memory "
                        "under pressure (unpaged on the CPU); the 8-bit ones not with --deepspeed "
                        "(default %(default)s)")
    g.add_argument("--warmup-ratio", type=float, default=d.warmup_ratio, help="share of the steps of linear warmup "
                   "before the cosine decay (default %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm, help="gradient clipping norm, 0 for none "
                   "(default %(default)s)")
    g.add_argument("--max-nonfinite-steps", type=int, default=d.max_nonfinite_steps, metavar="N",
                   help="stop the run (exit code 3) after N steps in a row whose loss or gradient norm is not finite "
                        "(each is not applied), or once the probe positives collapse (see README) (default %(default)s)")
    g.add_argument("--seed", type=int, default=d.seed, help="seed of weights (tiny models), data order, sampling "
                   "(default %(default)s)")

    g = p.add_argument_group("method options")
    g.add_argument("--beta", type=float, default=None, help="beta of dpo/cw-dpo (default 0.1), simpo (2.0), orpo "
                   "(0.1)")
    g.add_argument("--loss-type", default=m.loss_type,
                   choices=("sigmoid", "cdpo", "robust", "hinge", "ipo", "rpo"), help="DPO variant "
                   "(default %(default)s)")
    g.add_argument("--label-smoothing", type=float, default=m.label_smoothing, help="cdpo/robust label noise; "
                   "label smoothing of the positives for sft and sft-c (default %(default)s)")
    g.add_argument("--rpo-alpha", type=float, default=m.rpo_alpha, help="weight of the chosen NLL for loss-type rpo "
                   "(default %(default)s)")
    g.add_argument("--simpo-gamma", type=float, default=m.simpo_gamma, help="SimPO target margin "
                   "(default %(default)s)")
    g.add_argument("--cw-floor", type=float, default=None, help="CW-DPO: per-token log-prob of a negative below "
                   "which its push-down cools off (default -3.0; -6.0 for the tiny models with random weights, whose "
                   "log-probs start near -6.5)")
    g.add_argument("--cw-tau", type=float, default=m.cw_tau, help="CW-DPO: temperature of the cooling weight "
                   "(default %(default)s)")
    g.add_argument("--sftc-lam", type=float, default=m.sftc_lam, help="SFT-C: weight of the negative hinge "
                   "(default %(default)s)")
    g.add_argument("--sftc-margin", type=float, default=m.sftc_margin, help="SFT-C: NLL per token a negative is "
                   "pushed up to, C (default %(default)s)")
    g.add_argument("--sftc-fraction", type=float, default=m.sftc_fraction, help="CW-DPO: share of the steps spent "
                   "in stage 1 (SFT-C) (default %(default)s)")
    g.add_argument("--onpolicy-fraction", type=float, default=m.onpolicy_fraction,
                   help="CW-DPO stage 2: share of each batch's negatives replaced by answers sampled from the current "
                        "policy (default %(default)s)")
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="length limit of sampled negatives "
                   "(default %(default)s)")
    g.add_argument("--kl-coef", type=float, default=m.kl_coef, help="nSFT: weight of the per-token KL to the "
                   "reference; 0 builds no reference (one model in memory) (default %(default)s)")
    g.add_argument("--num-generations", type=int, default=m.num_generations, help="GRPO: answers sampled per prompt "
                   "(at most --max-new-tokens tokens each), rewarded 1 when exactly the record's chosen answer "
                   "(default %(default)s)")
    g.add_argument("--grpo-loss-type", default=m.grpo_loss_type, choices=GRPO_LOSS_TYPES,
                   help="GRPO: TRL's loss type, i.e. how the per-token losses are averaged (default %(default)s, as TRL)")
    g.add_argument("--grpo-beta", type=float, default=m.grpo_beta, help="GRPO: weight of the per-token k3 KL to the "
                   "reference; 0 builds no reference (default %(default)s, as TRL)")

    g = p.add_argument_group("probes, checkpoints, launch")
    g.add_argument("--probe-every", type=int, default=d.probe_every, help="score the probe set every K steps, 0 for "
                   "never (default %(default)s)")
    g.add_argument("--early-stop-chosen-drop", type=float, default=None, metavar="NATS",
                   help="stop once the probe positives' mean per-token log-prob has fallen this far below its start "
                        "(default: never)")
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (default 0: by "
                   "--save-minutes and at the end)")
    g.add_argument("--save-minutes", type=float, default=d.save_minutes, help="checkpoint at the first step boundary "
                   "this many minutes after the last checkpoint, so a failure loses at most that much training; 0 for "
                   "never by time (default %(default)s). SIGINT/SIGTERM checkpoint at the next step boundary and stop "
                   "(a second signal stops at once)")
    g.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, help="checkpoints kept, 0 for all "
                   "(default %(default)s)")
    g.add_argument("--keep-adapter", action="store_true", help="with --lora: OUT/model/ keeps the adapters as a peft "
                   "adapter beside the base weights (default: merged into the weights)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint "
                   "(same options)")
    g.add_argument("--stop-after", type=int, default=None, metavar="STEPS",
                   help="stop after this many steps of the schedule, with a checkpoint (continue with --resume)")
    g.add_argument("--deepspeed", default=None, metavar="zero2|zero3|CONFIG.json",
                   help="train under DeepSpeed (launch with deepspeed or torchrun); a JSON config may use 'auto' for "
                        "batch sizes, clipping and precision")
    g.add_argument("--dist-timeout", type=float, default=d.dist_timeout, metavar="SECONDS",
                   help="DDP/DeepSpeed: a collective that waits this long for another rank (hung or dead) fails with a "
                        "one-line error on every waiting rank (default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument("--json", action="store_true", help="print the summary as JSON")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def config_from_args(args) -> "TrainConfig":
    from .config import TrainConfig
    from .methods import MethodOptions

    options = MethodOptions(
        beta=args.beta, loss_type=args.loss_type, label_smoothing=args.label_smoothing, rpo_alpha=args.rpo_alpha,
        simpo_gamma=args.simpo_gamma, cw_floor=args.cw_floor, cw_tau=args.cw_tau, sftc_lam=args.sftc_lam,
        sftc_margin=args.sftc_margin, sftc_fraction=args.sftc_fraction, onpolicy_fraction=args.onpolicy_fraction,
        kl_coef=args.kl_coef, num_generations=args.num_generations, grpo_loss_type=args.grpo_loss_type,
        grpo_beta=args.grpo_beta,
    )
    out = args.out or time.strftime("runs/train-%Y%m%d-%H%M%S")
    return TrainConfig(
        method=args.method, model=args.model or args.init_from or TrainConfig.model, init_from=args.init_from,
        revision=args.revision, trust_remote_code=args.trust_remote_code,
        keep_adapter=args.keep_adapter, data=args.data, data_split=args.data_split,
        data_revision=args.data_revision, data_columns=args.data_columns,
        out=out, reference=args.reference, lora=args.lora or args.qlora, qlora=args.qlora,
        lora_r=args.lora_r, lora_alpha=args.lora_alpha, dtype=args.dtype, device=args.device,
        gradient_checkpointing=args.gradient_checkpointing or args.offload_activations,
        offload_activations=args.offload_activations, share_prefix=args.share_prefix,
        op_backend=args.op_backend, train_size=args.train_size,
        max_length=args.max_length, strict_data=args.strict_data, allow_outside_images=args.allow_outside_images,
        max_image_pixels=args.max_image_pixels, max_record_bytes=args.max_record_bytes, probe_data=args.probe_data,
        probe_size=args.probe_size,
        eval_size=args.eval_size, steps=args.steps, epochs=args.epochs, batch_size=args.batch_size,
        grad_accum=args.grad_accum, gpu_memory=args.gpu_memory, lr=args.lr, weight_decay=args.weight_decay,
        optim=args.optim, warmup_ratio=args.warmup_ratio,
        max_grad_norm=args.max_grad_norm, max_nonfinite_steps=args.max_nonfinite_steps,
        seed=args.seed, options=options, max_new_tokens=args.max_new_tokens,
        probe_every=args.probe_every, early_stop_chosen_drop=args.early_stop_chosen_drop, save_every=args.save_every,
        save_minutes=args.save_minutes,
        keep_checkpoints=args.keep_checkpoints, resume=args.resume, stop_after=args.stop_after,
        deepspeed=args.deepspeed, dist_timeout=args.dist_timeout, progress=not args.no_progress,
    )


REFERENCE_WORDS = {"none": "none, one model", "model": "a frozen copy, two models", "adapters": "adapters off, one model",
                   "precompute": "precomputed log-probs, one model"}


def format_summary(s: dict) -> str:
    def num(v, fmt):
        return "n/a" if v is None else format(v, fmt)

    lines = [
        f"prefopt train: {s['method']} on {s['model']}, {s['steps']}/{s['total_steps']} steps"
        + (" (stopped early by the probe rule)" if s["stopped_early"] else "")
        + f" in {s['wall_seconds']:.0f} s ({s['backend']}, {s['world_size']} process"
        + ("es" if s["world_size"] > 1 else "") + ")",
    ]
    if s.get("eval_n"):
        lines += [
            f"  held-out ({s['eval_n']} pairs)  pair accuracy {num(s['eval_pair_accuracy'], '.3f')}   "
            f"generation accuracy {num(s['eval_generation_accuracy'], '.3f')}   "
            f"hallucination {num(s['eval_hallucination_rate'], '.3f')}",
            f"  calibration        ece pair {num(s['eval_ece_pair'], '.3f')}   ece token {num(s['eval_ece_token'], '.3f')}"
            f"   log p(chosen) - log p(rejected) {num(s['eval_logp_gap'], '+.3f')} nats",
            f"  shift from start   TV {num(s['eval_tv_shift'], '.4f')}   KL {num(s['eval_kl_shift'], '.4f')}   "
            f"entropy {num(s['eval_entropy'], '.3f')}",
        ]
        per_type = s.get("eval_per_type") or {}
        lines += [f"    {t:<9} n={row['n']:<4} pair {num(row['pair_accuracy'], '.2f')}   generation "
                  f"{num(row['generation_accuracy'], '.2f')}   hallucination {num(row['hallucination_rate'], '.2f')}"
                  for t, row in per_type.items()]
    else:
        lines.append("  held-out           n/a (no held-out data: --data synthetic or a folder with heldout.jsonl)")
    lines += [
        f"  loss               {num(s['loss'], '.4f')}   (mean of the last steps)",
    ]
    if s.get("reward") is not None:
        lines.append(f"  GRPO reward        {s['reward']:.3f}   (share of sampled answers that are exactly right)")
    else:
        lines.append(f"  reward accuracy    {num(s['reward_accuracy'], '.3f')}   reward margin {num(s['reward_margin'], '.4f')}")
    if "probe/delta_logp_chosen" in s:
        lines.append(f"  probes (Δ log p/token since start)  positives {s['probe/delta_logp_chosen']:+.4f}   "
                     f"negatives {s['probe/delta_logp_rejected']:+.4f}")
    lines += [
        f"  peak memory        {s['peak_memory_mb']:.0f} MiB ("
        + ("torch's peak GPU allocation" if s["device"].startswith("cuda") else "peak resident set, libraries left out, above the pre-model baseline")
        + f"; reference: {REFERENCE_WORDS[s['reference']]})   throughput {num(s['tokens_per_second'], '.0f')} tokens/s",
        f"  checkpoint         {s['checkpoint']}",
        f"  model folder       {s['model_folder']}   (Hugging Face from_pretrained)",
        *([f"  skipped records    {s['skipped_records']} (listed on stderr)"] if s.get("skipped_records") else []),
        f"  metrics            {s['metrics']}",
    ]
    return "\n".join(lines)


#: Modules of the ``train`` extra that every run imports (deepspeed only with --deepspeed).
TRAIN_EXTRA_MODULES = ("transformers", "tokenizers", "safetensors", "peft", "PIL")


def missing_train_extra() -> Optional[str]:
    """The first module of the train extra that is not installed, or None (found, not imported: importing
    peft pulls in much of transformers)."""
    for module in TRAIN_EXTRA_MODULES:
        try:
            if importlib.util.find_spec(module) is None:
                return module
        except ImportError:
            return module
    return None


def resume_command(argv: List[str], out: str) -> str:
    """The command line that continues this run: its arguments (with its --out) and --resume."""
    args, skip = [], False
    for a in argv:
        if skip or a.startswith("--stop-after"):
            skip = a == "--stop-after"
            continue
        args.append(a)
    if "--out" not in args and not any(a.startswith("--out=") for a in args):
        args += ["--out", out]
    if "--resume" not in args:
        args.append("--resume")
    return "prefopt train " + shlex.join(args)


def main(argv: Optional[List[str]] = None) -> int:
    """Run ``prefopt train`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    missing = missing_train_extra()
    if missing is not None:
        print(f"prefopt train: error: the trainer needs the train extra (no module {missing!r}): "
              "pip install 'prefopt[train]'", file=sys.stderr)
        return 2
    from .threads import keep_num_threads

    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    except SystemExit as e:  # --help (0) or a usage error (2, one line already on stderr)
        return int(e.code or 0)
    with keep_num_threads():
        return _train(args, sys.argv[1:] if argv is None else list(argv))


def _train(args, argv: List[str]) -> int:
    import torch

    from .checkpoint import CheckpointError, os_error_line
    from .distributed import exit_without_teardown
    from .interrupts import Interrupted
    from .loop import prepare
    from .runfolder import RunFolderError
    from .threads import one_thread_for_tiny_models

    if args.model is not None and args.init_from is not None:
        print("prefopt train: error: give --model or --init-from, not both", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    one_thread_for_tiny_models(cfg.model, cfg.device)
    try:
        run = prepare(cfg)
    except KeyboardInterrupt:
        print("prefopt train: interrupted before training started; nothing was written", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, NotADirectoryError) as e:
        message = first_line(e)
        print(f"prefopt train: error: {message}", file=sys.stderr)
        return 2
    except RuntimeError as e:  # in more than one process: a rendezvous or collective another rank missed
        if int(os.environ.get("WORLD_SIZE", "1")) < 2:
            raise
        print(f"prefopt train: error: rank {os.environ.get('RANK', '0')}: setting up the run failed ({first_line(e)}); "
              f"a rank that hung past --dist-timeout {cfg.dist_timeout:g} s or died says why in its own output",
              file=sys.stderr, flush=True)
        return 1
    try:
        summary = run.execute()
    except KeyboardInterrupt:  # outside the steps (where SIGINT only asks for a checkpoint and a stop)
        print("prefopt train: interrupted outside the training steps; the run folder keeps its last checkpoint",
              file=sys.stderr)
        return 130
    except RunFolderError as e:  # another process holds --out, or wrote to it since it was checked
        print(f"prefopt train: error: {first_line(e)}", file=sys.stderr, flush=True)
        return 2
    except Diverged as e:
        if run.state.is_main:
            print(f"prefopt train: stopped: {e}", file=sys.stderr, flush=True)
        return DIVERGED_EXIT
    except Interrupted as e:
        if run.state.is_main:
            print(f"prefopt train: stopped by {signal.Signals(e.signum).name} at step {e.step}/{e.total}; checkpoint "
                  f"{e.checkpoint}; resume with: {resume_command(argv, cfg.out)}", file=sys.stderr, flush=True)
        return 128 + e.signum
    except (CheckpointError, OSError, ValueError, RankFailed, StepNotRedone, MemoryError, torch.OutOfMemoryError) as e:
        message = os_error_line(e, cfg.out) if isinstance(e, OSError) else first_line(e)
        if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
            message = f"out of memory ({message})"
        rank = f"rank {run.state.rank}: " if run.state.distributed else ""
        print(f"prefopt train: error: {rank}{message}", file=sys.stderr, flush=True)
        return 1
    except RuntimeError as e:  # a collective that failed: another rank hung (--dist-timeout) or died
        if not run.state.distributed or run.failure_agreed or run.own_failure:
            raise  # this rank's own error
        first = first_line(e)
        print(f"prefopt train: error: rank {run.state.rank}: a collective failed, another rank hung past "
              f"--dist-timeout {cfg.dist_timeout:g} s or died ({first})", file=sys.stderr, flush=True)
        exit_without_teardown(1)
    if run.state.is_main:
        print(json.dumps(summary, indent=1) if args.json else format_summary(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
