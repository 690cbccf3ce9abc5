"""Liger-Kernel's chunked-loss API (``liger_kernel.chunked_loss``) on prefopt's fused op, name for name.

``from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss`` becomes
``from prefopt.liger import LigerFusedLinearDPOLoss``; constructor arguments, defaults, ``forward`` and
``Function.apply`` positional orders, return tuples and their meaning are Liger-Kernel 0.8.5's. The
shims translate arguments, call :func:`prefopt.linear_logprobs` once (never a ``[tokens, vocab]`` tensor)
and apply the objective from :mod:`prefopt.objectives`. The ``...Function`` classes expose Liger's
``.apply`` but are not ``torch.autograd.Function`` subclasses: autograd flows through prefopt's op.
Submodules carry Liger's names too (``prefopt.liger.dpo_loss.LigerFusedLinearDPOFunction``, ...).
``compiled`` and ``chunk_size`` are accepted and have no effect: the op streams over the vocabulary and
needs neither row chunks nor ``torch.compile``.

Where prefopt departs from Liger on purpose (Liger bugs), the shim's docstring says so: padded positions
of GRPO never reach the loss (Liger's ``luspo`` counts them at token level), and KTO's per-row ``kl [B]``
is applied row by row (Liger broadcasts it against each chunk).
"""
from . import functional
from .cpo_loss import LigerFusedLinearCPOFunction, LigerFusedLinearCPOLoss
from .dpo_loss import LigerFusedLinearDPOFunction, LigerFusedLinearDPOLoss
from .grpo_loss import LigerFusedLinearGRPOFunction, LigerFusedLinearGRPOLoss
from .kto_loss import LigerFusedLinearKTOFunction, LigerFusedLinearKTOLoss
from .orpo_loss import LigerFusedLinearORPOFunction, LigerFusedLinearORPOLoss
from .simpo_loss import LigerFusedLinearSimPOFunction, LigerFusedLinearSimPOLoss

__all__ = [
    "LigerFusedLinearDPOLoss", "LigerFusedLinearORPOLoss", "LigerFusedLinearSimPOLoss", "LigerFusedLinearCPOLoss",
    "LigerFusedLinearKTOLoss", "LigerFusedLinearGRPOLoss",
    "LigerFusedLinearDPOFunction", "LigerFusedLinearORPOFunction", "LigerFusedLinearSimPOFunction",
    "LigerFusedLinearCPOFunction", "LigerFusedLinearKTOFunction", "LigerFusedLinearGRPOFunction",
    "functional",
]
