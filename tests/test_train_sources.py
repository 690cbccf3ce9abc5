"""Where records come from (prefopt.train.sources): bounded JSONL lines, parquet / arrow / save_to_disk / hub
sources, TRL's formats and mapped columns, every check on every source, reading on demand."""
import json
import os
import tracemalloc

import pytest

pytest.importorskip("transformers")

from prefopt.train.cli import main  # noqa: E402
from prefopt.train.data import load_records  # noqa: E402



def traced_load(path, limit):
    """(the records of ``path`` read with ``--max-record-bytes limit``, the traced Python peak while reading)."""
    tracemalloc.start()
    try:
        records = load_records(path, max_record_bytes=limit)
        return records, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()

def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------- bounded records


def test_an_oversized_line_is_one_line_and_never_held_whole(tmp_path, capsys):
    limit = 64 << 10
    big = {"prompt": "p" * (50 * limit), "chosen": "c", "rejected": "r"}
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, big,
                                              {"prompt": "p3", "chosen": "c3", "rejected": "r3"}])
    records, peak = traced_load(path, limit)
    assert [r.prompt for r in records] == ["p1", "p3"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}:2: record is over {limit} bytes (--max-record-bytes) (skipped)"], err
    assert peak < 8 * limit, f"peak {peak} bytes while reading a {50 * limit}-byte line with a {limit}-byte limit"
    with pytest.raises(ValueError, match=r"d\.jsonl:2: record is over"):
        load_records(path, max_record_bytes=limit, strict=True)
    # A line of exactly the limit (its newline not counted) is read.
    exact = json.dumps({"prompt": "", "chosen": "c", "rejected": "r"})
    exact = exact.replace('""', '"' + "q" * (limit - len(exact)) + '"')
    assert len(load_records(_write_jsonl(tmp_path / "e.jsonl", [exact]), max_record_bytes=limit)) == 1


def test_max_record_bytes_is_checked(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p", "chosen": "c", "rejected": "r"}])
    assert main(["--model", "tiny-llama", "--data", path, "--out", str(tmp_path / "run"), "--device", "cpu",
                 "--max-record-bytes", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--max-record-bytes: expected a positive number of bytes, got 0" in err[0], err


def test_a_deeply_nested_line_is_skipped_not_the_run(tmp_path, capsys):
    deep = '{"prompt": "p2", "chosen": "c2", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    nested = {"prompt": "p3", "chosen": "c3", "x": 1}
    for _ in range(40):
        nested = {"x": nested} if isinstance(nested, list) else [nested]
    shallow = {"prompt": "p4", "chosen": "c4", "x": [[[[1]]]]}
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p1", "chosen": "c1"}, deep,
                                              {"prompt": "p3", "chosen": "c3", "x": nested}, shallow])
    assert [r.prompt for r in load_records(path)] == ["p1", "p4"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}:{n}: record is nested deeper than 32 levels (skipped)" for n in (2, 3)], err


def test_answers_equal_after_normalisation_are_one_line(tmp_path, capsys):
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "p1", "chosen": "caf\u00e9", "rejected": "cafe\u0301"},       # NFC vs NFD
        {"prompt": "p2", "chosen": "Red.", "rejected": "Re\u200bd.\ufeff"},      # zero-width characters
        {"prompt": "p3", "chosen": "Red.", "rejected": "Blue."},
    ])
    assert [r.prompt for r in load_records(path)] == ["p3"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}:{n}: chosen and rejected are the same answer (skipped)" for n in (1, 2)], err


# ------------------------------------------------------------------------------------- sources and layouts

datasets = pytest.importorskip("datasets")
from PIL import Image  # noqa: E402

from prefopt.train.data import PreferenceCollator, data_fingerprint  # noqa: E402
from prefopt.train.faults import read_skipped_records, record_key  # noqa: E402
from prefopt.train.loop import SKIPPED_FILE, TrainConfig, prepare  # noqa: E402
from prefopt.train.models import build_model  # noqa: E402
from prefopt.train.sources import image_key  # noqa: E402

RUN = ["--model", "tiny-llava", "--method", "dpo", "--steps", "1", "--batch-size", "2", "--probe-size", "2",
       "--probe-every", "0", "--no-progress", "--device", "cpu", "--eval-size", "0", "--max-length", "160"]


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path, monkeypatch):
    """datasets' cache (parquet is converted into it) in the test's folder, not the user's."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))


@pytest.fixture(scope="module")
def llava():
    return build_model("tiny-llava")[1]


def _png(colour, size=(16, 16)):
    import io

    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


COLOURS = {"red": (220, 20, 20), "blue": (20, 20, 220)}


def rlaif_v_like(n):
    """RLAIF-V's layout: question / chosen / rejected strings and the image's bytes embedded."""
    rows = {"question": [], "chosen": [], "rejected": [], "image": []}
    for i in range(n):
        colour, other = ("red", "blue") if i % 2 == 0 else ("blue", "red")
        rows["question"].append(f"What colour is square {i}?")
        rows["chosen"].append(f"It is {colour}.")
        rows["rejected"].append(f"It is {other}.")
        rows["image"].append({"bytes": _png(COLOURS[colour]), "path": f"{i}.png"})
    features = datasets.Features({"question": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"), "image": datasets.Image()})
    return datasets.Dataset.from_dict(rows, features=features)


def trl_vision_like(n):
    """TRL's vision preference format: an ``images`` list and conversational prompt / chosen / rejected, with a
    system turn, two user turns and the image placed between two texts."""
    rows = {"images": [], "prompt": [], "chosen": [], "rejected": []}
    for i in range(n):
        colour, other = ("red", "blue") if i % 2 == 0 else ("blue", "red")
        rows["images"].append([{"bytes": _png(COLOURS[colour]), "path": None}])
        rows["prompt"].append([
            {"role": "system", "content": [{"type": "text", "text": "Answer in three words."}]},
            {"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image"},
                                         {"type": "text", "text": "What is it?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "A square."}]},
            {"role": "user", "content": [{"type": "text", "text": f"Its colour, {i}?"}]},
        ])
        rows["chosen"].append([{"role": "assistant", "content": [{"type": "text", "text": f"It is {colour}."}]}])
        rows["rejected"].append([{"role": "assistant", "content": [{"type": "text", "text": f"It is {other}."}]}])
    ds = datasets.Dataset.from_dict(rows)
    return ds.cast_column("images", datasets.List(datasets.Image()))


def test_readme_rlaif_v_like_command(tmp_path, capsys):
    """The README's RLAIF-V-like command: a parquet file, columns question/chosen/rejected, image bytes
    embedded, mapped with --data-columns; one step trains."""
    rlaif_v_like(6).to_parquet(str(tmp_path / "rlaif-v.parquet"))
    args = ["--data", str(tmp_path / "rlaif-v.parquet"),
            "--data-columns", "prompt=question,images=image,chosen=chosen,rejected=rejected"]
    assert main(RUN + args + ["--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert "skipped" not in capsys.readouterr().err


def test_readme_trl_format_command(tmp_path, capsys):
    """The README's TRL-format command: a save_to_disk DatasetDict with images and conversational
    prompt/chosen/rejected; one step trains."""
    datasets.DatasetDict({"train": trl_vision_like(6), "test": trl_vision_like(2)}).save_to_disk(str(tmp_path / "trl"))
    assert main(RUN + ["--data", str(tmp_path / "trl"), "--out", str(tmp_path / "run")]) == 0, capsys.readouterr().err
    assert (tmp_path / "run" / "model" / "config.json").is_file()
    assert "skipped" not in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-qwen2-vl"])
def test_images_sit_where_the_messages_put_them(model, llava):
    """A conversational prompt is rendered by the processor's chat template with its system turn, every turn
    and the image where the messages place it, and the batch holds the image's tokens."""
    processor = llava if model == "tiny-llava" else build_model(model)[1]
    records = load_records(trl_vision_like(1))
    collator = PreferenceCollator(processor)
    text = collator.prompt_text(records[0])
    parts = ("Answer in three words.", "Look:", processor.image_token, "What is it?", "Its colour, 0?")
    system, look, image, what, colour = (text.index(s) for s in parts)
    assert system < look < image < what < text.index("A square.") < colour, text
    messages = [{"role": m["role"], "content": m["content"]} for m in trl_vision_like(1)[0]["prompt"]]
    for m in messages:
        m["content"] = [{k: v for k, v in p.items() if v is not None} for p in m["content"]]
    assert text == processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    batch = collator(records, mode="pair")
    assert int((batch["input_ids"] == processor.image_token_id).sum()) > 0 and batch["num_images"].tolist() == [1, 1]


def test_image_values_of_every_kind_give_the_same_pixels(tmp_path, llava, monkeypatch):
    """A path (relative to the file naming it), a {"bytes", "path"} dict, a PIL image and a one-element list
    of each are the same image to the collator."""
    png = _png(COLOURS["red"])
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "a.png").write_bytes(png)
    values = ["img/a.png", {"bytes": png, "path": "x.png"}, {"bytes": None, "path": "img/a.png"},
              Image.open(tmp_path / "img" / "a.png").convert("RGB")]
    ds = datasets.Dataset.from_dict({"prompt": ["What colour?"] * 3, "chosen": ["Red."] * 3,
                                     "rejected": ["Blue."] * 3, "images": [[v] for v in values[:3]]},
                                    features=datasets.Features({"prompt": datasets.Value("string"),
                                                                "chosen": datasets.Value("string"),
                                                                "rejected": datasets.Value("string"),
                                                                "images": datasets.List(datasets.Image())}))
    monkeypatch.chdir(tmp_path)  # datasets sizes the relative paths as it writes them
    ds.to_parquet(str(tmp_path / "d.parquet"))
    records = list(load_records(str(tmp_path / "d.parquet")))
    assert records[0].images == [str(tmp_path / "img" / "a.png")] == records[2].images
    from prefopt.train.data import PreferenceRecord

    records.append(PreferenceRecord(prompt="What colour?", chosen="Red.", rejected="Blue.", images=values[3]))
    records.append(PreferenceRecord(prompt="What colour?", chosen="Red.", rejected="Blue.", images=[values[3]]))
    collator = PreferenceCollator(llava)
    pixels = [collator([r], mode="pair")["pixel_values"] for r in records]
    for p in pixels[1:]:
        assert p.equal(pixels[0])


def _same_records(a, b):
    """Same texts and images (image files compared by content: each source resolves paths in its folder)."""
    def content(img):
        return open(img, "rb").read() if isinstance(img, str) else image_key(img)

    return [(r.prompt, r.chosen, r.rejected, [content(i) for i in r.images]) for r in a] == \
           [(r.prompt, r.chosen, r.rejected, [content(i) for i in r.images]) for r in b]


def test_every_source_kind_reads_the_same_records(tmp_path, capsys):
    """The same rows as a parquet file, a folder of split parquet files, an .arrow file, a save_to_disk folder
    (a DatasetDict's split), a hub dataset id in the hub cache, and a datasets.Dataset: the same records; a
    JSONL file with the same rows and image paths too. Mixed and unknown sources are one line."""
    import shutil

    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "r.png").write_bytes(_png(COLOURS["red"]))
    rows = [{"prompt": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue.", "images": ["img/r.png"]}
            for i in range(4)]
    jsonl = _write_jsonl(tmp_path / "d.jsonl", rows)
    abs_rows = [dict(r, images=[str(tmp_path / "img" / "r.png")]) for r in rows]
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    (tmp_path / "split" / "img").mkdir(parents=True)
    (tmp_path / "split" / "img" / "r.png").write_bytes(_png(COLOURS["red"]))
    ds.to_parquet(str(tmp_path / "split" / "train-00000-of-00001.parquet"))
    datasets.Dataset.from_list(rows[:1]).to_parquet(str(tmp_path / "split" / "test-00000-of-00001.parquet"))
    datasets.DatasetDict({"train": ds, "test": ds.select([0])}).save_to_disk(str(tmp_path / "saved"))
    shutil.copytree(tmp_path / "img", tmp_path / "saved" / "img")
    arrow = tmp_path / "saved" / "train" / "data-00000-of-00001.arrow"
    shutil.copy(arrow, tmp_path / "d.arrow")
    snapshot = tmp_path / "hf" / "hub" / "datasets--org--prefs" / "snapshots" / ("0" * 40)
    shutil.copytree(tmp_path / "split", snapshot / "data")
    (snapshot / "data" / "img").rename(snapshot / "img")
    (tmp_path / "hf" / "hub" / "datasets--org--prefs" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "datasets--org--prefs" / "refs" / "main").write_text("0" * 40)
    jsonl_snapshot = tmp_path / "hf" / "hub" / "datasets--org--lines" / "snapshots" / ("1" * 40)
    shutil.copytree(tmp_path / "img", jsonl_snapshot / "img")
    shutil.copy(jsonl, jsonl_snapshot / "train.jsonl")
    (tmp_path / "hf" / "hub" / "datasets--org--lines" / "refs").mkdir()
    (tmp_path / "hf" / "hub" / "datasets--org--lines" / "refs" / "main").write_text("1" * 40)

    expected = load_records(jsonl)
    assert len(expected) == 4
    for source, name in ((tmp_path / "d.parquet", None), (tmp_path / "split", None), (tmp_path / "d.arrow", None),
                         (tmp_path / "saved", tmp_path / "saved" / "train")):
        got = load_records(str(source))
        assert [r.where for r in got] == [f"{name or source}:{i}" for i in range(4)], source
        assert _same_records(got, expected), source
    assert [r.prompt for r in load_records(str(tmp_path / "split"), split="test")] == ["Colour 0?"]
    assert [r.prompt for r in load_records(str(tmp_path / "saved"), split="test")] == ["Colour 0?"]
    assert _same_records(load_records(datasets.Dataset.from_list(abs_rows)), expected)

    import huggingface_hub

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        hub = load_records("org/prefs")
        assert len(hub) == 4 and hub[3].where == "org/prefs:3"
        assert [r.images for r in hub] == [[str(snapshot / "img" / "r.png")]] * 4
        assert _same_records(load_records("org/lines"), expected)
        with pytest.raises(ValueError, match=r"^--data org/other: not a file or folder, and no hub dataset"):
            load_records("org/other")

    (tmp_path / "split" / "train.jsonl").write_text(open(jsonl).read())
    with pytest.raises(ValueError, match=r"holds both JSONL and parquet/arrow files; name the file"):
        load_records(str(tmp_path / "split"))
    assert len(load_records(str(tmp_path / "split" / "train.jsonl"))) == 4
    with pytest.raises(ValueError, match=r"--data-columns: expected FIELD=COLUMN"):
        load_records(str(tmp_path / "d.parquet"), columns="question=prompt")
    with pytest.raises(ValueError, match=r"no column 'question'"):
        load_records(str(tmp_path / "d.parquet"), columns="prompt=question")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match=r"broken\.parquet: cannot be read"):
        load_records(str(tmp_path / "broken.parquet"))
    assert "Traceback" not in capsys.readouterr().err


def test_trl_layouts_and_their_problems(tmp_path, capsys):
    """TRL's implicit prompt (whole conversations, no prompt column) and messages in JSONL; a prompt placing
    more images than the record has, a multi-message answer or a prompt ending with the assistant is one line."""
    convo = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}]
    turn = {"role": datasets.Value("string"), "content": datasets.List({"type": datasets.Value("string"),
                                                                        "text": datasets.Value("string")})}
    ds = datasets.Dataset.from_dict({
        "chosen": [convo + [{"role": "assistant", "content": [{"type": "text", "text": "Red."}]}]] * 2,
        "rejected": [convo + [{"role": "assistant", "content": [{"type": "text", "text": "Blue."}]}]] * 2,
        "images": [[{"bytes": _png(COLOURS["red"]), "path": None}], []],
    }, features=datasets.Features({"chosen": datasets.List(turn), "rejected": datasets.List(turn),
                                   "images": datasets.List(datasets.Image())}))
    records = load_records(ds)
    assert len(records) == 1
    assert (records[0].prompt, records[0].chosen, records[0].rejected) == ("Colour?", "Red.", "Blue.")
    assert records[0].messages == convo
    assert capsys.readouterr().err.strip().splitlines() == [
        "dataset:1: the prompt places 1 images but the record has 0 (skipped)"]
    system = {"role": "system", "content": "Be brief."}
    path = _write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": [system, {"role": "user", "content": "Hi?"}], "chosen": "Hello.", "rejected": "Bye."},
        {"prompt": [{"role": "user", "content": "Hi?"}], "chosen": [{"role": "assistant", "content": "A"},
                                                                    {"role": "assistant", "content": "B"}]},
        {"prompt": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "A"}], "chosen": "B"},
        {"prompt": [{"role": "bot", "content": "Hi?"}], "chosen": "B"},
    ])
    records = load_records(path)
    assert len(records) == 1 and records[0].messages[0] == {"role": "system",
                                                           "content": [{"type": "text", "text": "Be brief."}]}
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}:2: field 'chosen' must be a non-empty string or one assistant message of text (skipped)",
                   f"{path}:3: field 'prompt' must end with a user message (skipped)",
                   f"{path}:4: field 'prompt': message 0 must have a role of system, user, assistant (skipped)"], err


def bad_parquet(folder, good=4):
    """A parquet file of ``good`` usable image pairs (bytes embedded) and, after them, one row of every kind the
    checks refuse; returns (path, {row: expected reason fragment})."""
    from test_train_data import _bomb_png

    (folder / "img").mkdir(parents=True)
    _bomb_png(folder / "img" / "bomb.png", 8000, 8000)
    (folder.parent / "outside.png").write_bytes(_png(COLOURS["red"]))
    (folder / "img" / "late.png").write_bytes(_png(COLOURS["blue"]))
    ok = {"prompt": "What colour is the square?", "chosen": "Red.", "rejected": "Blue.",
          "images": [{"bytes": _png(COLOURS["red"]), "path": None}]}
    bad = {
        "null prompt": (dict(ok, prompt=None), "field 'prompt' must be a non-empty string or a list of messages"),
        "empty chosen": (dict(ok, chosen=" "), "field 'chosen' must be a non-empty string"),
        "same after NFC": (dict(ok, chosen="caf\u00e9", rejected="cafe\u0301"), "chosen and rejected are the same"),
        "zero width": (dict(ok, rejected="Red.\u200b"), "chosen and rejected are the same answer"),
        "bytes": (dict(ok, images=[{"bytes": b"not an image", "path": "x.png"}]),
                  "image 0 (x.png) does not decode (cannot identify image file bytes)"),
        "bomb": (dict(ok, images=[{"bytes": (folder / "img" / "bomb.png").read_bytes(), "path": None}]),
                 "8000x8000 pixels, over the limit"),
        "outside": (dict(ok, images=[{"bytes": None, "path": "../outside.png"}]), "outside the data folder"),
        "missing": (dict(ok, images=[{"bytes": None, "path": "img/none.png"}]), "image not found"),
        "image token": (dict(ok, prompt="Look: <image> What colour?"), "literal image token '<image>'"),
        "too long": (dict(ok, prompt="colour " * 400), "leaving no answer token within max_length"),
        "no rejected": (dict(ok, rejected=None), "no rejected answer, which dpo needs"),
        "too big": (dict(ok, prompt="big " * 20_000), "record is over 60000 bytes (--max-record-bytes)"),
    }
    rows = [ok] * good + [rec for rec, _ in bad.values()]
    rows.append(dict(ok, images=[{"bytes": None, "path": "img/late.png"}], chosen="Blue.", rejected="Red."))
    table = {k: [r[k] for r in rows] for k in ok}
    features = datasets.Features({"prompt": datasets.Value("string"), "chosen": datasets.Value("string"),
                                  "rejected": datasets.Value("string"),
                                  "images": datasets.List({"bytes": datasets.Value("binary"),
                                                           "path": datasets.Value("string")})})
    path = folder / "prefs.parquet"
    datasets.Dataset.from_dict(table, features=features).to_parquet(str(path))
    return str(path), {good + n: reason for n, (_, reason) in enumerate(bad.values())}


def test_every_check_holds_for_a_parquet_source(tmp_path, capsys):
    """Every check the JSONL path makes, on a parquet source: one line SOURCE:ROW: reason per bad row,
    counted in the summary; --strict-data makes the first the run's one-line error."""
    path, expected = bad_parquet(tmp_path / "data")
    args = RUN + ["--data", path, "--max-record-bytes", "60000", "--steps", "2"]
    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    captured = capsys.readouterr()
    lines = [ln for ln in captured.err.splitlines() if ln.startswith(path + ":")]
    by_row = {int(ln[len(path) + 1:].split(":")[0]): ln for ln in lines}
    assert sorted(by_row) == sorted(expected) and len(lines) == len(expected), captured.err
    for row, reason in expected.items():
        assert reason in by_row[row] and by_row[row].endswith("(skipped)"), (by_row[row], reason)
    assert "Traceback" not in captured.err and f"skipped records    {len(expected)}" in captured.out

    assert main(args + ["--strict-data", "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:{min(expected)}: " in err[0], err


def test_a_row_failing_inside_a_step_is_listed_by_content_and_skipped_again(tmp_path, capsys):
    """A parquet row whose image file breaks after the up-front check is reported as SOURCE:ROW inside the step,
    listed in OUT/skipped_records.json by its content and skipped when the run starts again."""
    path, expected = bad_parquet(tmp_path / "data")
    late = max(expected) + 1
    cfg = TrainConfig(method="sft", model="tiny-llava", data=path, out=str(tmp_path / "run"), steps=2, batch_size=8,
                      probe_every=0, probe_size=2, max_length=160, progress=False, device="cpu", eval_size=0,
                      max_record_bytes=60000)
    run = prepare(cfg)
    (tmp_path / "data" / "img" / "late.png").write_bytes(b"broken")
    capsys.readouterr()
    assert run.execute()["steps"] == 2
    assert f"{path}:{late}: cannot identify image file" in capsys.readouterr().err
    listed = json.loads((tmp_path / "run" / SKIPPED_FILE).read_text())["records"]
    (tmp_path / "data" / "img" / "late.png").write_bytes(_png(COLOURS["blue"]))  # passes the up-front check again
    records = load_records(path, max_record_bytes=60000)
    assert [e["where"] for e in listed] == [f"{path}:{late}"]
    assert listed[0]["key"] == record_key(records[len(records) - 1])
    assert read_skipped_records(str(tmp_path / "run"), records) == {len(records) - 1}


def test_the_fingerprint_of_a_dataset_is_cheap_and_sees_changes(tmp_path, monkeypatch):
    """A parquet source's fingerprint (what --resume compares) changes with its content, split and columns and
    is computed from file sizes and parquet footers: reading no row data."""
    def fingerprint(source, **kw):
        return data_fingerprint(source, load_records(source, **kw))

    rlaif_v_like(6).to_parquet(str(tmp_path / "a.parquet"))
    columns = "prompt=question,images=image"
    before = fingerprint(str(tmp_path / "a.parquet"), columns=columns)
    assert fingerprint(str(tmp_path / "a.parquet"), columns=columns) == before
    changed = rlaif_v_like(6).map(lambda r: {"chosen": r["chosen"].replace("It", "if")})
    changed.to_parquet(str(tmp_path / "a.parquet"))
    assert fingerprint(str(tmp_path / "a.parquet"), columns=columns) != before
    assert load_records(str(tmp_path / "a.parquet"), columns=columns)[0].chosen == "if is red."  # not a stale copy
    assert fingerprint(str(tmp_path / "a.parquet"), columns=columns + ",rejected=question") != \
        fingerprint(str(tmp_path / "a.parquet"), columns=columns)
    datasets.DatasetDict({"train": rlaif_v_like(4), "test": rlaif_v_like(4)}).save_to_disk(str(tmp_path / "saved"))
    assert fingerprint(str(tmp_path / "saved"), columns=columns) != \
        fingerprint(str(tmp_path / "saved"), columns=columns, split="test")

    import hashlib

    from prefopt.train import sources

    rlaif_v_like(400).to_parquet(str(tmp_path / "big.parquet"))
    hashed = []
    real = hashlib.sha256
    monkeypatch.setattr(sources.hashlib, "sha256", lambda data=b"": hashed.append(len(data)) or real(data))
    fingerprint(str(tmp_path / "big.parquet"), columns=columns)
    assert sum(hashed) < os.path.getsize(tmp_path / "big.parquet") / 10, hashed


def test_rows_are_read_on_demand_and_the_checks_stream(tmp_path):
    """Loading a parquet set checks every row holding a few rows at a time and keeps only row indices: the
    Python memory held after loading, and its peak while loading, are a small part of the embedded images."""
    import numpy as np

    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8))
    buf = __import__("io").BytesIO()
    noise.save(buf, format="PNG")
    n = 600
    ds = datasets.Dataset.from_dict({"prompt": [f"What is {i}?" for i in range(n)], "chosen": ["Noise."] * n,
                                     "rejected": ["A cat."] * n,
                                     "images": [[{"bytes": buf.getvalue(), "path": None}]] * n})
    ds.to_parquet(str(tmp_path / "d.parquet"))
    total = n * len(buf.getvalue())
    tracemalloc.start()
    try:
        records = load_records(str(tmp_path / "d.parquet"))
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(records) == n and records[n - 1].prompt == f"What is {n - 1}?"
    assert records[5].images[0]["bytes"] == buf.getvalue()
    assert held < total / 20 and peak < total / 4, (held, peak, total)


def test_resume_refuses_changed_parquet_data(tmp_path, capsys):
    """--resume on a parquet source whose content changed is refused, naming the data; unchanged, it resumes."""
    path = str(tmp_path / "d.parquet")
    rlaif_v_like(6).to_parquet(path)

    def args(steps, *extra):  # the last --steps counts
        return RUN + ["--steps", str(steps), "--data", path, "--data-columns", "prompt=question,images=image", "--out",
                      str(tmp_path / "run"), *extra]

    assert main(args(1)) == 0
    assert main(args(2, "--resume")) == 0
    rlaif_v_like(6).map(lambda r: {"rejected": r["rejected"].replace("It", "if")}).to_parquet(path)
    capsys.readouterr()
    assert main(args(3, "--resume")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--resume: the data content (or --data-split, --data-columns) is" in err[0], err


def test_a_json_array_with_image_paths(tmp_path, capsys):
    """A POVID/VLFeedback-like .json file (one JSON array, image paths relative to it) is read with its columns
    mapped, each bad row one SOURCE:ROW line; a .json file of JSON lines is still read line by line."""
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "0.png").write_bytes(_png(COLOURS["red"]))
    rows = [{"image": "img/0.png", "question": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue."}
            for i in range(3)]
    rows[1]["image"] = "img/missing.png"
    path = tmp_path / "povid.json"
    path.write_text(json.dumps(rows, indent=1), encoding="utf-8")
    records = load_records(str(path), columns="prompt=question,images=image")
    assert [(r.prompt, r.images, r.where) for r in records] == [
        (f"Colour {i}?", [str(tmp_path / "img" / "0.png")], f"{path}:{i}") for i in (0, 2)]
    assert capsys.readouterr().err.strip().splitlines() == [
        f"{path}:1: image not found: {tmp_path / 'img' / 'missing.png'} (skipped)"]
    lines = _write_jsonl(tmp_path / "lines.json", [dict(r, prompt=r["question"]) for r in rows])
    assert [r.where for r in load_records(lines, columns="images=image")] == [f"{lines}:1", f"{lines}:3"]


@pytest.mark.parametrize("kind", ["parquet", "arrow"])
def test_an_oversized_row_is_refused_before_it_becomes_python_objects(tmp_path, capsys, kind):
    """A row whose embedded image bytes are 50 times --max-record-bytes: one line SOURCE:ROW: reason, the rows
    around it kept, and the traced Python peak a small part of that row (its size is read from Arrow's buffers)."""
    import pyarrow as pa

    limit = 64 << 10
    small = {"bytes": _png(COLOURS["red"]), "path": None}
    rows = [{"prompt": f"Colour {i}?", "chosen": "Red.", "rejected": "Blue.", "images": [small]} for i in range(3)]
    rows[1]["images"] = [{"bytes": b"\x89PNG" + bytes(50 * limit), "path": None}]
    ds = datasets.Dataset.from_list(rows)
    path = str(tmp_path / f"d.{kind}")
    if kind == "parquet":
        ds.to_parquet(path)
    else:
        with pa.OSFile(path, "wb") as sink, pa.ipc.new_stream(sink, ds.data.table.schema) as writer:
            writer.write_table(ds.data.table)
    del ds, rows
    capsys.readouterr()  # datasets' progress bars
    records, peak = traced_load(path, limit)
    assert [r.prompt for r in records] == ["Colour 0?", "Colour 2?"]
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"{path}:1: record is over {limit} bytes (--max-record-bytes) (skipped)"], err
    assert peak < 10 * limit, f"peak {peak} bytes while reading a {50 * limit}-byte row with a {limit}-byte limit"


MAIN_DATA, V2_DATA = "c" * 40, "d" * 40


def test_data_revision_reads_that_revision_of_a_hub_dataset(tmp_path, capsys, monkeypatch):
    """``--data org/prefs --data-revision v2`` (or its commit) reads the v2 snapshot of the hub cache, whose main
    holds no usable record; a revision not in the cache (offline) and a revision of a local file are one line."""
    import huggingface_hub

    repo = tmp_path / "hub" / "datasets--org--prefs"
    for ref, sha, rejected in (("main", MAIN_DATA, "Same."), ("v2", V2_DATA, "Other.")):
        (repo / "snapshots" / sha).mkdir(parents=True)
        datasets.Dataset.from_list([{"prompt": f"{ref} {i}?", "chosen": "Same.", "rejected": rejected}
                                    for i in range(4)]).to_parquet(str(repo / "snapshots" / sha / "train.parquet"))
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    assert len(load_records("org/prefs")) == 0
    capsys.readouterr()
    for revision in ("v2", V2_DATA):
        assert [r.prompt for r in load_records("org/prefs", revision=revision)] == [f"v2 {i}?" for i in range(4)]
    with pytest.raises(ValueError, match=r"^--data org/prefs: .*hub dataset of that id at revision v3 is cached"):
        load_records("org/prefs", revision="v3")
    local = str(repo / "snapshots" / V2_DATA / "train.parquet")
    for source in (local, "synthetic"):
        with pytest.raises(ValueError, match=r"^--data-revision v2: applies to a hub dataset id \(org/name\)"):
            load_records(source, revision="v2")

    args = ["--model", "tiny-llama", "--method", "dpo", "--data", "org/prefs", "--steps", "1", "--batch-size", "2",
            "--probe-size", "2", "--probe-every", "0", "--eval-size", "0", "--no-progress", "--device", "cpu"]
    assert main(args + ["--out", str(tmp_path / "main")]) == 2
    assert "--data org/prefs: no training records" in capsys.readouterr().err
    assert main(args + ["--data-revision", "v2", "--out", str(tmp_path / "v2")]) == 0
    with open(tmp_path / "v2" / "config.json", encoding="utf-8") as f:
        assert json.load(f)["data_revision"] == "v2"
