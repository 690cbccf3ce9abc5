"""One prefix per record: a record's images and prompt run through the vision tower and the decoder once,
its answers (chosen and rejected; chosen and corrections; GRPO's group of sampled answers) after them in
the same row.

A packed row is ``[prefix | answer 1 | answer 2 | ... | padding]``. A boolean 4-D attention mask
(``[B, 1, T, T]``, True = attend, taken as it is by transformers' SDPA attention) lets every answer token see
the prefix and its own answer's earlier tokens, never another answer; its position ids continue from the
prefix's end (answer ``a`` token ``j`` sits at position ``P + j``, as in its own unshared row). A padding
position attends to itself only (a query row with no key would give NaN). So every answer token's hidden
state is the one the unshared row computes, up to the order of additions inside the attention.

The objective then receives exactly what the unshared path gives it, per logical row (the collator's row
order): ``labels [R, A]`` and hidden states ``[R, A, H]`` gathered from the packed rows at
``answer_positions [R, A]`` (flat indices into ``[B * T]``); row ``r`` starts at its prompt's last position
(whose hidden state predicts the first answer token) and runs to its last token. Losses, metrics and their
unit counts are those of the unshared batch; ``logical_tokens`` keeps the unshared batch's token count.

``--max-length`` keeps its meaning per logical row (prefix + one answer); a packed row may be longer.

Multimodal RoPE (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``get_rope_index``) takes the prefix's 3-D positions from the
model and continues each answer after them (:func:`packed_positions`).

Where it applies: the model's attention is SDPA (a FlexAttention or flash-attn varlen path would take the
same segments) and its family is tested equal to the unshared rows (:data:`SHARED_FAMILIES`). Families whose
masks are their own (Gemma 3's bidirectional image attention, PaliGemma's prefix-LM) are listed in
:data:`NOT_SHARED` with the reason; ``auto`` trains them and untested families unshared, ``on`` refuses.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch

from .data import PreferenceCollator, PreferenceRecord

__all__ = ["SHARE_PREFIX_CHOICES", "SHARED_FAMILIES", "NOT_SHARED", "SHARED_METHODS",
           "SharedPrefixCollator", "share_refusal", "method_refusal", "make_collator", "logical_tokens",
           "decoder_tokens", "block_mask", "packed_positions"]

SHARE_PREFIX_CHOICES = ("auto", "on", "off")

#: ``config.model_type`` of the families whose shared rows are tested equal to the unshared ones.
SHARED_FAMILIES = ("llama", "qwen2", "llava", "llava_next", "llava_onevision", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
                   "idefics3", "smolvlm", "mllama", "internvl", "aya_vision")

#: Families sharing cannot serve yet, with why (``auto`` trains them unshared; ``on`` refuses).
NOT_SHARED = {
    "gemma3": "its image tokens attend to each other bidirectionally (a mask of its own)",
    "paligemma": "its prefix-LM mask (bidirectional over image and prompt) is its own",
}

#: The methods whose batches share prefixes: a record's two answers, its chosen answer and corrections, or
#: GRPO's group of answers sampled for one prompt.
SHARED_METHODS = ("sft-c", "dpo", "cw-dpo", "simpo", "orpo", "nsft", "grpo")


def share_refusal(config) -> Optional[str]:
    """Why a model of ``config`` cannot share prefixes (one line naming the family), or None."""
    family = getattr(config, "model_type", "?")
    if family in NOT_SHARED:
        return f"model family {family!r} cannot share prefixes yet: {NOT_SHARED[family]}"
    if family not in SHARED_FAMILIES:
        return f"model family {family!r} is not tested with shared prefixes (tested: {', '.join(SHARED_FAMILIES)})"
    attn = getattr(config, "_attn_implementation", None)
    if attn != "sdpa":
        return f"shared prefixes need SDPA attention (a boolean 4-D block mask), the model uses {attn!r}"
    return None


def method_refusal(method: str) -> Optional[str]:
    """Why ``method``'s batches cannot share prefixes (one line), or None (:data:`SHARED_METHODS`: all but sft)."""
    if method in SHARED_METHODS:
        return None
    return f"{method} trains one answer per record: there is no prefix to share"


def make_collator(processor, config, share_prefix: str, *, method: Optional[str],
                  max_length: int) -> PreferenceCollator:
    """The collator of ``--share-prefix``: ``off`` the unshared one; ``auto`` the shared one where ``method``
    (None: pair scoring, as the held-out evaluation's) and the model of ``config`` can share
    (:func:`method_refusal`, :func:`share_refusal`), else the unshared one; ``on`` the shared one or
    ``ValueError`` (one line: why it cannot apply)."""
    if share_prefix not in SHARE_PREFIX_CHOICES:
        raise ValueError(f"--share-prefix: expected one of {', '.join(SHARE_PREFIX_CHOICES)}, got {share_prefix!r}")
    refusal = None
    if share_prefix != "off":
        refusal = (method and method_refusal(method)) or share_refusal(config)
    if share_prefix == "on" and refusal is not None:
        raise ValueError(f"--share-prefix on: {refusal}")
    cls = SharedPrefixCollator if share_prefix != "off" and refusal is None else PreferenceCollator
    return cls(processor, max_length=max_length)


def logical_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """The tokens of the batch's logical rows (prefix + one answer each): what the unshared rows hold."""
    if "logical_tokens" in batch:
        return int(batch["logical_tokens"])
    return int(batch["attention_mask"].sum())


def decoder_tokens(batch: Dict[str, torch.Tensor]) -> int:
    """The positions the decoder runs on this batch (padding included)."""
    return int(batch["input_ids"].numel())


class SharedPrefixCollator(PreferenceCollator):
    """:class:`~prefopt.train.data.PreferenceCollator` whose batches hold one packed row per prefix (see the
    module's docstring): the rows of every answer of the records with the same prompt and images (a
    ``pair`` record's two answers, an ``nsft`` record's chosen answer and corrections, the ``sft`` rows of
    GRPO's answers sampled for one prompt).

    Keys of a shared batch: the processor's model inputs for the packed rows (images once per record),
    ``attention_mask`` the boolean block mask ``[B, 1, T, T]``, ``position_ids [B, T]``; and per logical row
    ``labels [R, A]``, ``answer_positions [R, A]``, ``num_images``, ``row_record`` (``correction_rows``), in
    the unshared batch's row order; ``prefix_lengths [B]``, ``logical_tokens`` (0-d).
    """

    def __call__(self, records: Sequence[PreferenceRecord], *, mode: str = "pair") -> Dict[str, torch.Tensor]:
        rows, rows_features = self.encode_rows(records, mode)
        # per logical row: (token ids cut at max_length, prompt length, features)
        encoded = [(feats["input_ids"][0, : self.max_length], prompt_len, feats) for feats, prompt_len in rows_features]
        # Rows with the same prompt and images share a packed row: a record's answers, or GRPO's group of
        # sampled answers (one row per answer, each a copy of its record).
        groups: Dict[tuple, List[int]] = {}
        for row, (i, _, _) in enumerate(rows):
            groups.setdefault(prefix_key(records[i]), []).append(row)

        packed, starts, prefix_len = [], {}, []  # starts[row]: where its answer segment begins in its packed row
        packed_of = {}  # row -> its packed row
        for b, group in enumerate(groups.values()):
            i = rows[group[0]][0]
            first_ids, _, first = encoded[group[0]]
            P = min(encoded[row][1] for row in group)
            for row in group[1:]:
                ids = encoded[row][0]
                n = min(P, len(ids), len(first_ids))
                same = (ids[:n] == first_ids[:n]).long()
                P = min(P, int(same.cumprod(0).sum()))
            pieces = [first_ids[:P]]
            for row in group:
                starts[row] = sum(len(p) for p in pieces)
                pieces.append(encoded[row][0][P:])
            ids = torch.cat(pieces)
            if any(int(t) in self.image_token_ids for t in ids[P:]):
                raise ValueError(f"{records[i].where or f'record {i}'}: image tokens after the shared prefix")
            feats = {"input_ids": ids[None]}
            for key, value in first.items():
                if key in ("input_ids", "attention_mask", "labels") or not isinstance(value, torch.Tensor):
                    continue
                if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == first["input_ids"].shape[1]:
                    per_token = [value[0, :P]] + [encoded[row][2][key][0, P:len(encoded[row][0])] for row in group]
                    feats[key] = torch.cat(per_token)[None]
                else:  # images and their sizes / grids: once per record, from its first row
                    feats[key] = value
            packed.append((feats, group))
            prefix_len.append(P)
            packed_of.update({row: b for row in group})

        T = max(f["input_ids"].shape[1] for f, _ in packed)
        out = self._pad([f for f, _ in packed], T, left=False)
        B = len(packed)
        segment = torch.full((B, T), -1, dtype=torch.long)  # -1 padding, 0 prefix, a + 1 answer a
        positions = torch.zeros((B, T), dtype=torch.long)
        for b, (feats, group) in enumerate(packed):
            P = prefix_len[b]
            segment[b, :P] = 0
            positions[b, :P] = torch.arange(P)
            for a, row in enumerate(group):
                n = len(encoded[row][0]) - P
                segment[b, starts[row]:starts[row] + n] = a + 1
                positions[b, starts[row]:starts[row] + n] = torch.arange(P, P + n)
        out["attention_mask"] = block_mask(segment)
        out["position_ids"] = positions
        out["prefix_lengths"] = torch.tensor(prefix_len, dtype=torch.long)

        width = max(len(ids) - prompt_len + 1 for ids, prompt_len, _ in encoded)
        labels = torch.full((len(rows), width), self.ignore_index, dtype=torch.long)
        answer_positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, prompt_len, _) in enumerate(encoded):
            b = packed_of[row]
            P = prefix_len[b]
            logical = torch.arange(prompt_len - 1, len(ids))  # the prompt's last position, then the answer
            packed_at = torch.where(logical < P, logical, starts[row] + logical - P)
            answer_positions[row, : len(logical)] = b * T + packed_at
            labels[row, 1: len(logical)] = ids[prompt_len:]
        for tid in self.image_token_ids:
            labels[labels == tid] = self.ignore_index
        out["labels"] = labels
        out["answer_positions"] = answer_positions
        out["num_images"] = torch.tensor([len(records[i].images) for i, _, _ in rows], dtype=torch.long)
        out["row_record"] = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
        if mode == "nsft":
            out["correction_rows"] = torch.tensor([c for _, _, c in rows], dtype=torch.bool)
        out["logical_tokens"] = torch.tensor(sum(len(ids) for ids, _, _ in encoded))
        return out


def prefix_key(record: PreferenceRecord) -> tuple:
    """What a row's prefix is made of: its prompt (and the messages it came from) and its images (paths, or
    the image objects themselves)."""
    return record.prompt, repr(record.messages), tuple(i if isinstance(i, str) else id(i) for i in record.images)


def packed_positions(backbone, inputs: Dict[str, torch.Tensor], prefix_lengths: torch.Tensor) -> torch.Tensor:
    """The position ids of packed rows for ``backbone``: the collator's 1-D ones, or for a multimodal-RoPE
    backbone (Qwen2-VL, Qwen2.5-VL, Qwen3-VL: ``get_rope_index``) with images, the prefix's 3-D positions and each
    answer's continuing from the prefix's end as in its own row (``1-D position + the prefix's rope
    delta``, the delta being the prefix's largest position + 1 minus its length)."""
    positions = inputs["position_ids"]
    if not hasattr(backbone, "get_rope_index") or inputs.get("image_grid_thw") is None:
        return positions
    in_prefix = torch.arange(positions.shape[1], device=positions.device)[None] < prefix_lengths[:, None]
    prefix, deltas = backbone.get_rope_index(inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                                             image_grid_thw=inputs["image_grid_thw"], attention_mask=in_prefix)
    answers = positions + deltas.to(positions.device).view(-1, 1)
    return torch.where(in_prefix[None], prefix.to(positions.device), answers[None])


def block_mask(segment: torch.Tensor) -> torch.Tensor:
    """The boolean attention mask ``[B, 1, T, T]`` of packed rows whose positions belong to ``segment``
    ``[B, T]`` (-1 padding, 0 the shared prefix, k > 0 answer k): causal, a position sees the prefix and its
    own segment; a padding position sees itself only."""
    T = segment.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    q, k = segment[:, :, None], segment[:, None, :]
    allowed = causal & (q >= 0) & ((k == 0) | (k == q))
    allowed |= torch.eye(T, dtype=torch.bool) & (q < 0)
    return allowed[:, None]
