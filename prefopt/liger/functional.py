"""Functional forms, as in ``liger_kernel.chunked_loss.functional``: each is the Function's ``apply``."""
from .cpo_loss import LigerFusedLinearCPOFunction
from .dpo_loss import LigerFusedLinearDPOFunction
from .grpo_loss import LigerFusedLinearGRPOFunction
from .kto_loss import LigerFusedLinearKTOFunction
from .orpo_loss import LigerFusedLinearORPOFunction
from .simpo_loss import LigerFusedLinearSimPOFunction

liger_fused_linear_orpo = LigerFusedLinearORPOFunction.apply
liger_fused_linear_dpo = LigerFusedLinearDPOFunction.apply
liger_fused_linear_cpo = LigerFusedLinearCPOFunction.apply
liger_fused_linear_simpo = LigerFusedLinearSimPOFunction.apply
liger_fused_linear_kto = LigerFusedLinearKTOFunction.apply
liger_fused_linear_grpo = LigerFusedLinearGRPOFunction.apply
