"""torch's intra-op thread count for the trainer's commands (train, eval, study): one thread for the embedded
tiny models on the CPU, and the caller's count given back afterwards."""
from __future__ import annotations

import contextlib
import os

import torch

from .models import TINY_MODELS


@contextlib.contextmanager
def keep_num_threads():
    """Context that gives torch's intra-op thread count back as it found it: the commands may set one thread
    for the tiny models, and an in-process caller keeps its own."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_thread_for_tiny_models(model: str, device: str) -> None:
    """One intra-op thread for an embedded tiny model on the CPU unless OMP_NUM_THREADS says otherwise: its
    matrices are too small to share, and on a busy machine a second thread waits for a core on every product
    (the default main job, measured on 2 shared cores: 78 s with 2 threads, 10 s with 1)."""
    if model in TINY_MODELS and device in ("auto", "cpu") and "OMP_NUM_THREADS" not in os.environ and (
            device == "cpu" or not torch.cuda.is_available()):
        torch.set_num_threads(1)


__all__ = ["keep_num_threads", "one_thread_for_tiny_models"]
