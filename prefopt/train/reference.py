"""The reference policy, three ways (the memory lever of preference training).

``model``
    A separate frozen copy of the policy (built like it, LoRA structure included). Two models in memory.
    Under ZeRO-3 the copy is partitioned like the policy.
``adapters``
    The policy itself with its LoRA adapters disabled (needs ``--lora``): one model in memory, and the
    reference's head is the policy's (frozen) head.
``precompute``
    One pass of the policy writes every training example's per-sequence reference log-prob sums (chosen
    and rejected) to ``reference_logps-<step>.safetensors`` in the run folder, keyed by example index;
    the losses then take ``ref_logps``. One model in memory, and no reference forward while training.
    It cannot serve nSFT (its per-token KL needs the reference's hidden states) nor on-policy negatives
    (sampled while training, so not in the file).

The reference is the policy as it was at the method's *reference point*: the start of training, or for
CW-DPO the end of stage 1 (SFT-C), so that stage 2's implicit rewards measure what stage 2 changes. At a
reference point after step 0 the policy's trainable parameters are saved to
``reference-<step>.safetensors`` (so a resumed run rebuilds the same reference) and

* ``model`` loads them into its copy;
* ``adapters`` merges the LoRA update into the (frozen) base weights and zeroes the adapters' B, so the
  policy is unchanged and "adapters off" is now the stage-1 policy (AdamW moments carry over);
* ``precompute`` runs its pass again with the current policy.

All three give the same loss on the same batch (tests/test_train_loop.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from typing import Dict, Optional, Sequence

import torch
from torch import Tensor

from .data import PreferenceRecord
from .sources import image_key
from .distributed import DistState, all_gather_object, barrier, gathered
from .faultpoints import fault_point

MODES = ("model", "adapters", "precompute")


class Reference:
    """What the losses take from the reference: ``loss_inputs(batch, indices, hidden=...)`` returns the
    keyword arguments of the fused loss (``ref_hidden``/``ref_weight``/``ref_bias`` or ``ref_logps``).
    Called under ``torch.no_grad()`` inside the wrapped module's forward."""

    mode = ""

    def loss_inputs(self, batch: Dict[str, Tensor], indices: Optional[Sequence[int]], *, hidden: bool) -> Dict[str, Tensor]:
        raise NotImplementedError


class ModelReference(Reference):
    """A separate frozen model (a :class:`~prefopt.train.models.ModelAdapter`)."""

    mode = "model"

    def __init__(self, adapter, state: Optional[DistState] = None, snapshot: Optional[Dict[str, Tensor]] = None):
        if snapshot:
            load_into(adapter.model, snapshot)
        adapter.model.requires_grad_(False)
        adapter.model.eval()
        self.adapter = adapter
        self.state = state or DistState()

    def loss_inputs(self, batch, indices, *, hidden):
        ref_hidden = self.adapter.hidden_states(**batch)
        head = self.adapter.head()
        weight, bias = head.weight, head.bias
        if self.state.zero_stage == 3:
            # The copy is partitioned too: hold its whole head for the fused op's pass (and for nSFT's
            # backward, which recomputes the reference logits).
            with gathered([weight, bias], self.state):
                weight = weight.detach().clone()
                bias = None if bias is None else bias.detach().clone()
        return {"ref_hidden": ref_hidden, "ref_weight": weight, "ref_bias": bias}


class AdapterReference(Reference):
    """The policy with its LoRA adapters disabled; the head is shared (LoRA leaves it frozen)."""

    mode = "adapters"

    def __init__(self, policy, state: Optional[DistState] = None, snapshot: Optional[Dict[str, Tensor]] = None):
        if not policy.has_adapters:
            raise ValueError("--reference adapters: the policy has no LoRA adapters (add --lora, or use "
                             "--reference model or precompute)")
        self.policy = policy
        if snapshot:
            merge_adapters(policy.model, snapshot, state or DistState())

    def loss_inputs(self, batch, indices, *, hidden):
        with self.policy.disable_adapters():
            ref_hidden = self.policy.hidden_states(**batch)
        return {"ref_hidden": ref_hidden}  # ref_weight defaults to the policy's head weight


class PrecomputedReference(Reference):
    """Per-sequence reference log-prob sums from the precompute pass: ``chosen[i]``, ``rejected[i]``
    for training example ``i``."""

    mode = "precompute"

    def __init__(self, chosen: Tensor, rejected: Tensor):
        self.chosen, self.rejected = chosen, rejected

    def loss_inputs(self, batch, indices, *, hidden):
        if hidden:
            raise ValueError("--reference precompute: nSFT's per-token KL needs the reference's hidden states; "
                             "use --reference model or adapters")
        if indices is None:
            raise ValueError("precomputed reference log-probs need the batch's example indices")
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        return {"ref_logps": torch.cat([self.chosen[idx], self.rejected[idx]]).to(batch["labels"].device)}


# ------------------------------------------------------------------------------------------ snapshots


def load_into(model: torch.nn.Module, snapshot: Dict[str, Tensor]) -> None:
    """Copy ``snapshot`` (parameter name -> tensor) into ``model``'s parameters of the same names."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in snapshot.items():
            if name not in params:
                raise ValueError(f"reference snapshot: parameter {name} is not in the reference model")
            params[name].copy_(value)


def merge_adapters(model: torch.nn.Module, snapshot: Dict[str, Tensor], state: DistState) -> None:
    """Fold the LoRA update held in ``snapshot`` into the base weights and zero the live adapters' B:
    the policy's function is unchanged, and the model with adapters off becomes the snapshot's policy."""
    from peft.tuners.lora import LoraLayer

    modify = _modify_context(state)
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        for adapter in module.lora_A:
            a = snapshot[f"{name}.lora_A.{adapter}.weight"].float()
            b = snapshot[f"{name}.lora_B.{adapter}.weight"].float()
            base, live_b = module.get_base_layer().weight, module.lora_B[adapter].weight
            with torch.no_grad(), modify([base, live_b]):
                delta = (b @ a) * module.scaling[adapter]
                if getattr(module, "fan_in_fan_out", False):
                    delta = delta.T
                base.add_(delta.to(base.device, base.dtype))
                live_b.zero_()
            if state.backend == "deepspeed":
                # DeepSpeed's optimizer steps its own fp32 copy of every trainable weight and copies it back
                # into the module: zero B there too, or the next step would restore it.
                from deepspeed.utils import safe_set_full_fp32_param

                shape = tuple(getattr(live_b, "ds_shape", live_b.shape))
                safe_set_full_fp32_param(live_b, torch.zeros(shape, dtype=torch.float32, device=state.device))


def _modify_context(state: DistState):
    """Context factory in which ZeRO-3 parameters are whole and rank 0's changes are kept."""
    if state.zero_stage != 3:
        import contextlib

        return lambda params: contextlib.nullcontext()
    import deepspeed as ds

    return lambda params: ds.zero.GatheredParameters(params, modifier_rank=0)


# ------------------------------------------------------------------------------------------ precompute


def fingerprint(records: Sequence[PreferenceRecord], model: str, seed: int, point: int) -> str:
    """Identifies the training set, initial model and reference point a precompute file belongs to."""
    h = hashlib.sha256(f"{model}\0{seed}\0{point}\0{len(records)}".encode())
    for r in records:
        h.update(json.dumps([r.prompt, r.chosen, r.rejected, [image_key(i) for i in r.images]]).encode())
    return h.hexdigest()[:32]


@torch.no_grad()
def precompute_logps(engine, records: Sequence[PreferenceRecord], collator, *, batch_size: int,
                     state: DistState, progress=None) -> Dict[str, Tensor]:
    """Per-sequence log-prob sums of every record's chosen and rejected answer under the current policy,
    through the wrapped module's forward (so ZeRO-3 gathers what it needs), model in eval mode. Ranks
    split the records, run the same number of batches, and gather the results."""
    mine = list(range(state.rank, len(records), state.world_size))
    per_rank = -(-len(records) // state.world_size)
    model = engine.module.model
    was_training = model.training
    model.eval()
    results: Dict[int, tuple] = {}
    for start in range(0, per_rank, batch_size):
        idx = mine[start:start + batch_size]
        # Every rank runs every batch (ZeRO-3 forwards are collective); a short rank repeats a record.
        run = idx if idx else mine[:1] or [0]
        batch = {k: v.to(state.device) for k, v in collator([records[i] for i in run], mode="pair").items()}
        logps, _ = engine(batch)
        logps = logps.float().cpu()
        for j, i in enumerate(idx):
            results[i] = (float(logps[j]), float(logps[len(run) + j]))
        if progress is not None:
            progress.update(min(batch_size * state.world_size, len(records) - progress.n))
    model.train(was_training)
    merged: Dict[int, tuple] = {}
    for part in all_gather_object(results, state):
        merged.update(part)
    chosen = torch.tensor([merged[i][0] for i in range(len(records))], dtype=torch.float32)
    rejected = torch.tensor([merged[i][1] for i in range(len(records))], dtype=torch.float32)
    return {"chosen": chosen, "rejected": rejected}


def save_tensors(path: str, tensors: Dict[str, Tensor], state: DistState, metadata: Optional[Dict[str, str]] = None) -> None:
    """Rank 0 writes a safetensors file atomically, never through a link: into a new folder of its own
    beside ``path`` (``.<name>.<random>.tmp``, made by ``mkdtemp``: no entry in it can be planted), then
    renamed to ``path``; every rank waits."""
    from safetensors.torch import save_file

    if state.is_main:
        folder = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path))
        try:
            tmp = os.path.join(folder, os.path.basename(path))
            fault_point(tmp)
            save_file({k: v.contiguous() for k, v in tensors.items()}, tmp, metadata=metadata)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    barrier(state)


def load_tensors(path: str, fp: Optional[str] = None) -> Optional[Dict[str, Tensor]]:
    """The file's tensors (None if it does not exist); ``ValueError`` if its fingerprint is not ``fp``."""
    if not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own error type for a file that is not safetensors
        raise ValueError(f"{path}: unreadable ({str(e).strip()[:100]})") from None
    if fp is not None and metadata.get("fingerprint") != fp:
        raise ValueError(f"{path}: precomputed reference log-probs of another dataset, model or reference "
                         "point; delete it or use a new --out")
    return tensors


def check_mode(mode: str, method, *, lora: bool, qlora: bool = False) -> None:
    """``ValueError`` for a reference mode that cannot serve ``method`` (with ``qlora``: a 4-bit backbone)."""
    if mode not in MODES:
        raise ValueError(f"--reference: expected one of {', '.join(MODES)}, got {mode!r}")
    if qlora and mode == "model":
        raise ValueError("--reference model: not with --qlora (its reference is the 4-bit policy with its adapters "
                         "off, one model in memory); use --reference adapters or precompute")
    if qlora and mode == "adapters" and method.reference_point:
        raise ValueError(f"--qlora: {method.name} takes its reference at step {method.reference_point}, which merges "
                         "the adapters into the base weights, and 4-bit weights take no merge; use --reference "
                         "precompute (with --onpolicy-fraction 0) or a method whose reference is the start")
    if mode == "adapters" and not lora:
        raise ValueError("--reference adapters needs --lora (the reference is the policy with its adapters off)")
    if mode == "precompute":
        if method.reference == "hidden":
            raise ValueError(f"--reference precompute cannot serve {method.name}: its per-token KL needs the "
                             "reference's hidden states; use --reference model or adapters")
        if method.onpolicy:
            raise ValueError("--reference precompute cannot score on-policy negatives (they are sampled while "
                             "training); add --onpolicy-fraction 0 or use --reference model or adapters")


__all__ = ["MODES", "Reference", "ModelReference", "AdapterReference", "PrecomputedReference", "load_into",
           "merge_adapters", "precompute_logps", "save_tensors", "load_tensors", "check_mode", "fingerprint"]
