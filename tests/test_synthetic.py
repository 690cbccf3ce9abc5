"""The synthetic visual set needs the image: balance, matched answers, disjoint splits, exact parsing."""
import collections
import io

import pytest

pytest.importorskip("PIL")

from prefopt.train.synthetic import (  # noqa: E402
    CELLS, COLOURS, HELDOUT_OBJECTS, IMAGE_SIZE, QUESTION_TYPES, VERIFIABLE_TYPES, answer_text, generate_scenes,
    judge, make_synthetic_records, parse_answer, question_type, scene_key, scene_split,
)

CHANCE = {"colour": 1 / len(COLOURS), "count": 1 / 3, "position": 1 / len(CELLS), "presence": 1 / 2}


@pytest.fixture(scope="module")
def train():
    return list(generate_scenes("train", size=1000, seed=0))


@pytest.fixture(scope="module")
def heldout():
    return list(generate_scenes("heldout", size=200, seed=0))


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _fact(record):
    kind, subject = question_type(record.prompt)
    return parse_answer(kind, subject, record.chosen)


def test_types_and_answers_are_balanced(train, heldout):
    for data in (train, heldout):
        kinds = collections.Counter(k for _, k, _ in data)
        assert set(kinds) == set(QUESTION_TYPES) and max(kinds.values()) - min(kinds.values()) <= 1
        for kind in VERIFIABLE_TYPES:
            answers = collections.Counter(_fact(r) for _, k, r in data if k == kind)
            n = sum(answers.values())
            # answers cycle in shuffled blocks: each value's count is within one block of the others
            assert len(answers) == round(1 / CHANCE[kind]) and max(answers.values()) - min(answers.values()) <= 1, answers
            assert n >= 40


def test_no_text_only_shortcut(train, heldout):
    """The best text-only rule (the majority training answer of each exact prompt) is at chance on held-out."""
    by_prompt = collections.defaultdict(collections.Counter)
    for _, kind, r in train:
        if kind in VERIFIABLE_TYPES:
            by_prompt[r.prompt][_fact(r)] += 1
    for kind in VERIFIABLE_TYPES:
        rows = [r for _, k, r in heldout if k == kind]
        hits = [by_prompt[r.prompt].most_common(1)[0][0] == _fact(r) for r in rows if by_prompt[r.prompt]]
        assert len(hits) >= 30
        assert sum(hits) / len(hits) <= CHANCE[kind] + 0.15, (kind, sum(hits) / len(hits))


def test_rejected_matches_chosen_in_length_and_form(train):
    for _, kind, r in train:
        assert len(r.rejected.split()) == len(r.chosen.split()) and r.rejected != r.chosen
        assert r.images[0].size == (IMAGE_SIZE, IMAGE_SIZE) and 1 <= len(r.corrections) <= 2
        if kind in VERIFIABLE_TYPES:
            q, subject = question_type(r.prompt)
            assert q == kind
            wrong = parse_answer(kind, subject, r.rejected)
            assert wrong is not None and wrong != _fact(r)
        else:
            assert r.chosen.startswith("I see ") and r.rejected.startswith("I see ")


def test_splits_are_disjoint_and_heldout_shows_unseen_combinations(train, heldout):
    seen = {(o[0], o[1], cell) for s, _, _ in train for cell, o in enumerate(s) if o is not None}
    assert not seen & HELDOUT_OBJECTS
    for scene, _, _ in heldout:
        objects = {(o[0], o[1], cell) for cell, o in enumerate(scene) if o is not None}
        assert objects - seen, "every held-out scene shows a (shape, colour, cell) never seen in training"
        assert scene_split(scene) == "heldout"
    assert all(scene_split(s) == "train" for s, _, _ in train)
    assert not {scene_key(s) for s, _, _ in train} & {scene_key(s) for s, _, _ in heldout}
    assert not {_png(r.images[0]) for _, _, r in train} & {_png(r.images[0]) for _, _, r in heldout}


def test_deterministic_and_bad_split():
    a, b = make_synthetic_records("heldout", 10, seed=3), make_synthetic_records("heldout", 10, seed=3)
    assert [(r.prompt, r.chosen, _png(r.images[0])) for r in a] == [(r.prompt, r.chosen, _png(r.images[0])) for r in b]
    with pytest.raises(ValueError, match="split"):
        make_synthetic_records("test")


def test_parsing_is_exact_never_a_substring():
    assert question_type("What colour is the circle?") == ("colour", ("circle",))
    assert question_type("Where is the red square?") == ("position", ("square", "red"))
    assert question_type("How many circles are there?") == ("count", ("circle",))
    assert question_type("What colour is the circle? Answer briefly.") is None
    assert parse_answer("colour", ("circle",), " The circle is red. ") == "red"
    for text in ("The circle is red and blue.", "the circle is red.", "The circle is red. The circle is blue.",
                 "The square is red.", "red"):
        assert parse_answer("colour", ("circle",), text) is None, text
    assert parse_answer("count", ("square",), "I count one square.") == 1
    assert parse_answer("count", ("square",), "I count one squares.") is None
    assert parse_answer("position", ("circle", "red"), "The red circle is in the bottom left.") == CELLS.index("bottom left")
    assert parse_answer("presence", ("circle",), answer_text("presence", ("circle",), "square")) is False
    assert parse_answer("presence", ("circle",), "I see a circle; circle? yes.") is True
    assert parse_answer("presence", ("circle",), "I see a square; circle? yes.") is None  # contradicts itself


def test_judge_hallucination_rules():
    yes, no = "I see a circle; circle? yes.", "I see a square; circle? no."
    q = "Is there a circle in the image?"
    assert judge(q, no, yes) == ("presence", False, True)  # asserts an absent object
    assert judge(q, yes, no) == ("presence", False, False)  # misses one: wrong, not a hallucination
    assert judge(q, no, "I see a diamond; circle? no.") == ("presence", True, False)  # the verdict is what counts
    assert judge(q, yes, yes) == ("presence", True, False)
    c = "What colour is the circle?"
    assert judge(c, "The circle is red.", "The circle is blue.") == ("colour", False, True)
    assert judge(c, "The circle is red.", "The circle is red and blue.") == ("colour", False, False)
    assert judge("How many circles are there?", "I count two circles.", "I count three circles.") == ("count", False, True)
    assert judge("Describe the shapes in the image.", "I see a red circle.", "I see a red circle.") is None
    assert judge("Some user question?", "x", "y") is None
