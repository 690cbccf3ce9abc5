"""The collator that turns preference records into model inputs + labels (the records, their sources and
their checks: :mod:`prefopt.train.sources`, whose names this module re-exports).

The collator renders each (prompt, answer) pair with the processor's (or tokenizer's) chat template,
runs it through the processor (image tokens are expanded there), and builds Hugging Face labels
(unshifted: ``labels[r, t]`` is the target of position ``t``; the loss shifts by one): ``input_ids`` with
every prompt token (image tokens included) and padding set to ``ignore_index``.
"""
from __future__ import annotations

import io
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import first_line
from .sources import (MAX_IMAGE_PIXELS, MAX_RECORD_BYTES, DataProblems, PreferenceRecord, RecordSet, check_image,
                      data_fingerprint, load_records)

__all__ = ["PreferenceRecord", "RecordSet", "load_records", "data_fingerprint", "DataProblems", "check_image",
           "PreferenceCollator", "EXTRA_BATCH_KEYS", "model_inputs", "MAX_IMAGE_PIXELS", "MAX_RECORD_BYTES"]

# Keys the collator adds that are not model inputs; ModelAdapter.hidden_states drops them.
EXTRA_BATCH_KEYS = ("labels", "num_images", "correction_rows", "row_record")


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
    ``pixel_values``, ``image_grid_thw``, ``mm_token_type_ids``; images are repeated for every row that
    uses them, in row order), plus ``labels`` ([R, T] long, unshifted, prompt/image/padding tokens =
    ``ignore_index``), ``num_images`` ([R] long) and ``row_record`` ([R] long: the record each row came from).
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
        images. Without a chat template: ``prompt + "\n"`` and that + answer + eos."""
        owner = self._template_owner
        if owner is None:
            if n_images:
                raise ValueError("records with images need a processor with a chat template")
            p = prompt + "\n"
            return p, p + answer + (self.tokenizer.eos_token or "")
        structured = owner is not self.tokenizer or n_images > 0
        p = owner.apply_chat_template(
            self._messages(prompt, n_images, None, structured, turns), tokenize=False, add_generation_prompt=True
        )
        full = owner.apply_chat_template(self._messages(prompt, n_images, answer, structured, turns), tokenize=False)
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

    def _features(self, text: str, images: list, where: str) -> Dict[str, Any]:
        add_special = self._template_owner is None
        if images:
            if self.image_processor is None:
                raise ValueError(
                    f"{where} has images but the model's processor has no image processor (text-only model?)"
                )
            feats = self.processor(
                text=[text], images=[_load_image(i) for i in images], return_tensors="pt",
                add_special_tokens=add_special,
            )
        else:
            feats = self.tokenizer(
                [text], return_tensors="pt", add_special_tokens=add_special, return_token_type_ids=False
            )
        return dict(feats)

    def generation_inputs(self, records: Sequence[PreferenceRecord]) -> Dict[str, torch.Tensor]:
        """Left-padded prompt batch (chat template with the generation prompt, images processed) for
        ``model.generate(**inputs)``; the new tokens start at column ``inputs["input_ids"].shape[1]``."""
        self._check_images(records)
        feats = [self._features(self.prompt_text(r), list(r.images), f"record {i}") for i, r in enumerate(records)]
        T = max(f["input_ids"].shape[1] for f in feats)
        R = len(feats)
        out: Dict[str, Any] = {
            "input_ids": torch.full((R, T), self.pad_token_id, dtype=torch.long),
            "attention_mask": torch.zeros((R, T), dtype=torch.long),
        }
        stacked: Dict[str, List[torch.Tensor]] = {}
        for row, f in enumerate(feats):
            L = f["input_ids"].shape[1]
            out["input_ids"][row, T - L:] = f["input_ids"][0]
            out["attention_mask"][row, T - L:] = 1
            for key, val in f.items():
                if key in ("input_ids", "attention_mask") or not isinstance(val, torch.Tensor):
                    continue
                if key.endswith("token_type_ids"):
                    if key not in out:
                        out[key] = torch.zeros((R, T) + tuple(val.shape[2:]), dtype=val.dtype)
                    out[key][row, T - L:] = val[0]
                else:
                    stacked.setdefault(key, []).append(val)
        for key, vals in stacked.items():
            out[key] = torch.cat(vals, dim=0)
        return out

    def __call__(self, records: Sequence[PreferenceRecord], *, mode: str = "pair") -> Dict[str, torch.Tensor]:
        if mode not in ("pair", "sft", "nsft"):
            raise ValueError(f"mode: expected 'pair', 'sft' or 'nsft', got {mode!r}")
        if not records:
            raise ValueError("cannot collate an empty list of records")
        self._check_images(records)
        rows = []  # (record index, answer, is_correction)
        for i, r in enumerate(records):
            rows.append((i, r.chosen, False))
        if mode == "pair":
            for i, r in enumerate(records):
                if r.rejected is None:
                    raise ValueError(f"record {i} has no rejected answer (mode='pair')")
                rows.append((i, r.rejected, False))
        elif mode == "nsft":
            for i, r in enumerate(records):
                rows.extend((i, c, True) for c in r.corrections)

        encoded = []
        for i, answer, _ in rows:
            r = records[i]
            encoded.append(self._encode(r.prompt, answer, list(r.images), r.where or f"record {i}", r.messages))

        T = min(self.max_length, max(f["input_ids"].shape[1] for f, _ in encoded))
        R = len(rows)
        input_ids = torch.full((R, T), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((R, T), dtype=torch.long)
        labels = torch.full((R, T), self.ignore_index, dtype=torch.long)
        per_token: Dict[str, torch.Tensor] = {}
        stacked: Dict[str, List[torch.Tensor]] = {}
        for row, (feats, prompt_len) in enumerate(encoded):
            ids = feats["input_ids"][0][:T]
            L = ids.shape[0]
            input_ids[row, :L] = ids
            attention_mask[row, :L] = 1
            labels[row, prompt_len:L] = ids[prompt_len:]
            for key, val in feats.items():
                if key in ("input_ids", "attention_mask") or not isinstance(val, torch.Tensor):
                    continue
                if key.endswith("token_type_ids"):
                    if key not in per_token:
                        per_token[key] = torch.zeros((R, T) + tuple(val.shape[2:]), dtype=val.dtype)
                    per_token[key][row, :L] = val[0, :L]
                else:
                    stacked.setdefault(key, []).append(val)
        for tid in self.image_token_ids:
            labels[input_ids == tid] = self.ignore_index
        out: Dict[str, torch.Tensor] = {"input_ids": input_ids, "attention_mask": attention_mask}
        out.update(per_token)
        for key, vals in stacked.items():
            out[key] = torch.cat(vals, dim=0)
        out["labels"] = labels
        out["num_images"] = torch.tensor([len(records[i].images) for i, _, _ in rows], dtype=torch.long)
        out["row_record"] = torch.tensor([i for i, _, _ in rows], dtype=torch.long)
        if mode == "nsft":
            out["correction_rows"] = torch.tensor([c for _, _, c in rows], dtype=torch.bool)
        return out
