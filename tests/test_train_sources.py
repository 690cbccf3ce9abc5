"""Where records come from (prefopt.train.sources): bounded JSONL lines, parquet / arrow / save_to_disk / hub
sources, TRL's formats and mapped columns, every check on every source, reading on demand."""
import json
import tracemalloc

import pytest

pytest.importorskip("transformers")

from prefopt.train.cli import main  # noqa: E402
from prefopt.train.data import load_records  # noqa: E402


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return str(path)


# ------------------------------------------------------------------------------------- bounded records


def test_an_oversized_line_is_one_line_and_never_held_whole(tmp_path, capsys):
    limit = 64 << 10
    big = {"prompt": "p" * (50 * limit), "chosen": "c", "rejected": "r"}
    path = _write_jsonl(tmp_path / "d.jsonl", [{"prompt": "p1", "chosen": "c1", "rejected": "r1"}, big,
                                              {"prompt": "p3", "chosen": "c3", "rejected": "r3"}])
    tracemalloc.start()
    try:
        records = load_records(path, max_record_bytes=limit)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
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
