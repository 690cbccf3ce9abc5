"""A built-in synthetic visual preference set: drawn shapes, questions, correct and hallucinated answers.

Each record is one procedurally drawn scene (a 56x56 RGB PIL image; a 2x2 grid of cells, each empty or
holding one shape of one colour, with a little jitter in place and size) with one question about it:

* ``colour``   "What colour is the circle?"        chosen: the true colour, rejected: a wrong colour;
* ``count``    "How many squares are there?"       chosen: the true count, rejected: a wrong count;
* ``absent``   "Is there a triangle in the image?" chosen: "No, ...", rejected: a hallucinated object;
* ``describe`` "Describe the shapes in the image." rejected: the true list plus an object that is not there;
* ``position`` "Where is the red circle?"          chosen: the true cell, rejected: a wrong cell.

Every record has one or two ``corrections`` (corrective answers that name the hallucination and the
truth) for nSFT. Everything is deterministic from ``seed`` (Python's ``random.Random`` and PIL drawing;
no global RNG is touched). A scene belongs to the train or the held-out split by a hash of its layout
(not of the seed), so no held-out image is ever in the training split, whatever the seeds.
"""
from __future__ import annotations

import hashlib
import random
from typing import Dict, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

IMAGE_SIZE = 56
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 205, 20),
    "purple": (140, 40, 170),
    "orange": (245, 130, 20),
}
CELLS: Tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
NUMBERS: Tuple[str, ...] = ("no", "one", "two", "three", "four", "five")
QUESTION_TYPES: Tuple[str, ...] = ("colour", "count", "absent", "describe", "position")
SPLITS: Tuple[str, ...] = ("train", "heldout")
DEFAULT_SIZES = {"train": 256, "heldout": 64}
HELDOUT_EVERY = 5  # about one scene layout in five is held out

Obj = Tuple[str, str]  # (shape, colour)
Scene = Tuple[Optional[Obj], ...]  # one entry per cell


def scene_key(scene: Scene) -> str:
    """The canonical text of a scene's layout (what the split hash and de-duplication use)."""
    return "|".join("-" if o is None else f"{o[1]} {o[0]}" for o in scene)


def scene_split(scene: Scene) -> str:
    """``"heldout"`` or ``"train"``: fixed by a hash of the layout, independent of any seed."""
    digest = hashlib.sha256(scene_key(scene).encode("utf-8")).hexdigest()
    return "heldout" if int(digest[:8], 16) % HELDOUT_EVERY == 0 else "train"


def _plural(shape: str, n: int) -> str:
    return shape if n == 1 else shape + "s"


def _count_phrase(shape: str, n: int) -> str:
    verb = "is" if n == 1 else "are"
    return f"There {verb} {NUMBERS[n]} {_plural(shape, n)}."


def _list_phrase(objs: Sequence[Obj]) -> str:
    parts = [f"a {c} {s}" for s, c in objs]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` on a light grey ``IMAGE_SIZE`` square; ``rng`` jitters place and size."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (225, 225, 225))
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for cell, obj in enumerate(scene):
        if obj is None:
            continue
        shape, colour = obj
        rgb = COLOURS[colour]
        r = rng.randint(8, 11)
        cx = (cell % 2) * half + half // 2 + rng.randint(-2, 2)
        cy = (cell // 2) * half + half // 2 + rng.randint(-2, 2)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif shape == "square":
            d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
        else:  # diamond
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    return img


def _random_scene(rng: random.Random) -> Scene:
    n = rng.randint(1, 4)
    cells = sorted(rng.sample(range(4), n))
    scene: List[Optional[Obj]] = [None] * 4
    # Shapes repeat often enough to make counting interesting.
    shapes = [rng.choice(SHAPES) for _ in range(n)]
    if n > 1 and rng.random() < 0.5:
        shapes[1:] = [shapes[0] if rng.random() < 0.6 else s for s in shapes[1:]]
    for cell, shape in zip(cells, shapes):
        scene[cell] = (shape, rng.choice(sorted(COLOURS)))
    return tuple(scene)


def _question(scene: Scene, kind: str, rng: random.Random) -> Optional[Tuple[str, str, str, List[str]]]:
    """(prompt, chosen, rejected, corrections) for one question kind, or None if it does not fit."""
    objs = [(cell, o) for cell, o in enumerate(scene) if o is not None]
    shapes_present = [o[0] for _, o in objs]
    colours = sorted(COLOURS)
    if kind == "colour":
        unique = [(cell, o) for cell, o in objs if shapes_present.count(o[0]) == 1]
        if not unique:
            return None
        _, (shape, colour) = rng.choice(unique)
        wrong = rng.choice([c for c in colours if c != colour])
        return (
            f"What colour is the {shape}?",
            f"The {shape} is {colour}.",
            f"The {shape} is {wrong}.",
            [f"The {shape} is not {wrong}; it is {colour}.", f"The {shape} in the image is {colour}."][
                : rng.randint(1, 2)
            ],
        )
    if kind == "count":
        shape = rng.choice(sorted(set(shapes_present)))
        n = shapes_present.count(shape)
        wrong = rng.choice([k for k in range(1, 5) if k != n])
        return (
            f"How many {_plural(shape, 2)} are there?",
            _count_phrase(shape, n),
            _count_phrase(shape, wrong),
            [f"There are not {NUMBERS[wrong]}; I count {NUMBERS[n]} {_plural(shape, n)}."][:1]
            + ([f"{NUMBERS[n].capitalize()} {_plural(shape, n)} in the image."] if rng.random() < 0.5 else []),
        )
    if kind == "absent":
        missing = [s for s in SHAPES if s not in shapes_present]
        if not missing:
            return None
        shape = rng.choice(missing)
        colour = rng.choice(colours)
        cell = rng.choice(CELLS)
        return (
            f"Is there a {shape} in the image?",
            f"No, there is no {shape} in the image.",
            f"Yes, there is a {colour} {shape} in the {cell}.",
            [f"No. There is no {shape} in the image, so there is no {colour} {shape} in the {cell}."][:1]
            + ([f"No {shape} is in the image."] if rng.random() < 0.5 else []),
        )
    if kind == "describe":
        missing = [(s, c) for s in SHAPES for c in colours if (s, c) not in [o for _, o in objs]]
        extra = rng.choice(missing)
        truth = [o for _, o in objs]
        fake = list(truth)
        fake.insert(rng.randint(0, len(fake)), extra)
        return (
            "Describe the shapes in the image.",
            f"I see {_list_phrase(truth)}.",
            f"I see {_list_phrase(fake)}.",
            [f"I see {_list_phrase(truth)}. There is no {extra[1]} {extra[0]}."],
        )
    if kind == "position":
        cell, (shape, colour) = rng.choice(objs)
        if sum(1 for _, o in objs if o == (shape, colour)) > 1:
            return None
        wrong = rng.choice([c for i, c in enumerate(CELLS) if i != cell])
        return (
            f"Where is the {colour} {shape}?",
            f"The {colour} {shape} is in the {CELLS[cell]}.",
            f"The {colour} {shape} is in the {wrong}.",
            [f"The {colour} {shape} is not in the {wrong}; it is in the {CELLS[cell]}."][:1]
            + ([f"It is in the {CELLS[cell]}."] if rng.random() < 0.5 else []),
        )
    raise ValueError(f"unknown question kind {kind!r}")


def generate_scenes(split: str = "train", size: Optional[int] = None, seed: int = 0):
    """Yield ``(scene, question kind, PreferenceRecord)`` for :func:`make_synthetic_records` (the scene
    layouts let tests check the split)."""
    from .data import PreferenceRecord  # data imports this module lazily; avoid a cycle at import

    if split not in SPLITS:
        raise ValueError(f"synthetic split: expected one of {SPLITS}, got {split!r}")
    size = DEFAULT_SIZES[split] if size is None else int(size)
    if size < 0:
        raise ValueError(f"synthetic size: expected >= 0, got {size}")
    rng = random.Random(f"prefopt-synthetic/{seed}/{split}")
    seen = set()
    made = attempts = 0
    while made < size:
        attempts += 1
        if attempts > 200 * size + 1000:  # pragma: no cover - the scene space is far larger than any size
            raise RuntimeError(f"could not draw {size} distinct synthetic records for split {split!r}")
        scene = _random_scene(rng)
        if scene_split(scene) != split:
            continue
        kind = rng.choice(QUESTION_TYPES)
        q = _question(scene, kind, rng)
        if q is None:
            continue
        prompt, chosen, rejected, corrections = q
        key = (scene_key(scene), prompt)
        if key in seen:
            continue
        seen.add(key)
        image = draw_scene(scene, rng)
        made += 1
        yield scene, kind, PreferenceRecord(
            prompt=prompt, chosen=chosen, rejected=rejected, images=[image], corrections=corrections
        )


def make_synthetic_records(split: str = "train", size: Optional[int] = None, seed: int = 0) -> list:
    """``size`` synthetic :class:`~prefopt.train.data.PreferenceRecord` s of ``split`` (``"train"`` or
    ``"heldout"``; default sizes 256 and 64), deterministic from ``seed``.

    Each record has one 56x56 PIL image, a question ``prompt``, the correct ``chosen`` answer, a
    hallucinated ``rejected`` answer and one or two ``corrections``. No (scene, question) pair repeats
    within a split, and no scene layout is in both splits.
    """
    return [rec for _, _, rec in generate_scenes(split, size, seed)]


def corpus_sentences() -> List[str]:
    """Sentences covering every word the synthetic set uses (the tiny models' tokenizer is trained on it)."""
    out = [
        "You are a helpful assistant.",
        "Describe the shapes in the image. I see nothing. Yes, no. It is. There is not. I count.",
        "The quick brown fox jumps over the lazy dog. What is this? Answer the question.",
    ]
    colours = sorted(COLOURS)
    for shape in SHAPES:
        for n in range(1, 5):
            out.append(f"How many {_plural(shape, 2)} are there? {_count_phrase(shape, n)}")
            out.append(f"There are not {NUMBERS[n]}; I count {NUMBERS[n]} {_plural(shape, n)}.")
            out.append(f"{NUMBERS[n].capitalize()} {_plural(shape, n)} in the image.")
        for colour in colours:
            out.append(f"What colour is the {shape}? The {shape} is {colour}. The {shape} is not {colour}; it is.")
            out.append(f"Is there a {shape} in the image? No, there is no {shape} in the image.")
            out.append(f"No. There is no {shape} in the image, so there is no {colour} {shape}. No {shape} is.")
            for cell in CELLS:
                out.append(f"Where is the {colour} {shape}? The {colour} {shape} is in the {cell}. It is.")
                out.append(f"Yes, there is a {colour} {shape} in the {cell}.")
            out.append(f"I see {_list_phrase([(shape, colour), (shape, colour), (shape, colour)])}.")
    return out
