"""Where preference records come from, and the checks every record passes before training.

``--data`` is detected by what it is:

* ``synthetic``: the built-in visual set (:mod:`prefopt.train.synthetic`);
* a JSONL file (any other file name), or a folder holding ``{split}.jsonl``: prefopt's records, one per line;
* a ``.json`` file holding a JSON array of records (VLFeedback, POVID, ...), read by ``datasets``' JSON reader
  (whole, into its cache: such files hold image paths, not images);
* a ``.parquet`` or ``.arrow`` file, or a folder of them (names starting with a split name, e.g.
  ``train-00000-of-00002.parquet``, are that split's; other names are all ``train``);
* a ``save_to_disk`` folder (``state.json`` or ``dataset_dict.json``);
* else a Hugging Face hub dataset id (``org/name``): its snapshot at ``--data-revision`` (default ``main``) in
  the hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` honoured), downloaded when online, read as a folder (JSONL,
  or parquet/arrow files).

A folder with both JSONL and parquet/arrow files is refused unless ``--data`` names the file.

Each row is a record in one of these layouts (fields found by name, or by the columns that
``--data-columns prompt=question,images=image,chosen=chosen,rejected=rejected`` maps them to):

* prefopt's: ``prompt``, ``chosen`` strings, ``rejected`` a string or null, ``images``, ``corrections``;
* TRL's preference format: ``prompt`` a string or a list of messages (``{"role": system|user|assistant,
  "content": str or [{"type": "text", "text": ...}, {"type": "image"}]}``, several turns allowed, ending
  with a user turn), ``chosen`` / ``rejected`` a string or one assistant message; or, without ``prompt``,
  whole conversations whose shared start is the prompt (TRL's implicit prompt). ``{"type": "image"}``
  parts place the images, in order; with none, the images go before the first user message's text.

Images (``images``, else ``image``): a path (relative to the file that names it), a ``{"bytes", "path"}`` dict
(``datasets.Image``), a PIL image, or a list of these.

Rows are read on demand by index: a :class:`RecordSet` holds the source and the indices of the usable rows,
never the rows; images are decoded when a batch is built. The up-front checks stream over the rows.
Parquet is copied once, a few rows at a time, into an arrow file in ``datasets``' cache (``HF_DATASETS_CACHE``)
and memory-mapped from there; ``.arrow`` files and ``save_to_disk`` folders are memory-mapped in place.

The module is long (about 760 lines) because every ``--data`` layout's reader and the record checks they all
run live together behind one entry, :func:`load_records`; each reader is a few private functions.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import stat
import sys
from array import array
from collections.abc import Sequence as SequenceABC
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

from .errors import first_line
from .records import PreferenceRecord

__all__ = ["PreferenceRecord", "DataProblems", "RecordSet", "check_image", "load_records", "data_fingerprint",
           "parse_columns", "image_key", "same_answer", "MAX_IMAGE_PIXELS", "MAX_RECORD_BYTES", "MAX_RECORD_DEPTH"]

#: Default pixel limit of one image (width x height); larger ones are refused as decompression bombs.
MAX_IMAGE_PIXELS = 50_000_000
#: Default size limit of one record in bytes (a JSONL line, or a row's text and embedded images): a larger
#: JSONL line is skipped without being held whole.
MAX_RECORD_BYTES = 64 << 20
#: Deepest nesting of lists and objects in a record; a deeper one is skipped.
MAX_RECORD_DEPTH = 32
#: The fields of a record, which ``--data-columns`` maps to columns.
FIELDS = ("prompt", "chosen", "rejected", "images", "corrections")
# Bytes read at a time while skipping the rest of an oversized line.
_SKIP_CHUNK = 1 << 16
# Rows decoded at a time while the up-front checks stream over an arrow source.
_STREAM_ROWS = 64
# Characters that render as nothing: answers differing only by them (or by Unicode normalisation) are equal.
_ZERO_WIDTH = dict.fromkeys(map(ord, "\u200b\u200c\u200d\u2060\ufeff\u00ad"))
_ROLES = ("system", "user", "assistant")
_SPLIT_NAMES = ("train", "test", "validation", "valid", "dev", "heldout", "eval")


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


class RecordSet(SequenceABC):
    """The usable records of a source, read on demand: ``read(row)`` builds the record of one row and
    ``rows`` lists the usable rows. Indexing gives a :class:`PreferenceRecord`, slicing a list of them;
    :meth:`select` keeps a subset without reading it. ``fingerprint`` identifies the source's content (or
    computes it from the set, :func:`data_fingerprint`)."""

    def __init__(self, read: Callable[[int], PreferenceRecord], rows: Sequence[int],
                 fingerprint: Union[str, Callable[["RecordSet"], str]]):
        self.read, self.rows, self.fingerprint = read, rows, fingerprint

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self.read(r) for r in self.rows[i]]
        return self.read(self.rows[i])

    def select(self, positions: Sequence[int]) -> "RecordSet":
        """The records at ``positions`` (indices into this set), in that order."""
        return RecordSet(self.read, array("q", (self.rows[p] for p in positions)), self.fingerprint)


# --------------------------------------------------------------------------------------------- checks


def same_answer(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` are the same text after NFC normalisation, removing zero-width characters and
    surrounding white space."""
    import unicodedata

    def norm(s):
        return unicodedata.normalize("NFC", s).translate(_ZERO_WIDTH).strip()

    return norm(a) == norm(b)


def _nesting_depth(obj: Any) -> int:
    """How deeply lists and dicts nest in ``obj`` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((c, depth + 1) for c in children)
    return deepest


def _verify_image(open_image: Callable, name: str, max_pixels: int) -> None:
    """``ValueError`` unless the image ``open_image()`` opens has at most ``max_pixels`` pixels (read from its
    header, before decoding) and PIL verifies it."""
    import warnings

    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with open_image() as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ValueError(f"image {name} is {w}x{h} pixels, over the limit of {max_pixels}")
                im.verify()
    except ValueError:
        raise
    except Exception as e:  # PIL raises many types for broken files
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "bytes", first_line(e))
        raise ValueError(f"image {name} does not decode ({reason})") from None


def check_image(path: str, folder: str, *, allow_outside: bool = False, max_pixels: int = MAX_IMAGE_PIXELS) -> None:
    """``ValueError`` (the reason) unless ``path`` is a regular file inside ``folder`` (unless
    ``allow_outside``; symbolic links are followed) that PIL identifies and verifies, with at most
    ``max_pixels`` pixels (a decompression bomb is refused from its header, before decoding)."""
    from PIL import Image

    real = os.path.realpath(path)
    if not allow_outside and os.path.commonpath([real, os.path.realpath(folder)]) != os.path.realpath(folder):
        raise ValueError(f"image {path} is outside the data folder (pass --allow-outside-images to allow)")
    if not os.path.exists(real):
        raise ValueError(f"image not found: {path}")
    if not stat.S_ISREG(os.stat(real).st_mode):
        raise ValueError(f"image {path} is not a regular file")
    _verify_image(lambda: Image.open(real), path, max_pixels)


def _image_name(img: dict, n: int) -> str:
    return f"{n} ({img['path']})" if img.get("path") else str(n)


def _checked_images(value: Any, folder: Optional[str], allow_outside: bool, max_pixels: int,
                    check: bool = True) -> list:
    """The images of a record's ``images`` value, each checked (unless not ``check``): paths made absolute
    (relative to ``folder``), ``{"bytes", "path"}`` dicts and PIL images kept as they are."""
    from PIL import Image

    if value is None:
        return []
    images = []
    for n, img in enumerate(value if isinstance(value, list) else [value]):
        if isinstance(img, dict) and img.get("bytes") is None and isinstance(img.get("path"), str):
            img = img["path"]  # datasets' Image feature holding a path only
        if isinstance(img, str) and img:
            if not os.path.isabs(img):
                if folder is None:
                    raise ValueError(f"image {img} is a relative path and the data has no folder to resolve it in")
                img = os.path.join(folder, img)
            if check:
                check_image(img, folder or os.path.dirname(img), allow_outside=allow_outside or folder is None,
                            max_pixels=max_pixels)
        elif isinstance(img, dict) and isinstance(img.get("bytes"), bytes):
            if check:
                data = img["bytes"]
                _verify_image(lambda: Image.open(io.BytesIO(data)), _image_name(img, n), max_pixels)
        elif isinstance(img, Image.Image):
            if check and img.width * img.height > max_pixels:
                raise ValueError(f"image {n} is {img.width}x{img.height} pixels, over the limit of {max_pixels}")
        else:
            raise ValueError("field 'images' must hold image paths, {bytes, path} dicts or PIL images")
        images.append(img)
    return images


def image_key(img: Any) -> str:
    """A short, stable name of an image's content or place: its path, or the sha256 of its bytes or pixels."""
    if isinstance(img, (str, os.PathLike)):
        return str(img)
    if isinstance(img, dict):
        return "sha256:" + hashlib.sha256(img.get("bytes") or b"").hexdigest()[:32] + f" {img.get('path')}"
    tobytes = getattr(img, "tobytes", None)
    return "sha256:" + hashlib.sha256(tobytes() if tobytes else repr(img).encode()).hexdigest()[:32]


# --------------------------------------------------------------------------------------------- layouts


def parse_columns(spec: Optional[str]) -> Dict[str, str]:
    """``--data-columns``: ``"prompt=question,images=image"`` -> ``{"prompt": "question", "images": "image"}``."""
    if not spec:
        return {}
    columns: Dict[str, str] = {}
    for item in spec.split(","):
        name, sep, column = (s.strip() for s in item.partition("="))
        if not sep or name not in FIELDS or not column or name in columns:
            raise ValueError(f"--data-columns: expected FIELD=COLUMN pairs separated by commas, FIELD one of "
                             f"{', '.join(FIELDS)} (each once), got {spec!r}")
        columns[name] = column
    return columns


def _parts(content: Any, where: str) -> List[dict]:
    """A message's content as typed parts: ``{"type": "text", "text": ...}`` or ``{"type": "image"}``."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise ValueError(f"{where}: content must be a string or a list of parts")
    parts = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            parts.append({"type": "image"})
        elif kind == "text" and isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
        else:
            raise ValueError(f"{where}: a content part must be {{'type': 'text', 'text': str}} or {{'type': 'image'}}")
    return parts


def _messages(value: Any, name: str) -> List[dict]:
    """A list of chat messages, each ``{"role", "content": parts}``."""
    messages = []
    for n, m in enumerate(value):
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise ValueError(f"field {name!r}: message {n} must have a role of {', '.join(_ROLES)}")
        messages.append({"role": m["role"], "content": _parts(m.get("content"), f"field {name!r}: message {n}")})
    return messages


def _text_of(messages: List[dict]) -> str:
    return "\n".join(p["text"] for m in messages for p in m["content"] if p["type"] == "text")


def _answer(value: Any, name: str) -> str:
    """An answer: a non-empty string, or one assistant message of text."""
    if isinstance(value, list):
        msgs = _messages(value, name)
        if len(msgs) != 1 or msgs[0]["role"] != "assistant" or any(p["type"] != "text" for p in msgs[0]["content"]):
            raise ValueError(f"field {name!r} must be a non-empty string or one assistant message of text")
        value = _text_of(msgs)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"field {name!r} must be a non-empty string")
    return value


def _implicit_prompt(chosen: list, rejected: Any) -> Tuple[list, list, Any]:
    """TRL's implicit prompt: the messages ``chosen`` and ``rejected`` start with (all but the last message
    of ``chosen`` when there is no ``rejected``); returns (prompt, chosen's rest, rejected's rest)."""
    if rejected is None:
        return chosen[:-1], chosen[-1:], None
    if not isinstance(rejected, list):
        raise ValueError("field 'rejected' must be a list of messages like 'chosen' (no 'prompt' field)")
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    return chosen[:n], chosen[n:], rejected[n:]


def _place_images(messages: List[dict], n_images: int) -> List[dict]:
    """``messages`` with one image part per image: where the messages put them, else before the first user
    message's text. ``ValueError`` when they put a different number."""
    placed = sum(p["type"] == "image" for m in messages for p in m["content"])
    if placed == n_images:
        return messages
    if placed:
        raise ValueError(f"the prompt places {placed} images but the record has {n_images}")
    first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
    out = list(messages)
    out[first_user] = dict(out[first_user], content=[{"type": "image"}] * n_images + out[first_user]["content"])
    return out


def record_from_row(row: Any, columns: Dict[str, str], images: Callable[[Any], list]) -> PreferenceRecord:
    """The record of one row (a decoded JSON object or a dataset row) in any layout (module docstring);
    ``images(value)`` checks and resolves the images. ``ValueError`` with the reason when it is malformed."""
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    col = {f: columns.get(f, f) for f in FIELDS}
    if "images" not in columns and "images" not in row and "image" in row:
        col["images"] = "image"
    for name in ("prompt", "chosen"):
        if col[name] not in row and not (name == "prompt" and "prompt" not in columns
                                          and isinstance(row.get(col["chosen"]), list)):
            raise ValueError(f"missing field {col[name]!r}")
    prompt, chosen, rejected = row.get(col["prompt"]), row[col["chosen"]], row.get(col["rejected"])
    if col["prompt"] not in row:
        prompt, chosen, rejected = _implicit_prompt(chosen, rejected)
        if not prompt:
            raise ValueError("no 'prompt' field, and 'chosen' and 'rejected' share no first messages")
    turns = None
    if isinstance(prompt, list):
        turns = _messages(prompt, col["prompt"])
        if not turns or turns[-1]["role"] != "user":
            raise ValueError(f"field {col['prompt']!r} must end with a user message")
        prompt = _text_of(turns)
    elif not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"field {col['prompt']!r} must be a non-empty string or a list of messages")
    chosen = _answer(chosen, col["chosen"])
    if rejected is not None:
        rejected = _answer(rejected, col["rejected"])
        if same_answer(rejected, chosen):
            raise ValueError("chosen and rejected are the same answer")
    corrections = row.get(col["corrections"]) or []
    if not isinstance(corrections, list) or not all(isinstance(c, str) and c.strip() for c in corrections):
        raise ValueError(f"field {col['corrections']!r} must be a list of non-empty strings")
    paths = images(row.get(col["images"]))
    if turns is not None:
        turns = _place_images(turns, len(paths))
    return PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, images=paths,
                            corrections=list(corrections), messages=turns)


# --------------------------------------------------------------------------------------------- JSONL


def _no_duplicate_keys(pairs):
    seen = set()
    for k, _ in pairs:
        if k in seen:
            raise ValueError(f"duplicate key {k!r}")
        seen.add(k)
    return dict(pairs)


def _bounded_lines(f, limit: int):
    """``(line number, bytes or None)`` for each line of the binary file ``f``: None for a line over ``limit``
    bytes (its newline not counted), which is read past in fixed chunks, never held whole."""
    lineno = 0
    while True:
        raw = f.readline(limit + 1)
        if not raw:
            return
        lineno += 1
        if raw.endswith(b"\n") or len(raw) <= limit:
            yield lineno, raw
            continue
        while raw and not raw.endswith(b"\n"):
            raw = f.readline(_SKIP_CHUNK)
        yield lineno, None


def _jsonl_rows(path: str, limit: int) -> Iterator[Tuple[int, str, Any]]:
    """``(line, FILE:LINE, decoded object or ValueError)`` for each non-blank line of the JSONL file ``path``."""
    with open(path, "rb") as f:
        for lineno, raw in _bounded_lines(f, limit):
            where = f"{path}:{lineno}"
            if raw is None:
                yield lineno, where, ValueError(f"record is over {limit} bytes (--max-record-bytes)")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield lineno, where, ValueError(f"not UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line, object_pairs_hook=_no_duplicate_keys)
                too_deep = _nesting_depth(obj) > MAX_RECORD_DEPTH
            except json.JSONDecodeError as e:
                yield lineno, where, ValueError(f"invalid JSON ({e.msg})")
                continue
            except ValueError as e:  # a duplicate key
                yield lineno, where, e
                continue
            except RecursionError:  # json's parser stops at the interpreter's recursion limit
                too_deep = True
            if too_deep:
                obj = ValueError(f"record is nested deeper than {MAX_RECORD_DEPTH} levels")
            yield lineno, where, obj


def _jsonl_fingerprint(path: str, records: Sequence[PreferenceRecord], columns: Dict[str, str]) -> str:
    """sha256 of the file's bytes, then of each record's image files' sizes (and of ``columns`` if any)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    for r in records:
        for img in r.images:
            if isinstance(img, (str, os.PathLike)):
                h.update(f"{os.path.getsize(img)}\n".encode())
    if columns:
        h.update(json.dumps(columns).encode())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------- arrow sources


@contextlib.contextmanager
def _quiet_datasets():
    """``datasets`` without its progress bars and info logs (the trainer prints its own lines)."""
    import datasets

    was_disabled = datasets.utils.are_progress_bars_disabled()
    level = datasets.logging.get_verbosity()
    datasets.disable_progress_bars()
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its errors become one line here
    try:
        yield datasets
    finally:
        datasets.logging.set_verbosity(level)
        if not was_disabled:
            datasets.enable_progress_bars()


def _parquet_footer_hash(path: str) -> str:
    """sha256 of a parquet file's footer (its metadata: schema, row groups, column statistics and offsets)."""
    with open(path, "rb") as f:
        f.seek(-8, os.SEEK_END)
        size = int.from_bytes(f.read(4), "little")
        f.seek(-8 - size, os.SEEK_END)
        return hashlib.sha256(f.read(size)).hexdigest()


def _files_fingerprint(files: Sequence[str]) -> str:
    """File names and sizes, each parquet file's footer (cheap whatever the files' size) and a JSON file's
    bytes (text: image paths, not images)."""
    h = hashlib.sha256()
    for path in files:
        h.update(f"{os.path.basename(path)}\0{os.path.getsize(path)}\0".encode())
        if path.endswith(".parquet"):
            h.update(_parquet_footer_hash(path).encode())
        elif path.endswith(".json"):
            h.update(_jsonl_fingerprint(path, [], {}).encode())
    return h.hexdigest()


def _parquet_as_arrow(files: Sequence[str], fingerprint: str) -> str:
    """An arrow copy of the parquet ``files`` in datasets' cache (``HF_DATASETS_CACHE``), to memory-map: made
    once per content and modification time, a few rows at a time (datasets' own conversion pre-buffers whole
    files: its peak memory grows with the file), under a temporary name renamed when complete."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    key = json.dumps([fingerprint] + [[os.path.abspath(p), os.stat(p).st_mtime_ns] for p in files])
    folder = os.path.join(str(datasets.config.HF_DATASETS_CACHE), "prefopt-parquet")
    path = os.path.join(folder, hashlib.sha256(key.encode()).hexdigest()[:32] + ".arrow")
    if os.path.isfile(path):
        return path
    os.makedirs(folder, exist_ok=True)
    schema = pq.read_schema(files[0])
    partial = f"{path}.{os.getpid()}.partial"
    try:
        with pa.OSFile(partial, "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            for name in files:
                parquet = pq.ParquetFile(name, pre_buffer=False)
                if not parquet.schema_arrow.equals(schema):
                    raise _SourceError(f"{name}: its columns differ from those of {files[0]}")
                for batch in parquet.iter_batches(batch_size=_STREAM_ROWS):
                    writer.write_batch(batch)
        os.replace(partial, path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return path


def _split_files(folder: str, files: List[str], split: str) -> List[str]:
    """The files of ``split``: those whose name starts with a split name belong to it; when no name does,
    every file is ``train``."""
    def split_of(path):
        name = os.path.basename(path).lower()
        return next((s for s in _SPLIT_NAMES if re.match(rf"{s}([-_.]|$)", name)), None)

    if any(split_of(p) for p in files):
        return [p for p in files if split_of(p) == split]
    return files if split == "train" else []


class _SourceError(ValueError):
    """A source that cannot be used, in one line (told apart from the ValueErrors of pyarrow's readers)."""


def _open_dataset(source: str, split: str) -> Tuple[Any, Optional[str], str, str]:
    """``(datasets.Dataset, folder for relative image paths, fingerprint, name in problem lines)`` of a
    parquet/arrow file or folder, a ``save_to_disk`` folder or a hub dataset id; ``ValueError`` (one line)
    when it cannot be read."""
    try:
        return _read_dataset(source, split)
    except _SourceError:
        raise
    except Exception as e:  # pyarrow's and datasets' errors come in many types (pyarrow's ValueErrors too)
        raise ValueError(f"--data {source}: cannot be read ({first_line(e)})") from None


def _read_dataset(source: str, split: str) -> Tuple[Any, Optional[str], str, str]:
    with _quiet_datasets() as datasets:
        if os.path.isfile(source):
            files, folder = [source], os.path.dirname(os.path.abspath(source))
        elif os.path.isdir(source):
            folder = os.path.abspath(source)
            if any(os.path.isfile(os.path.join(source, n)) for n in ("state.json", "dataset_dict.json")):
                ds = datasets.load_from_disk(source)
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise _SourceError(f"--data {source}: no split {split!r} (has {', '.join(ds)}; --data-split)")
                    ds, where = ds[split], os.path.join(source, split)
                else:
                    where = source
                files = [f["filename"] for f in ds.cache_files]
                return ds, folder, f"{ds._fingerprint}:{_files_fingerprint(files)}", where
            found = sorted(os.path.join(d, n) for d in (source, os.path.join(source, "data")) if os.path.isdir(d)
                           for n in os.listdir(d) if n.endswith((".parquet", ".arrow")))
            files = _split_files(source, found, split)
            if not files:
                raise _SourceError(f"--data {source}: no {split} parquet or arrow files")
        else:
            raise _SourceError(f"--data {source}: not a file or folder")
        kinds = {os.path.splitext(p)[1] for p in files}
        if len(kinds) > 1:
            raise _SourceError(f"--data {source}: holds both parquet and arrow files; name one file")
        fingerprint = _files_fingerprint(files)
        if kinds == {".json"}:  # a JSON array of records: datasets' JSON reader, into its cache
            return datasets.load_dataset("json", data_files=list(files), split="train"), folder, fingerprint, source
        if kinds == {".parquet"}:
            files = [_parquet_as_arrow(files, fingerprint)]
        ds = datasets.concatenate_datasets([datasets.Dataset.from_file(p) for p in files])
        return ds, folder, fingerprint, source


def _dataset_rows(ds, max_record_bytes: int) -> Iterator[Tuple[int, Any]]:
    """``(row index, row)`` of every row of ``ds``, as stored (images undecoded), a few rows at a time; a row
    whose Arrow data (text, bytes and their offsets, from the row's slice of the buffers) is over
    ``max_record_bytes`` comes as a ``ValueError`` instead, without becoming Python objects."""
    table = ds.with_format("arrow")
    start = 0
    for batch in table.iter(batch_size=_STREAM_ROWS):
        for offset in range(batch.num_rows):
            row = batch.slice(offset, 1)
            if row.nbytes > max_record_bytes:
                yield start + offset, ValueError(f"record is over {max_record_bytes} bytes (--max-record-bytes)")
            else:
                yield start + offset, row.to_pylist()[0]
        start += batch.num_rows


def _json_array(path: str) -> bool:
    """True when the file ``path`` holds a JSON array (its first non-blank byte is ``[``), not JSON lines."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 12), b""):
            start = block.lstrip()
            if start:
                return start.startswith(b"[")
    return False


def _data_kind(source: str) -> str:
    """'jsonl' or 'dataset' (parquet, arrow, a JSON array, save_to_disk), from what the path ``source`` is."""
    if os.path.isfile(source):
        tabular = source.endswith((".parquet", ".arrow")) or (source.endswith(".json") and _json_array(source))
        return "dataset" if tabular else "jsonl"
    if not os.path.isdir(source):
        return "dataset"
    names = set(os.listdir(source))
    if os.path.isdir(os.path.join(source, "data")):
        names |= set(os.listdir(os.path.join(source, "data")))
    has_jsonl = any(n.endswith(".jsonl") for n in names)
    has_tables = any(n.endswith((".parquet", ".arrow")) for n in names) or bool(
        names & {"state.json", "dataset_dict.json"})
    if has_jsonl and has_tables:
        raise ValueError(f"--data {source}: holds both JSONL and parquet/arrow files; name the file to use")
    return "dataset" if has_tables else "jsonl"


# --------------------------------------------------------------------------------------------- loading


def _hub_snapshot(source: str, revision: Optional[str]) -> str:
    """The folder of hub dataset ``source`` (``org/name``) at ``revision`` (a branch, tag or commit; default
    ``main``): its snapshot in the hub cache (``HF_HOME``, ``HF_HUB_OFFLINE`` honoured), downloaded when
    online. ``ValueError`` (one line) when ``source`` is no such id or it cannot be had."""
    from huggingface_hub import snapshot_download

    if not re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", source) or source.endswith((".jsonl", ".json", ".parquet", ".arrow")):
        raise ValueError(f"data file not found: {source!r} (expected a JSONL, parquet or arrow file, a folder, a hub "
                         "dataset id or 'synthetic')")
    try:
        return snapshot_download(source, repo_type="dataset", revision=revision)
    except Exception as e:  # the hub's errors come in many types
        at = f" at revision {revision}" if revision else ""
        raise ValueError(f"--data {source}: not a file or folder, and no hub dataset of that id{at} is cached or "
                         f"could be downloaded ({first_line(e)})") from None


def load_records(
    source: Any, *, split: str = "train", strict: bool = False, seed: int = 0, size: Optional[int] = None,
    problems: Optional[DataProblems] = None, allow_outside_images: bool = False,
    max_image_pixels: int = MAX_IMAGE_PIXELS, max_record_bytes: int = MAX_RECORD_BYTES,
    columns: Optional[str] = None, revision: Optional[str] = None,
) -> RecordSet:
    """The usable records of ``source`` (module docstring), checked as they stream past.

    ``source``: ``"synthetic"`` (:func:`prefopt.train.synthetic.make_synthetic_records` with ``split``,
    ``size`` and ``seed``), a path or hub id (module docstring), or a ``datasets.Dataset``. ``split`` picks
    ``{split}.jsonl`` in a folder, a split's files in a folder of parquet/arrow files, a ``save_to_disk``
    DatasetDict's split or a hub dataset's; ``revision`` (``--data-revision``) a hub dataset's branch, tag or
    commit. ``size`` keeps the first ``size`` usable records. ``columns``:
    ``--data-columns``. Each record's ``where`` is ``FILE:LINE`` (JSONL) or ``SOURCE:ROW`` (row counted from
    0, as ``dataset[ROW]``). A record that is not UTF-8 or not JSON (JSONL), over ``max_record_bytes``
    (a JSONL line is never held whole) or nested deeper than ``MAX_RECORD_DEPTH``, has a duplicate key, a
    missing or empty field, chosen == rejected (after NFC normalisation and removing zero-width characters),
    a malformed message, or an image that fails :func:`check_image` (or does not decode, or is over
    ``max_image_pixels``) is reported to ``problems`` (default: a new :class:`DataProblems` with ``strict``)
    and skipped. A missing source or a bad option: ``ValueError`` with a one-line message.
    """
    if revision is not None and (not isinstance(source, str) or source == "synthetic" or os.path.exists(source)):
        raise ValueError(f"--data-revision {revision}: applies to a hub dataset id (org/name), and --data "
                         f"{source if isinstance(source, str) else 'dataset'} is not one")
    if isinstance(source, str) and source == "synthetic":
        from .synthetic import make_synthetic_records

        made = make_synthetic_records(split=split, size=size, seed=seed)
        return RecordSet(made.__getitem__, range(len(made)), "synthetic")
    if not isinstance(max_record_bytes, int) or max_record_bytes < 1:
        raise ValueError(f"--max-record-bytes: expected a positive number of bytes, got {max_record_bytes!r}")
    mapping = parse_columns(columns)
    report = problems if problems is not None else DataProblems(strict)
    local = source if not isinstance(source, str) or os.path.exists(source) else _hub_snapshot(source, revision)
    if isinstance(local, str) and _data_kind(local) == "jsonl":
        path = os.path.join(local, f"{split}.jsonl") if os.path.isdir(local) else local
        if not os.path.isfile(path):
            raise ValueError(f"data folder {source!r} has no {split}.jsonl")
        folder = os.path.dirname(os.path.abspath(path))
        rows: Iterator[Tuple[int, str, Any]] = _jsonl_rows(path, max_record_bytes)
        read_row = None
    else:
        ds, folder, fingerprint, name = _open_dataset(local, split) if isinstance(source, str) else (
            source, None, f"dataset:{source._fingerprint}", "dataset")
        if local is not source:  # a hub snapshot: its rows named by the id
            name = source
        absent = [c for c in (*mapping.values(), mapping.get("chosen", "chosen")) if c not in ds.column_names]
        if absent:
            raise ValueError(f"--data {name}: no column {absent[0]!r} (columns: {', '.join(ds.column_names)}; map "
                             "them with --data-columns FIELD=COLUMN,...)")
        rows = ((i, f"{name}:{i}", row) for i, row in _dataset_rows(ds, max_record_bytes))
        arrow = ds.with_format("arrow")

        def read_row(i):
            return arrow[i].to_pylist()[0]

    def parse(where, row, check_images=True):
        if isinstance(row, ValueError):
            raise row
        # JSONL lines were checked for size and nesting as they were read, dataset rows for size (_dataset_rows)
        if read_row is not None and _nesting_depth(row) > MAX_RECORD_DEPTH:
            raise ValueError(f"record is nested deeper than {MAX_RECORD_DEPTH} levels")
        record = record_from_row(row, mapping, lambda v: _checked_images(
            v, folder, allow_outside_images, max_image_pixels, check=check_images))
        record.where = where
        return record

    kept: Any = [] if read_row is None else array("q")  # JSONL: the records; a dataset: the usable rows' indices
    image_sizes = hashlib.sha256()
    for index, where, row in rows:
        try:
            record = parse(where, row)
        except ValueError as e:
            report(where, str(e))
            continue
        for img in record.images:
            if isinstance(img, str):
                image_sizes.update(f"{os.path.getsize(img)}\n".encode())
        kept.append(record if read_row is None else index)
        if size is not None and len(kept) >= size:
            break
    if read_row is None:
        return RecordSet(kept.__getitem__, range(len(kept)), lambda records: _jsonl_fingerprint(path, records, mapping))

    def read(i):  # checked when the set was loaded; decoded when a batch is built
        return parse(f"{name}:{i}", read_row(i), check_images=False)

    summary = json.dumps([fingerprint, image_sizes.hexdigest(), split, mapping])
    return RecordSet(read, kept, hashlib.sha256(summary.encode()).hexdigest())


def data_fingerprint(source: str, records: RecordSet) -> str:
    """A cheap fingerprint of the training data ``records`` (from :func:`load_records`): for JSONL, sha256 of
    the file's bytes and of the records' image files' sizes; for parquet and arrow files (a hub dataset's
    too), the files' names, sizes and parquet footers; for ``save_to_disk``, those and the dataset's
    fingerprint; with the image files' sizes, the split and ``--data-columns``. ``"synthetic"`` for the
    built-in set, whose options fix it."""
    if source == "synthetic":
        return "synthetic"
    return records.fingerprint(records) if callable(records.fingerprint) else records.fingerprint
