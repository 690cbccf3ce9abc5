"""Delta-log-p probes: how the policy's likelihood of a fixed set of positives and negatives moves.

Preference training can lower the likelihood of the chosen answers along with the rejected ones (the
"squeezing" effect CW-DPO is built against). A probe set of held-out records is scored every K steps:
the mean per-token log-prob of its chosen answers (positives) and of its rejected answers (negatives),
logged relative to the start of training as ``probe/delta_logp_chosen`` and
``probe/delta_logp_rejected``. The optional early-stop rule ends training once the positives have
fallen more than a set number of nats per token below their starting value.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .data import PreferenceRecord


@dataclass
class ProbeResult:
    chosen: float  # mean per-token log-prob of the positives
    rejected: float  # ... of the negatives


class LogpProbe:
    """Scores a fixed probe set with the policy. ``measure(engine)`` runs the wrapped module's forward
    without a stage (per-row log-prob sums and token counts), on every rank (ZeRO-3 needs all of them),
    with gradients off and the model in eval mode."""

    def __init__(self, records: Sequence[PreferenceRecord], collator, *, batch_size: int, device: torch.device):
        self.records = [r for r in records if r.rejected is not None]
        if not self.records:
            raise ValueError("probe set: no record with a rejected answer")
        self.collator = collator
        self.batch_size = max(1, batch_size)
        self.device = device
        self.start: Optional[ProbeResult] = None

    @torch.no_grad()
    def measure(self, engine) -> ProbeResult:
        model = engine.module.model
        was_training = model.training
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64)
        counts = torch.zeros(2, dtype=torch.float64)
        for i in range(0, len(self.records), self.batch_size):
            part = self.records[i:i + self.batch_size]
            batch = {k: v.to(self.device) for k, v in self.collator(part, mode="pair").items()}
            logps, n = engine(batch)
            half = len(part)
            sums += torch.stack([logps[:half].sum(), logps[half:].sum()]).double().cpu()
            counts += torch.stack([n[:half].sum(), n[half:].sum()]).double().cpu()
        model.train(was_training)
        mean = (sums / counts.clamp(min=1)).tolist()
        return ProbeResult(chosen=mean[0], rejected=mean[1])

    def metrics(self, result: ProbeResult) -> Dict[str, float]:
        """The logged numbers; the first measurement becomes the start the deltas are relative to."""
        if self.start is None:
            self.start = result
        return {
            "probe/logp_chosen": result.chosen,
            "probe/logp_rejected": result.rejected,
            "probe/delta_logp_chosen": result.chosen - self.start.chosen,
            "probe/delta_logp_rejected": result.rejected - self.start.rejected,
        }


def should_stop(metrics: Dict[str, float], max_chosen_drop: Optional[float]) -> bool:
    """The early-stop rule: the positives' mean per-token log-prob fell more than ``max_chosen_drop``
    nats below its start (None: never stop)."""
    if max_chosen_drop is None or "probe/delta_logp_chosen" not in metrics:
        return False
    return metrics["probe/delta_logp_chosen"] < -max_chosen_drop


__all__: List[str] = ["LogpProbe", "ProbeResult", "should_stop"]
