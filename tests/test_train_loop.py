"""The training loop: reference modes, accumulation, resume, methods, probes, checkpoints, no logits.

Runs the real loop on the embedded tiny text model (``tiny-llama``) with text-only records, a few steps
each, so the whole file takes seconds.
"""
import dataclasses
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from prefopt.train import checkpoint as ckpt  # noqa: E402
from prefopt.train import reference as ref_mod  # noqa: E402
from prefopt.train.data import PreferenceCollator  # noqa: E402
from prefopt.train.distributed import DistState, Engine  # noqa: E402
from prefopt.train.loop import DataPlan, TrainConfig, train  # noqa: E402
from prefopt.train.methods import MethodOptions, PolicyObjective, build_method  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from prefopt.train.summary import METRICS_FILE  # noqa: E402
from prefopt.train.synthetic import make_synthetic_records  # noqa: E402

TEXT = "tiny-llama"


def text_records(split, size, seed=0):
    return [dataclasses.replace(r, images=[]) for r in make_synthetic_records(split=split, size=size, seed=seed)]


def write_text_data(folder, train=48, heldout=8):
    """A data folder (train.jsonl, heldout.jsonl) of text-only preference records; returns its path."""
    for split, size in (("train", train), ("heldout", heldout)):
        with open(folder / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for r in text_records(split, size):
                f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected,
                                    "corrections": r.corrections}) + "\n")
    return str(folder)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("text_data"))


def config(out, data, **kw):
    base = dict(model=TEXT, data=data, out=str(out), steps=4, batch_size=2, probe_every=2, probe_size=4,
                progress=False, max_new_tokens=8, device="cpu", eval_size=0)  # the final eval: test_train_eval.py
    options = kw.pop("options", {})
    base.update(kw)
    return TrainConfig(options=MethodOptions(**options), **base)


def metrics(out):
    with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def losses(out):
    return [m["loss"] for m in metrics(out) if "loss" in m]


def final_weights(summary):
    from safetensors.torch import load_file

    return load_file(os.path.join(summary["checkpoint"], ckpt.WEIGHTS_FILE))


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


# ---------------------------------------------------------------------------------------- reference modes


def test_three_reference_modes_give_the_same_loss():
    """model copy, adapters off and precomputed log-probs: the same DPO loss on the same batch, with a
    policy that differs from the reference (LoRA B perturbed)."""
    records = text_records("train", 4)
    policy, processor = build_model(TEXT, lora=True, seed=3)
    collator = PreferenceCollator(processor)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    method = build_method("dpo", MethodOptions(), total_steps=1)
    stage = method.stage_at(0)
    objective = PolicyObjective(policy)
    batch = collator(records, mode="pair")
    indices = list(range(len(records)))

    def loss_with(reference):
        objective.reference = reference
        with torch.no_grad():
            return objective(batch, stage=stage, num_items=len(records), indices=indices)

    copy, _ = build_model(TEXT, lora=True, seed=3)  # adapters B = 0: the base model
    out_model = loss_with(ref_mod.ModelReference(copy))
    out_adapters = loss_with(ref_mod.AdapterReference(policy))
    # Precompute: the pass runs the policy itself, so give it the base (adapters B = 0) policy.
    base_objective = PolicyObjective(copy)
    logps = ref_mod.precompute_logps(Engine(DistState(), base_objective, None, None, 0.0), records, collator,
                                     batch_size=3, state=DistState())
    out_pre = loss_with(ref_mod.PrecomputedReference(logps["chosen"], logps["rejected"]))

    with torch.no_grad():
        policy_logps, _ = objective(batch)
    gap = (policy_logps - torch.cat([logps["chosen"], logps["rejected"]])).abs().max()
    assert gap > 0.1, "the policy should differ from the reference"
    for other in (out_adapters, out_pre):
        torch.testing.assert_close(other.loss, out_model.loss, rtol=1e-5, atol=1e-6)
        for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
            torch.testing.assert_close(other.metrics[k], out_model.metrics[k], rtol=1e-4, atol=1e-5)


def test_precompute_cannot_serve_nsft_or_onpolicy():
    nsft = build_method("nsft", MethodOptions(), total_steps=4)
    with pytest.raises(ValueError, match="precompute cannot serve nsft"):
        ref_mod.check_mode("precompute", nsft, lora=False)
    cw = build_method("cw-dpo", MethodOptions(), total_steps=4)
    with pytest.raises(ValueError, match="on-policy"):
        ref_mod.check_mode("precompute", cw, lora=False)
    with pytest.raises(ValueError, match="needs --lora"):
        ref_mod.check_mode("adapters", cw, lora=False)
    with pytest.raises(ValueError, match="nSFT's per-token KL"):
        ref_mod.PrecomputedReference(torch.zeros(1), torch.zeros(1)).loss_inputs({}, [0], hidden=True)


def test_cwdpo_reference_point_same_in_every_mode(tmp_path, text_data):
    """CW-DPO's stage-2 reference is the stage-1 policy: at the first stage-2 step the three modes give
    the same loss (a fresh reference: ~log 2), and every mode trains through to the end."""
    runs = {}
    for mode in ("model", "adapters", "precompute"):
        cfg = config(tmp_path / mode, text_data, method="cw-dpo", lora=True, reference=mode, steps=4,
                     options=dict(sftc_fraction=0.5, onpolicy_fraction=0.0))
        runs[mode] = train(cfg)
        assert os.path.isfile(tmp_path / mode / ("reference_logps-2.safetensors" if mode == "precompute"
                                                 else "reference-2.safetensors"))
    first = {mode: [m for m in metrics(tmp_path / mode) if m.get("stage") == "cw-dpo"][0] for mode in runs}
    assert first["model"]["step"] == 3
    assert abs(first["model"]["rewards/margins"]) < 1e-5  # policy == reference at the reference point
    for mode in ("adapters", "precompute"):
        assert losses(tmp_path / mode)[:3] == pytest.approx(losses(tmp_path / "model")[:3], rel=1e-5, abs=1e-6)
        assert first[mode]["loss"] == pytest.approx(first["model"]["loss"], rel=1e-5)


# ---------------------------------------------------------------------------------------- the loop


@pytest.mark.parametrize("method", ["sft", "dpo"])
def test_grad_accumulation_is_normalised_by_the_whole_batch(tmp_path, text_data, method):
    """One step over 4 records: one micro-batch of 4, two of 2, four of 1 give the same loss and weights
    (the loss of each micro-batch is divided by the token / pair count of the whole step)."""
    results = []
    for batch, accum in ((4, 1), (2, 2), (1, 4)):
        out = tmp_path / f"{batch}x{accum}"
        s = train(config(out, text_data, method=method, steps=1, batch_size=batch, grad_accum=accum, probe_every=0,
                         lr=1e-2, max_grad_norm=0.0))
        results.append((losses(out)[0], final_weights(s)))
    for loss, weights in results[1:]:
        assert loss == pytest.approx(results[0][0], rel=1e-5)
        assert_same_weights(weights, results[0][1], atol=2e-6)


def test_resume_continues_to_the_same_numbers(tmp_path, text_data):
    """6 steps straight vs 4 + resume + 2 (past CW-DPO's reference point, with on-policy negatives):
    the same losses, probes and final weights."""
    common = dict(method="cw-dpo", steps=6, options=dict(sftc_fraction=1 / 3, onpolicy_fraction=0.5))
    straight = train(config(tmp_path / "straight", text_data, **common))
    part = config(tmp_path / "resumed", text_data, stop_after=4, **common)
    first = train(part)
    assert first["steps"] == 4 and first["checkpoint"].endswith("checkpoint-4")
    resumed = train(dataclasses.replace(part, resume=True, stop_after=None))
    assert resumed["steps"] == 6
    a, b = metrics(tmp_path / "straight"), metrics(tmp_path / "resumed")
    assert [m["step"] for m in a] == [m["step"] for m in b]
    drop = ("tokens_per_second", "step_seconds", "peak_memory_mb")
    for ma, mb in zip(a, b):
        assert {k: v for k, v in ma.items() if k not in drop} == {k: v for k, v in mb.items() if k not in drop}
    assert any(m.get("onpolicy/negatives") for m in a)
    assert_same_weights(final_weights(straight), final_weights(resumed))


@pytest.mark.parametrize("method,extra", [
    ("sft", {}), ("sft-c", {}), ("nsft", {}), ("simpo", {}), ("orpo", {}),
    ("dpo", {"loss_type": "sigmoid"}), ("dpo", {"loss_type": "cdpo", "label_smoothing": 0.1}),
    ("dpo", {"loss_type": "robust", "label_smoothing": 0.1}), ("dpo", {"loss_type": "hinge"}),
    ("dpo", {"loss_type": "ipo"}), ("dpo", {"loss_type": "rpo"}),
])
def test_every_method_trains(tmp_path, text_data, method, extra):
    s = train(config(tmp_path, text_data, method=method, steps=2, probe_every=0, options=extra))
    rows = metrics(tmp_path)
    assert s["steps"] == 2 and len(rows) == 2
    for m in rows:
        assert torch.isfinite(torch.tensor(m["loss"])) and m["grad_norm"] > 0
        # in-process the peak above the pre-model baseline can be 0: a tiny model fits memory the process already held
        assert m["tokens_per_second"] > 0 and m["peak_memory_mb"] >= 0
    assert rows[0]["learning_rate"] == 0.0 < rows[1]["learning_rate"]  # linear warmup from 0, as in transformers
    if method in ("dpo", "simpo", "orpo"):
        for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                    "logps/rejected"):
            assert key in rows[0], key
    if method == "nsft":
        assert "kl" in rows[0] and rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0


def test_loop_never_computes_logits(tmp_path, text_data, monkeypatch):
    """The head module is never run while training (the fused op takes its weight); generation for
    on-policy negatives is the only caller, and it is off here."""
    import transformers

    def boom(self, *a, **k):
        raise AssertionError("the output head was run: logits computed")

    monkeypatch.setattr(transformers.LlamaForCausalLM, "forward", boom)
    s = train(config(tmp_path, text_data, method="dpo", steps=2, reference="model"))
    assert s["steps"] == 2


def test_probes_and_early_stop(tmp_path, text_data):
    s = train(config(tmp_path, text_data, method="dpo", steps=6, probe_every=2, early_stop_chosen_drop=-1e9))
    assert s["stopped_early"] and s["steps"] == 2  # the rule fires at the first probe after the start
    rows = metrics(tmp_path)
    assert rows[0]["step"] == 0 and rows[0]["probe/delta_logp_chosen"] == 0.0
    assert "probe/delta_logp_rejected" in rows[-1] and "probe/logp_chosen" in rows[-1]
    assert s["checkpoint"].endswith("checkpoint-2")


def test_checkpoints_are_atomic_and_pruned(tmp_path, text_data):
    s = train(config(tmp_path, text_data, method="sft", steps=4, save_every=1, keep_checkpoints=2, probe_every=0))
    names = sorted(os.listdir(tmp_path))
    assert [n for n in names if n.startswith("checkpoint-")] == ["checkpoint-3", "checkpoint-4"]
    assert not [n for n in names if n.endswith(".tmp")]
    assert ckpt.latest_checkpoint(str(tmp_path)) == s["checkpoint"]
    files = set(os.listdir(s["checkpoint"]))
    assert files == {ckpt.WEIGHTS_FILE, ckpt.STATE_FILE, ckpt.OPTIMIZER_TENSORS, ckpt.OPTIMIZER_JSON,
                     ckpt.SCHEDULER_FILE, ckpt.rng_file(0), ckpt.MANIFEST_FILE}
    assert ckpt.verify(s["checkpoint"]) is None


def test_data_plan_shards_like_one_big_batch():
    """Two ranks with batch 2 see, step by step, the records one process with batch 4 sees."""
    one = DataPlan(10, batch=4, accum=2, world=1, seed=5)
    two = DataPlan(10, batch=2, accum=2, world=2, seed=5)
    for step in range(4):  # crosses epochs
        for a in range(2):
            assert one.indices(step, a, 0) == two.indices(step, a, 0) + two.indices(step, a, 1)
    assert sorted(one.indices(0, 0, 0) + one.indices(0, 1, 0) + one.indices(1, 0, 0)[:2]) == list(range(10))
