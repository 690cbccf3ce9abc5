"""One optimizer step of a run (:class:`StepMixin`, a part of :class:`~prefopt.train.loop.Run`).

    micro_batch      this rank's records of micro-batch ``a`` of step ``s`` (:class:`~prefopt.train.loop.DataPlan`),
                     collated on the device (GRPO's rollouts and on-policy negatives: :mod:`.rollouts`)
    item count       the whole accumulated global batch's size in the loss's unit
    forward          the engine's forward (its saved activations in host memory with --offload-activations);
                     the ranks agree whether one failed (:mod:`.faults` then drops the
                     failing records and the step is redone from the same generator state)
    backward, step   every micro-batch's loss normalised by that count; clip, AdamW, schedule (the engine)
    metrics          TRL's names, summed over ranks before the optimizer step
"""
from __future__ import annotations

import contextlib
import math
import re
import resource
import time
from typing import Any, Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import faultpoints
from .errors import RankFailed
from .methods import Stage
from .prefixes import decoder_tokens, logical_tokens
from .rollouts import rollout_metrics


#: The process's own memory (bytes: the resident set less its shared libraries' pages) when :func:`start_memory_peak`
#: ran: CPU peaks are counted above it.
_cpu_baseline = 0
#: (high-water mark in bytes, the peak in MiB :func:`peak_memory_mb` made of it), or None before the first.
_cpu_peak: Optional[Tuple[int, float]] = None


def _proc_status_kib(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def _library_bytes() -> int:
    """Resident pages of the shared libraries mapped into the process (Linux ``/proc/self/smaps``; 0 elsewhere).
    How many a process holds depends on the page cache (the kernel maps cached neighbours of a page it faults
    in), not on what it allocates: the same run counted 16-46 MiB more in a freshly installed virtualenv.
    Memory-mapped weights are not libraries: they count."""
    total, library = 0, False
    try:
        with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:  # a mapping's header line
                    library = re.search(r"\.so(\.[0-9.]+)?$", line.rstrip()) is not None
                elif library and line.startswith("Rss:"):
                    total += int(line.split()[1])
    except OSError:
        return 0
    return 1024 * total


def start_memory_peak() -> None:
    """Take the CPU baseline of :func:`peak_memory_mb`, just before the model is built: the resident set now
    less its shared libraries' pages, and (Linux) the resident high-water mark reset to the resident set, so that
    what the process held before (data loading, imports) is not counted."""
    global _cpu_baseline, _cpu_peak
    _cpu_peak = None
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # resets VmHWM to VmRSS (Linux >= 4.0)
    except OSError:
        pass
    rss = _proc_status_kib("VmRSS")
    rss = 1024 * rss if rss is not None else 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    _cpu_baseline = rss - _library_bytes()


def peak_memory_mb(device: torch.device) -> float:
    """The run's peak memory in MiB: on CUDA torch's peak allocation (``max_memory_allocated``); on CPU the
    process's peak resident set less its shared libraries' pages (read the first time that peak is seen: the
    pages only grow while the libraries stay loaded, and reading them costs about 10 ms, too much for every
    step), above the baseline :func:`start_memory_peak` took before the model was built (the quantity
    ``prefopt plan --device cpu --dtype fp32`` predicts)."""
    global _cpu_peak
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = _proc_status_kib("VmHWM")
    peak = 1024 * (peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if _cpu_peak is None or _cpu_peak[0] != peak:
        _cpu_peak = (peak, max(0, peak - _library_bytes() - _cpu_baseline) / 2**20)
    return _cpu_peak[1]


def saved_activations(offload: bool, device: torch.device):
    """Where a training forward keeps what its backward needs: on ``device`` (a null context), or with ``offload``
    (``--offload-activations``) in host memory through ``torch.autograd.graph.save_on_cpu`` (pinned on CUDA),
    copied back when the backward unpacks it. Under non-reentrant checkpointing every checkpointed decoder
    layer saves only its inputs, so those are what moves to the host, with the tensors saved outside the
    checkpointed layers (embeddings, vision tower, the fused loss's inputs); inside them nothing is saved. On
    the CPU the tensors stay where they are: the same numbers."""
    if not offload:
        return contextlib.nullcontext()
    return torch.autograd.graph.save_on_cpu(pin_memory=device.type == "cuda")


def count_items(loss, labels: torch.Tensor) -> int:
    """The micro-batch's size in ``loss``'s unit (see :meth:`~prefopt.FusedLoss.count_items`); its scored
    tokens for a loss that normalises within each call (unit None: GRPO's bnpo)."""
    if loss.unit is None:
        return int((loss.align(labels, loss.ignore_index) != loss.ignore_index).sum())
    return loss.count_items(labels)


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


class StepMixin:
    """The step's methods of :class:`~prefopt.train.loop.Run` (they use its ``cfg``, ``state``, ``plan``,
    ``records``, ``collator`` and ``engine``)."""

    def micro_batch(self, step: int, micro: int, stage: Stage) -> Tuple[List[int], Dict[str, torch.Tensor], Dict[str, float]]:
        """(record indices, collated batch on the device, counters of what was sampled) of one micro-batch."""
        idx = self.usable(self.plan.indices(step, micro, self.state.rank))
        records = [self.records[i] for i in idx]
        if stage.mode == "grpo":
            idx, prompts = self.collate(idx, records, "sft", self.collator.generation_inputs)
            batch, counters = self.rollouts([self.records[i] for i in idx], prompts, stage.num_generations)
            return idx, to_device(batch, self.state.device), counters
        counters = {}
        if stage.onpolicy_fraction > 0:
            idx, records, sampled = self.onpolicy_negatives(idx, records, stage.onpolicy_fraction, (step, micro))
            counters["onpolicy/negatives"] = sampled
        idx, batch = self.collate(idx, records, stage.mode)
        return idx, to_device(batch, self.state.device), counters

    def train_step(self, step: int, stage: Stage) -> Dict[str, Any]:
        """One optimizer step over ``grad_accum`` micro-batches; returns the step's metrics (all ranks).
        A micro-batch whose forward raises because of a record is redone without it, from the same
        generator state (:meth:`skip_failing_records`); in more than one process the ranks first agree,
        before any backward, whether a forward failed."""
        started = ckpt.rng_state()  # a step redone without a failing record draws as the first try did
        while True:
            metrics = self.try_step(step, stage)
            if metrics is not None:
                return metrics
            ckpt.set_rng_state(started)

    def try_step(self, step: int, stage: Stage) -> Optional[Dict[str, Any]]:
        """:meth:`train_step`'s one try: its metrics, or None when it must be redone."""
        cfg, state, engine = self.cfg, self.state, self.engine
        t0 = time.perf_counter()
        micro = [self.micro_batch(step, a, stage) for a in range(cfg.grad_accum)]
        self.share_found_records()  # records that failed to collate on any rank
        # The whole global batch's size in the loss's unit (pairs or tokens): every micro-batch loss is
        # divided by it, so the accumulated gradient is that of one big batch.
        local_items = [count_items(stage.loss, batch["labels"]) for _, batch, _ in micro]
        (global_items,) = dist.all_reduce([sum(local_items)], state)
        global_items = max(1, int(global_items))
        # A loss that normalises within each call (GRPO's bnpo, as TRL) gets no count; its micro-batch
        # losses are averaged over the accumulation, and DDP averages them over ranks.
        per_call = stage.loss.unit is None
        lr = engine.learning_rate
        loss_sum, tokens, decoded = 0.0, 0, 0
        weighted: Dict[str, float] = {}
        counters: Dict[str, float] = {}
        for a, (idx, batch, drawn) in enumerate(micro):
            last = a == len(micro) - 1
            with contextlib.nullcontext() if last else engine.no_sync():
                out, failure = self.forward(batch, stage, None if per_call else global_items, idx)
                if failure is None:
                    # DDP and DeepSpeed average gradients over ranks; the count is already global.
                    share = out.loss / len(micro) if per_call else out.loss * state.world_size
                    if faultpoints.fault_kind(f"loss-{step + 1}") == "nan":  # the tests' non-finite step
                        share = share * math.nan
                    try:
                        engine.backward(share)
                    except Exception as e:
                        if state.distributed:  # the other ranks are inside this backward's collectives
                            self.own_failure = True
                            raise
                        failure = e
            if failure is not None:
                out = share = None  # the failed try's graph goes before the records are run alone
                self.skip_failing_records(failure, idx, stage, step, first_micro_batch=a == 0)
                return None
            if not last:
                engine.micro_step()
            loss_sum += float(share.detach()) / state.world_size
            tokens += logical_tokens(batch)
            decoded += decoder_tokens(batch)
            for k, v in drawn.items():
                counters[k] = counters.get(k, 0.0) + v
            for k, v in out.metrics.items():
                weighted[k] = weighted.get(k, 0.0) + float(v) * local_items[a]
        keys, counter_keys = sorted(weighted), sorted(counters)
        # Summed over ranks before the optimizer step: a rank's non-finite loss makes the sum non-finite on
        # every rank, and no rank applies the step.
        totals = dist.all_reduce([loss_sum, tokens, sum(local_items)] + [weighted[k] for k in keys]
                                 + [counters[k] for k in counter_keys] + [decoded], state)
        loss, tokens, items = totals[:3]
        self.ahead_of_count = True
        applied = engine.step(loss_finite=math.isfinite(loss))
        counters = dict(zip(counter_keys, totals[3 + len(keys):-1]))
        elapsed = time.perf_counter() - t0
        (peak,) = dist.all_reduce([peak_memory_mb(state.device)], state, op="max")
        metrics: Dict[str, Any] = {
            "step": step + 1,
            "epoch": round(self.plan.epoch(step + 1), 4),
            "stage": stage.name,
            "loss": loss,
            **{k: v / max(items, 1) for k, v in zip(keys, totals[3:3 + len(keys)])},
            "learning_rate": lr,
            "grad_norm": engine.grad_norm,
            "tokens_per_second": tokens / max(elapsed, 1e-9),
            "step_seconds": elapsed,
            "decoder_tokens": int(totals[-1]),
            "peak_memory_mb": peak,
        }
        if not (applied and math.isfinite(loss) and math.isfinite(engine.grad_norm)):
            metrics["nonfinite"] = True  # the step was not applied (see Engine.step)
        if stage.onpolicy_fraction:
            metrics["onpolicy/negatives"] = int(counters["onpolicy/negatives"])
        if stage.mode == "grpo":
            metrics.update(rollout_metrics(counters))
        return metrics

    def forward(self, batch, stage: Stage, num_items: Optional[int], idx: List[int]):
        """(the objective's output, None), or (output or None, the error) when this micro-batch's forward
        raised here (out of memory included) or on another rank (:class:`RankFailed`). In more than one
        process every rank all-reduces a failure flag after its forward, before any backward, so no rank
        enters the backward's collectives alone; not under ZeRO-3, whose forward is itself collective (a
        failure there ends the run)."""
        out, failure = None, None
        try:
            with saved_activations(self.cfg.offload_activations, self.state.device):
                out = self.engine(batch, stage=stage, num_items=num_items, indices=idx)
        except Exception as e:
            failure = e
        if self.state.distributed and self.state.zero_stage != 3:
            failed = dist.ranks_with(failure is not None, self.state)
            if failed and failure is None:
                failure = RankFailed(failed)
        return out, failure
