"""A run's options as data (:class:`TrainConfig`, the CLI's flags one to one; the CLI parses them, every
other module takes this), their ranges (:data:`RANGES`), the defaults that depend on the model family
(learning rate, CW-DPO's floor for the tiny models) and the identity a resumed run must match."""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, Optional

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from .methods import MethodOptions

TINY_LR = 1e-3  # the embedded tiny models learn visibly in a few dozen steps at this rate
# tiny-llava-sft is a trained model: at 1e-3, 64 steps of CW-DPO undid its grounding (held-out greedy colour
# accuracy 1.0 -> 0.15); it takes a fine-tuning rate, and CW-DPO's floor for trained models.
TINY_BASE_LR = 1e-4
# CW-DPO's floor for the tiny models: their per-token log-probs start near -log(640) = -6.5 and stay
# below the -3 nats of the default (meant for real models) for the whole default run, which would cool
# every negative off.
TINY_CW_FLOOR = -6.0


@dataclass
class TrainConfig:
    """Every option of a run (the CLI's flags, one to one)."""

    method: str = "cw-dpo"
    model: str = "tiny-llava-sft"
    init_from: Optional[str] = None  # a model folder, run folder or checkpoint to start from (replaces model)
    revision: Optional[str] = None  # of a hub id in model / init_from (resolved to its cached folder by prepare)
    trust_remote_code: bool = False  # let a model folder's own Python code run
    data: str = "synthetic"  # prefopt.train.sources: JSONL, parquet, arrow, save_to_disk, hub id or synthetic
    data_split: str = "train"
    data_columns: Optional[str] = None  # "prompt=question,images=image,...": the columns of the record fields
    data_revision: Optional[str] = None  # the branch, tag or commit of a hub dataset id in data
    out: str = "runs/train"
    reference: str = "auto"  # model | adapters | precompute | auto (adapters with --lora, else model)
    # model
    lora: bool = False
    lora_r: int = 8
    lora_alpha: int = 16
    # the language model's linear layers in 4-bit NF4 under the adapters (prefopt.train.quantize); implies lora
    qlora: bool = False
    dtype: Optional[str] = None  # None: bf16 on GPU, fp32 on CPU
    device: str = "auto"
    gradient_checkpointing: bool = False
    # the checkpointed layers' inputs (and whatever else the forward saves outside them) kept in host memory
    # (torch.autograd.graph.save_on_cpu, prefopt.train.step); implies gradient_checkpointing
    offload_activations: bool = False
    share_prefix: str = "auto"  # auto | on | off: one prefix per record (prefopt.train.prefixes)
    op_backend: str = "auto"  # the fused op's backend
    # data
    train_size: Optional[int] = None
    max_length: int = 512
    strict_data: bool = False
    allow_outside_images: bool = False
    max_image_pixels: int = 50_000_000  # prefopt.train.data.MAX_IMAGE_PIXELS
    max_record_bytes: int = 64 << 20  # prefopt.train.data.MAX_RECORD_BYTES
    probe_data: Optional[str] = None
    probe_size: int = 16
    eval_size: Optional[int] = None  # held-out records of the final evaluation; None: all, 0: none
    # optimisation
    steps: int = 0  # 0: from epochs
    epochs: float = 1.0
    batch_size: int = 4  # records per micro-batch per process (a record is one pair)
    grad_accum: int = 1
    gpu_memory: Optional[str] = None  # "24GB": micro-batch, accumulation and checkpointing from prefopt plan
    lr: Optional[float] = None  # None: 1e-3 for the tiny models, 1e-4 with LoRA, 5e-6 otherwise
    weight_decay: float = 0.0
    optim: str = "adamw"  # adamw (torch) | adamw8bit | paged_adamw8bit (bitsandbytes; prefopt.train.optimizers)
    warmup_ratio: float = 0.1
    max_grad_norm: float = 1.0  # 0: no clipping
    max_nonfinite_steps: int = 3  # skipped non-finite steps in a row that stop the run as diverged
    seed: int = 0
    # method
    options: MethodOptions = field(default_factory=MethodOptions)
    max_new_tokens: int = 24
    # probes, checkpoints, launch
    probe_every: int = 10
    early_stop_chosen_drop: Optional[float] = None
    save_every: int = 0  # 0: by time only (save_minutes) and at the end
    save_minutes: float = 30.0  # a checkpoint once this long has passed since the last; 0: never by time
    keep_checkpoints: int = 2
    resume: bool = False
    stop_after: Optional[int] = None  # stop (with a checkpoint) after this many steps of the schedule
    deepspeed: Optional[str] = None
    keep_adapter: bool = False  # OUT/model/ keeps LoRA as a peft adapter instead of merging it
    dist_timeout: float = dist.DEFAULT_TIMEOUT_S  # seconds a collective waits for a hung or dead rank
    progress: bool = True

    def family(self) -> str:
        """The model family the defaults are keyed on (:func:`~prefopt.train.export.model_family`): "tiny"
        (the embedded models with random weights), "tiny-sft" (the shipped tiny-llava-sft) or "hf"; a model
        trained from one of them keeps its family (recorded in an export's prefopt.json)."""
        from .export import model_family

        return model_family(self.model, self.init_from)

    def learning_rate(self) -> float:
        if self.lr is not None:
            return self.lr
        if self.family() == "tiny-sft":
            return TINY_BASE_LR
        if self.family() == "tiny":
            return TINY_LR
        return 1e-4 if self.lora else 5e-6

    def method_options(self) -> MethodOptions:
        """The method options with the run-dependent defaults filled in (CW-DPO's floor for the tiny
        models; GRPO's completion length is the sampling limit)."""
        options = dataclasses.replace(self.options, max_completion_length=self.max_new_tokens)
        if options.cw_floor is None and self.family() == "tiny":
            options = dataclasses.replace(options, cw_floor=TINY_CW_FLOOR)
        return options

    def reference_mode(self, method) -> str:
        if method.reference == "none":
            return "none"
        if self.reference == "auto":
            return "adapters" if self.lora else "model"
        return self.reference


#: Options that change a run's numbers: a resumed run must share them with the run it continues (``steps``
#: and ``epochs`` may grow: the run is extended, with a note).
RESUME_KEYS = ("method", "model", "init_from", "reference", "qlora", "lora", "lora_r", "lora_alpha", "train_size",
               "max_length", "batch_size", "grad_accum", "lr", "weight_decay", "optim", "warmup_ratio", "max_grad_norm",
               "seed", "options", "max_new_tokens", "deepspeed", "offload_activations")


#: The identity's record of what ``--gpu-memory`` chose (micro-batch, accumulation, checkpointing).
GPU_MEMORY_CHOICE = "gpu_memory_choice"


def run_identity(cfg: TrainConfig, world_size: int, dtype: torch.dtype, data_fingerprint: str) -> Dict[str, Any]:
    """What a resumed run must match (saved in every checkpoint): the options that change the numbers,
    with their defaults resolved, the world size, the parameter dtype and the data's fingerprint."""
    options = asdict(cfg)
    identity = {k: options[k] for k in RESUME_KEYS}
    identity.update(lr=cfg.learning_rate(), options=asdict(cfg.method_options()), world_size=world_size,
                    dtype=str(dtype).replace("torch.", ""), data_fingerprint=data_fingerprint,
                    init_source=init_source(cfg.init_from))
    return identity


def init_source(init_from: Optional[str]) -> Optional[str]:
    """What ``--init-from`` resolves to now: a model folder, or a checkpoint with its manifest's hash (a run
    folder resolves to its newest checkpoint, which may change while the path stays the same)."""
    if init_from is None:
        return None
    from .export import resolve_init_from

    kind, path = resolve_init_from(init_from)
    if kind == "checkpoint":
        return f"checkpoint {os.path.realpath(path)} ({ckpt.sha256_file(os.path.join(path, ckpt.MANIFEST_FILE))[:16]})"
    return f"folder {os.path.realpath(path)}"


def check_resume_identity(saved: Dict[str, Any], now: Dict[str, Any], out: str) -> None:
    """``ValueError`` naming the first difference between the saved run's identity and this run's. An option
    the saved identity lacks (a run from before the option existed) counts as its default."""
    defaults = asdict(TrainConfig())
    names = {"world_size": "the world size", "dtype": "the parameter dtype (--dtype)",
             "data_fingerprint": "the data content (or --data-split, --data-columns)",
             "init_source": "the model --init-from resolves to",
             GPU_MEMORY_CHOICE: "what --gpu-memory chose (micro-batch, accumulation, checkpointing)"}
    flat_saved = {**saved, **(saved.get("options") or {})}
    for key, value in {**now, **now["options"]}.items():
        saved_value = flat_saved.get(key, defaults.get(key))
        if key != "options" and saved_value != value:
            what = names.get(key, f"--{key.replace('_', '-')}")
            raise ValueError(f"--resume: {what} is {value!r} but the run in {out} used {saved_value!r}")


#: Every numeric option's range (``>=0``, ``>0``, ``[0,1)``...; ``finite``: any finite number). A None (a default
#: resolved later) passes; NaN and infinity never do. ``max_grad_norm`` 0 turns clipping off.
RANGES = {
    "lr": ">0", "epochs": ">0", "max_grad_norm": ">=0", "weight_decay": ">=0", "warmup_ratio": "[0,1)",
    "steps": ">=0", "train_size": ">=1", "eval_size": ">=0", "batch_size": ">=1", "grad_accum": ">=1",
    "probe_size": ">=1", "max_length": ">=1", "max_image_pixels": ">=1", "max_new_tokens": ">=1", "lora_r": ">=1",
    "lora_alpha": ">0", "probe_every": ">=0", "save_every": ">=0", "save_minutes": ">=0", "keep_checkpoints": ">=0",
    "stop_after": ">=1", "early_stop_chosen_drop": "finite", "dist_timeout": ">0", "max_nonfinite_steps": ">=1",
    "beta": ">0", "rpo_alpha": ">=0", "simpo_gamma": "finite", "cw_floor": "finite", "cw_tau": ">0",
    "sftc_lam": ">=0", "sftc_margin": "finite", "sftc_fraction": "[0,1]", "onpolicy_fraction": "[0,1]",
    "kl_coef": ">=0", "grpo_beta": ">=0", "grpo_epsilon": ">0", "label_smoothing": "[0,1)",
}


def in_range(value: float, rule: str) -> bool:
    """Whether the finite ``value`` satisfies ``rule`` (see :data:`RANGES`)."""
    if rule == "finite":
        return True
    if rule.startswith(">="):
        return value >= float(rule[2:])
    if rule.startswith(">"):
        return value > float(rule[1:])
    low, high = (float(x) for x in rule[1:-1].split(","))
    return low <= value and (value <= high if rule.endswith("]") else value < high)


def check_ranges(cfg: TrainConfig) -> None:
    """``ValueError`` naming the first numeric option outside its :data:`RANGES` rule."""
    values = {**asdict(cfg), **asdict(cfg.options)}
    for name, rule in RANGES.items():
        value = values[name]
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not in_range(value, rule):
            expected = "a finite number" if rule == "finite" else (
                f"a number in {rule}" if rule[0] == "[" else f"a finite number {rule}")
            raise ValueError(f"--{name.replace('_', '-')}: expected {expected}, got {value!r}")
