"""The ``prefopt`` command: ``prefopt train|eval|export|study|bench|plan|demo [options]``; ``prefopt CMD --help`` for each."""
from __future__ import annotations

import importlib
import sys
from typing import List, Optional

COMMANDS = {
    "train": ("prefopt.train.cli", "train a (vision-)language model with DPO, CW-DPO, nSFT, SFT, SimPO, ORPO or GRPO"),
    "eval": ("prefopt.train.eval", "held-out evaluation of a model: preference and generation accuracy, "
             "hallucination, calibration, shift"),
    "export": ("prefopt.train.export", "a Hugging Face model folder from a checkpoint of prefopt train"),
    "study": ("prefopt.train.study", "the embedded comparison of the methods from one SFT base, with STUDY.md"),
    "bench": ("prefopt.bench.cli", "memory and throughput of the fused losses against the naive path and peers"),
    "plan": ("prefopt.train.plan", "will it fit? the peak GPU memory of a training step, term by term, from the config"),
    "demo": ("prefopt.demo", "the fused DPO loss against the naive path on random data: values and peak memory"),
}


def usage() -> str:
    lines = ["usage: prefopt COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<7} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Run 'prefopt COMMAND --help' for the options of each; 'prefopt train' alone runs the embedded default."]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"prefopt: unknown command {name!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
