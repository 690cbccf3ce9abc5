"""``prefopt train``: --help, the one-line errors (exit 2, nothing written), a short run and its summary."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")

from prefopt.train.cli import build_parser, config_from_args, main  # noqa: E402

from test_train_loop import text_records  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli_data") / "prefs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for r in text_records("train", 8):
            f.write(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n")
    return str(path)


def test_help_explains_every_option(capsys):
    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    parser = build_parser()
    for action in parser._actions:
        if action.help == "==SUPPRESS==" or not action.option_strings:
            continue
        assert action.help and len(action.help) > 10, action.option_strings
        assert action.option_strings[0] in text
    for word in ("cw-dpo", "precompute", "adapters", "zero3", "tiny-llava", "synthetic", "metrics.jsonl"):
        assert word in text


def test_no_arguments_is_the_embedded_default():
    cfg = config_from_args(build_parser().parse_args([]))
    assert (cfg.method, cfg.model, cfg.data) == ("cw-dpo", "tiny-llava-sft", "synthetic")
    assert cfg.out.startswith("runs/train-") and not cfg.resume
    assert cfg.options.onpolicy_fraction > 0 and 0 < cfg.options.sftc_fraction < 1


@pytest.mark.parametrize("args,message", [
    (["--method", "ppo"], "invalid choice: 'ppo'"),
    (["--data", "/no/such/prefs.jsonl"], "data file not found"),
    (["--model", "/no/such/model"], "model not found"),
    (["--model", "tiny-llama", "--data", "synthetic"], "no image processor"),
    (["--model", "tiny-llama", "--method", "nsft", "--reference", "precompute", "--data", "TEXT"],
     "precompute cannot serve nsft"),
    (["--model", "tiny-llama", "--method", "dpo", "--reference", "adapters", "--data", "TEXT"], "needs --lora"),
    (["--model", "tiny-llama", "--resume", "--data", "TEXT"], "no checkpoint"),
    (["--model", "tiny-llama", "--deepspeed", "zero9", "--data", "TEXT"], "--deepspeed"),
    (["--model", "tiny-llama", "--method", "dpo", "--batch-size", "0", "--data", "TEXT"], "--batch-size"),
    (["--model", "tiny-llama", "--method", "nsft", "--data", "TEXT"], "no record has corrections"),
    # Every numeric option is range-checked before anything loads (NaN and infinity never pass).
    *[(["--model", "tiny-llama", "--method", "dpo", "--data", "TEXT", option, value], option + ": expected")
      for option, value in [("--lr", "nan"), ("--lr", "-1"), ("--lr", "inf"), ("--epochs", "inf"), ("--epochs", "nan"),
                            ("--train-size", "-1"), ("--max-grad-norm", "nan"), ("--beta", "-1"),
                            ("--warmup-ratio", "1"), ("--dist-timeout", "nan"), ("--max-nonfinite-steps", "0")]],
    (["--model", "tiny-llama", "--method", "sft", "--share-prefix", "on", "--data", "TEXT"],
     "--share-prefix on: sft trains one answer per record"),
    (["--share-prefix", "yes"], "invalid choice: 'yes'"),
])
def test_errors_are_one_line_exit_2_and_write_nothing(tmp_path, capsys, text_file, args, message):
    out = tmp_path / "run"
    args = [text_file if a == "TEXT" else a for a in args]
    assert main(args + ["--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("prefopt train: error:") and message in err, err
    assert not out.exists()


def test_library_callers_get_the_range_checks_too(tmp_path):
    from prefopt.train.loop import TrainConfig, train
    from prefopt.train.methods import MethodOptions

    with pytest.raises(ValueError, match=r"^--beta: expected a finite number >0, got -1.0$"):
        train(TrainConfig(method="dpo", out=str(tmp_path / "run"), options=MethodOptions(beta=-1.0)))
    with pytest.raises(ValueError, match=r"^--save-minutes: expected a finite number >=0, got nan$"):
        train(TrainConfig(out=str(tmp_path / "run"), save_minutes=float("nan")))
    assert not (tmp_path / "run").exists()


def test_malformed_record_fails_with_its_line_under_strict_data(tmp_path, capsys, text_file):
    bad = tmp_path / "bad.jsonl"
    with open(text_file, encoding="utf-8") as f:
        lines = f.readlines()
    bad.write_text("".join(lines[:3]) + '{"prompt": "no chosen"}\n' + "".join(lines[3:]))
    out = tmp_path / "run"
    assert main(["--model", "tiny-llama", "--data", str(bad), "--strict-data", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:4: missing field" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_occupied_out_is_refused(tmp_path, capsys, text_file):
    (tmp_path / "keep.txt").write_text("a previous run")
    assert main(["--model", "tiny-llama", "--data", text_file, "--out", str(tmp_path)]) == 2
    assert "holds files but no prefopt run (prefopt-run.json) and no checkpoint" in capsys.readouterr().err
    assert os.listdir(tmp_path) == ["keep.txt"]


def test_error_from_a_fresh_process_is_one_line(tmp_path):
    """The real command: no warnings or tracebacks around the one error line."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "prefopt.cli", "train", "--model", "tiny-llama", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", "")),
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "prefopt train: error: --model tiny-llama cannot take --data synthetic: record 0 has images but the model's "
        "processor has no image processor (text-only model?)"
    ]
    assert not out.exists()


def test_a_short_run_of_the_default_method_prints_its_summary(tmp_path, capsys):
    """The embedded default (CW-DPO on tiny-llava-sft, synthetic images), cut to a few steps."""
    out = tmp_path / "run"
    assert main(["--train-size", "8", "--steps", "4", "--batch-size", "2", "--probe-every", "2", "--probe-size", "4",
                 "--eval-size", "10", "--max-new-tokens", "6", "--device", "cpu", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    summary = captured.out
    for word in ("cw-dpo on tiny-llava-sft, 4/4 steps", "held-out (10 pairs)", "pair accuracy", "hallucination",
                 "ece pair", "loss", "reward accuracy", "probes", "peak memory",
                 "checkpoint-4"):
        assert word in summary, summary
    assert "stage cw-dpo" in captured.err  # progress goes to stderr
    rows = [json.loads(line) for line in open(out / "metrics.jsonl", encoding="utf-8")]
    assert [r["stage"] for r in rows[1:-1]] == ["sft-c", "cw-dpo", "cw-dpo", "cw-dpo"]
    assert rows[-1]["step"] == 4 and 0 <= rows[-1]["eval_pair_accuracy"] <= 1  # the held-out evaluation
    # On-policy sampling ran in every CW-DPO step (the grounded base often samples the chosen answer
    # itself, which keeps the dataset negative, so the count may be 0).
    assert all("onpolicy/negatives" in r for r in rows if r.get("stage") == "cw-dpo")
    assert sorted(os.listdir(out)) == ["checkpoint-4", "config.json", "eval", "latest", "metrics.jsonl", "model",
                                       "prefopt-run.json", "prefopt-run.lock", "reference-1.safetensors"]


def test_error_lines_are_the_first_line_or_the_type():
    from prefopt.train.errors import first_line

    assert first_line(ValueError("  --data x: not found\n  detail\n")) == "--data x: not found"
    assert first_line(RuntimeError("")) == "RuntimeError"  # an empty message still makes a line
