"""prefopt: fused kernels for memory-efficient preference optimisation of (vision-)language models.

The fused op :func:`linear_logprobs` turns hidden states and an output head into per-token statistics
without ever holding the ``[tokens, vocab]`` logits; the losses in :mod:`prefopt.losses` build every
objective of :mod:`prefopt.objectives` on it.
"""
import importlib.machinery
import importlib.util
import os
import sys


def _kernels_from_checkout():
    """Maps ``prefopt.kernels`` to the checkout's top-level ``kernels/`` when prefopt was not installed.

    setup.py installs ``kernels/`` as ``prefopt.kernels``; a copied checkout (the GPU machine's, or
    ``python -m bench`` from the root) has no such folder inside the package. ``kernels/`` carries no
    ``__init__.py`` on purpose: a folder without one never shadows the PyPI package ``kernels`` that
    transformers imports, even with the checkout's root first on ``sys.path``.
    """
    if importlib.util.find_spec(__name__ + ".kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    if not os.path.isdir(folder):
        return
    spec = importlib.machinery.ModuleSpec(__name__ + ".kernels", None, is_package=True)
    spec.submodule_search_locations = [folder]
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    setattr(sys.modules[__name__], "kernels", module)


_kernels_from_checkout()

from . import objectives  # noqa: E402
from .losses import (  # noqa: E402
    FusedCWDPOLoss,
    FusedDPOLoss,
    FusedGRPOLoss,
    FusedLoss,
    FusedNSFTLoss,
    FusedORPOLoss,
    FusedSFTCLoss,
    FusedSFTLoss,
    FusedSimPOLoss,
    LossOutput,
    fused_cwdpo_loss,
    fused_dpo_loss,
    fused_grpo_loss,
    fused_nsft_loss,
    fused_orpo_loss,
    fused_sft_loss,
    fused_sftc_loss,
    fused_simpo_loss,
    sequence_logps,
)
from .ops import TokenStats, linear_logprobs  # noqa: E402
from .ops.objective import ObjectiveOutput, linear_objective  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs", "linear_objective", "ObjectiveOutput", "TokenStats", "sequence_logps", "LossOutput", "FusedLoss", "objectives",
    "FusedDPOLoss", "FusedCWDPOLoss", "FusedSimPOLoss", "FusedORPOLoss", "FusedSFTCLoss", "FusedSFTLoss",
    "FusedNSFTLoss", "FusedGRPOLoss",
    "fused_dpo_loss", "fused_cwdpo_loss", "fused_simpo_loss", "fused_orpo_loss", "fused_sftc_loss",
    "fused_sft_loss", "fused_nsft_loss", "fused_grpo_loss",
]
