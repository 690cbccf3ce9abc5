"""What a run reports (:class:`SummaryMixin`, a part of :class:`~prefopt.train.loop.Run`): ``OUT/metrics.jsonl``,
one line per step (strict JSON; a resumed run first drops the lines logged after its checkpoint), and the
summary ``prefopt train`` prints and returns."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional

from . import runfolder
from .step import peak_memory_mb

METRICS_FILE = "metrics.jsonl"


def _logged_step(line: str) -> float:
    """The step of a metrics.jsonl line (infinity for a line that does not parse: it is dropped)."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


class SummaryMixin:
    """The reporting methods of :class:`~prefopt.train.loop.Run` (they use its ``cfg``, ``state``,
    ``total_steps``, ``ref_mode``, ``problems``, ``checkpoint_path`` and ``model_folder``)."""

    def write_metrics(self, metrics: Dict[str, Any]) -> None:
        """One line of ``metrics.jsonl`` (strict JSON: a non-finite number is null)."""
        if self.state.is_main:
            line = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in metrics.items()}
            with open(os.path.join(self.cfg.out, METRICS_FILE), "a", encoding="utf-8") as f:
                f.write(json.dumps(line, allow_nan=False) + "\n")

    def truncate_metrics(self, step: int) -> None:
        """Drop the lines a killed run logged after its last checkpoint (they are trained again) and a final
        evaluation's line (the resumed run evaluates again)."""
        path = os.path.join(self.cfg.out, METRICS_FILE)
        if self.state.is_main and os.path.isfile(path):
            with open(path, encoding="utf-8", errors="replace") as f:
                lines = [ln for ln in f if _logged_step(ln) <= step and '"eval_' not in ln]
            with runfolder.open_nofollow(path + ".tmp", "w") as f:
                f.writelines(lines)
            os.replace(path + ".tmp", path)

    def summary(self, history: List[Dict[str, Any]], step: int, stopped_early: bool, wall: float,
                evaluation: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        """The held-out evaluation (``eval_*``, None without held-out data), then means over the last tenth
        of the steps (at least 5, all in the final stage) of loss and reward accuracy, the final probes, peak
        memory, mean throughput and where the checkpoint is."""
        final_stage = [m for m in history if m["stage"] == history[-1]["stage"]] if history else []
        tail = final_stage[-max(5, len(history) // 10):]

        def mean(key):  # over the steps that were applied (a non-finite one was not)
            values = [m[key] for m in tail if key in m and not m.get("nonfinite")]
            return sum(values) / len(values) if values else None

        probes = next((m for m in reversed(history) if "probe/delta_logp_chosen" in m), {})
        from .eval import EVAL_KEYS

        held_out = {f"eval_{k}": None if evaluation is None else evaluation[k] for k in EVAL_KEYS}
        return {
            "method": self.cfg.method,
            "model": self.cfg.model,
            **held_out,
            "eval_per_type": None if evaluation is None else evaluation["per_type"],
            "eval_n": 0 if evaluation is None else evaluation["n"],
            "steps": step,
            "total_steps": self.total_steps,
            "stopped_early": stopped_early,
            "loss": mean("loss"),
            "reward_accuracy": mean("rewards/accuracies"),
            "reward_margin": mean("rewards/margins"),
            "reward": mean("reward"),
            "reference": self.ref_mode,
            **{k: v for k, v in probes.items() if k.startswith("probe/")},
            "peak_memory_mb": max((m["peak_memory_mb"] for m in history), default=peak_memory_mb(self.state.device)),
            "tokens_per_second": mean("tokens_per_second"),
            "wall_seconds": wall,
            "checkpoint": self.checkpoint_path,
            "model_folder": getattr(self, "model_folder", None),
            "skipped_records": len(self.problems),
            "metrics": os.path.join(self.cfg.out, METRICS_FILE),
            "device": str(self.state.device),
            "world_size": self.state.world_size,
            "backend": self.state.backend + (f" ZeRO-{self.state.zero_stage}" if self.state.backend == "deepspeed" else ""),
        }
