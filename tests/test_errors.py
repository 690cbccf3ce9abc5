"""Bad input gets a ValueError/TypeError that names the argument, before any kernel runs."""
import pytest
import torch

import prefopt
from prefopt import linear_logprobs

H, V = 8, 13


def good():
    return dict(hidden=torch.randn(2, 5, H), weight=torch.randn(V, H), targets=torch.randint(0, V, (2, 5)))


def call(**changes):
    args = good()
    args.update(changes)
    return linear_logprobs(args.pop("hidden"), args.pop("weight"), args.pop("targets"), **args)


CASES = [
    (dict(backend="cuda"), ValueError, "backend"),
    (dict(hidden=torch.randn(2, 5, H + 1)), ValueError, "weight"),
    (dict(hidden=torch.randn(H)), ValueError, "hidden"),
    (dict(hidden=torch.randint(0, 3, (2, 5, H))), TypeError, "hidden"),
    (dict(weight=torch.randn(V, H, 1)), ValueError, "weight"),
    (dict(weight=None), TypeError, "weight"),
    (dict(targets=torch.randint(0, V, (2, 4))), ValueError, "targets"),
    (dict(targets=torch.rand(2, 5)), TypeError, "targets"),
    (dict(targets=torch.full((2, 5), V)), ValueError, "targets"),
    (dict(targets=torch.full((2, 5), -1)), ValueError, "targets"),
    (dict(targets=[[1, 2]]), TypeError, "targets"),
    (dict(bias=torch.randn(V + 1)), ValueError, "bias"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(softcap=0.0), ValueError, "softcap"),
    (dict(kl=True), ValueError, "kl"),
    (dict(ref_weight=torch.randn(V, H)), ValueError, "ref_hidden"),
    (dict(ref_hidden=torch.randn(2, 4, H)), ValueError, "ref_hidden"),
    (dict(ref_hidden=torch.randn(2, 5, H), ref_weight=torch.randn(V + 2, H)), ValueError, "ref_weight"),
    (dict(ref_hidden=torch.randn(2, 5, H + 3), ref_weight=torch.randn(V, H)), ValueError, "ref_weight"),
    (dict(ref_hidden=torch.randn(2, 5, H), ref_bias=torch.randn(V)), ValueError, "ref_bias"),
]


@pytest.mark.parametrize("changes,error,name", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_op_rejects_bad_input(changes, error, name):
    with pytest.raises(error, match=name):
        call(**changes)


def test_targets_equal_to_a_custom_ignore_index_are_fine():
    out = call(targets=torch.full((2, 5), -1), ignore_index=-1)
    assert torch.equal(out.logp, torch.zeros(2, 5))


def paired():
    return torch.randn(V, H), torch.randn(4, 5, H), torch.randint(0, V, (4, 5))


LOSS_CASES = [
    (lambda: prefopt.FusedDPOLoss(loss_type="kto"), ValueError, "loss_type"),
    (lambda: prefopt.FusedDPOLoss(loss_type="robust", label_smoothing=0.5)(*paired(), ref_hidden=torch.randn(4, 5, H)),
     ValueError, "label_smoothing"),
    (lambda: prefopt.FusedDPOLoss(label_smoothing=0.1), ValueError, "label_smoothing.*cdpo"),
    (lambda: prefopt.FusedDPOLoss(loss_type="hinge", label_smoothing=0.1), ValueError, "label_smoothing"),
    (lambda: prefopt.objectives.dpo_loss(*torch.zeros(4, 2), label_smoothing=0.1), ValueError, "label_smoothing"),
    (lambda: prefopt.FusedCWDPOLoss(tau=0.0), ValueError, "tau"),
    (lambda: prefopt.FusedSFTLoss(label_smoothing=1.0), ValueError, "label_smoothing"),
    (lambda: prefopt.FusedGRPOLoss(loss_agg="sum"), ValueError, "loss_agg"),
    (lambda: prefopt.FusedDPOLoss()(*paired()), ValueError, "ref_hidden/ref_logps"),
    (lambda: prefopt.FusedDPOLoss()(torch.randn(V, H), torch.randn(3, 5, H), torch.randint(0, V, (3, 5)),
                                    ref_logps=torch.zeros(3)), ValueError, "hidden"),
    (lambda: prefopt.FusedDPOLoss()(*paired(), ref_logps=torch.zeros(3)), ValueError, "ref_logps"),
    (lambda: prefopt.FusedDPOLoss()(*paired(), ref_logps=torch.zeros(4), ref_hidden=torch.randn(4, 5, H)),
     ValueError, "ref_logps"),
    (lambda: prefopt.FusedNSFTLoss()(*paired()), ValueError, "ref_hidden"),
    (lambda: prefopt.FusedGRPOLoss()(*paired(), torch.zeros(3)), ValueError, "advantages"),
    (lambda: prefopt.FusedGRPOLoss()(*paired(), torch.zeros(4), old_logps=torch.zeros(4, 4)), ValueError, "old_logps"),
    (lambda: prefopt.FusedGRPOLoss(beta=0.1)(*paired(), torch.zeros(4)), ValueError, "ref_logps"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="luspo"), ValueError, "loss_type"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="sapo", sapo_temperature_neg=0.0), ValueError, "sapo_temperature_neg"),
    (lambda: prefopt.FusedGRPOLoss(delta=0.0), ValueError, "delta"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="vespo"), ValueError, "loss_type"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="ppo"), ValueError, "loss_type"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="dr_grpo"), ValueError, "max_completion_length"),
    (lambda: prefopt.FusedGRPOLoss(loss_type="grpo", loss_agg="token-mean"), ValueError, "loss_agg"),
    (lambda: prefopt.FusedGRPOLoss(beta=0.0, loss_type="bnpo")(*paired(), torch.zeros(4), num_items_in_batch=9),
     ValueError, "num_items_in_batch"),
]


@pytest.mark.parametrize("make,error,name", LOSS_CASES, ids=[c[2] + str(i) for i, c in enumerate(LOSS_CASES)])
def test_losses_reject_bad_input(make, error, name):
    with pytest.raises(error, match=name):
        make()
