"""Fast CPU tests of the benchmark harness (prefopt.bench): argument errors, failure isolation, outputs.

Figures are not asserted (benchmarks measure, tests check correctness); only that every cell ends as a
row and that the outputs carry what users need.
"""
import json
import os

import pytest

from prefopt.bench import cli, report
from prefopt.bench.runner import Cell, Point, run_all, run_cell
from prefopt.bench.workloads import Shape

TINY = ["--hidden", "32", "--vocab", "512", "--warmup", "1", "--repeats", "2", "--no-plots"]


def test_unknown_implementation_is_a_clear_error(capsys):
    assert cli.main(["--impl", "naive,nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown implementation 'nope'" in err and "prefopt-torch" in err


def test_unknown_workload_and_bad_numbers(capsys):
    assert cli.main(["--workload", "ppo"]) == 2
    assert "unknown workload 'ppo'" in capsys.readouterr().err
    assert cli.main(["--tokens", "12x"]) == 2
    assert "comma-separated integers" in capsys.readouterr().err
    assert cli.main(["--tokens", "100", "--rows", "3"]) == 2
    assert "not a multiple of --rows" in capsys.readouterr().err
    assert cli.main(["--quick", "--preset", "gpu"]) == 2
    assert cli.main(["--quick", "--deadline", "60"]) == 2
    assert "--deadline: expected a positive number of seconds with --preset gpu-first-contact" in capsys.readouterr().err
    assert cli.main(["--preset", "gpu-first-contact", "--deadline", "0"]) == 2
    assert cli.main(["--quick", "--device-model", "m.json"]) == 2
    assert "--device-model: only with --io-model" in capsys.readouterr().err


def test_shape_that_does_not_fit_is_refused_without_running(tmp_path, capsys):
    rc = cli.main(["--tokens", "4000000", "--vocab", "152064", "--hidden", "8192", "--impl", "naive",
                   "--device", "cpu", "--out", str(tmp_path), "--no-plots"])
    captured = capsys.readouterr()
    assert rc == 2
    assert "does not fit" in captured.err and "GiB available" in captured.err
    rows = json.loads((tmp_path / "results.json").read_text())["results"]
    assert [r["status"] for r in rows] == ["skipped"]


def test_one_failing_implementation_does_not_lose_the_others():
    point = Point("dpo-ref", Shape(2, 16, 32, 256))
    # "no-such-impl" makes its worker raise (as a broken peer would); its neighbours still report.
    cells = [Cell(point, "naive"), Cell(point, "no-such-impl"), Cell(point, "prefopt-torch")]
    lines = []
    run_all(cells, device="cpu", dtype="float32", warmup=1, repeats=1, timeout=120, progress=lines.append)
    assert [c.result["status"] for c in cells] == ["ok", "failed", "ok"]
    assert "KeyError" in cells[1].result["reason"]
    assert len(lines) == 3 and "failed" in lines[1]
    env = report.environment("cpu", "float32", cells)
    md = report.markdown(cells, env, "t")
    assert "| no-such-impl | failed: KeyError" in md and "| prefopt-torch | " in md


def test_a_cell_past_its_timeout_becomes_a_row():
    res = run_cell(Cell(Point("dpo-ref", Shape(2, 16, 32, 256)), "naive"), device="cpu", dtype="float32",
                   warmup=1, repeats=1, timeout=0.2)
    assert res["status"] == "timeout" and "timed out" in res["reason"]


def test_json_markdown_and_plots_on_a_tiny_shape(tmp_path, capsys):
    args = ["--workload", "dpo-ref", "--tokens", "32,64", "--rows", "2", "--impl", "naive,prefopt-torch,prefopt-triton",
            "--device", "cpu", "--out", str(tmp_path)] + TINY[:-1]
    assert cli.main(args) == 0
    captured = capsys.readouterr()
    assert "| naive | " in captured.out and "| prefopt-torch | " in captured.out
    assert "prefopt-triton: CUDA only" in captured.out  # skipped with a clear line, not silently
    assert "[1/4]" in captured.err and "[4/4]" in captured.err
    data = json.loads((tmp_path / "results.json").read_text())
    env = data["environment"]
    for key in ("device", "device_name", "dtype", "versions", "git_commit", "date"):
        assert key in env
    assert env["device"] == "cpu" and env["dtype"] == "float32" and env["versions"]["torch"]
    ok = [r for r in data["results"] if r["status"] == "ok"]
    assert len(ok) == 4
    for r in ok:
        assert r["median_s"] > 0 and len(r["times_s"]) == 2 and r["peak_extra_bytes"] >= 0
        assert r["grad_bytes"] > 0 and r["loss"] is not None and "RSS" in r["memory_method"]
    naive = {r["shape"]["scored"]: r["loss"] for r in ok if r["impl"] == "naive"}
    fused = {r["shape"]["scored"]: r["loss"] for r in ok if r["impl"] == "prefopt-torch"}
    assert naive.keys() == fused.keys() == {32, 64}
    for n in naive:
        assert fused[n] == pytest.approx(naive[n], rel=1e-4)
    assert (tmp_path / "results.md").read_text().startswith("## prefopt bench")
    pytest.importorskip("matplotlib")
    assert os.path.getsize(tmp_path / "growth_tokens.png") > 1000


def test_rounds_combine_into_one_row():
    from prefopt.bench.runner import combine_rounds

    a = {"status": "ok", "times_s": [1.0, 3.0], "median_s": 2.0, "peak_extra_bytes": 10, "wall_s": 5.0}
    b = {"status": "ok", "times_s": [2.0, 4.0], "median_s": 3.0, "peak_extra_bytes": 30, "wall_s": 6.0}
    r = combine_rounds([a, b])
    assert r["median_s"] == 2.5 and r["peak_extra_bytes"] == 30 and r["wall_s"] == 11.0 and len(r["rounds"]) == 2
    failed = {"status": "oom", "reason": "killed"}
    assert combine_rounds([a, failed])["status"] == "oom"


@pytest.mark.parametrize("workload", ["dpo-ref"])  # one workload: each cell is a subprocess (CI time)
def test_trl_fused_head_peer_gives_the_naive_loss(workload):
    # TRL's ChunkedLogProbFunction as a bench peer (the head TRL's trainers run): same loss as naive
    pytest.importorskip("trl")
    point = Point(workload, Shape(2, 16, 32, 256))
    cells = [Cell(point, "naive"), Cell(point, "trl")]
    run_all(cells, device="cpu", dtype="float32", warmup=1, repeats=1, timeout=120, progress=lambda _: None)
    assert [c.result["status"] for c in cells] == ["ok", "ok"], [c.result.get("reason") for c in cells]
    assert cells[1].result["loss"] == pytest.approx(cells[0].result["loss"], rel=1e-5)


def test_vlm_step_records_have_the_stated_geometry():
    """--preset vlm-step: 576 image tokens (Qwen2-VL-like: 1,280), a 32-token prompt (+ 8 of the chat template) and 64-token answers
    (+ the end of turn and its newline); shared, one 616-token prefix per record and both answers after it."""
    from bench import vlm_step
    from prefopt.train.data import PreferenceCollator
    from prefopt.train.prefixes import SharedPrefixCollator

    processor = vlm_step.make_processor("llava")
    data = vlm_step.records(processor, 2, "llava")
    plain = PreferenceCollator(processor, max_length=2048)(data, mode="pair")
    shared = SharedPrefixCollator(processor, max_length=2048)(data, mode="pair")
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    assert (plain["input_ids"] == image).sum(-1).tolist() == [576] * 4
    assert (plain["labels"] == -100).int().argmin(-1).tolist() == [576 + 32 + 8] * 4
    assert (plain["labels"] != -100).sum(-1).tolist() == [64 + 2] * 4
    assert shared["prefix_lengths"].tolist() == [616, 616] and list(shared["input_ids"].shape) == [2, 616 + 2 * 66]
    qwen = vlm_step.make_processor("qwen2-vl")
    plain = PreferenceCollator(qwen, max_length=4096)(vlm_step.records(qwen, 1, "qwen2-vl"), mode="pair")
    assert (plain["input_ids"] == qwen.tokenizer.convert_tokens_to_ids("<|image_pad|>")).sum(-1).tolist() == [1280] * 2
    assert (plain["labels"] != -100).sum(-1).tolist() == [64 + 2] * 2


def test_vlm_flop_model_matches_a_hand_count():
    """bench/vlm_model.py at a tiny shape: 2 answers of 2 tokens after a 1-token prompt and a 2-token image."""
    from bench.vlm_model import DecoderShape, ModelShape, VisionShape, step_model, table

    shape = ModelShape("tiny", VisionShape(layers=1, hidden=2, intermediate=4, patches=3, gated_mlp=False, projector=10),
                       DecoderShape(layers=1, hidden=4, intermediate=8, heads=2, kv_heads=1, vocab=10), image_tokens=2)
    m = step_model(shape, prompt_tokens=1, answer_tokens=2, answers=2)
    # vision per image: 3 patches x 2 x (4 x 2 x 2 + 2 x 2 x 4) = 192, attention 4 x 2 x 3^2 = 72, projector 2 x 10
    # decoder per position: 2 x (4 x (4 + 2 x 2) + 4 x 4 + 3 x 4 x 8) = 288; prefix 3 positions
    # attention pairs: unshared 2 rows of 5 -> 2 x 15; shared 3 x 4 / 2 + 2 x (2 x 3 + 2 x 3 / 2) = 24; 4 x 4 each
    # head: 2 answers x 2 tokens x 2 x 4 x 10; activations per position 2 x 4 + 8 + 4 + 3 x 8 = 44 values, 2 bytes
    assert m["unshared"] == {"decoder_positions": 10, "vision": 568, "decoder_linear": 2880, "decoder_attention": 480,
                             "head": 320, "total": 4248, "activation_bytes_per_layer": 880}
    assert m["shared"] == {"decoder_positions": 7, "vision": 284, "decoder_linear": 2016, "decoder_attention": 384,
                           "head": 320, "total": 3004, "activation_bytes_per_layer": 616}
    assert m["ratio"]["decoder_positions"] == 0.7
    assert "| LLaVA-1.5-7B | DPO | ratio | 0.55x |" in table() and "Qwen2.5-VL-7B | GRPO" in table()


def test_vlm_profile_groups_backward_operators_with_their_forward():
    """bench/vlm_profile.py: an operator of the backward counts in the group of the module whose forward it
    differentiates (the autograd sequence number), not in "other"."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.vlm_profile import _scope, group_times

    mlp, attention = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    _scope(mlp, "decoder MLP")
    _scope(attention, "decoder attention")
    x = torch.randn(32, 64, requires_grad=True)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        mlp(attention(x)).sum().backward()
    groups = group_times(prof.events())
    for group in ("decoder MLP", "decoder attention"):
        ops = groups[group]
        assert ops.get("aten::addmm", 0) > 0 and ops.get("aten::mm", 0) > 0, (group, dict(ops))  # forward, backward
    assert "aten::mm" not in groups.get("other", {})
