"""A built-in synthetic visual preference set that cannot be answered without looking at the image.

Each record is one procedurally drawn scene (a 32x32 RGB PIL image on black: a 2x2 grid of cells, each
empty or holding one shape of one colour, with a pixel of jitter in place and size) and one question:

==========  ===================================  ======================================================
type        prompt                               chosen / rejected (same words, one fact differs)
==========  ===================================  ======================================================
colour      What colour is the circle?           The circle is red. / The circle is blue.
count       How many squares are there?          I count two squares. / I count one square.
position    Where is the red circle?             The red circle is in the top left. / ... bottom right.
presence    Is there a triangle in the image?    I see a circle; triangle? no. / I see a triangle; triangle? yes.
describe    Describe the shapes in the image.    I see a red circle and a blue square. / one object
                                                 swapped for one that is not there
==========  ===================================  ======================================================

The verifiable questions' scenes show only what the question is about (one object; for counts, one to
three objects of the asked shape), describe scenes one to four objects: a design the tiny model learns to
read within a CPU budget (with up to three distractor objects beside the asked one, it stayed near chance
after 500 steps at lr 3e-4 and 3000 steps at lr 2e-3). No question type has a text-only answer: question
types come in turn, and within each type the answer cycles through its values in shuffled blocks (colours, counts one to three, cells, yes/no), so every
answer is equally likely whatever the prompt; the scene is then drawn to fit the answer. The rejected
answer has the chosen answer's words with the one fact replaced by a wrong value drawn uniformly, so
length and form never tell them apart. Every record has one or two ``corrections`` for nSFT.

Splits: a fixed set of (shape, colour, cell) combinations, :data:`HELDOUT_OBJECTS`, never appears in a
training scene, and every held-out scene contains at least one of them; so each held-out image shows an
object in a place the training set never showed it (and no held-out scene equals a training one).

The verifiable answers are judged by :func:`parse_answer` (an exact parse of the whole answer, never a
substring match) and :func:`judge` (correct, or a hallucination: a wrong colour, count or position, or a
"yes" for an absent shape). Everything is deterministic from ``seed`` (Python's ``random.Random`` and PIL
drawing; no global RNG is touched).
"""
from __future__ import annotations

import random
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from PIL import Image, ImageDraw

from .records import PreferenceRecord

IMAGE_SIZE = 32
SHAPES: Tuple[str, ...] = ("circle", "square", "triangle", "diamond")
COLOURS: Dict[str, Tuple[int, int, int]] = {
    "red": (230, 25, 25),
    "green": (30, 200, 40),
    "blue": (40, 80, 255),
    "yellow": (240, 230, 20),
    "purple": (170, 40, 220),
    "orange": (255, 140, 0),
}
CELLS: Tuple[str, ...] = ("top left", "top right", "bottom left", "bottom right")
NUMBERS: Tuple[str, ...] = ("no", "one", "two", "three", "four")
COUNTS: Tuple[int, ...] = (1, 2, 3)
QUESTION_TYPES: Tuple[str, ...] = ("colour", "count", "position", "presence", "describe")
#: The question types with a short answer that :func:`parse_answer` verifies (describe is scored pairwise).
VERIFIABLE_TYPES: Tuple[str, ...] = ("colour", "count", "position", "presence")
SPLITS: Tuple[str, ...] = ("train", "heldout")
DEFAULT_SIZES = {"train": 256, "heldout": 200}
#: (shape, colour, cell index) combinations only held-out scenes show: every (shape, colour) pair in one cell,
#: so that within the held-out split too each shape comes in every colour and each cell holds every shape.
HELDOUT_OBJECTS = frozenset((shape, colour, (i + j) % 4) for i, shape in enumerate(SHAPES)
                            for j, colour in enumerate(COLOURS))

Obj = Tuple[str, str]  # (shape, colour)
Scene = Tuple[Optional[Obj], ...]  # one entry per cell


def scene_key(scene: Scene) -> str:
    """The canonical text of a scene's layout."""
    return "|".join("-" if o is None else f"{o[1]} {o[0]}" for o in scene)


def scene_split(scene: Scene) -> str:
    """``"heldout"`` if the scene shows one of :data:`HELDOUT_OBJECTS`, else ``"train"``."""
    held = any(o is not None and (o[0], o[1], cell) in HELDOUT_OBJECTS for cell, o in enumerate(scene))
    return "heldout" if held else "train"


def _plural(shape: str, n: int = 2) -> str:
    return shape if n == 1 else shape + "s"


def _list_phrase(objs: Sequence[Obj]) -> str:
    parts = [f"a {c} {s}" for s, c in objs]
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def draw_scene(scene: Scene, rng: random.Random) -> Image.Image:
    """Draw ``scene`` on a black ``IMAGE_SIZE`` square; ``rng`` jitters place and size by a pixel."""
    img = Image.new("RGB", (IMAGE_SIZE, IMAGE_SIZE), (0, 0, 0))
    d = ImageDraw.Draw(img)
    half = IMAGE_SIZE // 2
    for cell, obj in enumerate(scene):
        if obj is None:
            continue
        shape, colour = obj
        rgb = COLOURS[colour]
        r = rng.randint(5, 6)
        cx = (cell % 2) * half + half // 2 + rng.randint(-1, 0)
        cy = (cell // 2) * half + half // 2 + rng.randint(-1, 0)
        if shape == "circle":
            d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=rgb)
        elif shape == "square":
            d.rectangle([cx - r + 1, cy - r + 1, cx + r - 1, cy + r - 1], fill=rgb)
        elif shape == "triangle":
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=rgb)
        else:  # diamond
            d.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=rgb)
    return img


# ------------------------------------------------------------------------------------ answers and parsing

def answer_text(kind: str, subject: Tuple[str, ...], value) -> str:
    """The answer of question ``kind`` about ``subject`` asserting ``value`` (the one form of each type).

    colour: subject (shape,), value a colour; count: (shape,), value 1-4; position: (shape, colour), value
    a cell index; presence: (shape,), value the shape seen: the answer names what it sees, repeats the asked
    shape, then gives its verdict (the tiny model named the shape it saw correctly long before it learned
    to compare it with the prompt's; with both shapes a fixed distance before the verdict it need not search).
    """
    if kind == "colour":
        return f"The {subject[0]} is {value}."
    if kind == "count":
        return f"I count {NUMBERS[value]} {_plural(subject[0], value)}."
    if kind == "position":
        return f"The {subject[1]} {subject[0]} is in the {CELLS[value]}."
    if kind == "presence":
        return f"I see a {value}; {subject[0]}? {'yes' if value == subject[0] else 'no'}."
    raise ValueError(f"answer_text: kind must be one of {VERIFIABLE_TYPES}, got {kind!r}")


_SHAPE = "|".join(SHAPES)
_COLOUR = "|".join(COLOURS)
_PROMPTS = {
    "colour": re.compile(rf"What colour is the ({_SHAPE})\?"),
    "count": re.compile(rf"How many ({'|'.join(s + 's' for s in SHAPES)}) are there\?"),
    "position": re.compile(rf"Where is the ({_COLOUR}) ({_SHAPE})\?"),
    "presence": re.compile(rf"Is there a ({_SHAPE}) in the image\?"),
    "describe": re.compile(r"Describe the shapes in the image\."),
}


def question_type(prompt: str) -> Optional[Tuple[str, Tuple[str, ...]]]:
    """``(type, subject)`` of a synthetic prompt (the whole prompt must match a template), else None."""
    text = prompt.strip()
    for kind, pattern in _PROMPTS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        if kind == "count":
            return kind, (m.group(1)[:-1],)
        if kind == "position":
            return kind, (m.group(2), m.group(1))
        return kind, tuple(m.groups())
    return None


def parse_answer(kind: str, subject: Tuple[str, ...], text: str):
    """The fact an answer asserts, or None when the answer is not exactly one of the type's forms about
    ``subject`` (the whole text, stripped, must equal :func:`answer_text` for some value; for presence the
    fact is the verdict, True for yes, and a verdict that contradicts the shape named is no form)."""
    text = text.strip()
    if kind == "presence":
        seen = next((v for v in SHAPES if text == answer_text(kind, subject, v)), None)
        return None if seen is None else seen == subject[0]
    values = {"colour": tuple(COLOURS), "count": (1, 2, 3, 4), "position": range(len(CELLS))}.get(kind)
    if values is None:
        raise ValueError(f"parse_answer: kind must be one of {VERIFIABLE_TYPES}, got {kind!r}")
    for v in values:
        if text == answer_text(kind, subject, v):
            return v
    return None


def judge(prompt: str, chosen: str, answer: str) -> Optional[Tuple[str, bool, bool]]:
    """``(type, correct, hallucination)`` of ``answer`` to a synthetic verifiable ``prompt`` whose correct
    answer is ``chosen``; None for a prompt that is not a verifiable synthetic question.

    correct: the answer parses to the true fact. hallucination: it parses to a wrong fact of the type that
    asserts something not in the image (a wrong colour, count or position; "yes" for an absent shape).
    An unparseable answer is neither correct nor a hallucination.
    """
    q = question_type(prompt)
    if q is None or q[0] not in VERIFIABLE_TYPES:
        return None
    kind, subject = q
    truth = parse_answer(kind, subject, chosen)
    if truth is None:
        return None
    said = parse_answer(kind, subject, answer)
    if said is None:
        return kind, False, False
    wrong = said != truth
    hallucination = wrong and (kind != "presence" or said is True)
    return kind, not wrong, hallucination


# ------------------------------------------------------------------------------------------ the records

def _fill(scene: List[Optional[Obj]], rng: random.Random) -> None:
    """Put 0..(free cells) random objects into the empty cells."""
    free = [i for i, o in enumerate(scene) if o is None]
    rng.shuffle(free)
    for cell in free[: rng.randint(0, len(free))]:
        scene[cell] = (rng.choice(SHAPES), rng.choice(tuple(COLOURS)))


def _build(kind: str, value, rng: random.Random):
    """(scene, prompt, subject) of one question ``kind`` whose true answer is ``value``."""
    scene: List[Optional[Obj]] = [None] * 4
    colours = tuple(COLOURS)
    if kind == "colour":
        shape = rng.choice(SHAPES)
        scene[rng.randrange(4)] = (shape, value)
        return scene, f"What colour is the {shape}?", (shape,)
    if kind == "count":
        shape = rng.choice(SHAPES)
        for cell in rng.sample(range(4), value):
            scene[cell] = (shape, rng.choice(colours))
        return scene, f"How many {_plural(shape)} are there?", (shape,)
    if kind == "position":
        obj = (rng.choice(SHAPES), rng.choice(colours))
        scene[value] = obj
        return scene, f"Where is the {obj[1]} {obj[0]}?", obj
    if kind == "presence":
        shape = rng.choice(SHAPES)
        other = shape if value else rng.choice([s for s in SHAPES if s != shape])
        scene[rng.randrange(4)] = (other, rng.choice(colours))
        return scene, f"Is there a {shape} in the image?", (shape,)
    if kind == "describe":
        scene[rng.randrange(4)] = (rng.choice(SHAPES), rng.choice(colours))
        _fill(scene, rng)
        return scene, "Describe the shapes in the image.", ()
    raise ValueError(f"unknown question kind {kind!r}")


_VALUES = {"colour": tuple(COLOURS), "count": COUNTS, "position": tuple(range(4)), "presence": (True, False),
           "describe": (None,)}


def _answers(kind: str, scene: Sequence[Optional[Obj]], subject, value, rng: random.Random):
    """(chosen, rejected, corrections)."""
    if kind == "describe":
        truth = [o for o in scene if o is not None]
        absent = [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in truth]
        fake = list(truth)
        swapped = rng.randrange(len(fake))
        fake[swapped] = rng.choice(absent)
        extra = fake[swapped]
        return (f"I see {_list_phrase(truth)}.", f"I see {_list_phrase(fake)}.",
                [f"I see {_list_phrase(truth)}. There is no {extra[1]} {extra[0]}."])
    wrong = rng.choice([v for v in (COUNTS if kind == "count" else _VALUES[kind]) if v != value])
    if kind == "presence":  # the answer names the shape seen; the rejected one denies it or hallucinates
        seen = next(o for o in scene if o is not None)[0]
        chosen = answer_text(kind, subject, seen)
        rejected = answer_text(kind, subject, rng.choice([s for s in SHAPES if s != subject[0]]) if value
                               else subject[0])
    else:
        chosen, rejected = answer_text(kind, subject, value), answer_text(kind, subject, wrong)
    if kind == "presence":
        note = f"There is {'a' if value else 'no'} {subject[0]} in the image."
    elif kind == "count":
        note = f"There are not {NUMBERS[wrong]}."
    elif kind == "colour":
        note = f"It is not {wrong}."
    else:
        note = f"It is not in the {CELLS[wrong]}."
    return chosen, rejected, [f"{chosen} {note}"] + ([f"{note} {chosen}"] if rng.random() < 0.5 else [])


def generate_scenes(split: str = "train", size: Optional[int] = None, seed: int = 0
                    ) -> Iterator[Tuple[Scene, str, PreferenceRecord]]:
    """Yield ``(scene, question type, PreferenceRecord)`` (the scenes let tests check the split)."""
    if split not in SPLITS:
        raise ValueError(f"synthetic split: expected one of {SPLITS}, got {split!r}")
    size = DEFAULT_SIZES[split] if size is None else int(size)
    if size < 0:
        raise ValueError(f"synthetic size: expected >= 0, got {size}")
    rng = random.Random(f"prefopt-synthetic-v2/{seed}/{split}")
    blocks: Dict[str, List] = {k: [] for k in QUESTION_TYPES}
    made = 0
    while made < size:
        kind = QUESTION_TYPES[made % len(QUESTION_TYPES)]
        if not blocks[kind]:  # the answers of a type in shuffled blocks: balanced whatever the size
            blocks[kind] = list(_VALUES[kind])
            rng.shuffle(blocks[kind])
        value = blocks[kind][-1]
        for _ in range(1000):
            scene, prompt, subject = _build(kind, value, rng)
            scene = tuple(scene)
            if scene_split(scene) == split:
                break
        else:  # pragma: no cover - every (type, value) has many scenes in both splits
            raise RuntimeError(f"could not draw a {split} scene for a {kind} question")
        blocks[kind].pop()
        chosen, rejected, corrections = _answers(kind, scene, subject, value, rng)
        image = draw_scene(scene, rng)
        made += 1
        yield scene, kind, PreferenceRecord(prompt=prompt, chosen=chosen, rejected=rejected, images=[image],
                                            corrections=corrections)


def make_synthetic_records(split: str = "train", size: Optional[int] = None, seed: int = 0) -> list:
    """``size`` synthetic :class:`~prefopt.train.data.PreferenceRecord` s of ``split`` (``"train"`` or
    ``"heldout"``; default sizes 256 and 200), deterministic from ``seed``: one 32x32 PIL image, a question
    ``prompt``, the correct ``chosen`` answer, a ``rejected`` answer of the same form with one wrong fact and
    one or two ``corrections``. No (scene, question) pair repeats within a split; see the module docstring
    for the split and the balance."""
    return [rec for _, _, rec in generate_scenes(split, size, seed)]


def corpus_sentences() -> List[str]:
    """Sentences covering every word the synthetic set uses (the tiny models' tokenizer is trained on it)."""
    out = [
        "You are a helpful assistant.",
        "Describe the shapes in the image. I see nothing. Yes, no. It is. There is not. I count. Not the",
        "The quick brown fox jumps over the lazy dog. What is this? Answer the question.",
    ]
    for shape in SHAPES:
        out.append(f"How many {_plural(shape)} are there? Is there a {shape} in the image? What colour is the {shape}?")
        out.append(f"I see a {shape}; {shape}? yes. I see a {shape}; {shape}? no. There is a {shape} in the image.")
        for n in range(1, 5):
            out.append(f"I count {NUMBERS[n]} {_plural(shape, n)}. There are not {NUMBERS[n]}.")
        for colour in COLOURS:
            out.append(f"The {shape} is {colour}. It is not {colour}. I see {_list_phrase([(shape, colour)] * 3)}.")
            out.append(f"There is no {colour} {shape}. Where is the {colour} {shape}?")
            for cell in CELLS:
                out.append(f"The {colour} {shape} is in the {cell}. It is not in the {cell}.")
    return out
