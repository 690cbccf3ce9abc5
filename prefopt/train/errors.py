"""One-line error messages for the trainer's commands."""
import argparse


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message}\n")


def first_line(e: BaseException) -> str:
    """The first line of an exception's message, or its type's name when the message is empty."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class RankFailed(Exception):
    """Another rank's training step failed: every rank stops there together (that rank prints its error)."""

    def __init__(self, ranks):
        self.ranks = list(ranks)
        super().__init__(f"rank {', '.join(map(str, self.ranks))} failed in a training step "
                         "(its error is on its stderr)")


class StepNotRedone(Exception):
    """A record failed inside a step that cannot be redone in this process; ``OUT/skipped_records.json``
    lists it, and a resume or a restart of the run continues without it."""


#: ``prefopt train``'s exit code when a run stops as diverged (README: "Divergence").
DIVERGED_EXIT = 3


class Diverged(Exception):
    """The run stopped as diverged at ``step`` for ``reason``; ``checkpoint``: the last checkpoint it kept (finite
    and not collapsed), exported to ``model_folder``; both None when there is none."""

    def __init__(self, reason: str, step: int, checkpoint, model_folder):
        self.reason, self.step, self.checkpoint, self.model_folder = reason, step, checkpoint, model_folder
        kept = (f"kept {checkpoint}, exported to {model_folder}" if model_folder else
                "no earlier checkpoint, so no model was written")
        super().__init__(f"diverged at step {step}: {reason}; {kept}")
