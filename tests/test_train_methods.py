"""Trainer methods: GRPO (rollouts, exact-answer reward, TRL's loss types), nSFT with one model, and
the message of ``prefopt train`` without the train extra.

The loop tests run the real loop on the embedded tiny text model (``tiny-llama``) for a few steps.
"""
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from prefopt import linear_logprobs  # noqa: E402
from prefopt.train import loop as loop_mod  # noqa: E402
from prefopt.train import reference as ref_mod  # noqa: E402
from prefopt.train.data import PreferenceCollator  # noqa: E402
from prefopt.train.methods import (  # noqa: E402
    MethodOptions,
    PolicyObjective,
    build_method,
    answer_reward,
    group_advantages,
)
from prefopt import FusedGRPOLoss  # noqa: E402
from prefopt.train.step import count_items  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from test_train_loop import config, metrics, text_data, text_records  # noqa: E402,F401


def step_rows(out):
    """The run's per-step metrics (not the probe's start nor the final evaluation)."""
    return [m for m in metrics(out) if "stage" in m]

# ---------------------------------------------------------------------------------------------- GRPO


def test_answer_reward_parses_exactly():
    colour = "What colour is the circle?"
    assert answer_reward(colour, "The circle is red.", "The circle is red.") == 1.0
    assert answer_reward(colour, "The circle is red.", " The circle is red. ") == 1.0
    # A longer answer that contains the right one, a wrong one, an unparseable one: no reward.
    assert answer_reward(colour, "The circle is red.", "The circle is red. The square is blue.") == 0.0
    assert answer_reward(colour, "The circle is red.", "The circle is blue.") == 0.0
    assert answer_reward(colour, "The circle is red.", "red") == 0.0
    # Not a verifiable synthetic question: the chosen answer itself, up to case, spacing, final period.
    other = "Describe the shapes in the image."
    assert answer_reward(other, "I see a yellow triangle.", "i see a  yellow triangle") == 1.0
    assert answer_reward(other, "I see a yellow triangle.", "I see a yellow triangle and a square.") == 0.0


def test_group_advantages_are_trl_group_scaled():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    adv = group_advantages(rewards, 4)
    first = rewards[:4]
    expected = (first - first.mean()) / (first.std() + 1e-4)  # TRL: unbiased std, + 1e-4
    torch.testing.assert_close(adv[:4], expected)
    assert torch.equal(adv[4:], torch.zeros(4)), "a group whose answers are all equally good has no signal"


def _trl_loss(loss_type, per_token_logps, mask, advantages, *, accum, num_items, max_completion_length):
    """TRL's own ``GRPOTrainer._compute_loss`` on a stand-in trainer whose model returns ``per_token_logps``."""
    from trl import GRPOTrainer

    identity = types.SimpleNamespace(num_processes=1, gather=lambda x: x, reduce=lambda x, reduction: x,
                                     gather_for_metrics=lambda x: x, sync_gradients=True)
    fake = types.SimpleNamespace(
        loss_type=loss_type, beta=0.0, epsilon_low=0.2, epsilon_high=0.2, top_entropy_quantile=1.0,
        off_policy_mask_threshold=None, importance_sampling_level="token", use_vllm=False,
        vllm_importance_sampling_correction=False, aux_loss_enabled=False, _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=accum, max_completion_length=max_completion_length,
        accelerator=identity, model=types.SimpleNamespace(training=True),
        args=types.SimpleNamespace(delta=None, steps_per_generation=accum, use_bias_correction_kl=False),
        _metrics={"train": __import__("collections").defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (per_token_logps, torch.zeros_like(per_token_logps), None),
    )
    B, T = mask.shape
    inputs = {"prompt_ids": torch.zeros(B, 1, dtype=torch.long), "prompt_mask": torch.ones(B, 1, dtype=torch.long),
              "completion_ids": torch.zeros(B, T, dtype=torch.long), "completion_mask": mask.long(),
              "advantages": advantages, "num_items_in_batch": torch.tensor(float(num_items))}
    return GRPOTrainer._compute_loss(fake, None, inputs)


@pytest.mark.parametrize("loss_type", ("grpo", "bnpo", "dr_grpo", "dapo"))
def test_grpo_loss_types_match_trl(loss_type, seed):
    """Two accumulated micro-batches of different token counts: the loop's accumulation of each loss type
    (the global item count, or for bnpo each micro-batch's own mean averaged, as ``train_step`` does)
    gives TRL's accumulated loss and gradient."""
    g = torch.Generator().manual_seed(seed)
    V, H, T, max_len = 11, 8, 6, 9
    weight = torch.randn(V, H, generator=g, dtype=torch.float64, requires_grad=True)
    micro = []
    for B in (4, 4):  # the loop's micro-batches all hold batch_size * num_generations rows
        hidden = torch.randn(B, T, H, generator=g, dtype=torch.float64)
        targets = torch.randint(0, V, (B, T), generator=g)
        lengths = torch.randint(1, T + 1, (B,), generator=g)
        mask = torch.arange(T)[None, :] < lengths[:, None]
        targets[~mask] = -100
        micro.append((hidden, targets, mask, torch.randn(B, generator=g, dtype=torch.float64)))
    loss = FusedGRPOLoss(loss_type=loss_type, max_completion_length=max_len, beta=0.0, backend="torch")
    per_call = loss.unit is None
    total_items = sum(count_items(loss, t) for _, t, _, _ in micro)
    ours = 0
    for hidden, targets, _, adv in micro:
        out = loss(weight, hidden, targets, adv, num_items_in_batch=None if per_call else total_items).loss
        ours = ours + (out / len(micro) if per_call else out)
    (ours_grad,) = torch.autograd.grad(ours, weight)
    theirs = 0
    total_tokens = sum(int(m.sum()) for _, _, m, _ in micro)
    for hidden, targets, mask, adv in micro:
        logps = linear_logprobs(hidden, weight, targets, backend="torch").logp
        theirs = theirs + _trl_loss(loss_type, logps, mask, adv, accum=len(micro), num_items=total_tokens,
                                    max_completion_length=max_len)
    (theirs_grad,) = torch.autograd.grad(theirs, weight)
    torch.testing.assert_close(ours, theirs, msg=f"seed {seed}")
    torch.testing.assert_close(ours_grad, theirs_grad, msg=f"seed {seed}")


def test_grpo_nonzero_advantages_reach_the_gradient():
    """On-policy GRPO (rho = 1, beta = 0) has the gradient of -sum_r A_r * log p(answer_r) / N: non-zero
    advantages give exactly that gradient on every trainable weight, zero advantages none at all."""
    policy, processor = build_model("tiny-llama", seed=1)
    collator = PreferenceCollator(processor)
    rows = text_records("train", 4)
    batch = collator(rows, mode="sft")
    stage = build_method("grpo", MethodOptions(num_generations=2), total_steps=1).stage_at(0)
    objective = PolicyObjective(policy)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    n = stage.loss.count_items(batch["labels"])

    def grads(advantages):
        out = objective({**batch, "advantages": advantages}, stage=stage, num_items=n)
        return torch.autograd.grad(out.loss, params, allow_unused=True)

    advantages = torch.tensor([1.0, -1.0, 0.5, -0.5])
    got = grads(advantages)
    logps, _ = objective(batch)
    expected = torch.autograd.grad(-(advantages * logps).sum() / n, params, allow_unused=True)
    assert sum(float(g.abs().sum()) for g in got if g is not None) > 0
    for a, b in zip(got, expected):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    zero = grads(torch.zeros(4))
    assert all(g is None or float(g.abs().max()) == 0.0 for g in zero)


@pytest.mark.parametrize("method", ["sft", "nsft", "grpo"])
def test_token_methods_form_the_gradient_in_the_forward(method):
    """The trainer's per-token losses (nSFT with its KL, GRPO with k3 to a reference head) take the
    fused-gradient path by default, with the recompute path's gradients on every trainable weight."""
    from prefopt.ops import objective as objective_mod

    policy, processor = build_model("tiny-llama", seed=1)
    reference = ref_mod.ModelReference(build_model("tiny-llama", seed=2)[0])
    batch = PreferenceCollator(processor)(text_records("train", 4), mode="sft")
    if method == "grpo":
        batch["advantages"] = torch.tensor([1.0, -1.0, 0.5, -0.5])
    stage = build_method(method, MethodOptions(num_generations=2, grpo_beta=0.1), total_steps=1).stage_at(0)
    objective = PolicyObjective(policy, reference)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    n = stage.loss.count_items(batch["labels"])
    grads = {}
    for fused in (True, False):
        stage.loss.fused_gradient = fused
        objective_mod.PATH_COUNTS.clear()
        out = objective(dict(batch), stage=stage, num_items=n)
        grads[fused] = torch.autograd.grad(out.loss * 0.5, params, allow_unused=True)
        expected = objective_mod.FUSED_GRADIENT if fused else objective_mod.RECOMPUTE
        assert set(objective_mod.PATH_COUNTS) == {expected}
    assert sum(float(g.abs().sum()) for g in grads[True] if g is not None) > 0
    for a, b in zip(grads[True], grads[False]):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def _answers_from(pattern):
    """A ``Run.sample_answers`` stand-in: answer i of each prompt is the chosen answer when
    ``pattern[i]`` is True, else a wrong one."""
    def sample_answers(self, records, num, prompts=None):
        return [r.chosen if pattern[i % len(pattern)] else "I do not know." for r in records for i in range(num)]
    return sample_answers


def test_grpo_run_trains_on_rewarded_answers(tmp_path, text_data, monkeypatch):  # noqa: F811
    """The loop's GRPO: half of each group exactly right -> reward 0.5, every group informative and a
    non-zero gradient; every answer wrong -> no signal and a zero gradient."""
    monkeypatch.setattr(loop_mod.Run, "sample_answers", _answers_from([True, False]))
    loop_mod.train(config(tmp_path / "half", text_data, method="grpo", steps=2, probe_every=0,
                          options=dict(num_generations=2)))
    steps = step_rows(tmp_path / "half")
    assert [m["reward"] for m in steps] == [0.5, 0.5]
    assert all(m["frac_reward_zero_std"] == 0.0 and m["grad_norm"] > 0 for m in steps)

    monkeypatch.setattr(loop_mod.Run, "sample_answers", _answers_from([False]))
    loop_mod.train(config(tmp_path / "none", text_data, method="grpo", steps=2, probe_every=0,
                          options=dict(num_generations=2)))
    steps = step_rows(tmp_path / "none")
    assert all(m["reward"] == 0.0 and m["frac_reward_zero_std"] == 1.0 and m["grad_norm"] == 0.0 for m in steps)


def test_grpo_samples_groups_from_the_policy(tmp_path, text_data):  # noqa: F811
    """Unpatched: the policy samples num_generations answers per prompt, and with --grpo-beta the KL to
    the reference is logged (TRL's name ``kl``)."""
    summary = loop_mod.train(config(tmp_path / "run", text_data, method="grpo", steps=1, probe_every=0,
                                    options=dict(num_generations=3, grpo_beta=0.1)))
    (step,) = step_rows(tmp_path / "run")
    assert summary["reference"] == "model" and "kl" in step and "reward" in step


def test_grpo_options_are_checked():
    with pytest.raises(ValueError, match="--grpo-loss-type"):
        build_method("grpo", MethodOptions(grpo_loss_type="luspo"), total_steps=1)
    with pytest.raises(ValueError, match="--num-generations"):
        build_method("grpo", MethodOptions(num_generations=1), total_steps=1)
    with pytest.raises(ValueError, match="precompute cannot serve grpo"):
        ref_mod.check_mode("precompute", build_method("grpo", MethodOptions(grpo_beta=0.1), total_steps=1),
                           lora=False)


# ---------------------------------------------------------------------------------------------- nSFT


def _count_reference_models(monkeypatch):
    built = []
    original = ref_mod.ModelReference.__init__

    def counting(self, *args, **kwargs):
        built.append(self)
        original(self, *args, **kwargs)

    monkeypatch.setattr(ref_mod.ModelReference, "__init__", counting)
    return built


def test_nsft_without_kl_builds_no_reference(tmp_path, text_data, monkeypatch):  # noqa: F811
    built = _count_reference_models(monkeypatch)
    one = loop_mod.train(config(tmp_path / "kl0", text_data, method="nsft", steps=2, options=dict(kl_coef=0.0)))
    assert built == [] and one["reference"] == "none"
    assert "kl" not in step_rows(tmp_path / "kl0")[-1]
    two = loop_mod.train(config(tmp_path / "kl", text_data, method="nsft", steps=2))
    assert len(built) == 1 and two["reference"] == "model"


def test_nsft_lora_kl_uses_the_policy_with_adapters_off(tmp_path, text_data, monkeypatch):  # noqa: F811
    built = _count_reference_models(monkeypatch)
    summary = loop_mod.train(config(tmp_path / "run", text_data, method="nsft", steps=3, lora=True,
                                    reference="adapters"))
    kls = [m["kl"] for m in step_rows(tmp_path / "run") if "kl" in m]
    assert built == [] and summary["reference"] == "adapters"
    assert kls[0] == 0.0 and kls[-1] > 0, "adapters start at B = 0 (the reference itself), then move away"


# ---------------------------------------------------------------------------------------------- extra


def test_train_without_the_train_extra_says_which_extra(tmp_path):
    """transformers hidden by a meta-path blocker: one line naming the extra, exit 2."""
    script = textwrap.dedent("""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "transformers":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        sys.meta_path.insert(0, Block())
        from prefopt.cli import main
        sys.exit(main(["train", "--steps", "1", "--out", sys.argv[1]]))
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'prefopt[train]'" in lines[0] and "transformers" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()
