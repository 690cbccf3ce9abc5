"""Parity with Liger-Kernel's chunked DPO module: switching is changing the import."""
import pytest
import torch

import prefopt
from test_op import assert_close

liger = pytest.importorskip("liger_kernel.chunked_loss")


@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_matches_liger(with_bias, beta, seed):
    pairs, length, hidden_size, vocab = 2, 9, 16, 67
    hidden = torch.randn(2 * pairs, length, hidden_size)
    weight = torch.randn(vocab, hidden_size) / hidden_size**0.5
    bias = torch.randn(vocab) * 0.1 if with_bias else None
    targets = torch.randint(0, vocab, (2 * pairs, length))
    targets[:, :3] = -100
    ref = (torch.randn(2 * pairs, length, hidden_size), torch.randn(vocab, hidden_size) / hidden_size**0.5,
           torch.randn(vocab) * 0.1 if with_bias else None)

    def run(module, parse):
        leaves = [t.clone().requires_grad_() for t in (weight, hidden) + ((bias,) if with_bias else ())]
        out = module(leaves[0], leaves[1], targets, leaves[2] if with_bias else None, *ref)
        loss, rewards = parse(out)
        loss.backward()
        return loss, rewards, [t.grad for t in leaves]

    theirs = run(liger.LigerFusedLinearDPOLoss(beta=beta, compiled=False, use_ref_model=True),
                 lambda out: (out[0], (out[1][5].mean(), out[1][6].mean())))
    ours = run(prefopt.FusedDPOLoss(beta=beta),
               lambda out: (out.loss, (out.metrics["rewards/chosen"], out.metrics["rewards/rejected"])))
    assert_close(ours[0], theirs[0], 1e-5, "loss", seed)
    for a, b in zip(ours[1], theirs[1]):
        assert_close(a, b, 1e-5, "rewards", seed)
    for a, b, name in zip(ours[2], theirs[2], ("weight", "hidden", "bias")):
        assert_close(a, b, 1e-5, f"d {name}", seed)
