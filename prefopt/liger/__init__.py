"""Liger-Kernel's chunked-loss API (``liger_kernel.chunked_loss``) on prefopt's fused op, name for name.

``from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss`` becomes
``from prefopt.liger import LigerFusedLinearDPOLoss``; constructor arguments, defaults, ``forward`` and
``Function.apply`` positional orders, return tuples and their meaning are Liger-Kernel 0.8.5's. The
shims translate arguments, call :func:`prefopt.linear_logprobs` once (never a ``[tokens, vocab]`` tensor)
and apply the objective from :mod:`prefopt.objectives`. The ``...Function`` classes expose Liger's
``.apply`` but are not ``torch.autograd.Function`` subclasses: autograd flows through prefopt's op.
``compiled`` and ``chunk_size`` are accepted and have no effect: the op streams over the vocabulary and
needs neither row chunks nor ``torch.compile``.

Where prefopt departs from Liger on purpose (Liger bugs), the shim's docstring says so: padded positions
of GRPO never reach the loss (Liger's ``luspo`` counts them at token level), and KTO's per-row ``kl [B]``
is applied row by row (Liger broadcasts it against each chunk).
"""
from . import functional
from .grpo import LigerFusedLinearGRPOFunction, LigerFusedLinearGRPOLoss
from .kto import LigerFusedLinearKTOFunction, LigerFusedLinearKTOLoss
from .preference import (
    LigerFusedLinearCPOFunction,
    LigerFusedLinearCPOLoss,
    LigerFusedLinearDPOFunction,
    LigerFusedLinearDPOLoss,
    LigerFusedLinearORPOFunction,
    LigerFusedLinearORPOLoss,
    LigerFusedLinearSimPOFunction,
    LigerFusedLinearSimPOLoss,
)

__all__ = [
    "LigerFusedLinearDPOLoss", "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss", "LigerFusedLinearCPOLoss",
    "LigerFusedLinearKTOLoss", "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearDPOFunction", "LigerFusedLinearORPOFunction", "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearCPOFunction", "LigerFusedLinearKTOFunction", "LigerFusedLinearGRPOFunction",
    "functional",
]
