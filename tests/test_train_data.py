"""Preference records, the JSONL loader, the collator and the synthetic set (prefopt.train.data / synthetic)."""
import io
import json
import os

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


def test_malformed_lines_are_reported_with_line_numbers(tmp_path, capsys):
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
    recs = load_records(str(path))
    assert [r.prompt for r in recs] == ["p1", "p8"] and recs[1].where == f"{path}:8"
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(": ")[0] for line in err] == [f"{path}:{n}" for n in (2, 4, 5, 6, 7)], err
    assert all(line.endswith("(skipped)") for line in err)
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        load_records(str(path), strict=True)


def _bomb_png(path, width, height):
    """A PNG whose header claims ``width x height`` pixels (no pixel data behind it)."""
    import struct
    import zlib

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) +
                     chunk(b"IEND", b""))


def bad_data_folder(tmp_path, good=6):
    """A data folder whose train.jsonl holds ``good`` usable text+image pairs and, after them, one record
    of every kind that used to pass the loader and kill the run (or pass silently); returns
    (folder, {line: expected reason fragment})."""
    data = tmp_path / "data"
    (data / "img").mkdir(parents=True)
    Image.new("RGB", (16, 16), (200, 10, 10)).save(data / "img" / "ok.png")
    (data / "img" / "empty.png").write_bytes(b"")
    (data / "img" / "text.png").write_text("not an image")
    (tmp_path / "outside.txt").write_text("secret")
    os.symlink(tmp_path / "outside.txt", data / "img" / "link.png")
    os.mkdir(data / "img" / "dir.png")
    _bomb_png(data / "img" / "bomb.png", 8000, 8000)
    ok = {"images": ["img/ok.png"], "prompt": "What colour is the square?", "chosen": "Red.", "rejected": "Blue."}
    lines = [ok] * good
    bad = {
        "empty.png": (dict(ok, images=["img/empty.png"]), "does not decode"),
        "text.png": (dict(ok, images=["img/text.png"]), "does not decode"),
        "symlink": (dict(ok, images=["img/link.png"]), "outside the data folder"),
        "dotdot": (dict(ok, images=["../outside.txt"]), "outside the data folder"),
        "dir": (dict(ok, images=["img/dir.png"]), "not a regular file"),
        "bomb": (dict(ok, images=["img/bomb.png"]), "8000x8000 pixels, over the limit"),
        "same": (dict(ok, rejected="Red."), "chosen and rejected are the same answer"),
        "dupkey": ('{"prompt": "a", "chosen": "b", "rejected": "c", "chosen": "d"}', "duplicate key 'chosen'"),
        "utf8": (b'{"prompt": "caf\xe9", "chosen": "b", "rejected": "c"}', "not UTF-8 (byte 0xe9"),
        "image-token": (dict(ok, prompt="Look: <image> What colour?"), "literal image token '<image>'"),
        "too-long": (dict(ok, prompt="colour " * 400), "leaving no answer token within max_length"),
        "no-rejected": ({"images": ["img/ok.png"], "prompt": "Say red.", "chosen": "Red."}, "no rejected answer"),
    }
    expected = {}
    with open(data / "train.jsonl", "wb") as f:
        for rec in lines:
            f.write(json.dumps(rec).encode() + b"\n")
        for n, (rec, reason) in enumerate(bad.values(), start=good + 1):
            raw = rec if isinstance(rec, bytes) else (rec if isinstance(rec, str) else json.dumps(rec)).encode()
            f.write(raw + b"\n")
            expected[n] = reason
    return data, expected


def test_every_bad_record_is_one_line_and_the_run_trains_on_the_rest(tmp_path, capsys):
    """Every kind of record that used to kill a run mid-way (or pass silently) is skipped before training
    with one line FILE:LINE: reason, counted in the summary; no Python warning, no traceback. With
    --strict-data the first one is the run's one-line error."""
    from prefopt.train.cli import main

    data, expected = bad_data_folder(tmp_path)
    args = ["--model", "tiny-llava", "--method", "dpo", "--data", str(data), "--steps", "2", "--batch-size", "2",
            "--probe-every", "0", "--probe-size", "2", "--max-length", "160", "--no-progress", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    path = str(data / "train.jsonl")
    lines = [ln for ln in captured.err.splitlines() if ln.startswith(path)]
    assert len(lines) == len(expected), captured.err
    by_line = {int(ln[len(path) + 1:].split(":")[0]): ln for ln in lines}
    for n, reason in expected.items():
        assert reason in by_line[n] and by_line[n].endswith("(skipped)"), (by_line[n], reason)
    assert "Warning" not in captured.err and "Traceback" not in captured.err
    assert f"skipped records    {len(expected)}" in captured.out

    assert main(args + ["--strict-data", "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:{min(expected)}: " in err[0], err
    assert not (tmp_path / "strict").exists()


def test_a_record_that_fails_inside_a_step_is_skipped(tmp_path, capsys):
    """An image that passed the up-front check but is broken by the time its batch is built (replaced on
    disk) is reported with its line and replaced by the next usable record; the run ends normally."""
    from prefopt.train.loop import TrainConfig, prepare

    data, _ = bad_data_folder(tmp_path, good=4)
    Image.new("RGB", (16, 16), (10, 10, 200)).save(data / "img" / "late.png")
    with open(data / "train.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"images": ["img/late.png"], "prompt": "Colour?", "chosen": "Blue.", "rejected": "Red."})
                + "\n")
    cfg = TrainConfig(method="sft", model="tiny-llava", data=str(data), out=str(tmp_path / "run"), steps=3,
                      batch_size=5, probe_every=0, probe_size=2, max_length=160, progress=False, device="cpu")
    run = prepare(cfg)
    (data / "img" / "late.png").write_bytes(b"broken")
    capsys.readouterr()
    summary = run.execute()
    late = sum(1 for _ in open(data / "train.jsonl", "rb"))
    err = capsys.readouterr().err
    assert f"train.jsonl:{late}: cannot identify image file" in err and err.strip().endswith("(skipped)"), err
    # sft needs no rejected answer: 11 of the 12 planted problems, and the late one.
    assert summary["steps"] == 3 and summary["skipped_records"] == 11 + 1


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
        assert n_image_tokens.tolist() == [4] * 6  # one 16x16 patch per cell of the 2x2 grid
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
