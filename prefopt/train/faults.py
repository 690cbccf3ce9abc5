"""Records that fail inside a run (:class:`FaultsMixin`, a part of :class:`~prefopt.train.loop.Run`).

A record the up-front checks passed can still fail: to collate (a file changed, the processor refuses it) or
inside a step's forward or backward. Such a record is found (alone, by the rank whose batch held it), the
ranks agree on the union at fixed points (every rank calls :meth:`FaultsMixin.share_found_records` at the
same places, so no collective waits for a rank alone), it is reported ``FILE:LINE: reason``, replaced by the
next usable record and listed in ``OUT/skipped_records.json`` by content (:func:`record_key`), so that a
resume or a restart skips it too. A failure that is not the data's is raised on every rank together.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import traceback
from typing import Dict, List, Optional, Tuple

import torch

from . import checkpoint as ckpt
from . import distributed as dist
from . import runfolder
from .errors import RankFailed, StepNotRedone, first_line
from .interrupts import SKIPPED_FILE
from .methods import Stage
from .step import count_items, to_device


def record_key(record) -> str:
    """A record's identity by content (its text, messages and image paths or contents): what
    ``OUT/skipped_records.json`` lists, so that it names the same records whatever options filter or order
    the data."""
    from .sources import image_key

    text = json.dumps([record.prompt, record.chosen, record.rejected, [image_key(i) for i in record.images],
                       list(record.corrections)] + ([record.messages] if record.messages is not None else []))
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def read_skipped_records(out: str, records) -> set:
    """The indices of ``records`` that ``OUT/skipped_records.json`` lists (by :func:`record_key`)."""
    path = os.path.join(out, SKIPPED_FILE)
    if not os.path.isfile(path):
        return set()
    try:
        with open(path, encoding="utf-8") as f:
            keys = {entry["key"] for entry in json.load(f)["records"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: unreadable ({first_line(e)}); remove it to start over") from None
    return {i for i, r in enumerate(records) if record_key(r) in keys}


class FaultsMixin:
    """The failing-record methods of :class:`~prefopt.train.loop.Run` (they use its ``cfg``, ``state``,
    ``records``, ``collator``, ``engine``, ``problems`` and the sets ``unusable`` and ``found``)."""

    def collate(self, idx: List[int], records, mode: str, build=None) -> Tuple[List[int], Dict[str, torch.Tensor]]:
        """Collate ``records`` in ``mode`` (or ``build(records)``: prompts to sample from); a record that
        fails although the up-front check passed it is replaced by the next usable record, so every rank
        keeps its batch size and no collective waits for a rank that skipped. The ranks share what they
        found at the start of the step's training (:meth:`share_found_records`)."""
        try:
            return idx, self.collator(records, mode=mode) if build is None else build(records)
        except Exception:
            failed = {i: self.collate_problem(r, mode, build) for i, r in zip(idx, records) if i not in self.unusable}
            failed = {i: reason for i, reason in failed.items() if reason is not None}
            if not failed and not self.unusable.intersection(idx):  # none to replace: not the data
                raise
            self.found.update(failed)
            self.unusable.update(failed)
            if len(self.unusable) == len(self.records):
                raise ValueError(f"--data {self.cfg.data}: no usable training records left") from None
            idx = self.usable(idx)
            return self.collate(idx, [self.records[i] for i in idx], mode, build)

    def collate_problem(self, record, mode: str, build=None) -> Optional[str]:
        """Why ``record`` alone cannot be collated in ``mode`` (or by ``build``), or None."""
        if build is None:
            return self.collator.check_record(record, [mode])
        try:
            build([record])
        except Exception as e:  # the processor's own errors come in many types
            return first_line(e)
        return None

    def usable(self, idx: List[int], unusable: Optional[set] = None) -> List[int]:
        """``idx`` with each unusable record (default :attr:`unusable`) replaced by the next usable one (in
        data order, wrapping)."""
        n, unusable = len(self.records), self.unusable if unusable is None else unusable
        return [next((i + k) % n for k in range(n) if (i + k) % n not in unusable) for i in idx]

    def share_found_records(self) -> None:
        """Every rank's records found failing since the last call (:attr:`found`), to every rank: each is
        reported (``FILE:LINE: reason``, by the rank that found it; under ``--strict-data`` every rank
        raises here), counted, never used again, and rank 0 lists them in ``OUT/skipped_records.json``
        for a restart or a resume. Every rank calls this at the same points."""
        state = self.state
        found, self.found = self.found, {}
        union = sorted({i for part in dist.all_gather_ints(sorted(found), state) for i in part})
        if not union:
            return
        self.failure_agreed = True  # --strict-data raises on every rank here
        for i in union:
            where = self.records[i].where or f"record {i}"
            if i in found:
                self.problems(where, found[i], echo=True)
            else:
                self.problems(where, "failed on another rank (reported there)", echo=False)
        self.failure_agreed = False
        self.unusable.update(union)
        written = True
        if state.is_main:
            path = os.path.join(self.cfg.out, SKIPPED_FILE)
            try:
                listed = [{"where": self.records[i].where, "key": record_key(self.records[i])}
                          for i in sorted(self.unusable)]
                runfolder.write_json_atomic(path, {"records": listed})
            except OSError as e:
                written = False
                print(f"prefopt train: warning: {ckpt.os_error_line(e, path)}; a resume or restart will meet these "
                      "records again", file=sys.stderr, flush=True)
        self.skipped_listed = not dist.ranks_with(not written, state)

    def skip_failing_records(self, failure: Exception, idx: List[int], stage: Stage, step: int,
                             first_micro_batch: bool) -> None:
        """After a micro-batch's forward (in one process, also its backward) raised, here or on another rank:
        each rank finds the records of its ``idx`` that fail alone (:meth:`records_failing_alone`); the
        ranks share them (:meth:`share_found_records`), the step's gradients are dropped and the caller
        redoes the step with their replacements.

        Raises instead, on every rank together (so each can checkpoint the steps trained so far): when on
        some rank the failure is not the data's (out of memory; no record fails alone; or every one does
        and so does the record that would replace them), for GRPO (its rows are sampled answers, not
        records), with ``--strict-data``, and under DeepSpeed once a micro-batch of the step has
        backpropagated (its gradients are inside DeepSpeed's partitions; a resume or a restart continues
        without the records). Under ZeRO-3 the failing rank raises alone."""
        state = self.state
        if state.zero_stage == 3:
            self.own_failure = True
            raise failure
        if failure.__traceback__ is not None:  # its frames hold the failed forward's activations
            traceback.clear_frames(failure.__traceback__)
        found = None
        if not isinstance(failure, (RankFailed, torch.OutOfMemoryError, MemoryError)):
            try:
                found = self.records_failing_alone(idx, stage)
            except (torch.OutOfMemoryError, MemoryError):
                found = None
        not_data = dist.ranks_with(found is None and not isinstance(failure, RankFailed), state)
        if not_data:
            self.failure_agreed = True
            raise failure if found is None and not isinstance(failure, RankFailed) else RankFailed(not_data)
        self.found.update({i: f"fails inside a training step ({reason})" for i, reason in (found or {}).items()})
        self.share_found_records()
        if state.backend == "deepspeed" and not first_micro_batch:
            self.failure_agreed = True
            path = os.path.join(self.cfg.out, SKIPPED_FILE)
            then = (f"a resume or a restart of this run skips it ({path})" if self.skipped_listed else
                    f"it could not be listed in {path}: remove it from the data to go on")
            raise StepNotRedone(f"a record failed inside step {step + 1} after a micro-batch of it backpropagated, "
                                f"and under DeepSpeed the step cannot be redone in place; {then}")
        self.engine.drop_gradients()

    def records_failing_alone(self, idx: List[int], stage: Stage) -> Optional[Dict[int, str]]:
        """The records of ``idx`` that fail alone (collated and run one by one on the unwrapped module:
        forward and backward in one process, forward under ``no_grad`` in more, where a backward would enter
        the backends' collectives), each with its reason; None when the failure is not the data's. The
        gradients this leaves are dropped by the caller."""
        if stage.mode == "grpo":
            return None
        with_backward = not self.state.distributed

        def fails_alone(i: int) -> Optional[str]:
            try:
                with torch.enable_grad() if with_backward else torch.no_grad():
                    batch = to_device(self.collator([self.records[i]], mode=stage.mode), self.state.device)
                    out = self.engine.module(batch, stage=stage, num_items=count_items(stage.loss, batch["labels"]),
                                             indices=[i])
                    if with_backward:
                        out.loss.backward()
            except (torch.OutOfMemoryError, MemoryError):
                raise
            except Exception as e:
                return f"{type(e).__name__}: {first_line(e)}"
            return None

        reasons = {i: fails_alone(i) for i in dict.fromkeys(idx)}
        failed = {i: r for i, r in reasons.items() if r is not None}
        if not failed:
            return None
        if len(failed) == len(reasons):  # the model fails on everything, or these records do
            excluded = self.unusable | set(failed)
            if len(excluded) == len(self.records) or fails_alone(self.usable(idx, excluded)[0]) is not None:
                return None
        return failed
