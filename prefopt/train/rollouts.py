"""Sampling from the current policy (:class:`RolloutsMixin`, a part of :class:`~prefopt.train.loop.Run`):
GRPO's groups of answers with their rewards and advantages, and the on-policy negatives that replace a share
of the dataset's rejected answers. Every rank samples the same number of prompts (ZeRO-3 generation is
collective)."""
from __future__ import annotations

import dataclasses
import random
from typing import Dict, List, Optional, Tuple

import torch


def rollout_metrics(counters: Dict[str, float]) -> Dict[str, float]:
    """GRPO's step metrics under TRL's names from the summed rollout counters: mean reward, mean
    within-group reward standard deviation, share of groups whose rewards are all equal (no signal)."""
    groups, completions = max(counters["groups"], 1), max(counters["completions"], 1)
    return {"reward": counters["reward"] / completions, "reward_std": counters["reward_std"] / groups,
            "frac_reward_zero_std": counters["frac_reward_zero_std"] / groups}


class RolloutsMixin:
    """The sampling methods of :class:`~prefopt.train.loop.Run` (they use its ``cfg``, ``state``, ``policy``,
    ``records``, ``collator``, ``tokenizer`` and, for a record that fails to collate, ``collate``)."""

    @torch.no_grad()
    def sample_answers(self, records, num: int, prompts: Optional[Dict[str, torch.Tensor]] = None) -> List[str]:
        """``num`` answers sampled from the current policy for each record's prompt (record by record, the
        ``num`` answers of a record consecutive; ``prompts``: the records' collated prompts, else collated
        here); every rank samples the same number (ZeRO-3 generation is collective)."""
        inputs = self.collator.generation_inputs(records) if prompts is None else prompts
        inputs = {k: v.to(self.state.device) for k, v in inputs.items()}
        model = self.policy.model
        was_training = model.training
        model.eval()
        out = model.generate(**inputs, do_sample=True, num_return_sequences=num, max_new_tokens=self.cfg.max_new_tokens,
                             use_cache=True, pad_token_id=self.collator.pad_token_id,
                             synced_gpus=self.state.zero_stage == 3)
        model.train(was_training)
        texts = self.tokenizer.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        return [t.strip() for t in texts]

    def rollouts(self, records, prompts, num_generations: int) -> Tuple[Dict[str, torch.Tensor], Dict[str, float]]:
        """GRPO's batch: ``num_generations`` answers sampled per prompt (``prompts``: the records' collated
        prompts), each rewarded 1.0 when it is right (:func:`~prefopt.train.methods.answer_reward`); the
        answers as SFT rows with their group advantages, and the reward counters (TRL's metric names)."""
        from .methods import answer_reward, group_advantages

        answers = self.sample_answers(records, num_generations, prompts)
        owners = [r for r in records for _ in range(num_generations)]
        rewards = torch.tensor([answer_reward(r.prompt, r.chosen, a) for a, r in zip(answers, owners)])
        # An empty sample still needs a scored token: it is the end of turn alone.
        rows = [dataclasses.replace(r, chosen=a or " ", rejected=None) for a, r in zip(answers, owners)]
        batch = self.collator(rows, mode="sft")
        batch["advantages"] = group_advantages(rewards, num_generations)
        groups = rewards.view(-1, num_generations)
        std = groups.std(-1)
        counters = {"reward": float(rewards.sum()), "reward_std": float(std.sum()),
                    "frac_reward_zero_std": float((std == 0).sum()), "groups": len(records),
                    "completions": len(rows)}
        return batch, counters

    @torch.no_grad()
    def onpolicy_negatives(self, idx: List[int], records, fraction: float, key) -> Tuple[List[int], list, int]:
        """Replace the rejected answer of ``fraction * B`` records (rounded up or down at random, so the
        share is right on average; which records is drawn from ``(seed, step, micro, rank)``) with an
        answer sampled from the current policy; a sample that is empty or equals the chosen answer keeps
        the dataset negative. A drawn record whose prompt fails to collate is replaced (:meth:`collate`).
        Returns (indices, records, number sampled). Every rank samples the same number of prompts (ZeRO-3
        generation is collective)."""
        k = int(fraction * len(records) + random.Random(repr((self.cfg.seed, *key))).random())
        if k == 0:
            return idx, records, 0
        rng = random.Random(repr((self.cfg.seed, *key, self.state.rank)))
        picks = sorted(rng.sample(range(len(records)), k))
        picked, prompts = self.collate([idx[p] for p in picks], [records[p] for p in picks], "sft",
                                       self.collator.generation_inputs)
        idx, records, sampled = list(idx), list(records), 0
        for p, i in zip(picks, picked):
            if i != idx[p]:  # its prompt failed to collate: replaced
                idx[p], records[p] = i, self.records[i]
        texts = self.sample_answers([records[p] for p in picks], 1, prompts)
        for p, text in zip(picks, texts):
            if text and text != records[p].chosen.strip():
                records[p] = dataclasses.replace(records[p], rejected=text)
                sampled += 1
        return idx, records, sampled
