"""Preference records, the JSONL loader, the collator and the synthetic set (prefopt.train.data / synthetic)."""
import io
import json

import pytest
import torch

pytest.importorskip("transformers")
from PIL import Image  # noqa: E402

from prefopt.train.data import PreferenceCollator, PreferenceRecord, load_records  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from prefopt.train.synthetic import make_synthetic_records  # noqa: E402

IGNORE = -100


@pytest.fixture(scope="module")
def processors():
    return {name: build_model(name)[1] for name in ("tiny-llama", "tiny-llava", "tiny-qwen2-vl")}


def _write_jsonl(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n", encoding="utf-8")


# ------------------------------------------------------------------------------------------- loading


def test_load_jsonl_with_relative_images(tmp_path):
    (tmp_path / "img").mkdir()
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "img" / "a.png")
    _write_jsonl(tmp_path / "data.jsonl", [
        {"images": ["img/a.png"], "prompt": "What colour?", "chosen": "Red.", "rejected": "Blue.",
         "corrections": ["Not blue; red."]},
        {"prompt": "Say hi.", "chosen": "Hi.", "rejected": None, "extra": 1},
        {"images": "img/a.png", "prompt": "P", "chosen": "C"},
    ])
    recs = load_records(str(tmp_path / "data.jsonl"))
    assert len(recs) == 3
    assert recs[0].images == [str(tmp_path / "img" / "a.png")] and recs[0].corrections == ["Not blue; red."]
    assert recs[1].rejected is None and recs[1].images == [] and recs[1].corrections == []
    assert len(recs[2].images) == 1
    assert len(load_records(str(tmp_path / "data.jsonl"), size=2)) == 2
    # A folder holding {split}.jsonl.
    (tmp_path / "heldout.jsonl").write_text((tmp_path / "data.jsonl").read_text())
    assert len(load_records(str(tmp_path), split="heldout")) == 3
    with pytest.raises(ValueError, match="no train.jsonl"):
        load_records(str(tmp_path), split="train")
    with pytest.raises(ValueError, match="data file not found"):
        load_records(str(tmp_path / "missing.jsonl"))


def test_malformed_lines_are_reported_with_line_numbers(tmp_path):
    path = tmp_path / "bad.jsonl"
    _write_jsonl(path, [
        {"prompt": "p1", "chosen": "c1", "rejected": "r1"},   # 1 ok
        '{"prompt": "p2", "chosen": ',                        # 2 invalid JSON
        "",                                                   # 3 blank: skipped silently
        {"prompt": "p4", "rejected": "r4"},                   # 4 missing chosen
        {"prompt": "p5", "chosen": "c5", "images": ["x.png"]},  # 5 image not found
        "[1, 2]",                                             # 6 not an object
        {"prompt": "p7", "chosen": "c7", "corrections": "c"},  # 7 corrections not a list
        {"prompt": "p8", "chosen": "c8"},                     # 8 ok
    ])
    with pytest.warns(UserWarning) as caught:
        recs = load_records(str(path))
    assert [r.prompt for r in recs] == ["p1", "p8"]
    messages = [str(w.message) for w in caught]
    for line in (2, 4, 5, 6, 7):
        assert any(f"line {line}:" in m and "skipped" in m for m in messages), (line, messages)
    assert not any("line 3:" in m for m in messages)
    with pytest.raises(ValueError, match=r"bad\.jsonl: line 2: malformed record: invalid JSON"):
        load_records(str(path), strict=True)


# ----------------------------------------------------------------------------------------- collation


def _label_text(tok, labels_row):
    return tok.decode(labels_row[labels_row != IGNORE])


def _check_masks(batch, tok, answers, image_token_id=None):
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    assert ids.shape == mask.shape == labels.shape
    kept = labels != IGNORE
    assert torch.equal(labels[kept], ids[kept])          # unshifted: labels are the tokens themselves
    assert not kept[mask == 0].any()                     # padding masked
    if image_token_id is not None:
        assert (ids == image_token_id).any()
        assert not kept[ids == image_token_id].any()     # image tokens masked
    for row, answer in enumerate(answers):
        # Everything before the answer (the templated prompt and its image tokens) is masked ...
        first = int(kept[row].nonzero()[0])
        assert tok.decode(ids[row, :first]).endswith("<|im_start|>assistant\n")
        # ... and the answer (with the end-of-turn token) is what is learnt.
        assert _label_text(tok, labels[row]) == answer + "<|im_end|>\n"


@pytest.mark.parametrize("name", ["tiny-llava", "tiny-qwen2-vl"])
def test_collator_pair_masks_and_order(processors, name):
    proc = processors[name]
    recs = load_records("synthetic", size=3, seed=1)
    batch = PreferenceCollator(proc)(recs, mode="pair")
    assert batch["input_ids"].shape[0] == 6
    answers = [r.chosen for r in recs] + [r.rejected for r in recs]
    _check_masks(batch, proc.tokenizer, answers, proc.image_token_id)
    assert batch["row_record"].tolist() == [0, 1, 2, 0, 1, 2]
    assert batch["num_images"].tolist() == [1] * 6
    n_image_tokens = (batch["input_ids"] == proc.image_token_id).sum(1)
    if name == "tiny-llava":
        assert batch["pixel_values"].shape == (6, 3, 32, 32)
        assert n_image_tokens.tolist() == [16] * 6
        # Chosen and rejected rows of one record see the same image.
        assert torch.equal(batch["pixel_values"][0], batch["pixel_values"][3])
    else:
        assert batch["image_grid_thw"].tolist() == [[1, 4, 4]] * 6
        assert batch["pixel_values"].shape[0] == 6 * 16
        assert n_image_tokens.tolist() == [4] * 6
        assert batch["mm_token_type_ids"].shape == batch["input_ids"].shape


def test_collator_sft_and_nsft(processors):
    proc = processors["tiny-llava"]
    recs = load_records("synthetic", size=3, seed=2)
    col = PreferenceCollator(proc)
    sft = col(recs, mode="sft")
    _check_masks(sft, proc.tokenizer, [r.chosen for r in recs], proc.image_token_id)
    assert "correction_rows" not in sft
    nsft = col(recs, mode="nsft")
    corrections = [c for r in recs for c in r.corrections]
    _check_masks(nsft, proc.tokenizer, [r.chosen for r in recs] + corrections, proc.image_token_id)
    assert nsft["correction_rows"].tolist() == [False] * 3 + [True] * len(corrections)
    assert nsft["row_record"].tolist() == [0, 1, 2] + [i for i, r in enumerate(recs) for _ in r.corrections]
    with pytest.raises(ValueError, match="mode"):
        col(recs, mode="dpo")


def test_collator_text_only_and_errors(processors):
    tok = processors["tiny-llama"]
    recs = [PreferenceRecord("Is there a star?", "No.", "Yes, a red one."),
            PreferenceRecord("How many circles are there?", "There are two circles.", "There is one circle.")]
    batch = PreferenceCollator(tok)(recs, mode="pair")
    assert set(batch) == {"input_ids", "attention_mask", "labels", "num_images", "row_record"}
    _check_masks(batch, tok, ["No.", "There are two circles.", "Yes, a red one.", "There is one circle."])
    assert batch["attention_mask"][0].sum() < batch["attention_mask"].shape[1]  # row 0 is padded (right)
    with pytest.raises(ValueError, match="has images but the model's processor has no image processor"):
        PreferenceCollator(tok)(load_records("synthetic", size=1), mode="sft")
    with pytest.raises(ValueError, match="record 0 has no rejected answer"):
        PreferenceCollator(tok)([PreferenceRecord("p", "c")], mode="pair")


def test_collator_max_length(processors):
    tok = processors["tiny-llama"]
    rec = PreferenceRecord("Describe the shapes in the image.", "I see " + "a red circle and " * 20 + "a square.")
    full = PreferenceCollator(tok)([rec], mode="sft")
    cut = PreferenceCollator(tok, max_length=24)([rec], mode="sft")
    assert full["input_ids"].shape[1] > 24 and cut["input_ids"].shape[1] == 24
    assert torch.equal(cut["input_ids"], full["input_ids"][:, :24])
    assert torch.equal(cut["labels"], full["labels"][:, :24]) and (cut["labels"] != IGNORE).any()
    with pytest.raises(ValueError, match="no answer token within max_length=8"):
        PreferenceCollator(tok, max_length=8)([rec], mode="sft")


def test_collator_reads_image_paths(processors, tmp_path):
    rec = load_records("synthetic", size=1, seed=4)[0]
    rec.images[0].save(tmp_path / "s.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"images": ["s.png"], "prompt": rec.prompt, "chosen": rec.chosen,
                                                  "rejected": rec.rejected}) + "\n")
    from_file = load_records(str(tmp_path / "d.jsonl"))
    col = PreferenceCollator(processors["tiny-qwen2-vl"])
    a, b = col([rec], mode="pair"), col(from_file, mode="pair")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------------------------- synthetic


def _png(img):
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_synthetic_deterministic():
    a = make_synthetic_records("train", size=24, seed=7)
    b = make_synthetic_records("train", size=24, seed=7)
    c = make_synthetic_records("train", size=24, seed=8)
    key = lambda rs: [(r.prompt, r.chosen, r.rejected, tuple(r.corrections), _png(r.images[0])) for r in rs]  # noqa: E731
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert [(r.prompt, r.chosen) for r in load_records("synthetic", size=24, seed=7)] == [(r.prompt, r.chosen) for r in a]
