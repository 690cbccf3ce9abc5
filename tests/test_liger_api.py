"""prefopt.liger's surface against the installed liger-kernel: names, signatures, defaults, bad arguments."""
import importlib
import inspect

import pytest
import torch

liger_chunked = pytest.importorskip("liger_kernel.chunked_loss")
from liger_kernel.chunked_loss import functional as liger_functional  # noqa: E402

import prefopt.liger as ours  # noqa: E402
from prefopt.liger import functional as ours_functional  # noqa: E402

LOSSES = {"DPO": "dpo_loss", "ORPO": "orpo_loss", "SimPO": "simpo_loss", "CPO": "cpo_loss", "KTO": "kto_loss",
          "GRPO": "grpo_loss"}


def liger_function(name):
    module = importlib.import_module(f"liger_kernel.chunked_loss.{LOSSES[name]}")
    return getattr(module, f"LigerFusedLinear{name}Function")


def parameters(fn, drop=("self", "ctx", "cls")):
    """(name, kind, default) of every parameter: what a caller's code depends on."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values() if p.name not in drop]


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_module_signatures_match_liger(name):
    theirs = getattr(liger_chunked, f"LigerFusedLinear{name}Loss")
    mine = getattr(ours, f"LigerFusedLinear{name}Loss")
    assert issubclass(mine, torch.nn.Module)
    assert parameters(mine.__init__) == parameters(theirs.__init__), f"{name}Loss.__init__"
    assert parameters(mine.forward) == parameters(theirs.forward), f"{name}Loss.forward"


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_function_apply_order_matches_liger(name):
    """Liger's ``Function.forward(ctx, ...)`` fixes the positional order of ``.apply``; ours takes the same,
    and lives at the same submodule path (``prefopt.liger.dpo_loss`` for ``liger_kernel.chunked_loss.dpo_loss``)."""
    mine = getattr(ours, f"LigerFusedLinear{name}Function")
    submodule = importlib.import_module(f"prefopt.liger.{LOSSES[name]}")
    assert getattr(submodule, f"LigerFusedLinear{name}Function") is mine
    assert getattr(submodule, f"LigerFusedLinear{name}Loss") is getattr(ours, f"LigerFusedLinear{name}Loss")
    assert parameters(mine.forward) == parameters(liger_function(name).forward)


def test_functional_names_match_liger():
    for name in LOSSES:
        fn_name = f"liger_fused_linear_{name.lower()}"
        assert hasattr(liger_functional, fn_name), fn_name
        assert getattr(ours_functional, fn_name) == getattr(ours, f"LigerFusedLinear{name}Function").apply


def test_module_attributes_match_liger():
    """Code that reads or sets options on a constructed module (``loss_fn.beta = ...``) keeps working."""
    for name in LOSSES:
        theirs = getattr(liger_chunked, f"LigerFusedLinear{name}Loss")()
        mine = getattr(ours, f"LigerFusedLinear{name}Loss")()
        public = {k: v for k, v in vars(theirs).items() if not k.startswith("_") and k != "training"}
        assert {k: getattr(mine, k, "<missing>") for k in public} == public, name


def _tiny_pair_batch():
    hidden = torch.randn(4, 5, 8)
    weight = torch.randn(11, 8)
    target = torch.randint(0, 11, (4, 5))
    return hidden, weight, target


def _raised(call):
    try:
        call()
    except Exception as error:  # noqa: BLE001 - the type is what is compared
        return error
    return None


CONSTRUCTOR_ERRORS = [
    ("DPO", dict(loss_type="nope"), "loss_type"),
    ("DPO", dict(loss_type="ipo"), "loss_type"),
    ("DPO", dict(loss_type="exo_pair"), "label_smoothing"),
    ("DPO", dict(loss_type="robust", label_smoothing=0.5), "label_smoothing"),
    ("GRPO", dict(sapo_temperature_pos=0.0), "sapo_temperature_pos"),
    ("GRPO", dict(sapo_temperature_neg=-1.0), "sapo_temperature_neg"),
    ("GRPO", dict(delta=0.0), "delta"),
]


@pytest.mark.parametrize("name, options, argument", CONSTRUCTOR_ERRORS,
                         ids=[f"{n}-{a}-{i}" for i, (n, _, a) in enumerate(CONSTRUCTOR_ERRORS)])
def test_constructor_errors_match_liger(name, options, argument):
    theirs = _raised(lambda: getattr(liger_chunked, f"LigerFusedLinear{name}Loss")(**options))
    mine = _raised(lambda: getattr(ours, f"LigerFusedLinear{name}Loss")(**options))
    assert theirs is not None and mine is not None, (theirs, mine)
    assert isinstance(mine, type(theirs)), f"prefopt raised {type(mine).__name__}, Liger {type(theirs).__name__}"
    assert argument in str(mine), str(mine)


def _grpo_call(module, **overrides):
    hidden, weight, _ = _tiny_pair_batch()
    args = dict(_input=hidden, lin_weight=weight, selected_token_ids=torch.randint(0, 11, (4, 5)),
                attention_mask=torch.ones(4, 5), advantages=torch.randn(4))
    args.update(overrides)
    return lambda: module(**args)


FORWARD_ERRORS = [
    # (what, Liger call, prefopt call, argument named)
    ("dpo ipo via Function", "DPO-ipo", "loss_type"),
    ("dpo unknown loss via Function", "DPO-nope", "loss_type"),
    ("grpo ref missing", "GRPO-ref", "ref_"),
    ("grpo dr_grpo length", "GRPO-dr_grpo", "max_completion_length"),
    ("grpo vllm shape", "GRPO-vllm", "vllm_is_ratio"),
    ("grpo sequence level with cispo", "GRPO-sequence-cispo", "importance_sampling_level"),
    ("grpo unknown level", "GRPO-level", "importance_sampling_level"),
    ("grpo unknown loss", "GRPO-loss", "loss_type"),
    ("kto labels missing", "KTO-labels", "preference_labels"),
    ("dpo reference missing", "DPO-noref", "ref_input"),
    ("kto reference missing", "KTO-noref", "ref_input"),
]


def _forward_call(lib, case):
    hidden, weight, target = _tiny_pair_batch()
    dpo_function = (liger_function("DPO") if lib is liger_chunked else ours.LigerFusedLinearDPOFunction).apply
    if case == "DPO-ipo":
        return lambda: dpo_function(hidden, weight, target, None, hidden, weight, None, -100, 0.1, False, False,
                                    True, False, 1, "ipo")
    if case == "DPO-nope":
        return lambda: dpo_function(hidden, weight, target, None, hidden, weight, None, -100, 0.1, False, False,
                                    True, False, 1, "nope")
    if case == "DPO-noref":
        return lambda: dpo_function(hidden, weight, target, None, None, weight, None, -100, 0.1, False, False, True)
    if case == "KTO-noref":
        labels = torch.tensor([True, False, True, False])
        return lambda: lib.LigerFusedLinearKTOLoss(compiled=False, use_ref_model=True)(hidden, weight, target, None,
                                                                                     labels, None, weight)
    if case == "KTO-labels":
        return lambda: lib.LigerFusedLinearKTOLoss(compiled=False)(hidden, weight, target)
    grpo = {"GRPO-ref": dict(), "GRPO-dr_grpo": dict(loss_type="dr_grpo", use_ref_model=False),
            "GRPO-vllm": dict(use_ref_model=False), "GRPO-sequence-cispo": dict(
                loss_type="cispo", importance_sampling_level="sequence", use_ref_model=False),
            "GRPO-level": dict(importance_sampling_level="word", use_ref_model=False),
            "GRPO-loss": dict(loss_type="ppo", use_ref_model=False)}[case]
    module = lib.LigerFusedLinearGRPOLoss(compiled=False, **grpo) if lib is liger_chunked else \
        lib.LigerFusedLinearGRPOLoss(**grpo)
    overrides = {"vllm_is_ratio": torch.ones(4, 3)} if case == "GRPO-vllm" else {}
    return _grpo_call(module, **overrides)


@pytest.mark.parametrize("what, case, argument", FORWARD_ERRORS, ids=[w for w, _, _ in FORWARD_ERRORS])
def test_forward_errors_match_liger(what, case, argument):
    """Same exception type as Liger (where Liger asserts, prefopt's error is also an AssertionError, and a
    ValueError), with a message that names the argument."""
    theirs = _raised(_forward_call(liger_chunked, case))
    mine = _raised(_forward_call(ours, case))
    assert theirs is not None and mine is not None, (theirs, mine)
    assert isinstance(mine, type(theirs)), f"prefopt raised {type(mine).__name__}, Liger {type(theirs).__name__}"
    assert isinstance(mine, (ValueError, TypeError)), type(mine)
    assert argument in str(mine), str(mine)


def test_errors_where_liger_has_no_check():
    """Where Liger fails deep inside (or silently), prefopt says which argument is wrong."""
    hidden, weight, target = _tiny_pair_batch()
    with pytest.raises(ValueError, match="_input"):
        ours.LigerFusedLinearDPOLoss(use_ref_model=False)(weight, hidden[:3], target[:3])
    with pytest.raises(ValueError, match="nll_target"):
        ours.LigerFusedLinearORPOLoss()(weight, hidden, target, None, target[:, :3])
    with pytest.raises(ValueError, match="preference_labels"):
        ours.LigerFusedLinearKTOLoss()(hidden, weight, target, None, torch.ones(4))
    with pytest.raises(ValueError, match="targets"):
        ours.LigerFusedLinearCPOLoss()(weight, hidden, target + 20)
    # The functional form checks what the module checks at construction (Liger's functional gives loss 0).
    ids = target.clamp(min=0)
    with pytest.raises(ValueError, match="delta"):
        ours.functional.liger_fused_linear_grpo(hidden, weight, ids, torch.ones_like(ids), torch.zeros(4),
                                                use_ref_model=False, delta=0.0)


def test_one_fused_pass_per_call(monkeypatch):
    """The shims are thin: one call of prefopt's op scores the policy and the reference together
    (ORPO's nll_target adds one pass over the positions whose NLL label differs, and only those)."""
    import prefopt.liger._common as common
    import prefopt.liger._paired as paired
    import prefopt.liger.grpo_loss as grpo

    calls = []

    def counted(real):
        def counting(hidden, weight, targets, *args, **kwargs):
            scored = int((targets != kwargs.get("ignore_index", -100)).sum())
            calls.append((scored, kwargs.get("ref_hidden") is not None))
            return real(hidden, weight, targets, *args, **kwargs)
        return counting

    counting_op = counted(common.linear_logprobs)
    for module in (common, grpo, paired):
        monkeypatch.setattr(module, "linear_logprobs", counting_op)
    # GRPO's token-level loss takes the op's fused-gradient entry point (one pass as well)
    monkeypatch.setattr(grpo, "linear_objective", counted(grpo.linear_objective))
    hidden, weight, target = _tiny_pair_batch()
    ours.LigerFusedLinearDPOLoss()(weight, hidden, target, None, hidden + 1, weight)
    assert calls == [(20, True)]
    calls.clear()
    nll_target = target.clone()
    nll_target[0, :2] = (target[0, :2] + 1) % 11
    ours.LigerFusedLinearORPOLoss()(weight, hidden, target, None, nll_target)
    assert calls == [(20, False), (2, False)]
    calls.clear()
    mask = torch.ones(4, 5)
    mask[:, 3:] = 0
    ours.LigerFusedLinearGRPOLoss()(hidden, weight, target, mask, torch.randn(4), None, None, None, hidden, weight)
    assert calls == [(12, True)], "padded positions must not be scored"
