"""Preference records, their JSONL loader, and the collator that turns records into model inputs + labels.

JSONL format, one object per line (blank lines are skipped)::

    {"images": ["img/0.png"], "prompt": "What colour is the circle?",
     "chosen": "The circle is red.", "rejected": "The circle is blue.",
     "corrections": ["The circle is not blue; it is red."]}

``prompt`` and ``chosen`` are required non-empty strings; ``rejected`` is a string or null/absent;
``images`` is a list of paths (relative paths are resolved against the JSONL file's folder; a single
string is accepted as a one-element list), may be empty or absent; ``corrections`` is a list of strings,
may be absent. Other keys are ignored. A line is never trained on when it is not UTF-8 or not JSON, has a
duplicate key, a missing or empty field, ``chosen == rejected``, or an image that is missing, not a regular
file, outside the data folder (unless allowed), over the pixel limit or does not decode; the trainer
also skips records whose text holds a literal image token or whose prompt leaves no answer token within
``--max-length`` (a longer answer is cut at ``max_length``), and, for pairwise methods, records without
``rejected``. Each problem is one line ``FILE:LINE: reason`` on stderr and counted in the summary; with
``strict`` (``--strict-data``) the first one is a ``ValueError``.

The collator renders each (prompt, answer) pair with the processor's (or tokenizer's) chat template,
runs it through the processor (image tokens are expanded there), and builds Hugging Face labels
(unshifted: ``labels[r, t]`` is the target of position ``t``; the loss shifts by one): ``input_ids`` with
every prompt token (image tokens included) and padding set to ``ignore_index``.
"""
from __future__ import annotations

import functools
import inspect
import json
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

import torch

from .errors import first_line

__all__ = ["PreferenceRecord", "load_records", "data_fingerprint", "DataProblems", "check_image", "PreferenceCollator", "EXTRA_BATCH_KEYS", "model_inputs", "answer_rows"]

#: Default pixel limit of one image (width x height); larger ones are refused as decompression bombs.
MAX_IMAGE_PIXELS = 50_000_000

# Keys the collator adds that are not model inputs; ModelAdapter.hidden_states drops them.
EXTRA_BATCH_KEYS = ("labels", "num_images", "correction_rows", "row_record", "answer_positions", "prefix_lengths",
                    "logical_tokens")
# What a processor may return that the collator makes itself (PaliGemma's processor returns its own labels).
COLLATOR_KEYS = ("labels",)


@dataclass
class PreferenceRecord:
    """One preference example. ``images``: paths or PIL images (in the order their tokens appear)."""

    prompt: str
    chosen: str
    rejected: Optional[str] = None
    images: list = field(default_factory=list)
    corrections: List[str] = field(default_factory=list)
    where: str = ""  # FILE:LINE of a record loaded from JSONL (what problems with it are reported as)


def model_inputs(batch: Dict[str, Any]) -> Dict[str, Any]:
    """``batch`` without the collator's extra keys (``labels``, ``num_images``, ...): the model's inputs."""
    return {k: v for k, v in batch.items() if k not in EXTRA_BATCH_KEYS}


# --------------------------------------------------------------------------------------------- loading


class DataProblems:
    """The problems found in the data, one line each (``FILE:LINE: reason``): printed to stderr (rank 0)
    as they are found and counted for the summary; with ``strict`` the first one raises ``ValueError``."""

    def __init__(self, strict: bool = False):
        self.strict = strict
        self.lines: List[str] = []

    def __call__(self, where: str, reason: str, echo: Optional[bool] = None) -> None:
        """Count (and, with ``echo``, print; default: on rank 0) the problem ``reason`` of record ``where``."""
        line = f"{where}: {reason}"
        if self.strict:
            raise ValueError(line + " (--strict-data)")
        self.lines.append(line)
        if os.environ.get("RANK", "0") == "0" if echo is None else echo:
            print(f"{line} (skipped)", file=sys.stderr, flush=True)

    def __len__(self) -> int:
        return len(self.lines)


def _no_duplicate_keys(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen.add(k)
    return dict(pairs)


def check_image(path: str, folder: str, *, allow_outside: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """``ValueError`` (the reason) unless ``path`` is a regular file inside ``folder`` (unless
    ``allow_outside``; symbolic links are followed) that PIL identifies and verifies, with at most
    ``max_pixels`` pixels (a decompression bomb is refused from its header, before decoding)."""
    import warnings

    from PIL import Image

    real = os.path.realpath(path)
    if not allow_outside and os.path.commonpath([real, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise ValueError(f"image {path} is outside the data folder (pass --allow-outside-images to allow)")
    if not os.path.exists(real):
        raise ValueError(f"image not found: {path}")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise ValueError(f"image {path} is not a regular file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(real) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"image {path} is {w}x{h} pixels, over the limit of {max_pixels}")
                im.verify()
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        reason = first_line(e)
        raise ValueError(f"image {path} does not decode ({reason})") from None


def _parse_record(obj: Any, folder: str, allow_outside: bool = False,
                  max_pixels: int = MAX_IMAGE_PIXELS) -> PreferenceRecord:
    """Validate one decoded JSON value; raise ValueError with the reason when it is malformed."""
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("prompt", "chosen"):
        if key not in obj:
            raise ValueError(f"missing field {key!r}")
        if not isinstance(obj[key], str) or not obj[key].strip():
            raise ValueError(f"field {key!r} must be a non-empty string")
    rejected = obj.get("rejected")
    if rejected is not None and (not isinstance(rejected, str) or not rejected.strip()):
        raise ValueError("field 'rejected' must be a non-empty string or null")
    if rejected is not None and rejected.strip() == obj["chosen"].strip():
        raise ValueError("chosen and rejected are the same answer")
    images = obj.get("images", [])
    if images is None:
        images = []
    if isinstance(images, str):
        images = [images]
    if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
        raise ValueError("field 'images' must be a list of paths")
    paths = []
    for p in images:
        full = p if os.path.isabs(p) else os.path.join(folder, p)
        check_image(full, folder, allow_outside=allow_outside, max_pixels=max_pixels)
        paths.append(full)
    corrections = obj.get("corrections", [])
    if corrections is None:
        corrections = []
    if not isinstance(corrections, list) or not all(isinstance(c, str) and c.strip() for c in corrections):
        raise ValueError("field 'corrections' must be a list of non-empty strings")
    return PreferenceRecord(
        prompt=obj["prompt"], chosen=obj["chosen"], rejected=rejected, images=paths, corrections=list(corrections)
    )


def load_records(
    source: str, *, split: str = "train", strict: bool = False, seed: int = 0, size: Optional[int] = None,
    problems: Optional[DataProblems] = None, allow_outside_images: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
) -> List[PreferenceRecord]:
    """Load preference records.

    ``source``: ``"synthetic"`` (the built-in set, :func:`prefopt.train.synthetic.make_synthetic_records`
    with ``split``, ``size`` and ``seed``), a JSONL file, or a folder holding ``{split}.jsonl``. For a
    file, ``split`` and ``seed`` are not used and ``size`` keeps the first ``size`` valid records; each
    record's ``where`` is ``FILE:LINE``. Missing path: ``ValueError`` with a one-line message. A line
    that is not UTF-8, not JSON, has a duplicate key, a missing or empty field, chosen == rejected, or an
    image that fails :func:`check_image` is reported to ``problems`` (default: a new
    :class:`DataProblems` with ``strict``) and skipped.
    """
    if source == "synthetic":
        from .synthetic import make_synthetic_records

        return make_synthetic_records(split=split, size=size, seed=seed)
    path = source
    if os.path.isdir(path):
        path = os.path.join(path, f"{split}.jsonl")
        if not os.path.isfile(path):
            raise ValueError(f"data folder {source!r} has no {split}.jsonl")
    elif not os.path.isfile(path):
        raise ValueError(f"data file not found: {source!r} (expected a JSONL file, a folder, or 'synthetic')")
    report = problems if problems is not None else DataProblems(strict)
    folder = os.path.dirname(os.path.abspath(path))
    records: List[PreferenceRecord] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report(where, f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
                except json.JSONDecodeError as e:
                    raise ValueError(f"invalid JSON ({e.msg})") from None
                rec = _parse_record(obj, folder, allow_outside_images, max_image_pixels)
            except ValueError as e:
                report(where, str(e))
                continue
            rec.where = where
            records.append(rec)
            if size is not None and len(records) >= size:
                break
    return records


def data_fingerprint(source: str, records: Sequence[PreferenceRecord]) -> str:
    """A cheap fingerprint of the training data: sha256 of the JSONL file's bytes and of each record's
    images' sizes in bytes (``"synthetic"`` for the built-in set, whose options fix it)."""
    import hashlib

    if source == "synthetic":
        return "synthetic"
    path = os.path.join(source, "train.jsonl") if os.path.isdir(source) else source
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for r in records:
        for img in r.images:
            if isinstance(img, (str, os.PathLike)):
                h.update(f"{os.path.getsize(img)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- collation


def _load_image(img: Any):
    from PIL import Image

    if isinstance(img, (str, os.PathLike)):
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

    def _messages(self, prompt: str, n_images: int, answer: Optional[str], structured: bool) -> List[dict]:
        if structured:  # processors' templates take typed content parts
            content: Any = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": prompt}]
            reply: Any = [{"type": "text", "text": answer}]
        else:  # text tokenizers' templates take plain strings
            content, reply = prompt, answer
        msgs = [{"role": "user", "content": content}]
        if answer is not None:
            msgs.append({"role": "assistant", "content": reply})
        return msgs

    def render(self, prompt: str, answer: str, n_images: int = 0) -> tuple:
        """(prompt text, full text): the chat-templated prompt with the generation prompt, and the whole
        conversation with the answer. Without a chat template: ``prompt + "\n"`` and that + answer + eos; a
        prefix-LM processor's own layout (it adds the separator and the eos): ``prompt`` and ``prompt + answer``."""
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
        p = render(self._messages(prompt, n_images, None, structured), add_generation_prompt=True)
        full = render(self._messages(prompt, n_images, answer, structured))
        return p, full

    def prompt_text(self, record: PreferenceRecord) -> str:
        """The chat-templated prompt of ``record`` ending with the generation prompt (for ``generate``)."""
        return self.render(record.prompt, "", len(record.images))[0]

    # -- encoding

    def _tok_ids(self, text: str) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=self._template_owner is None)["input_ids"])

    def _encode(self, prompt: str, answer: str, images: list, where: str) -> tuple:
        """(features of one row, prompt length in tokens)."""
        p_text, full_text = self.render(prompt, answer, len(images))
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

    def __call__(self, records: Sequence[PreferenceRecord], *, mode: str = "pair") -> Dict[str, torch.Tensor]:
        if mode not in ("pair", "sft", "nsft"):
            raise ValueError(f"mode: expected 'pair', 'sft' or 'nsft', got {mode!r}")
        if not records:
            raise ValueError("cannot collate an empty list of records")
        self._check_images(records)
        rows = answer_rows(records, mode)
        encoded = []
        for i, answer, _ in rows:
            r = records[i]
            encoded.append(self._encode(r.prompt, answer, list(r.images), r.where or f"record {i}"))

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
