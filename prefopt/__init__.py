"""prefopt: fused kernels for memory-efficient preference optimisation of (vision-)language models.

The fused op :func:`linear_logprobs` turns hidden states and an output head into per-token statistics
without ever holding the ``[tokens, vocab]`` logits; the losses in :mod:`prefopt.losses` build every
objective of :mod:`prefopt.objectives` on it.
"""
from . import objectives
from .losses import (
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
from .ops import TokenStats, linear_logprobs

__version__ = "0.1.0"

__all__ = [
    "linear_logprobs", "TokenStats", "sequence_logps", "LossOutput", "FusedLoss", "objectives",
    "FusedDPOLoss", "FusedCWDPOLoss", "FusedSimPOLoss", "FusedORPOLoss", "FusedSFTCLoss", "FusedSFTLoss",
    "FusedNSFTLoss", "FusedGRPOLoss",
    "fused_dpo_loss", "fused_cwdpo_loss", "fused_simpo_loss", "fused_orpo_loss", "fused_sftc_loss",
    "fused_sft_loss", "fused_nsft_loss", "fused_grpo_loss",
]
