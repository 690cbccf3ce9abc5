"""The collator that turns preference records into model inputs + labels (the records, their sources and
their checks: :mod:`prefopt.train.sources`, whose names this module re-exports).

The collator renders each (prompt, answer) pair with the processor's (or tokenizer's) chat template,
runs it through the processor (image tokens are expanded there), and builds Hugging Face labels
(unshifted: ``labels[r, t]`` is the target of position ``t``; the loss shifts by one): ``input_ids`` with
every prompt token (image tokens included) and padding set to ``ignore_index``.
"""
from __future__ import annotations

import functools
import inspect
import io
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import first_line
from .sources import (MAX_IMAGE_PIXELS, MAX_RECORD_BYTES, DataProblems, PreferenceRecord, RecordSet, check_image,
                      data_fingerprint, load_records)

__all__ = ["PreferenceRecord", "RecordSet", "load_records", "data_fingerprint", "DataProblems", "check_image",
           "PreferenceCollator", "EXTRA_BATCH_KEYS", "model_inputs", "answer_rows", "MAX_IMAGE_PIXELS",
           "MAX_RECORD_BYTES"]

# Keys the collator adds that are not model inputs; ModelAdapter.hidden_states drops them.
EXTRA_BATCH_KEYS = ("labels", "num_images", "correction_rows", "row_record", "answer_positions", "prefix_lengths",
                    "logical_tokens")
# What a processor may return that the collator makes itself (PaliGemma's processor returns its own labels).
COLLATOR_KEYS = ("labels",)


def model_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """``batch`` without the collator's extra keys (``labels``, ``num_images``, ...): the model's inputs."""
    return {k: v for k, v in batch.items() if k not in EXTRA_BATCH_KEYS}


# --------------------------------------------------------------------------------------------- collation


def _load_image(img: Any):
    from PIL import Image

    if isinstance(img, dict):  # datasets' Image feature: {"bytes", "path"}
        img = io.BytesIO(img["bytes"]) if img.get("bytes") is not None else img["path"]
    if isinstance(img, (str, os.PathLike, io.BytesIO)):
        with Image.open(img) as im:
            return im.convert("RGB")
    if isinstance(img, Image.Image):
        return img if img.mode == "RGB" else img.convert("RGB")
    return img  # arrays / tensors: the image processor takes them as they are


def _pad_trailing(value: torch.Tensor, trailing: Sequence[int]) -> torch.Tensor:
    """``value`` zero-padded at the end of each dimension after the first to the sizes ``trailing``."""
    if list(value.shape[1:]) == list(trailing):
        return value
    out = value.new_zeros((value.shape[0], *trailing))
    out[(slice(None), *(slice(0, n) for n in value.shape[1:]))] = value
    return out


def answer_rows(records: Sequence[PreferenceRecord], mode: str) -> List[tuple]:
    """The rows of a batch in ``mode``, in order: (record index, answer, is_correction)."""
    rows = [(i, r.chosen, False) for i, r in enumerate(records)]
    if mode == "pair":
        for i, r in enumerate(records):
            if r.rejected is None:
                raise ValueError(f"record {i} has no rejected answer (mode='pair')")
            rows.append((i, r.rejected, False))
    elif mode == "nsft":
        for i, r in enumerate(records):
            rows.extend((i, c, True) for c in r.corrections)
    return rows


class PreferenceCollator:
    """Collate :class:`PreferenceRecord` s into one padded batch for the model and the fused losses.

    ``processor``: a Hugging Face processor (tokenizer + image processor, e.g. from :func:`build_model`)
    or a bare tokenizer for text-only models. The text is padded on the right.

    ``collator(records, mode=...)`` returns a dict of tensors with R rows:

    * ``mode="pair"``: R = 2B, the B chosen rows (record order) then the B rejected rows (same order);
      every record needs ``rejected``.
    * ``mode="sft"``: R = B, the chosen rows.
    * ``mode="nsft"``: the B chosen rows, then each record's ``corrections`` in record order;
      ``correction_rows`` (bool [R]) marks the correction rows.

    Keys: the processor's model inputs (``input_ids``, ``attention_mask``, and for images e.g.
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``, ``cross_attention_mask``; per-token keys
    are found by shape and padded with 0, see :meth:`_pad`; images are repeated for every row that uses
    them, in row order; a prefix-LM processor's ``token_type_ids`` are 1 on the answer), plus ``labels``
    ([R, T] long, unshifted, prompt/image/padding tokens = ``ignore_index``), ``num_images`` ([R] long) and ``row_record`` ([R] long: the record each row came from).
    Pass the whole dict to ``ModelAdapter.hidden_states`` (it drops the extra keys) or use
    :func:`model_inputs`.

    A row longer than ``max_length`` has its answer cut at ``max_length``; a prompt (with its image tokens)
    that leaves no room for one answer token raises ``ValueError``. Records with images and a processor
    without an image processor: ``ValueError``.
    """

    def __init__(self, processor, *, max_length: int = 512, ignore_index: int = -100):
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.image_processor = getattr(processor, "image_processor", None)
        self.max_length = int(max_length)
        self.ignore_index = int(ignore_index)
        pad_id = self.tokenizer.pad_token_id
        if pad_id is None:
            pad_id = self.tokenizer.eos_token_id
        if pad_id is None:
            raise ValueError("tokenizer has neither a pad token nor an eos token to pad with")
        self.pad_token_id = int(pad_id)
        self.image_token_ids = set()
        for attr in ("image_token_id", "video_token_id"):
            tid = getattr(processor, attr, None)
            if isinstance(tid, int):
                self.image_token_ids.add(tid)
        self._template_owner = self._find_template_owner()
        # A prefix-LM processor (PaliGemma's) takes the answer as a ``suffix`` and marks it in token_type_ids.
        call = getattr(processor, "__call__", None)
        self.prefix_lm = self.image_processor is not None and "suffix" in inspect.signature(call).parameters
        # The text of the image/video tokens: written literally in a record, the processor would count it
        # as an image.
        literal = {getattr(processor, a, None) for a in ("image_token", "video_token")}
        literal |= {self.tokenizer.convert_ids_to_tokens(t) for t in self.image_token_ids}
        self.literal_image_tokens = sorted(t for t in literal if isinstance(t, str) and t)

    def check_record(self, record: PreferenceRecord, modes: Sequence[str]) -> Optional[str]:
        """The reason ``record`` cannot be collated in one of ``modes`` (a literal image token in its text, a
        prompt that leaves no answer token within ``max_length``, an image the processor rejects), or None."""
        for text in (record.prompt, record.chosen, record.rejected or "", *record.corrections):
            for token in self.literal_image_tokens:
                if token in text:
                    return f"literal image token {token!r} in the text"
        for mode in modes:
            if mode == "pair" and record.rejected is None:
                continue
            try:
                self([record], mode=mode)
            except Exception as e:  # the processor's own errors come in many types
                message = first_line(e)
                return message[len(record.where) + 2:] if record.where and message.startswith(record.where) else message
        return None

    # -- text rendering

    def _find_template_owner(self):
        for owner in (self.processor, self.tokenizer):
            if getattr(owner, "chat_template", None):
                return owner
        return None

    def _messages(self, prompt: str, n_images: int, answer: Optional[str], structured: bool,
                  turns: Optional[List[dict]] = None) -> List[dict]:
        if turns is None:  # a plain prompt: one user turn, its images first
            turns = [{"role": "user", "content": [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]}]
        if answer is not None:
            turns = turns + [{"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        if structured:  # processors' templates take typed content parts
            return turns
        # text tokenizers' templates take plain strings
        return [{"role": m["role"], "content": "".join(p.get("text", "") for p in m["content"])} for m in turns]

    def render(self, prompt: str, answer: str, n_images: int = 0, turns: Optional[List[dict]] = None) -> tuple:
        """(prompt text, full text): the chat-templated prompt with the generation prompt, and the whole
        conversation with the answer; ``turns`` (a record's ``messages``) replace ``prompt`` and place its
        images. Without a chat template: ``prompt + "\n"`` and that + answer + eos; a prefix-LM processor's own
        layout (it adds the separator and the eos): ``prompt`` and ``prompt + answer``."""
        owner = self._template_owner
        if owner is None:
            if n_images and self.prefix_lm:  # image tokens first, as the processor asks
                p = (getattr(self.processor, "image_token", None) or "") * n_images + prompt
                return p, p + answer
            if n_images:
                raise ValueError("records with images need a processor with a chat template")
            p = prompt + "\n"
            return p, p + answer + (self.tokenizer.eos_token or "")
        structured = owner is not self.tokenizer or n_images > 0
        # The owner's template rendered by the tokenizer: a processor's own apply_chat_template may want its
        # video processor (SmolVLM's reads its frame rate), which an image-only processor does not have.
        render = functools.partial(self.tokenizer.apply_chat_template, chat_template=owner.chat_template, tokenize=False)
        p = render(self._messages(prompt, n_images, None, structured, turns), add_generation_prompt=True)
        full = render(self._messages(prompt, n_images, answer, structured, turns))
        return p, full

    def prompt_text(self, record: PreferenceRecord) -> str:
        """The chat-templated prompt of ``record`` ending with the generation prompt (for ``generate``)."""
        return self.render(record.prompt, "", len(record.images), record.messages)[0]

    # -- encoding

    def _tok_ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=self._template_owner is None)["input_ids"])

    def _encode(self, prompt: str, answer: str, images: list, where: str, turns: Optional[List[dict]] = None) -> tuple:
        """(features of one row, prompt length in tokens)."""
        p_text, full_text = self.render(prompt, answer, len(images), turns)
        if self.prefix_lm and images:
            # The processor marks the answer (its suffix) with token_type_ids 1: causal there, the prefix
            # (images + prompt) bidirectional; its own labels are left out (the collator makes them).
            feats = self._features(p_text, images, where, suffix=full_text[len(p_text):])
            feats.pop("labels", None)
            prompt_len = int((feats["token_type_ids"][0] == 0).sum())
            if prompt_len >= min(feats["input_ids"].shape[1], self.max_length):
                raise ValueError(f"{where}: prompt is {prompt_len} tokens (images included), leaving no answer "
                                 f"token within max_length={self.max_length}")
            return feats, prompt_len
        feats = self._features(full_text, images, where)
        ids = feats["input_ids"][0].tolist()
        # Image-token expansion happens in the prompt only, so the prompt length in the processed row is
        # the tokenizer's prompt length plus the number of tokens the processor added.
        text_full = self._tok_ids(full_text)
        text_prompt = self._tok_ids(p_text)
        n = 0
        while n < min(len(text_prompt), len(text_full)) and text_prompt[n] == text_full[n]:
            n += 1
        prompt_len = n + (len(ids) - len(text_full))
        if prompt_len >= min(len(ids), self.max_length):
            raise ValueError(
                f"{where}: prompt is {prompt_len} tokens (images included), leaving no answer token within "
                f"max_length={self.max_length}"
            )
        return feats, prompt_len

    def _check_images(self, records: Sequence[PreferenceRecord]) -> None:
        if self.image_processor is None:
            for i, r in enumerate(records):
                if r.images:
                    raise ValueError(
                        f"record {i} has images but the model's processor has no image processor (text-only model?)"
                    )

    def _features(self, text: str, images: list, where: str, suffix: Optional[str] = None) -> Dict[str, Any]:
        add_special = self._template_owner is None
        if images:
            if self.image_processor is None:
                raise ValueError(
                    f"{where} has images but the model's processor has no image processor (text-only model?)"
                )
            extra = {} if suffix is None else {"suffix": [suffix]}
            feats = self.processor(
                text=[text], images=[_load_image(i) for i in images], return_tensors="pt",
                add_special_tokens=add_special, **extra,
            )
        else:
            feats = self.tokenizer(
                [text], return_tensors="pt", add_special_tokens=add_special, return_token_type_ids=False
            )
        return dict(feats)

    def _pad(self, feats: List[Dict[str, Any]], T: int, *, left: bool) -> Dict[str, torch.Tensor]:
        """One batch of the rows' processor features, ``T`` tokens wide (cut or padded, on the left or right).

        Per-token keys are found by shape (``[1, L, ...]`` with ``L`` the row's length: the attention mask,
        token type ids, Mllama's ``cross_attention_mask``, ...; a row holds more tokens than images, tiles or
        patch rows, so no image key has that shape) and padded with 0 (masked / text / no image),
        ``input_ids`` with the pad token; the others (pixel values, image sizes, grids, ...) are
        concatenated row after row, zero-padded where their trailing sizes differ (the processors' own
        padding: more tiles or images in one row than another).
        """
        R = len(feats)
        out: Dict[str, Any] = {"input_ids": torch.full((R, T), self.pad_token_id, dtype=torch.long)}
        per_token: Dict[str, List[tuple]] = {}
        stacked: Dict[str, List[torch.Tensor]] = {}
        for row, f in enumerate(feats):
            L = f["input_ids"].shape[1]
            for key, val in f.items():
                if key in COLLATOR_KEYS or not isinstance(val, torch.Tensor):
                    continue
                if key == "input_ids" or (val.dim() >= 2 and val.shape[0] == 1 and val.shape[1] == L):
                    per_token.setdefault(key, []).append((row, val[0, :T] if not left else val[0, max(0, L - T):]))
                else:
                    stacked.setdefault(key, []).append(val)
        if "attention_mask" not in per_token:
            per_token["attention_mask"] = [(row, torch.ones(f["input_ids"].shape[1], dtype=torch.long))
                                           for row, f in enumerate(feats)]
        for key, rows in per_token.items():
            tail = [max(v.shape[d] for _, v in rows) for d in range(1, rows[0][1].dim())]
            if key not in out:
                out[key] = torch.zeros((R, T, *tail), dtype=rows[0][1].dtype)
            for row, v in rows:
                L = v.shape[0]
                where = (row, slice(T - L, T) if left else slice(0, L), *(slice(0, n) for n in v.shape[1:]))
                out[key][where] = v
        for key, vals in stacked.items():
            shape = [max(v.shape[d] for v in vals) for d in range(1, vals[0].dim())]
            out[key] = torch.cat([_pad_trailing(v, shape) for v in vals], dim=0)
        return out

    def generation_inputs(self, records: Sequence[PreferenceRecord]) -> Dict[str, torch.Tensor]:
        """Left-padded prompt batch (chat template with the generation prompt, images processed) for
        ``model.generate(**inputs)``; the new tokens start at column ``inputs["input_ids"].shape[1]``."""
        self._check_images(records)
        feats = [self._features(self.prompt_text(r), list(r.images), f"record {i}") for i, r in enumerate(records)]
        return self._pad(feats, max(f["input_ids"].shape[1] for f in feats), left=True)

    def encode_rows(self, records: Sequence[PreferenceRecord], mode: str) -> tuple:
        """(the logical rows of ``records`` in ``mode`` (:func:`answer_rows`), each row's (features, prompt
        length)): what the unshared and the shared-prefix collators both start from."""
        if mode not in ("pair", "sft", "nsft"):
            raise ValueError(f"mode: expected 'pair', 'sft' or 'nsft', got {mode!r}")
        if not records:
            raise ValueError("cannot collate an empty list of records")
        self._check_images(records)
        rows = answer_rows(records, mode)
        encoded = []
        for i, answer, _ in rows:
            r = records[i]
            encoded.append(self._encode(r.prompt, answer, list(r.images), r.where or f"record {i}", r.messages))
        return rows, encoded

    def __call__(self, records: Sequence[PreferenceRecord], *, mode: str = "pair") -> Dict[str, torch.Tensor]:
        rows, encoded = self.encode_rows(records, mode)

        T = min(self.max_length, max(f["input_ids"].shape[1] for f, _ in encoded))
        out = self._pad([f for f, _ in encoded], T, left=False)
        labels = torch.full(out["input_ids"].shape, self.ignore_index, dtype=torch.long)
        for row, (feats, prompt_len) in enumerate(encoded):
            L = min(feats["input_ids"].shape[1], T)
            labels[row, prompt_len:L] = out["input_ids"][row, prompt_len:L]
        for tid in self.image_token_ids:
            labels[out["input_ids"] == tid] = self.ignore_index
        out["labels"] = labels
        out["num_images"] = torch.tensor([len(records[i].images) for i, _, _ in rows], dtype=torch.long)
        out["row_record"] = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
        if mode == "nsft":
            out["correction_rows"] = torch.tensor([c for _, _, c in rows], dtype=torch.bool)
        return out
