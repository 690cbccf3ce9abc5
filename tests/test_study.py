"""``prefopt study`` at a tiny size (one seed, two steps, two variants: the CI check of the whole
pipeline), and the study's statistics and claim verdicts on hand-made tables."""
import json
import os

import pytest

pytest.importorskip("transformers")

from prefopt.cli import main as prefopt_main  # noqa: E402
from prefopt.train.config import TINY_BASE_LR  # noqa: E402
from prefopt.train.study import CLAIMS, aggregate, check_claims  # noqa: E402


def test_study_runs_end_to_end_at_a_tiny_size(tmp_path, capsys):
    out = tmp_path / "study"
    assert prefopt_main(["study", "--out", str(out), "--methods", "dpo,nsft-no-kl", "--seeds", "1", "--base", "train", "--base-steps",
                         "2", "--steps", "2", "--batch-size", "2", "--train-size", "8", "--eval-size", "4",
                         "--probe-every", "1", "--probe-size", "2", "--no-progress"]) == 0
    assert "STUDY.md" in capsys.readouterr().out
    result = json.loads((out / "study.json").read_text(encoding="utf-8"))
    assert [r["variant"] for r in result["runs"]] == ["sft base", "dpo", "nsft-no-kl"]
    base = result["conditions"]["base_model"]
    assert base == str(out / "base" / "model") and os.path.isfile(os.path.join(base, "config.json"))
    for r in result["runs"][1:]:
        config = json.loads(open(os.path.join(r["run"], "config.json"), encoding="utf-8").read())
        assert config["init_from"] == base and config["steps"] == 2 and config["batch_size"] == 2
        assert config["lr"] == TINY_BASE_LR  # a trained base's rate, not its random-weight family's
        assert [row["step"] for row in r["curve"]] == [0, 1, 2]
        assert os.path.isfile(os.path.join(r["run"], "model", "model.safetensors"))
    table = result["table"]
    # The trained base's shift and probes are from its random init, not from the base: not in its row.
    assert "eval_pair_accuracy" in table["sft base"] and "eval_kl_shift" in table["dpo"]
    assert not {"eval_kl_shift", "eval_tv_shift", "probe/delta_logp_chosen"} & set(table["sft base"])
    assert {"eval_pair_accuracy", "eval_hallucination_rate", "eval_ece_pair", "eval_kl_shift"} <= set(table["dpo"])
    assert table["dpo"]["probe/delta_logp_chosen"]["n"] == 1 and table["dpo"]["probe/delta_logp_chosen"]["std"] is None
    study_md = (out / "STUDY.md").read_text(encoding="utf-8")
    assert result["conditions"]["commit"] in study_md
    assert "| metric | sft base | dpo | nsft-no-kl |" in study_md and "| probe/delta_logp_chosen |" in study_md
    assert (out / "delta_logp.png").is_file()
    assert prefopt_main(["study", "--out", str(out)]) == 2  # an occupied folder is refused
    assert "already holds files" in capsys.readouterr().err

    # A given base (that one's folder): evaluated as the table's first row, every variant starts from it.
    again = tmp_path / "again"
    assert prefopt_main(["study", "--out", str(again), "--base", base, "--methods", "simpo", "--seeds", "1",
                         "--steps", "1", "--batch-size", "2", "--train-size", "8", "--eval-size", "4",
                         "--probe-every", "1", "--probe-size", "2", "--no-progress"]) == 0
    second = json.loads((again / "study.json").read_text(encoding="utf-8"))
    assert [r["variant"] for r in second["runs"]] == ["sft base", "simpo"]
    assert "eval_pair_accuracy" in second["table"]["sft base"] and "eval_pair_accuracy" in second["table"]["simpo"]
    assert f"base: {base}" in (again / "STUDY.md").read_text(encoding="utf-8")


def test_a_study_folder_in_use_is_refused_by_a_second_study_or_train(tmp_path, capsys):
    """While a study holds --out (its lock, and the files it has written so far): a second study and a
    ``prefopt train`` on that folder each print the one line naming the holder, exit 2, and write nothing
    (today: "already holds files" and "holds files but no prefopt run")."""
    from prefopt.train.runfolder import FolderLock

    out = tmp_path / "study"
    line = (f"--out {out}: in use by pid {os.getpid()} on host {os.uname().nodename} (one writer per run folder; "
            "wait for it or choose another folder)")
    with FolderLock(str(out)):
        (out / "base").mkdir()
        assert prefopt_main(["study", "--out", str(out), "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines() == [f"prefopt study: error: {line}"]
        assert prefopt_main(["train", "--model", "tiny-llama", "--data", "synthetic", "--out", str(out),
                             "--no-progress"]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"prefopt train: error: {line}"
        assert sorted(os.listdir(out)) == ["base", "prefopt-run.lock"] and not os.listdir(out / "base")
    assert prefopt_main(["study", "--out", str(out), "--no-progress"]) == 2  # free now: its files are what refuses
    assert capsys.readouterr().err.strip() == f"prefopt study: error: --out {out}: already holds files; choose a new folder"


def test_mean_spread_and_verdicts():
    runs = [{"variant": "cw-dpo", "metrics": {"eval_hallucination_rate": v}} for v in (0.10, 0.12, 0.14)]
    runs += [{"variant": "dpo", "metrics": {"eval_hallucination_rate": v, "eval_generation_accuracy": 0.6}}
             for v in (0.30, 0.32, 0.34)]
    table = aggregate(runs)
    assert table["cw-dpo"]["eval_hallucination_rate"] == pytest.approx({"mean": 0.12, "std": 0.02, "n": 3})
    (claim,) = check_claims(table)
    assert claim["text"] == "CW-DPO hallucinates less than DPO" and claim["verdict"] == "reproduced"

    def verdict(a, b, spread, claim_text):
        t = {v: {c.metric: {"mean": m, "std": spread, "n": 3} for c in CLAIMS} for v, m in (a, b)}
        return next(c["verdict"] for c in check_claims(t) if c["text"] == claim_text)

    less = "CW-DPO hallucinates less than DPO"
    assert verdict(("cw-dpo", 0.4), ("dpo", 0.2), 0.05, less) == "not reproduced"
    assert verdict(("cw-dpo", 0.19), ("dpo", 0.2), 0.05, less) == "inconclusive"
    matches = "nSFT matches DPO in generation accuracy"
    assert verdict(("nsft", 0.78), ("dpo", 0.8), 0.05, matches) == "reproduced"  # within the spread
    assert verdict(("nsft", 0.5), ("dpo", 0.8), 0.05, matches) == "not reproduced"
    # A model that answers nothing tells nothing about generation claims.
    assert verdict(("nsft", 0.0), ("dpo", 0.0), 0.0, matches).startswith("not testable")
