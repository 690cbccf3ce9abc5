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

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .data import PreferenceCollator, PreferenceRecord

__all__ = ["SHARE_PREFIX_CHOICES", "SHARED_FAMILIES", "NOT_SHARED", "SHARED_METHODS",
           "SharedPrefixCollator", "share_refusal", "method_refusal", "make_collator", "logical_tokens",
           "decoder_tokens", "block_mask", "packed_positions", "PackedRows", "pack_padded_batch"]

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
        packing = PackedRows([ids for ids, _, _ in encoded], [p for _, p, _ in encoded], list(groups.values()))

        packed = []
        for b, group in enumerate(packing.groups):
            i = rows[group[0]][0]
            if any(int(t) in self.image_token_ids for t in packing.ids[b][packing.prefix_lengths[b]:]):
                raise ValueError(f"{records[i].where or f'record {i}'}: image tokens after the shared prefix")
            first = encoded[group[0]][2]
            feats = {"input_ids": packing.ids[b][None]}
            for key, value in first.items():
                if key in ("input_ids", "attention_mask", "labels") or not isinstance(value, torch.Tensor):
                    continue
                if value.dim() >= 2 and value.shape[0] == 1 and value.shape[1] == first["input_ids"].shape[1]:
                    feats[key] = packing.pack_group(b, {row: encoded[row][2][key][0] for row in group})[None]
                else:  # images and their sizes / grids: once per record, from its first row
                    feats[key] = value
            packed.append(feats)

        T = packing.width
        out = self._pad(packed, T, left=False)
        out["attention_mask"] = block_mask(packing.segment)
        out["position_ids"] = packing.positions
        out["prefix_lengths"] = torch.tensor(packing.prefix_lengths, dtype=torch.long)

        width = max(len(ids) - prompt_len + 1 for ids, prompt_len, _ in encoded)
        labels = torch.full((len(rows), width), self.ignore_index, dtype=torch.long)
        answer_positions = torch.zeros((len(rows), width), dtype=torch.long)
        for row, (ids, prompt_len, _) in enumerate(encoded):
            logical = torch.arange(prompt_len - 1, len(ids))  # the prompt's last position, then the answer
            answer_positions[row, : len(logical)] = packing.flat_index(row, logical)
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


class PackedRows:
    """How logical rows (token ids, prompt lengths) pack when the rows of each of ``groups`` share one row.

    A group's shared prefix is the longest run of first tokens all its rows have in common, at most its
    shortest prompt (:attr:`prefix_lengths`); each row's remaining tokens follow as its answer segment
    (:attr:`starts`). :attr:`ids` the packed rows' token ids, :attr:`segment` ``[B, T]`` (-1 padding, 0 the
    prefix, a + 1 the group's row a: :func:`block_mask`'s input) and :attr:`positions` ``[B, T]`` (each token's
    position in its own logical row, plus the group's ``offsets``: where its rows' first token sits).
    """

    def __init__(self, ids: Sequence[torch.Tensor], prompt_lengths: Sequence[int], groups: Sequence[Sequence[int]],
                 offsets: Optional[Sequence[int]] = None):
        self.groups = [list(g) for g in groups]
        self.lengths = [len(row_ids) for row_ids in ids]
        self.prefix_lengths, self.starts, self.packed_of = [], {}, {}
        for b, group in enumerate(self.groups):
            first = ids[group[0]]
            P = min(prompt_lengths[row] for row in group)
            for row in group[1:]:
                n = min(P, len(ids[row]), len(first))
                P = min(P, int((ids[row][:n] == first[:n]).long().cumprod(0).sum()))
            start = P
            for row in group:
                self.starts[row], self.packed_of[row] = start, b
                start += self.lengths[row] - P
            self.prefix_lengths.append(P)
        self.ids = [self.pack_group(b, {row: ids[row] for row in group}) for b, group in enumerate(self.groups)]
        self.width = T = max(len(row_ids) for row_ids in self.ids)
        B = len(self.groups)
        self.segment = torch.full((B, T), -1, dtype=torch.long)
        self.positions = torch.zeros((B, T), dtype=torch.long)
        for b, group in enumerate(self.groups):
            P, offset = self.prefix_lengths[b], 0 if offsets is None else offsets[group[0]]
            self.segment[b, :P] = 0
            self.positions[b, :P] = torch.arange(offset, offset + P)
            for a, row in enumerate(group):
                start, n = self.starts[row], self.lengths[row] - P
                self.segment[b, start:start + n] = a + 1
                self.positions[b, start:start + n] = torch.arange(offset + P, offset + P + n)

    def pack_group(self, b: int, values: Dict[int, torch.Tensor]) -> torch.Tensor:
        """Per-token ``values`` of group ``b``'s rows (row -> ``[L, ...]``) laid out as its packed row."""
        group, P = self.groups[b], self.prefix_lengths[b]
        return torch.cat([values[group[0]][:P]] + [values[row][P:self.lengths[row]] for row in group])

    def flat_index(self, row: int, logical: torch.Tensor) -> torch.Tensor:
        """Where positions ``logical`` of logical row ``row`` sit in the packed rows flattened to ``[B * T]``."""
        b, P = self.packed_of[row], self.prefix_lengths[self.packed_of[row]]
        return b * self.width + torch.where(logical < P, logical, self.starts[row] + logical - P)


def pack_padded_batch(inputs: Dict[str, torch.Tensor], labels: torch.Tensor, *, image_token_ids: Sequence[int] = (),
                      ignore_index: int = -100) -> Optional[Tuple[Dict[str, torch.Tensor], torch.Tensor]]:
    """A padded batch of logical rows as TRL's trainers build it, packed: one row per prefix.

    ``inputs``: the model's keyword inputs, each row's tokens contiguous (``attention_mask`` 1 there; padding
    on either side), per-token keys ``[N, T, ...]``, image keys one entry per row (``[N, ...]``); ``labels``
    ``[N, T]``: ``ignore_index`` but on the scored answer tokens. Rows whose tokens before their first label,
    first column and images are equal share a packed row (a DPO record's chosen and rejected rows, a GRPO
    prompt's answers). Returns ``(packed inputs, index)``: the packed rows' model inputs (the boolean block
    mask, ``position_ids`` each token's column in its own row, ``prefix_lengths``) and ``index [N, T]``, where
    each logical row's position sits in the packed hidden states flattened to ``[B * T', H]`` with one
    zero row appended (every position that predicts no label points there); or None where the rows cannot be
    packed here: no row shares its prefix, images that are not one per row (each row's image tokens counted
    by ``image_token_ids``), a row scored from its first token.
    """
    input_ids = inputs["input_ids"]
    N, T = input_ids.shape
    attention = inputs.get("attention_mask")
    attention = torch.ones_like(input_ids, dtype=torch.bool) if attention is None else attention.bool()
    if attention.dim() != 2:
        return None
    per_token = {k: v for k, v in inputs.items()
                 if torch.is_tensor(v) and v.dim() >= 2 and tuple(v.shape[:2]) == (N, T) and k != "attention_mask"}
    images = {k: v for k, v in inputs.items()
              if torch.is_tensor(v) and v.dim() >= 1 and k not in per_token and k != "attention_mask"}
    if images:
        image_tokens = sum((input_ids == t).sum(1) for t in image_token_ids) if image_token_ids else None
        if (image_tokens is None or any(v.shape[0] != N for v in images.values())
                or bool((image_tokens == 0).any()) or bool((image_tokens != image_tokens[0]).any())):
            return None  # not one image per row
    cpu_attention, cpu_labels = attention.cpu(), labels.cpu()
    ids, prompt_lengths, offsets = [], [], []
    by_prompt: Dict[tuple, List[List[int]]] = {}  # (first column, prompt ids) -> groups of rows, told apart by images
    for r in range(N):
        columns = cpu_attention[r].nonzero().squeeze(1)
        first, length = int(columns[0]) if len(columns) else 0, len(columns)
        if length and int(columns[-1]) - first + 1 != length:
            return None  # a row's tokens with holes
        scored = (cpu_labels[r, first:first + length] != ignore_index).nonzero()
        prompt = int(scored[0]) if len(scored) else length
        if prompt == 0 and length:
            return None
        row_ids = input_ids[r, first:first + length].cpu()
        ids.append(row_ids)
        prompt_lengths.append(prompt)
        offsets.append(first)
        candidates = by_prompt.setdefault((first, tuple(row_ids[:prompt].tolist())), [])
        for group in candidates:
            if all(torch.equal(v[r], v[group[0]]) for v in images.values()):
                group.append(r)
                break
        else:
            candidates.append([r])
    groups = sorted((group for candidates in by_prompt.values() for group in candidates), key=lambda g: g[0])
    if len(groups) == N:
        return None
    packing = PackedRows(ids, prompt_lengths, groups, offsets)
    device = input_ids.device
    packed = {k: v for k, v in inputs.items() if k not in per_token and k not in images and k != "attention_mask"}
    firsts = torch.tensor([g[0] for g in packing.groups], device=device)
    for k, v in images.items():
        packed[k] = v[firsts]
    for k, v in per_token.items():
        rows = [packing.pack_group(b, {r: v[r, offsets[r]:offsets[r] + packing.lengths[r]] for r in group})
                for b, group in enumerate(packing.groups)]
        out = v.new_zeros((len(rows), packing.width, *v.shape[2:]))  # padding: attends to itself, predicts nothing
        for b, row in enumerate(rows):
            out[b, :len(row)] = row
        packed[k] = out
    packed["attention_mask"] = block_mask(packing.segment).to(device)
    packed["position_ids"] = packing.positions.to(device)
    packed["prefix_lengths"] = torch.tensor(packing.prefix_lengths, device=device)
    zero_row = len(packing.groups) * packing.width
    index = torch.full((N, T), zero_row, dtype=torch.long)
    for r in range(N):
        logical = torch.arange(max(prompt_lengths[r] - 1, 0), packing.lengths[r])
        index[r, offsets[r] + logical] = packing.flat_index(r, logical)
    return packed, index.to(device)


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
