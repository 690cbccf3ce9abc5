"""The training loop, readable top to bottom.

    prepare(config)          everything that can fail on a user's mistake, before anything is written:
                             options, launcher, data, model, processor/data fit, resume point
    Run.execute()            the run folder, AdamW (--optim) + cosine schedule, the DDP/DeepSpeed wrap, resume,
                             then per step:
        reference            at the method's reference point (step 0; CW-DPO: the end of stage 1) the
                             reference becomes the current policy (frozen copy / adapters off /
                             precompute pass)
        train_step           :mod:`.step`: this rank's micro-batches (on-policy negatives and GRPO's rollouts
                             are sampled by :mod:`.rollouts`), the global item count, forward/backward with
                             every micro-batch's loss normalised by it, clip, AdamW, schedule, metrics (TRL
                             names); a record that fails is found, agreed on by the ranks and replaced
                             (:mod:`.faults`), and the step redone
        log, save            metrics.jsonl (:mod:`.summary`), probes, checkpoints (at the end, the cadence, an
                             early stop, SIGINT/SIGTERM: see interrupts.py)
    then                     export (``OUT/model/``), the held-out evaluation, the summary (:mod:`.summary`)

:class:`Run` is this module's state and loop; its step, fault, rollout and summary methods come from the mixins
of those modules (so each concern is read, and changed, in its own file). The options are a
:class:`~prefopt.train.config.TrainConfig`. This module is over 500 lines because half of it is
:func:`prepare`'s checks, which stay beside the run they build.

The loss is always a fused prefopt module on the backbone's final hidden states and the head weight
(:class:`~prefopt.train.methods.PolicyObjective`); the loop never computes logits. Data order is a
function of (seed, step), so a resumed run sees the same batches as an uninterrupted one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import asdict
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import runfolder
from . import reference as ref_mod
from .config import GPU_MEMORY_CHOICE, TrainConfig, check_ranges, check_resume_identity, run_identity
from .data import DataProblems
from .errors import Diverged
from .faults import FaultsMixin, read_skipped_records
from .interrupts import SKIPPED_FILE, Cadence, Interrupted, StopSignals, at_boundary
from .methods import METHODS, PolicyObjective, Stage, build_method
from .optimizers import build_optimizer, check_optim
from .probes import LogpProbe, ProbeResult, should_stop
from .rollouts import RolloutsMixin
from .step import StepMixin, start_memory_peak
from .summary import SummaryMixin

CONFIG_FILE = "config.json"
MODEL_DIR = "model"  # the Hugging Face folder every run ends with


class DataPlan:
    """Which records each rank trains on at each step: epoch ``e`` walks a permutation drawn from
    ``(seed, e)``; step ``s`` takes the next ``batch * accum * world`` positions, micro-batch ``a`` of
    rank ``r`` its slice ``[a*batch*world + r*batch, +batch)``. One process with ``batch * world``
    records per micro-batch sees the same global batches as ``world`` processes."""

    def __init__(self, n: int, batch: int, accum: int, world: int, seed: int):
        self.n, self.batch, self.accum, self.world, self.seed = n, batch, accum, world, seed
        self.global_batch = batch * accum * world
        self._perms: Dict[int, List[int]] = {}

    def _at(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perms = {epoch: torch.randperm(self.n, generator=g).tolist()}
        return self._perms[epoch][offset]

    def indices(self, step: int, micro: int, rank: int) -> List[int]:
        start = step * self.global_batch + micro * self.batch * self.world + rank * self.batch
        return [self._at(p) for p in range(start, start + self.batch)]

    def epoch(self, step: int) -> float:
        return step * self.global_batch / self.n

    def total_steps(self, steps: int, epochs: float) -> int:
        return steps if steps > 0 else max(1, math.ceil(epochs * self.n / self.global_batch))


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ================================================================================================ prepare


def prepare(cfg: TrainConfig) -> "Run":
    """Check everything a user can get wrong and load model and data; writes nothing. ``ValueError``
    (one line) for a bad option, path, model/data mismatch or resume point."""
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r} (expected one of {', '.join(METHODS)})")
    check_ranges(cfg)
    check_optim(cfg.optim, deepspeed=cfg.deepspeed is not None)
    if cfg.qlora:
        if cfg.deepspeed is not None:
            raise ValueError("--qlora: not with --deepspeed (4-bit weights under ZeRO are untested; train on one GPU)")
        cfg = dataclasses.replace(cfg, lora=True)  # the adapters QLoRA trains
    if cfg.offload_activations:
        if cfg.deepspeed is not None:
            raise ValueError("--offload-activations: not with --deepspeed (untested with ZeRO's partitioned weights)")
        cfg = dataclasses.replace(cfg, gradient_checkpointing=True)  # what is offloaded: the checkpoints' inputs
    if cfg.keep_adapter and not cfg.lora:
        raise ValueError("--keep-adapter needs --lora (without adapters there is nothing to keep apart)")
    if cfg.deepspeed is not None and cfg.deepspeed not in dist.ZERO_PRESETS and not os.path.isfile(cfg.deepspeed):
        raise ValueError(f"--deepspeed: expected zero2, zero3 or a JSON config file, got {cfg.deepspeed!r}")
    from .models import resolve_hub_ids

    cfg = resolve_hub_ids(cfg)
    resume_state, stale, run_id = _check_out_dir(cfg)

    state = dist.setup(cfg.deepspeed, cfg.device, cfg.dist_timeout)
    try:
        run = _prepare(cfg, state, resume_state)
        run.stale_files, run.run_id = stale, run_id
        return run
    except Exception:
        dist.teardown(state, wait=False)
        raise


def _check_out_dir(cfg: TrainConfig) -> Tuple[Optional[Dict[str, Any]], List[str], Optional[str]]:
    """(the checkpoint to resume from or None, the entries of a run that stopped before its first checkpoint:
    the run starts again without them, the folder's run id or None); ``ValueError`` for a folder that is not
    this run's to write (see :mod:`~prefopt.train.runfolder`)."""
    main_rank = os.environ.get("RANK", "0") == "0"
    if os.path.exists(cfg.out) and not os.path.isdir(cfg.out):
        raise ValueError(f"--out {cfg.out}: exists and is not a folder")
    if main_rank:  # another writer (a run or a study) is named before its files are judged
        runfolder.check_not_held(cfg.out)
    if not runfolder.contents(cfg.out):
        if cfg.resume:
            raise ValueError(f"--resume: no checkpoint in {cfg.out}")
        return None, [], None
    run_id = runfolder.read_marker(cfg.out)
    if not ckpt.checkpoints(cfg.out):
        if run_id is None:
            raise ValueError(f"--out {cfg.out}: holds files but no prefopt run ({runfolder.MARKER}) and no checkpoint; "
                             "remove them or choose another --out")
        if main_rank:  # a run that stopped before its first checkpoint: nothing to lose
            print(f"prefopt train: note: {cfg.out} holds no checkpoint yet (the run stopped before its first): "
                  "starting it again", file=sys.stderr, flush=True)
        return None, runfolder.run_entries(cfg.out), run_id
    if not cfg.resume:
        raise ValueError(f"--out {cfg.out}: already holds files; pass --resume to continue that run or choose "
                         "a new folder")
    try:
        path = ckpt.latest_checkpoint(cfg.out, warn=main_rank)
        if path is None:
            raise ValueError(f"--resume: no intact checkpoint in {cfg.out}")
        return {"path": path, **ckpt.read_trainer_state(path)}, [], run_id
    except ckpt.CheckpointError as e:
        raise ValueError(f"--resume: {e}") from None


def _prepare(cfg: TrainConfig, state: dist.DistState, resume_state) -> "Run":
    from .data import data_fingerprint, load_records
    from .models import build_model, import_model_code
    from .prefixes import make_collator

    if cfg.gpu_memory is not None:
        from .plan import fit_gpu_memory

        cfg = fit_gpu_memory(cfg, model_source(cfg), state, (resume_state or {}).get("identity"))
    seed_everything(cfg.seed + state.rank)
    problems = DataProblems(cfg.strict_data)  # every skipped record: one line FILE:LINE: reason
    load = dict(strict=cfg.strict_data, seed=cfg.seed, problems=problems,
                allow_outside_images=cfg.allow_outside_images, max_image_pixels=cfg.max_image_pixels,
                max_record_bytes=cfg.max_record_bytes, columns=cfg.data_columns)
    records = load_records(cfg.data, split=cfg.data_split, size=cfg.train_size, revision=cfg.data_revision, **load)
    if not records:
        raise ValueError(f"--data {cfg.data}: no training records")
    method_probe = build_method(cfg.method, cfg.method_options(), total_steps=1)  # validates the method's options
    if cfg.reference_mode(method_probe) != "none":
        ref_mod.check_mode(cfg.reference_mode(method_probe), method_probe, lora=cfg.lora, qlora=cfg.qlora)
    modes = sorted({collated_mode(s) for _, s in method_probe.stages})
    if "pair" in modes:
        for i, r in enumerate(records):
            if r.rejected is None:
                problems(r.where or f"record {i}", f"no rejected answer, which {cfg.method} needs")
        records = records.select([i for i, r in enumerate(records) if r.rejected is not None])
    if "nsft" in modes and not any(r.corrections for r in records):
        raise ValueError(f"--data {cfg.data}: no record has corrections, which nsft trains on")

    source = model_source(cfg)
    import_model_code(source, trust_remote_code=cfg.trust_remote_code)
    start_memory_peak()  # peak_memory_mb on CPU counts from here: the model, not the libraries
    policy, processor = build_model(source, dtype=cfg.dtype, lora=cfg.lora, lora_r=cfg.lora_r,
                                    lora_alpha=cfg.lora_alpha, qlora=cfg.qlora,
                                    gradient_checkpointing=cfg.gradient_checkpointing, device=state.device,
                                    seed=cfg.seed, trust_remote_code=cfg.trust_remote_code)
    collator = make_collator(processor, policy.config, cfg.share_prefix, method=cfg.method, max_length=cfg.max_length)
    try:  # a model whose processor cannot take this data at all is one error, not a report per record
        collator._check_images([next((r for r in records if r.images), records[0])])
    except ValueError as e:
        raise ValueError(f"--model {cfg.model} cannot take --data {cfg.data}: {e}") from None
    # Everything a batch can fail on, per record, before training (the built-in set is made to fit).
    records = records.select([i for i, r in enumerate(records) if not (r.where and _skip_record(collator, r, modes,
                                                                                                problems))])
    if not records:
        raise ValueError(f"--data {cfg.data}: no usable training records ({len(problems)} skipped)")
    probe_records, checked = _probe_records(cfg, records, load)
    probe_records = [r for r in probe_records if checked or not (r.where and _skip_record(collator, r, ["pair"],
                                                                                           problems))]
    if not probe_records:
        raise ValueError("probe set: no usable record (give --probe-data)")
    eval_records = [r for r in _eval_records(cfg, load) if not (r.where and _skip_record(collator, r, ["pair"], problems))]
    if len(problems) and state.is_main:
        print(f"prefopt train: note: {len(problems)} records skipped (listed above; --strict-data makes them errors)",
              file=sys.stderr, flush=True)
    plan = DataPlan(len(records), cfg.batch_size, cfg.grad_accum, state.world_size, cfg.seed)
    try:  # a model whose processor cannot take this data fails here, not mid-run
        for mode in modes:
            collator([records[i] for i in plan.indices(0, 0, state.rank)], mode=mode)
        collator(probe_records[:1], mode="pair")
    except ValueError as e:
        raise ValueError(f"--model {cfg.model} cannot take --data {cfg.data}: {e}") from None

    total = plan.total_steps(cfg.steps, cfg.epochs)
    head = policy.head()
    identity = run_identity(cfg, state.world_size, head.weight.dtype, data_fingerprint(cfg.data, records))
    if cfg.gpu_memory is not None:  # what --gpu-memory chose: a resume reuses it (fit_gpu_memory)
        identity[GPU_MEMORY_CHOICE] = {k: getattr(cfg, k) for k in ("batch_size", "grad_accum", "gradient_checkpointing")}
    if resume_state is not None:
        check_resume_identity(resume_state.get("identity") or {}, identity, cfg.out)
        if total != resume_state["total_steps"]:
            if total < resume_state["step"]:
                raise ValueError(f"--resume: --steps gives {total} steps, fewer than the {resume_state['step']} the "
                                 f"checkpoint has trained")
            print(f"prefopt train: note: --resume: the run now lasts {total} steps instead of "
                  f"{resume_state['total_steps']}; the learning-rate schedule is recomputed for {total}",
                  file=sys.stderr, flush=True)
    method = build_method(cfg.method, cfg.method_options(), total_steps=total, temperature=head.temperature,
                          softcap=head.softcap, backend=cfg.op_backend)
    if cfg.qlora and cfg.reference_mode(method) != "none":  # its reference point is known with the run's length
        ref_mod.check_mode(cfg.reference_mode(method), method, lora=cfg.lora, qlora=cfg.qlora)
    dist.barrier(state)  # every rank has checked --out before rank 0 writes to it
    run = Run(cfg, state, policy, processor, collator, records, probe_records, plan, method,
              cfg.reference_mode(method), total, resume_state)
    run.identity, run.problems = identity, problems
    run.collapse_logp = -2 * math.log(head.weight.shape[0])
    run.eval_records = eval_records
    known = read_skipped_records(cfg.out, records)
    if known and cfg.strict_data:
        raise ValueError(f"{os.path.join(cfg.out, SKIPPED_FILE)}: {len(known)} records failed inside a step of this "
                         "run before (--strict-data)")
    run.unusable.update(known)
    for i in sorted(known):
        problems(records[i].where or f"record {i}", "failed inside a step of this run before", echo=False)
    if known and state.is_main:
        print(f"prefopt train: note: {len(known)} records that failed inside a step before are skipped "
              f"(listed in {os.path.join(cfg.out, SKIPPED_FILE)})", file=sys.stderr, flush=True)
    return run


def collated_mode(stage: Stage) -> str:
    """The collator mode of a stage's rows (GRPO's rollouts are SFT rows of the sampled answers)."""
    return "sft" if stage.mode == "grpo" else stage.mode


def model_source(cfg: TrainConfig) -> str:
    """What ``build_model`` builds the run's model from: ``--model``, or the model folder of
    ``--init-from`` (a checkpoint exported once per process)."""
    from .export import model_source as init_source

    return init_source(cfg.init_from) if cfg.init_from else cfg.model


def _eval_records(cfg: TrainConfig, load: Dict[str, Any]):
    """The held-out records of the final evaluation: the held-out split of 'synthetic' or of a folder with
    heldout.jsonl (``eval_size`` of them); none for other data or ``eval_size == 0``."""
    from .data import load_records

    if cfg.eval_size == 0 or not (cfg.data == "synthetic" or os.path.isfile(os.path.join(cfg.data, "heldout.jsonl"))):
        return []
    return [r for r in load_records(cfg.data, split="heldout", size=cfg.eval_size, **load) if r.rejected is not None]


def _skip_record(collator, record, modes, problems) -> bool:
    """Report ``record`` and return True when it cannot be collated in one of ``modes``."""
    reason = collator.check_record(record, modes)
    if reason is not None:
        problems(record.where, reason)
    return reason is not None


def _probe_records(cfg: TrainConfig, records, load: Dict[str, Any]):
    """(the probe records, whether they are training records, which passed the collator's checks)."""
    from .data import load_records

    source = cfg.probe_data
    if source is None and (cfg.data == "synthetic" or os.path.isfile(os.path.join(cfg.data, "heldout.jsonl"))):
        source = cfg.data
    if source is None:
        probe = records[: cfg.probe_size]
    else:
        probe = load_records(source, split="heldout", size=cfg.probe_size, **load)
    probe = [r for r in probe if r.rejected is not None]
    if not probe:
        raise ValueError("probe set: no record with a rejected answer (give --probe-data)")
    return probe, source is None


# ================================================================================================ the run


class Run(StepMixin, FaultsMixin, RolloutsMixin, SummaryMixin):
    """A prepared run; :meth:`execute` trains it."""

    def __init__(self, cfg, state, policy, processor, collator, records, probe_records, plan, method, ref_mode,
                 total_steps, resume_state):
        self.cfg, self.state = cfg, state
        self.policy, self.processor, self.collator = policy, processor, collator
        self.records, self.probe_records, self.plan = records, probe_records, plan
        self.method, self.ref_mode, self.total_steps = method, ref_mode, total_steps
        self.resume_state = resume_state
        self.stale_files: List[str] = []  # set by prepare
        self.run_id: Optional[str] = None  # set by prepare: the run folder's marker as prepare found it
        self.lock: Optional[runfolder.FolderLock] = None
        self.identity: Dict[str, Any] = {}  # set by prepare
        self.problems = DataProblems()  # set by prepare
        self.eval_records: list = []  # set by prepare
        self.unusable: set = set()  # records that failed inside a step (every rank's; OUT/skipped_records.json)
        self.found: Dict[int, str] = {}  # records this rank found failing since the ranks last shared theirs
        self.skipped_listed = True  # OUT/skipped_records.json lists every record in unusable
        self.own_failure = False  # this rank raises an error of its own that the other ranks did not agree on
        self.failure_agreed = False  # every rank is raising the same step's failure together
        # True while the weights hold more than the steps counted so far (from the optimizer step or the
        # reference point's adapter merge until the step is counted): no checkpoint may be written then.
        self.ahead_of_count = False
        self.collapse_logp = -math.inf  # set by prepare: the probe positives' collapse bound (-2 ln V)
        self.nonfinite_in_a_row = 0
        self.probed_at: Optional[int] = None  # the step of the last probe measurement
        self.diverged: Optional[str] = None  # why the run stops as diverged
        self.checkpoint_path: Optional[str] = None  # the newest checkpoint this run wrote or resumed from
        self.tokenizer = getattr(processor, "tokenizer", processor)

    def log(self, message: str) -> None:
        if self.state.is_main and self.cfg.progress:
            from tqdm import tqdm

            tqdm.write(message, file=sys.stderr)

    # ---------------------------------------------------------------------------------------- execute

    def execute(self) -> Dict[str, Any]:
        """Take the run folder (:meth:`take_folder`), train, export, evaluate; the folder's lock is released
        at the end."""
        try:
            self.take_folder()
            return self._execute()
        finally:
            if self.lock is not None:
                self.lock.release()

    def take_folder(self) -> None:
        """Rank 0 locks the run folder, checks it is as prepare found it, marks it (first) and removes what a
        run that stopped before its first checkpoint left; every rank then checks that it sees that run id."""
        cfg, state = self.cfg, self.state
        problem = None
        if state.is_main:
            try:
                self.lock = runfolder.FolderLock(cfg.out)
                if runfolder.read_marker(cfg.out) != self.run_id or (self.run_id is None and self.resume_state is None
                                                                     and runfolder.contents(cfg.out)):
                    raise runfolder.RunFolderError(f"--out {cfg.out}: another run wrote to it while this one was "
                                                   "being prepared")
                if self.run_id is None:
                    self.run_id = runfolder.write_marker(cfg.out)
                for path in self.stale_files:  # an earlier run of this folder that stopped before its first checkpoint
                    runfolder.remove_entry(path)
                with runfolder.open_nofollow(os.path.join(cfg.out, CONFIG_FILE), "w") as f:
                    json.dump({**asdict(cfg), "world_size": state.world_size, "total_steps": self.total_steps}, f,
                              indent=1)
            except (runfolder.RunFolderError, OSError) as e:  # raised on every rank below
                problem = e
        if dist.ranks_with(problem is not None, state):
            raise problem or runfolder.RunFolderError(f"--out {cfg.out}: rank 0 could not take the run folder")
        ids = dist.all_gather_object(runfolder.read_marker(cfg.out), state)
        if any(i != ids[0] for i in ids):
            raise runfolder.RunFolderError(f"--out {cfg.out}: rank {state.rank} sees run {ids[state.rank]}, rank 0 "
                                           f"marked {ids[0]} (the ranks need one shared run folder)")

    def _execute(self) -> Dict[str, Any]:
        started = time.perf_counter()
        objective, probe, start_step = self.start()
        history, done, stopped_early = self.steps(objective, probe, start_step)
        return self.finish(history, done, stopped_early, started)

    def start(self) -> Tuple[PolicyObjective, LogpProbe, int]:
        """The objective, the optimizer, the schedule and the backend's wrap (:attr:`engine`); the resumed
        state or the probes' starting point. Returns (objective, probe, the first step to train)."""
        cfg, state = self.cfg, self.state

        # The module every gradient flows through (its reference is set at the method's reference point).
        objective = PolicyObjective(self.policy)

        # --optim (AdamW, 8-bit or not) over the trainable parameters, cosine schedule with linear warmup, the
        # backend's wrap.
        from transformers import get_cosine_schedule_with_warmup

        params = [p for p in objective.parameters() if p.requires_grad]
        optimizer = build_optimizer(cfg.optim, params, lr=cfg.learning_rate(), weight_decay=cfg.weight_decay)
        warmup = math.ceil(cfg.warmup_ratio * self.total_steps)
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, self.total_steps)
        head = self.policy.head()
        self.engine = engine = dist.wrap(
            state, objective, optimizer, scheduler, max_grad_norm=cfg.max_grad_norm, deepspeed_spec=cfg.deepspeed,
            micro_batch=cfg.batch_size, grad_accum=cfg.grad_accum, dtype=head.weight.dtype,
            head_params=(head.weight, head.bias))

        # Resume (the reference of a point already passed first: merging adapters touches the weights the
        # checkpoint then restores), or take the probes' starting point.
        probe = LogpProbe(self.probe_records, self.collator, batch_size=cfg.batch_size, device=state.device)
        start_step = 0
        if self.resume_state is not None:
            start_step = self.resume_state["step"]
            point = self.method.reference_point
            if point is not None and start_step > point:
                objective.reference = self.make_reference(point, start_step)
            ckpt.load_checkpoint(self.resume_state["path"], engine=engine, state=state)
            saved_start = self.resume_state.get("probe_start")
            probe.start = None if saved_start is None else ProbeResult(**saved_start)
            self.truncate_metrics(start_step)
            self.checkpoint_path = self.resume_state["path"]
            self.log(f"resumed from {self.resume_state['path']} at step {start_step}/{self.total_steps}")
        elif cfg.probe_every > 0:
            self.write_metrics({"step": 0, **probe.metrics(probe.measure(engine))})
        return objective, probe, start_step

    def steps(self, objective: PolicyObjective, probe: LogpProbe,
              start_step: int) -> Tuple[List[Dict[str, Any]], int, bool]:
        """Train from ``start_step``: per step the reference point, the step, its probes and log line, the
        divergence check and the checkpoint. Returns (the steps' metrics, the steps trained, whether the
        probes stopped the run early); raises :class:`Interrupted` on a signal."""
        cfg, state, engine = self.cfg, self.state, self.engine

        # The steps. A checkpoint at the end, an early stop, a signal (then the run stops) and the cadence
        # (--save-every, --save-minutes); in one process an exception checkpoints the steps trained so far.
        from tqdm import tqdm

        last_step = self.total_steps if cfg.stop_after is None else min(self.total_steps, cfg.stop_after)
        bar = tqdm(total=self.total_steps, initial=start_step, disable=not (cfg.progress and state.is_main),
                   desc=f"{cfg.method}", dynamic_ncols=True)
        history: List[Dict[str, Any]] = []
        stage_name, stopped_early, done = None, False, start_step
        self.saved_step, self.boundary_rng = start_step, ckpt.rng_state()
        cadence = Cadence(cfg.save_every, cfg.save_minutes)
        with StopSignals(state.is_main) as signals, self.checkpoint_on_failure(lambda: done, probe):
            for step in range(start_step, last_step):
                stage = self.method.stage_at(step)
                if step == self.method.reference_point:
                    self.ahead_of_count = True
                    objective.reference = self.make_reference(step, step)
                if stage.name != stage_name:
                    self.log(f"step {step}: stage {stage.name}" + (
                        f" (on-policy negatives: {stage.onpolicy_fraction:.0%})" if stage.onpolicy_fraction else ""))
                    stage_name = stage.name
                metrics = self.train_step(step, stage)
                if cfg.probe_every and ((step + 1) % cfg.probe_every == 0 or step + 1 == last_step):
                    metrics.update(probe.metrics(probe.measure(engine)))
                    self.probed_at = step + 1
                    stopped_early = should_stop(metrics, cfg.early_stop_chosen_drop)
                self.write_metrics(metrics)
                history.append(metrics)
                bar.update(1)
                shown = (("loss", "loss"), ("acc", "rewards/accuracies"), ("dlogp+", "probe/delta_logp_chosen"))
                bar.set_postfix({k: f"{metrics[m]:.3g}" for k, m in shown if m in metrics})
                done = step + 1
                self.boundary_rng = ckpt.rng_state()
                self.ahead_of_count = False
                self.check_divergence(metrics)
                if stopped_early:
                    self.log(f"step {done}: early stop, probe positives fell "
                             f"{-metrics['probe/delta_logp_chosen']:.3f} nats/token below their start")
                signum, due = at_boundary(signals, cadence, done, state)
                if not self.diverged and (stopped_early or done == last_step or signum or due):
                    self.save(done, probe)
                    cadence.saved()
                if self.diverged:
                    break
                if signum:
                    bar.close()
                    dist.teardown(state)
                    raise Interrupted(signum, done, self.total_steps, self.checkpoint_path)
                if stopped_early:
                    break
        bar.close()
        return history, done, stopped_early

    def finish(self, history: List[Dict[str, Any]], done: int, stopped_early: bool, started: float) -> Dict[str, Any]:
        """Export the last checkpoint's model (``OUT/model/``), evaluate on the held-out records once the run has
        ended, and return the summary; a diverged run raises :class:`Diverged` after its export."""
        state = self.state
        if self.diverged:  # the last checkpoint it wrote is finite and not collapsed: that one is the model
            self.model_folder = self.export_model()
            dist.teardown(state)
            raise Diverged(self.diverged, done, self.checkpoint_path, self.model_folder)
        self.model_folder = self.export_model()
        # The held-out evaluation once the run has ended (not when it pauses with --stop-after).
        evaluation = self.evaluate(done) if done == self.total_steps or stopped_early else None
        summary = self.summary(history, done, stopped_early, time.perf_counter() - started, evaluation)
        dist.teardown(state)
        return summary

    @contextlib.contextmanager
    def checkpoint_on_failure(self, trained, probe: LogpProbe):
        """An exception first checkpoints the steps trained since the last checkpoint (``trained()`` of
        them); in more than one process only a failure every rank raises together
        (:meth:`skip_failing_records`), since the others would wait alone in the checkpoint's collectives.
        Not when the weights are already past that count (the failure came after an optimizer step or the
        reference point's merge): such a checkpoint would resume to other numbers, so the last one stands."""
        try:
            yield
        except Exception as e:
            step = trained()
            if not ((self.state.distributed and not self.failure_agreed) or self.ahead_of_count
                    or step <= self.saved_step or isinstance(e, ckpt.CheckpointError)):
                try:
                    self.save(step, probe)
                    if self.state.is_main:
                        print(f"prefopt train: the run failed after step {step}; the steps trained so far are in "
                              f"{self.checkpoint_path} (continue with --resume)", file=sys.stderr, flush=True)
                except Exception as failed:
                    print(f"prefopt train: could not checkpoint step {step}: {failed}", file=sys.stderr, flush=True)
            if self.failure_agreed:  # every rank is here: leave the process group together
                try:
                    dist.teardown(self.state)
                except Exception:  # a peer already gone: the error being raised is the one to report
                    pass
            raise

    # ---------------------------------------------------------------------------------------- pieces

    def evaluate(self, step: int) -> Optional[Dict[str, Any]]:
        """The held-out evaluation of the trained policy against the model the run started from
        (:func:`prefopt.train.eval.evaluate`); its numbers go to metrics.jsonl with HF's ``eval_`` prefix and
        its report to ``OUT/eval/``. Every rank takes part (ZeRO-3 forwards are collective)."""
        if not self.eval_records:
            return None
        from .eval import EVAL_KEYS, evaluate, write_report
        from .models import build_model

        cfg, state = self.cfg, self.state
        start, _ = build_model(model_source(cfg), dtype=cfg.dtype, lora=cfg.lora, lora_r=cfg.lora_r,
                               lora_alpha=cfg.lora_alpha, qlora=cfg.qlora, device=state.device, seed=cfg.seed,
                              trust_remote_code=cfg.trust_remote_code)
        result = evaluate(self.policy, processor=self.processor, reference=start, records=self.eval_records,
                          batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, max_length=cfg.max_length,
                          backend=cfg.op_backend, synced_gpus=state.zero_stage == 3, share_prefix=cfg.share_prefix,
                          gather=lambda params: dist.gathered(params, state), progress=cfg.progress and state.is_main)
        del start
        line = {"step": step, **{f"eval_{k}": result[k] for k in EVAL_KEYS}}
        for t, row in result["per_type"].items():
            line.update({f"eval_{t}/{k}": v for k, v in row.items()})
        if state.is_main:  # the whole report, then its line: an interrupted evaluation leaves neither
            write_report(result, os.path.join(cfg.out, "eval"), whole=True)
        self.write_metrics(line)
        return result

    def make_reference(self, point: int, step: int) -> ref_mod.Reference:
        """The reference: the policy as it was at step ``point``. At ``step == point`` it is taken from the
        policy now (a precompute pass, or a snapshot of the trainable parameters saved to the run folder);
        a resumed run past the point reads those files back."""
        cfg, state = self.cfg, self.state
        if self.ref_mode == "precompute":
            from tqdm import tqdm

            path = os.path.join(cfg.out, f"reference_logps-{point}.safetensors")
            fp = ref_mod.fingerprint(self.records, cfg.model, cfg.seed, point)
            logps = ref_mod.load_tensors(path, fp)
            if logps is None:
                if step != point:
                    raise ValueError(f"--resume: {path} is missing and the policy has moved on since step {point}")
                with tqdm(total=len(self.records), desc="reference log-probs", dynamic_ncols=True, leave=False,
                          disable=not (cfg.progress and state.is_main)) as bar:
                    # A record known to fail is never looked up: a usable one is scored in its place.
                    rows = [self.records[i] for i in self.usable(list(range(len(self.records))))]
                    logps = ref_mod.precompute_logps(self.engine, rows, self.collator,
                                                     batch_size=cfg.batch_size, state=state, progress=bar)
                ref_mod.save_tensors(path, logps, state, metadata={"fingerprint": fp})
                self.log(f"step {point}: reference log-probs of {len(self.records)} examples written to {path}")
            return ref_mod.PrecomputedReference(logps["chosen"], logps["rejected"])
        snapshot = None
        if point > 0:
            path = os.path.join(cfg.out, f"reference-{point}.safetensors")
            if step == point:
                snapshot = ckpt.trainable_state(self.policy.model, state, everywhere=True)
                ref_mod.save_tensors(path, snapshot, state)
                self.log(f"step {point}: the reference is now the current policy (saved to {path})")
            else:
                snapshot = ref_mod.load_tensors(path)
                if snapshot is None:
                    raise ValueError(f"--resume: {path} (the reference's weights) is missing")
        if self.ref_mode == "adapters":
            return ref_mod.AdapterReference(self.policy, state, snapshot)
        from .models import build_model

        copy, _ = build_model(model_source(cfg), dtype=cfg.dtype, lora=cfg.lora, lora_r=cfg.lora_r,
                              lora_alpha=cfg.lora_alpha, device=state.device, seed=cfg.seed,
                              trust_remote_code=cfg.trust_remote_code)
        reference = ref_mod.ModelReference(copy, state, snapshot)
        copy.model = dist.wrap_frozen(state, copy.model, self.policy.head().weight.dtype)
        return reference

    def save(self, step: int, probe: LogpProbe) -> None:
        """Checkpoint ``step`` with the generators as they were at that step's boundary; unless its weights are
        not finite or (with probes on: measured here if this step was not) collapsed: then nothing is written
        and :attr:`diverged` says why."""
        if self.cfg.probe_every and self.probed_at != step:
            self.probed_at = step
            self.check_divergence({"probe/logp_chosen": probe.measure(self.engine).chosen}, count_step=False)
            if self.diverged:
                return
        start = None if probe.start is None else dataclasses.asdict(probe.start)
        try:
            path = ckpt.save_checkpoint(self.cfg.out, step, engine=self.engine, state=self.state,
                                        keep=self.cfg.keep_checkpoints, rng=self.boundary_rng,
                                        trainer_state={"total_steps": self.total_steps, "probe_start": start,
                                                       "config": asdict(self.cfg), "identity": self.identity})
        except ckpt.NonFiniteWeights as e:
            self.diverged = str(e)
            return
        self.checkpoint_path, self.saved_step = path, step

    def check_divergence(self, metrics: Dict[str, Any], count_step: bool = True) -> None:
        """Set :attr:`diverged` when the run must stop (README: "Divergence"): ``--max-nonfinite-steps`` steps in a
        row whose loss or gradient norm was not finite (none of them applied), or the probe positives' mean
        per-token log-prob below :attr:`collapse_logp` (-2 ln V: far below a uniform guess's -ln V; a model
        trained on these answers has collapsed, as ``--lr 1e3`` does with finite numbers)."""
        if count_step:
            self.nonfinite_in_a_row = self.nonfinite_in_a_row + 1 if metrics.get("nonfinite") else 0
            if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
                self.diverged = (f"{self.nonfinite_in_a_row} steps in a row with a non-finite loss or gradient norm, "
                                 f"none applied (--max-nonfinite-steps {self.cfg.max_nonfinite_steps})")
        chosen = metrics.get("probe/logp_chosen")
        if chosen is not None and not chosen >= self.collapse_logp:
            self.diverged = (f"the probe positives' log-prob is {chosen:.4g} nats/token, below the collapse bound "
                             f"{self.collapse_logp:.3g} (-2 ln V; probes every --probe-every steps and at checkpoints)")

    def export_model(self) -> Optional[str]:
        """Rank 0 writes the final checkpoint's model as a Hugging Face folder ``OUT/model/`` (replacing
        one a finished run had written); returns its path."""
        from .export import export_checkpoint

        path = self.checkpoint_path
        if path is None:
            return None
        out = os.path.join(self.cfg.out, MODEL_DIR)
        if self.state.is_main:
            export_checkpoint(path, out, keep_adapter=self.cfg.keep_adapter, replace=True)
            self.log(f"model folder {out} (from {path})")
        dist.barrier(self.state)
        return out

def train(cfg: TrainConfig) -> Dict[str, Any]:
    """Prepare and run; returns the summary (see :meth:`Run.summary`)."""
    return prepare(cfg).execute()
