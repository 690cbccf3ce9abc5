"""``python -m bench.vlm_profile [llava|qwen2-vl]``: where the time of one unshared and one shared DPO step of
``--preset vlm-step``'s model goes (torch.profiler on CPU, self time of every operator, grouped).

Groups: the reference's forward (a frozen copy, whole), the policy's vision tower (and projector), the
decoder's attention modules, its MLPs, the rest of the decoder
(embeddings, norms, residual adds, rotary and the attention mask it prepares), head/loss (the fused loss
module), the optimizer (AdamW's step and zero_grad), collation and mask building (the collator's call,
which builds the shared batch's block mask and positions), and the rest. Forward operators are grouped by
the module they run in (profiler ranges opened by forward hooks); a backward operator belongs to the group
of the forward operator it differentiates (the autograd node's sequence number). Each step runs once
unprofiled first (AdamW's state), then both are profiled, the collation included, in 3 alternating rounds;
per variant the round with the least total self time is kept (the machine is shared).
"""
from __future__ import annotations

import collections
import json
import sys
from typing import Dict

import torch
from torch.profiler import ProfilerActivity, profile, record_function

from .vlm_step import build, records

GROUPS = ("reference forward", "vision tower", "decoder attention", "decoder MLP", "decoder other", "head/loss",
          "optimizer", "collation/mask", "other")
EVALUATE = "autograd::engine::evaluate_function: "


def _scope(module, group: str) -> None:
    """Open profiler range ``group:...`` for each forward of ``module``."""
    ranges = []

    def enter(*_):
        ranges.append(record_function(f"group:{group}"))
        ranges[-1].__enter__()

    def leave(*_):
        ranges.pop().__exit__(None, None, None)

    module.register_forward_pre_hook(enter)
    module.register_forward_hook(leave)


def scope_model(adapter) -> None:
    """Profiler ranges around the vision tower, projector, decoder, its attention and MLP modules."""
    backbone = adapter.backbone
    for name in ("vision_tower", "visual", "multi_modal_projector"):
        if getattr(backbone, name, None) is not None:
            _scope(getattr(backbone, name), "vision tower")
    decoder = adapter.language_model
    _scope(decoder, "decoder other")
    for layer in decoder.layers:
        _scope(layer.self_attn, "decoder attention")
        _scope(layer.mlp, "decoder MLP")


def group_times(events) -> Dict[str, Dict[str, float]]:
    """Self CPU time (ms) per group and operator: a forward operator in the innermost ``group:`` range it ran
    in, a backward one in the group of the forward operator with its autograd sequence number."""
    def group_of(event, by_sequence) -> str:
        node = event
        while node is not None:
            if node.name.startswith("group:"):
                return node.name[len("group:"):]
            if node.name.startswith(EVALUATE):
                return by_sequence.get(node.sequence_nr, "other")
            node = node.cpu_parent
        return "other"

    by_sequence: Dict[int, str] = {}
    for event in events:  # forward operators first: their sequence numbers name the backward's groups
        if not event.name.startswith(EVALUATE) and event.sequence_nr >= 0:
            group = group_of(event, {})
            if group != "other" or event.sequence_nr not in by_sequence:
                by_sequence[event.sequence_nr] = group
    totals: Dict[str, Dict[str, float]] = collections.defaultdict(lambda: collections.defaultdict(float))
    for event in events:
        if event.name.startswith("group:"):
            continue
        totals[group_of(event, by_sequence)][event.name] += event.self_cpu_time_total / 1e3
    return totals


def profile_steps(family: str, batch_records: int = 2, rounds: int = 3) -> dict:
    from prefopt.train.data import PreferenceCollator
    from prefopt.train.methods import MethodOptions, PolicyObjective, build_method
    from prefopt.train.prefixes import SharedPrefixCollator
    from prefopt.train.reference import ModelReference
    from prefopt.train.step import count_items

    torch.manual_seed(0)
    policy, processor = build(family, 0)
    data = records(processor, batch_records, family)
    objective = PolicyObjective(policy, ModelReference(build(family, 1)[0]))
    stage = build_method("dpo", MethodOptions(), total_steps=10).stage_at(0)
    optimizer = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=1e-5)
    collators = {"unshared": PreferenceCollator(processor, max_length=4096),
                 "shared": SharedPrefixCollator(processor, max_length=4096)}
    scope_model(policy)
    _scope(stage.loss, "head/loss")
    _scope(objective.reference.adapter.backbone, "reference forward")

    def step(variant) -> None:
        with record_function("group:collation/mask"):
            batch = collators[variant](data, mode="pair")
        out = objective(batch, stage=stage, num_items=count_items(stage.loss, batch["labels"]))
        out.loss.backward()
        with record_function("group:optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    results = {}
    for variant in collators:
        step(variant)
    for _ in range(rounds):  # on a shared machine: per variant the round with the least total time
        for variant in collators:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(variant)
            totals = group_times(prof.events())
            grouped = {group: {"ms": sum(ops.values()), "top": sorted(ops.items(), key=lambda kv: -kv[1])[:4]}
                       for group, ops in totals.items()}
            if variant not in results or _total(grouped) < _total(results[variant]):
                results[variant] = grouped
    return results


def _total(grouped) -> float:
    return sum(g["ms"] for g in grouped.values())


def table(results: dict) -> str:
    lines = ["| group | unshared ms | shared ms | shared / unshared | top operators, shared (self ms) |",
             "|---|---:|---:|---:|---|"]
    total = {v: _total(results[v]) for v in results}
    for group in GROUPS:
        u, s = (results[v].get(group, {"ms": 0.0, "top": []}) for v in ("unshared", "shared"))
        ratio = f"{s['ms'] / u['ms']:.2f}x" if u["ms"] else "-"
        top = ", ".join(f"{name} {ms:.0f}" for name, ms in s["top"])
        lines.append(f"| {group} | {u['ms']:.0f} | {s['ms']:.0f} | {ratio} | {top} |")
    lines.append(f"| total | {total['unshared']:.0f} | {total['shared']:.0f} | "
                 f"{total['shared'] / total['unshared']:.2f}x | |")
    return "\n".join(lines)


if __name__ == "__main__":
    family = sys.argv[1] if len(sys.argv) > 1 else "llava"
    out = profile_steps(family)
    print(table(out))
    print(json.dumps(out))
