"""One process, plain DDP, or DeepSpeed ZeRO-2/3: the glue the training loop needs, behind one interface.

The loop never branches on the backend. It calls :func:`setup` once (reads the launcher's environment:
``torchrun`` and the ``deepspeed`` launcher both set ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``), builds its
:class:`~prefopt.train.loop.PolicyObjective` module and optimizer, and hands them to :func:`wrap`, which
returns an :class:`Engine` with ``forward`` / ``backward`` / ``step`` / ``no_sync``.

Why the loss is computed inside the wrapped module's ``forward``:

* plain DDP all-reduces the gradients of the parameters used in the wrapped module's forward; a loss
  computed outside it (on the hidden states it returned, with the head weight read directly) would
  leave the head's gradient un-reduced;
* under ZeRO-3 every parameter is partitioned and gathered by hooks around the forward (and backward) of
  the module that owns it. The fused op reads the head weight without running the head module, so the
  weight is registered as an *external parameter* of the wrapped module
  (``deepspeed.zero.register_external_parameter``): DeepSpeed gathers it when the wrapped module's
  forward starts, gathers it again for its backward, and its gradient is reduce-scattered into the
  partitioned parameter like any other (tests/test_train_deepspeed.py checks the trained weights against
  a one-process run).

Loss scale: every loss is normalised by the item count of the whole global batch (all micro-batches on
all ranks); DDP and DeepSpeed *average* gradients over ranks, so the loop multiplies the loss it
backpropagates by ``world_size``, and the sum over ranks is the one-process gradient.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import socket
import sys
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch
import torch.distributed as torch_dist
from torch import nn

ZERO_PRESETS = ("zero2", "zero3")


@dataclass
class DistState:
    """Where this process stands: ``backend`` is ``"single"``, ``"ddp"`` or ``"deepspeed"``."""

    backend: str = "single"
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    zero_stage: int = 0
    #: The group of the few host-side flags the ranks agree on every micro-batch: gloo, so that agreeing
    #: does not wait for the GPU's queued work (None: the default group, already gloo).
    control: Any = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend != "single"


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"``: this rank's GPU when CUDA is available, else the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available on this machine")
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    return dev


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_deepspeed_shm_build() -> None:
    """DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce (about 100 s on a fresh machine)
    that only its inference all-reduce uses; training over gloo does not need it, so skip the build."""
    import importlib

    try:  # not "import deepspeed.comm.torch as m": deepspeed.comm's attribute "torch" is torch itself
        ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    except ImportError:  # pragma: no cover
        return
    if hasattr(ds_torch_comm, "build_shm_op"):
        ds_torch_comm.build_shm_op = lambda: None


#: Default of ``--dist-timeout``: how long a collective waits for the other ranks before it fails.
DEFAULT_TIMEOUT_S = 1800.0


def setup(deepspeed: Optional[str], device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> DistState:
    """Initialise the process group from the launcher's environment and pick this rank's device.

    ``deepspeed``: None (plain: one process, or DDP when launched with several), ``"zero2"``,
    ``"zero3"`` or a DeepSpeed JSON config path. A DeepSpeed run without a launcher is a one-process
    group on a free local port. ``timeout_s``: a collective that waits longer for another rank (hung or
    dead) fails on every rank that waits, instead of hanging.
    """
    from datetime import timedelta

    timeout = timedelta(seconds=timeout_s)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    comm = "nccl" if dev.type == "cuda" else "gloo"
    if deepspeed:
        if "WORLD_SIZE" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(_free_port()))
        if dev.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
            _skip_deepspeed_shm_build()
        import deepspeed as ds

        if not torch_dist.is_initialized():
            ds.init_distributed(dist_backend=comm, timeout=timeout)
        return DistState("deepspeed", rank, world, local_rank, dev, control=_control_group(comm, timeout))
    if world > 1:
        if not torch_dist.is_initialized():
            torch_dist.init_process_group(backend=comm, device_id=dev if dev.type == "cuda" else None, timeout=timeout)
        return DistState("ddp", rank, world, local_rank, dev, control=_control_group(comm, timeout))
    return DistState("single", 0, 1, 0, dev)


def _control_group(comm: str, timeout):
    return torch_dist.new_group(backend="gloo", timeout=timeout) if comm != "gloo" else None


def teardown(state: DistState, wait: bool = True) -> None:
    """Leave the process group (after every rank got here, unless ``wait`` is False: an error path)."""
    if state.distributed and torch_dist.is_initialized():
        if wait:
            torch_dist.barrier()
        torch_dist.destroy_process_group()


def exit_without_teardown(code: int) -> None:
    """End this process with ``code`` now, after a collective failed (another rank hung or died): the process
    group cannot be left (its threads wait on that rank), and its destructors at interpreter exit abort the
    process (SIGABRT, "terminate called without an active exception") instead of returning ``code``."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


# ------------------------------------------------------------------------------------------ collectives


def all_reduce(values: List[float], state: DistState, op: str = "sum") -> List[float]:
    """Sum (or max) a few Python numbers over ranks."""
    if not state.distributed:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=state.device if state.device.type == "cuda" else "cpu")
    torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX if op == "max" else torch_dist.ReduceOp.SUM)
    return t.tolist()


def ranks_with(flag: bool, state: DistState) -> List[int]:
    """The ranks whose ``flag`` is set (every rank calls this; over the host-side control group)."""
    if not state.distributed:
        return [0] if flag else []
    t = torch.zeros(state.world_size, dtype=torch.int32)
    t[state.rank] = int(flag)
    torch_dist.all_reduce(t, group=state.control)
    return t.nonzero().flatten().tolist()


def all_gather_ints(values: List[int], state: DistState) -> List[List[int]]:
    """Every rank's list of integers, by rank (over the host-side control group)."""
    if not state.distributed:
        return [list(values)]
    size = torch.tensor([len(values)], dtype=torch.int64)
    torch_dist.all_reduce(size, op=torch_dist.ReduceOp.MAX, group=state.control)
    if int(size) == 0:  # the usual case (every step shares what it found): one collective, not two
        return [[] for _ in range(state.world_size)]
    mine = torch.full((int(size) + 1,), -1, dtype=torch.int64)
    mine[0] = len(values)
    mine[1:1 + len(values)] = torch.tensor(values, dtype=torch.int64)
    out = [torch.empty_like(mine) for _ in range(state.world_size)]
    torch_dist.all_gather(out, mine, group=state.control)
    return [t[1:1 + int(t[0])].tolist() for t in out]


def all_gather_object(obj: Any, state: DistState) -> List[Any]:
    if not state.distributed:
        return [obj]
    out: List[Any] = [None] * state.world_size
    torch_dist.all_gather_object(out, obj)
    return out


def barrier(state: DistState) -> None:
    if state.distributed:
        torch_dist.barrier()


def gathered(params, state: DistState):
    """Context in which ZeRO-3-partitioned ``params`` hold their full data (read-only); a no-op otherwise."""
    params = [p for p in params if p is not None]
    if state.zero_stage != 3 or not params:
        return contextlib.nullcontext()
    import deepspeed as ds

    return ds.zero.GatheredParameters(params, modifier_rank=None)


# ------------------------------------------------------------------------------------------ DeepSpeed config


def deepspeed_config(spec: str, *, micro_batch: int, grad_accum: int, world_size: int, max_grad_norm: float,
                     dtype: torch.dtype) -> Dict[str, Any]:
    """The DeepSpeed config for ``spec`` (``zero2``, ``zero3`` or a JSON file whose ``"auto"`` values are
    filled from the trainer's options, as in transformers). Batch sizes and clipping always come from the
    trainer's options; a file that sets them to other values is an error."""
    if spec in ZERO_PRESETS:
        config: Dict[str, Any] = {"zero_optimization": {"stage": int(spec[-1])}}
    else:
        if not os.path.isfile(spec):
            raise ValueError(f"--deepspeed: expected zero2, zero3 or a JSON config file, got {spec!r}")
        try:
            with open(spec, encoding="utf-8") as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"--deepspeed {spec}: invalid JSON ({e.msg}, line {e.lineno})") from None
        if not isinstance(config, dict):
            raise ValueError(f"--deepspeed {spec}: expected a JSON object")
    ours = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch * grad_accum * world_size,
        "gradient_clipping": max_grad_norm,
    }
    for key, value in ours.items():
        if config.get(key, "auto") not in ("auto", value):
            raise ValueError(f"--deepspeed: {key}={config[key]!r} in the config, but the trainer's options give {value!r}")
        config[key] = value
    precision = {"bf16": {"enabled": dtype == torch.bfloat16}, "fp16": {"enabled": dtype == torch.float16}}
    for key, value in precision.items():
        section = config.setdefault(key, {})
        if section.get("enabled", "auto") == "auto":
            section["enabled"] = value["enabled"]
    if config["fp16"]["enabled"]:
        raise ValueError("--deepspeed: fp16 with loss scaling is not supported by prefopt's trainer; use bf16 or fp32")
    if "optimizer" in config or "scheduler" in config:
        raise ValueError("--deepspeed: leave 'optimizer' and 'scheduler' out of the config (the trainer brings AdamW "
                         "and its cosine schedule)")
    config.setdefault("zero_optimization", {}).setdefault("stage", 0)
    config["zero_allow_untested_optimizer"] = True  # the client optimizer is torch's AdamW
    config.setdefault("steps_per_print", 2**31 - 1)
    config.setdefault("wall_clock_breakdown", False)
    return config


# ------------------------------------------------------------------------------------------ the engine


class Engine:
    """The wrapped training module with one interface for every backend.

    ``forward(*args, **kwargs)`` runs the wrapped module; ``backward(loss)`` backpropagates (the loss is
    already normalised for the whole accumulated global batch); ``no_sync()`` is entered for every
    micro-batch but the last of a step (DDP skips the all-reduce there); ``step()`` clips the gradient
    norm, steps optimizer and scheduler (unless the step is not finite), zeroes the gradients.
    ``module`` is the unwrapped module.
    """

    def __init__(self, state: DistState, module: nn.Module, optimizer, scheduler, max_grad_norm: float,
                 wrapped=None):
        self.state = state
        self.module = module
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.max_grad_norm = max_grad_norm
        self.wrapped = wrapped if wrapped is not None else module
        self.grad_norm = float("nan")  # the last step's pre-clip gradient norm

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    __call__ = forward

    def backward(self, loss: torch.Tensor) -> None:
        if self.state.backend == "deepspeed":
            # The loss already carries the accumulation normalisation: no division by the step count.
            self.wrapped.backward(loss, scale_wrt_gas=False)
        else:
            loss.backward()

    def no_sync(self):
        if self.state.backend == "ddp":
            return self.wrapped.no_sync()
        return contextlib.nullcontext()

    def drop_gradients(self) -> None:
        """Forget the gradients of a step that is abandoned before its optimizer step (every rank at once;
        not under DeepSpeed once a micro-batch has backpropagated). A DDP wrapper is rebuilt: after a
        forward whose backward never ran, its reducer would refuse the next forward."""
        self.optimizer.zero_grad(set_to_none=True)
        if self.state.backend == "ddp":
            self.wrapped._remove_autograd_hooks()
            self.wrapped = _ddp(self.state, self.module)

    def micro_step(self) -> None:
        """DeepSpeed counts micro-batches itself and steps at its accumulation boundary."""
        if self.state.backend == "deepspeed":
            self.wrapped.step()

    def step(self, loss_finite: bool = True) -> bool:
        """Clip, optimizer, scheduler, zero_grad; :attr:`grad_norm` is the pre-clip norm. Returns whether the
        step was applied: one whose loss (``loss_finite``, agreed over ranks by the caller) or gradient norm is
        not finite changes nothing (no optimizer or scheduler step; gradients dropped). DeepSpeed decides on
        the norm itself (its overflow flag, all-reduced over ranks; bf16's ``check_grad_overflow`` is on by
        default) and is told to discard a step whose loss is not finite (:func:`_discarded_by_zero`); either
        way it keeps weights, optimizer and scheduler as they were."""
        if self.state.backend == "deepspeed":
            with contextlib.nullcontext() if loss_finite else _discarded_by_zero(self.wrapped.optimizer):
                self.wrapped.step()  # the boundary micro-batch: clip, optimizer, scheduler, zero_grad
            applied = bool(getattr(self.wrapped, "_step_applied", True))
            if applied and not loss_finite:  # a DeepSpeed whose ZeRO optimizer no longer takes that path
                raise RuntimeError(f"--deepspeed: {type(self.wrapped.optimizer).__name__} applied a step whose loss "
                                   "is not finite")
            norm = self.wrapped.get_global_grad_norm()
            self.grad_norm = float(norm) if norm is not None else float("nan")
            return applied
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm > 0 else float("inf"))
        self.grad_norm = float(norm)
        applied = loss_finite and math.isfinite(self.grad_norm)
        if applied:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return applied

    @property
    def learning_rate(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])


@contextlib.contextmanager
def _discarded_by_zero(optimizer):
    """Make DeepSpeed's ZeRO optimizer (stages 1-3) discard the step taken inside, as it discards one whose
    gradients overflowed: each hands its overflow verdict to ``_update_scale`` (a static loss scale's, as
    prefopt's bf16/fp32 have, updates nothing) and then, on overflow, clears the gradients and steps nothing;
    the engine counts the step as skipped and leaves the scheduler. Every rank enters this together (the
    loss it follows is all-reduced), so the collectives stay matched. ``RuntimeError`` before the step for
    an optimizer without that path (ZeRO stage 0 from a JSON config)."""
    if not hasattr(optimizer, "_update_scale"):
        raise RuntimeError(f"--deepspeed: cannot discard a step whose loss is not finite with "
                           f"{type(optimizer).__name__} (ZeRO stages 1-3 can)")

    def overflowed(has_overflow=False):
        optimizer.overflow = True

    optimizer._update_scale = overflowed
    try:
        yield
    finally:
        del optimizer._update_scale


def wrap(state: DistState, module: nn.Module, optimizer, scheduler, *, max_grad_norm: float,
         deepspeed_spec: Optional[str] = None, micro_batch: int = 1, grad_accum: int = 1,
         dtype: torch.dtype = torch.float32, head_params=()) -> Engine:
    """Wrap ``module`` (whose forward computes the loss) for ``state``'s backend."""
    if state.backend == "single":
        return Engine(state, module, optimizer, scheduler, max_grad_norm)
    if state.backend == "ddp":
        return Engine(state, module, optimizer, scheduler, max_grad_norm, wrapped=_ddp(state, module))
    import deepspeed as ds

    config = deepspeed_config(deepspeed_spec, micro_batch=micro_batch, grad_accum=grad_accum,
                              world_size=state.world_size, max_grad_norm=max_grad_norm, dtype=dtype)
    state.zero_stage = int(config["zero_optimization"]["stage"])
    if state.zero_stage == 3:
        for p in head_params:
            if p is not None:
                ds.zero.register_external_parameter(module, p)
    engine, ds_optimizer, _, ds_scheduler = ds.initialize(
        model=module, optimizer=optimizer, lr_scheduler=scheduler, config=config
    )
    return Engine(state, module, ds_optimizer, ds_scheduler, max_grad_norm, wrapped=engine)


def _ddp(state: DistState, module: nn.Module) -> nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    # find_unused_parameters: a text-only batch leaves a VLM's vision tower without gradients.
    return DistributedDataParallel(module, device_ids=[state.device.index] if state.device.type == "cuda" else None,
                                   find_unused_parameters=True)


def wrap_frozen(state: DistState, model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """A frozen model (the separate reference policy) for ``state``: under ZeRO-3 it is partitioned like
    the policy (a DeepSpeed engine without optimizer, as TRL does); otherwise every rank keeps a copy."""
    if state.backend != "deepspeed" or state.zero_stage != 3:
        return model
    import deepspeed as ds

    config = {
        "train_micro_batch_size_per_gpu": 1,
        "zero_optimization": {"stage": 3},
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 2**31 - 1,
    }
    engine, *_ = ds.initialize(model=model, config=config)
    engine.eval()
    return engine.module
