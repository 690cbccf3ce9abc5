"""Stopping a run without losing it: signals and the checkpoint cadence (what a run folder may hold: runfolder.py).

* SIGINT (Ctrl-C) or SIGTERM (a scheduler's notice): the first asks the loop to stop at the next step
  boundary, where it writes a checkpoint and exits with one line naming it and the command to resume
  (exit code 128 + the signal's number); a second signal exits at once, without a checkpoint (the
  previous one stays intact). Under DDP/DeepSpeed the flag is all-reduced every step, so every rank
  stops at the same step.
* Cadence: besides ``--save-every`` steps, a checkpoint is written once ``--save-minutes`` (default 30)
  have passed since the last one, so no failure loses more than that much training; the end of a run, an
  early stop, an interrupt and (in one process) an exception write one too.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

from . import distributed as dist
from .faultpoints import fault_point

#: Records found failing inside a step, kept beside the checkpoints: a restart (the same data, so they still
#: fail) or a resume skips them.
SKIPPED_FILE = "skipped_records.json"


class Interrupted(Exception):
    """The run stopped on a signal after writing ``checkpoint`` at ``step``."""

    def __init__(self, signum: int, step: int, total: int, checkpoint: Optional[str]):
        self.signum, self.step, self.total, self.checkpoint = signum, step, total, checkpoint
        super().__init__(f"{signal.Signals(signum).name} at step {step}/{total}")


class StopSignals:
    """Context in which SIGINT and SIGTERM set :attr:`signum` instead of stopping the process."""

    def __init__(self, is_main: bool = True):
        self.signum: Optional[int] = None
        self.is_main = is_main
        self._old = {}

    def _handle(self, signum, frame):
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"prefopt train: second {name}: exiting now without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        if self.is_main:
            print(f"prefopt train: {name}: stopping with a checkpoint after this step (again to exit at once)",
                  file=sys.stderr, flush=True)

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in (signal.SIGINT, signal.SIGTERM):
                self._old[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)


class Cadence:
    """When to checkpoint besides the run's end: every ``every`` steps and ``minutes`` after the last."""

    def __init__(self, every: int, minutes: float):
        self.every, self.seconds = every, minutes * 60
        self.last = time.monotonic()

    def saved(self) -> None:
        self.last = time.monotonic()

    def due(self, done: int) -> bool:
        return bool(self.every and done % self.every == 0) or (self.seconds > 0
                                                               and time.monotonic() - self.last >= self.seconds)


def at_boundary(signals: StopSignals, cadence: Cadence, done: int, state: dist.DistState):
    """(signal number or 0, checkpoint due): agreed over ranks (rank 0's clock decides the cadence)."""
    fault_point(f"step-{done}")
    signum, due = signals.signum or 0, cadence.due(done) and state.is_main
    if state.distributed:
        signum, due = dist.all_reduce([signum, float(due)], state, op="max")
    return int(signum), bool(due)


__all__ = ["Interrupted", "StopSignals", "Cadence", "at_boundary"]
