"""One preference record, the unit every data source yields (:mod:`prefopt.train.sources`) and the synthetic
set makes (:mod:`prefopt.train.synthetic`): a module of its own, so that both import it and neither the other."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class PreferenceRecord:
    """One preference example. ``images``: paths, ``{"bytes", "path"}`` dicts or PIL images (in the order
    their tokens appear). ``messages``: the prompt as chat messages with typed content parts (TRL's
    conversational format), None for a plain-text ``prompt``; ``prompt`` then holds their text."""

    prompt: str
    chosen: str
    rejected: Optional[str] = None
    images: list = field(default_factory=list)
    corrections: List[str] = field(default_factory=list)
    where: str = ""  # SOURCE:ROW (FILE:LINE for JSONL) of a loaded record (what problems with it are reported as)
    messages: Optional[List[dict]] = None

    def __post_init__(self):
        if not isinstance(self.images, list):  # one image, or none
            self.images = [] if self.images is None else list(self.images) if isinstance(self.images, tuple) \
                else [self.images]


__all__ = ["PreferenceRecord"]
