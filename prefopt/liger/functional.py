"""Functional forms, as in ``liger_kernel.chunked_loss.functional``: each is the Function's ``apply``."""
from .grpo import LigerFusedLinearGRPOFunction
from .kto import LigerFusedLinearKTOFunction
from .preference import (
    LigerFusedLinearCPOFunction,
    LigerFusedLinearDPOFunction,
    LigerFusedLinearORPOFunction,
    LigerFusedLinearSimPOFunction,
)

liger_fused_linear_orpo = LigerFusedLinearORPOFunction.apply
liger_fused_linear_dpo = LigerFusedLinearDPOFunction.apply
liger_fused_linear_cpo = LigerFusedLinearCPOFunction.apply
liger_fused_linear_simpo = LigerFusedLinearSimPOFunction.apply
liger_fused_linear_kto = LigerFusedLinearKTOFunction.apply
liger_fused_linear_grpo = LigerFusedLinearGRPOFunction.apply
