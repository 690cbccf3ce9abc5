"""``prefopt plan``: the memory model from config files alone, its command, and its agreement with the peak that
``prefopt train`` measures on CPU (tests/plan_measure.py: each run in its own process)."""
import concurrent.futures
import dataclasses
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("transformers")
from huggingface_hub import constants  # noqa: E402

from prefopt.train import plan as P  # noqa: E402

CONFIGS = os.path.join(os.path.dirname(P.__file__), "..", "assets", "configs")
LLAVA, QWEN3B, QWEN7B = (os.path.join(CONFIGS, n) for n in ("llava-1.5-7b", "qwen2.5-vl-3b", "qwen2.5-vl-7b"))


@pytest.fixture(scope="module")
def shapes():
    """The shipped config-only folders' shapes (built on the meta device: no weights exist there)."""
    return {name: P.model_shape(folder) for name, folder in (("llava", LLAVA), ("qwen3b", QWEN3B), ("qwen7b", QWEN7B))}


def with_images(shape, folder, **kw):
    shape = dataclasses.replace(shape)
    shape.image_tokens, shape.vision_tokens, shape.image_pixels = P.image_geometry(folder, shape, **kw)
    return shape


def test_shipped_configs_have_their_published_sizes(shapes):
    assert not any(n.endswith(".safetensors") for d in (LLAVA, QWEN3B, QWEN7B) for n in os.listdir(d))
    published = {"llava": 7.06e9, "qwen3b": 3.75e9, "qwen7b": 8.29e9}  # the model cards' parameter counts
    for name, shape in shapes.items():
        assert abs(shape.total_params / published[name] - 1) < 0.01, (name, shape.total_params)
    llava = shapes["llava"]
    assert (llava.decoder.layers, llava.decoder.hidden, llava.vision.layers, llava.vocab) == (32, 4096, 24, 32064)
    assert shapes["qwen3b"].params["head"] == 0 and shapes["qwen7b"].params["head"] == 152064 * 3584  # tied / not
    assert len(llava.decoder_linears) == 32 * 7


def test_image_tokens_come_from_the_processor_and_the_image_size(shapes):
    assert P.image_geometry(LLAVA, shapes["llava"], None, None) == (576, 577, (336, 336))  # 336 px, patch 14
    # Qwen2.5-VL: 14-pixel patches merged 2 x 2; 1120 x 896 pixels -> 80 x 64 patches -> 1,280 tokens
    assert P.image_geometry(QWEN7B, shapes["qwen7b"], (1120, 896), None)[:2] == (1280, 5120)
    assert P.image_geometry(QWEN7B, shapes["qwen7b"], None, 300)[:2] == (300, 1200)


def test_the_terms_follow_the_options(shapes):
    shape = with_images(shapes["llava"], LLAVA, image_size=None, image_tokens=None)
    base = P.PlanOptions(method="dpo", max_length=1024, batch_size=2, evaluation=False)
    full = P.plan(shape, base)
    assert full["peak_bytes"] == max(full["phases"].values()) == sum(full["breakdown"].values())
    assert full["peak_phase"] == "optimizer step"  # bf16 AdamW: weights, gradients, two states, a temporary
    assert full["breakdown"]["gradients"] == 2 * shape.total_params
    n = shape.total_params
    assert full["breakdown"]["weights"] == 2 * n and full["breakdown"]["optimizer"] == 4 * n  # bf16 AdamW
    assert full["breakdown"]["reference"] == 2 * n  # a frozen copy (its hidden states are gone by the step)
    ckpt = P.plan(shape, dataclasses.replace(base, gradient_checkpointing=True))
    act = "activations (decoder)"
    assert ckpt["terms"]["backward"][act] < full["terms"]["backward"][act] / 10
    lora = P.plan(shape, dataclasses.replace(base, lora=True))
    qlora = P.plan(shape, dataclasses.replace(base, qlora=True))
    assert lora["reference_mode"] == qlora["reference_mode"] == "adapters"
    quantised = sum(l.in_features * l.out_features for l in shape.decoder_linears)
    assert lora["breakdown"]["weights"] - qlora["breakdown"]["weights"] == pytest.approx(
        quantised * (2 - P.NF4_BYTES_PER_WEIGHT))
    eight = P.plan(shape, dataclasses.replace(base, optim="adamw8bit"))
    small = shape.small_tensor_params
    assert eight["breakdown"]["optimizer"] == (n - small) * P.EIGHT_BIT_STATE_BYTES + small * 8
    zero3 = P.plan(shape, dataclasses.replace(base, deepspeed="zero3", world=8))
    assert zero3["breakdown"]["optimizer"] == 12 * n / 8
    shared = P.plan(shape, base)["step"]
    unshared = P.plan(shape, dataclasses.replace(base, share_prefix="off"))["step"]
    assert shared["rows"] * 2 == unshared["rows"]  # one packed row per pair: the prefix once, both answers
    assert shared["row_length"] == unshared["row_length"] + unshared["answer_length"]
    assert shared["scored"] == unshared["scored"]
    # the fused head against materialised logits: [tokens, vocab] in fp32 and their gradient
    assert full["head_materialised_bytes"] >= 2 * shared["scored"] * shape.vocab * 4 > full["head_fused_bytes"]


def test_fitting_a_budget(shapes):
    shape = with_images(shapes["qwen7b"], QWEN7B, image_size=None, image_tokens=1280)
    opts = P.PlanOptions(method="dpo", qlora=True, gradient_checkpointing=True, batch_size=1,
                         max_length=1280 + 64 + 512, evaluation=False)
    result = P.plan_for_shape(shape, opts, gpu_memory=24 * P.GiB)
    assert result["fits"]
    b, length = result["max_batch_size"], result["max_length"]
    margin = P.CUDA_MARGIN_BYTES
    peak = lambda **kw: P.plan(shape, dataclasses.replace(opts, **kw))["peak_bytes"] + margin  # noqa: E731
    assert peak(batch_size=b) <= 24 * P.GiB < peak(batch_size=b + 1)
    assert peak(max_length=length) <= 24 * P.GiB < peak(max_length=length + 1)
    # full fine-tuning does not fit 24 GB: the first change of the documented order that fits is proposed
    big = dataclasses.replace(opts, qlora=False, gradient_checkpointing=False, batch_size=4)
    result = P.plan_for_shape(shape, big, gpu_memory=24 * P.GiB)
    assert not result["fits"] and result["change"]["peak_bytes"] + margin <= 24 * P.GiB
    for single in ("--gradient-checkpointing", "--lora"):  # neither alone fits, so more than one is proposed
        assert result["change"]["options"] != single


def run_cli(argv, capsys):
    code = P.main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_the_command_prints_a_table_and_json(capsys):
    code, out, _ = run_cli(["--model", QWEN7B, "--method", "dpo", "--qlora", "--image-tokens", "1280",
                            "--max-length", "1856", "--batch-size", "1", "--gradient-checkpointing",
                            "--gpu-memory", "16GB"], capsys)
    assert code == 0 and "peak" in out and "--gpu-memory 16.00 GiB" in out and "not a measurement" in out
    code, out, _ = run_cli(["--model", QWEN7B, "--qlora", "--image-tokens", "1280", "--max-length", "1856",
                            "--batch-size", "1", "--gpu-memory", "16GB", "--json"], capsys)
    result = json.loads(out)
    assert code == 0 and {"peak_bytes", "breakdown", "fits", "max_batch_size", "max_length"} <= set(result)
    assert result["peak_bytes"] == sum(result["breakdown"].values())


@pytest.mark.parametrize("argv, needle", [
    (["--gpu-memory", "lots"], "--gpu-memory"),
    (["--lora", "--qlora"], "--lora and --qlora"),
    (["--max-length", "100"], "--max-length 100"),
    (["--reference", "adapters"], "--reference adapters"),
    (["--world", "4"], "--world 4"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "tiny-llava"], "--model tiny-llava: an embedded model has no config folder"),
])
def test_bad_input_is_one_line_and_exit_2(argv, needle, capsys):
    code, out, err = run_cli(["--model", LLAVA, *argv], capsys)
    assert code == 2 and out == "" and needle in err and err.count("\n") == 1, err


def test_a_missing_model_is_one_line(tmp_path, capsys):
    code, _, err = run_cli(["--model", str(tmp_path / "nothing")], capsys)
    assert code == 2 and "--model" in err and err.count("\n") == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(["--model", str(tmp_path / "empty")], capsys)
    assert code == 2 and "config.json" in err and err.count("\n") == 1


def test_a_hub_id_reads_the_config_files_from_the_cache(tmp_path, monkeypatch, capsys):
    import shutil

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--llava"
    shutil.copytree(LLAVA, repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, out, _ = run_cli(["--model", "org/llava", "--max-length", "1024", "--json"], capsys)
    assert code == 0, out
    code, local, _ = run_cli(["--model", LLAVA, "--max-length", "1024", "--json"], capsys)
    assert json.loads(out) == json.loads(local)


# ------------------------------------------------------------------------------- the plan against measurement


@pytest.fixture(scope="module")
def measured_models(tmp_path_factory):
    import plan_measure as M

    root = tmp_path_factory.mktemp("plan-measure")
    return {"text": (M.save_text_model(root / "text"), M.write_data(root / "data")),
            "llava": (M.save_llava_model(root / "llava"), M.write_data(root / "idata", image=True)), "root": root}


def measure(case, folders, root):
    """(plan, measured) peaks in MiB of one case: ``prefopt train`` in its own process (glibc returning freed
    memory at once, so that the resident set follows the live tensors), the largest peak_memory_mb it logged."""
    import plan_measure as M

    name, kind, options = case
    out = root / name.replace(" ", "-")
    env = dict(os.environ, OMP_NUM_THREADS="1", MALLOC_MMAP_THRESHOLD_="65536")
    proc = subprocess.run([sys.executable, "-m", "prefopt", "train", *M.train_argv(*folders[kind], str(out), kind,
                                                                                   options)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        measured = max(json.loads(line).get("peak_memory_mb", 0) for line in f)
    planned = P.make_plan(folders[kind][0], M.plan_options(kind, options))["peak_bytes"] / 2**20
    return name, planned, measured


def test_the_plan_predicts_the_measured_cpu_peak(measured_models):
    """8 runs (dpo, cw-dpo, nsft, grpo x full / LoRA / QLoRA x reference model / adapters / precompute x
    checkpointing), two at a time: each plan within 15% or 64 MiB of its run's measured peak, whichever is larger."""
    import plan_measure as M

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        rows = list(pool.map(lambda c: measure(c, measured_models, measured_models["root"]), M.CASES))
    report = "\n".join(f"{n}: plan {p:.0f} MiB, measured {m:.0f} MiB ({(p / m - 1) * 100:+.1f}%)" for n, p, m in rows)
    print(report)
    for name, planned, measured in rows:
        assert abs(planned - measured) <= max(0.15 * measured, 64), report


def test_train_gpu_memory_picks_the_micro_batch_and_a_resume_reuses_it(tiny_family, tmp_path, capsys):
    """--gpu-memory between the plans of micro-batch 4 and 2: the run trains 2 x 2 (the global batch kept), says so,
    records it, and a resume under a budget that would choose 4 x 1 keeps 2 x 2."""
    import plan_measure as M

    from prefopt.train import checkpoint as ckpt
    from prefopt.train.cli import main as train_main

    folder, data = tiny_family("llama"), M.write_data(tmp_path / "data", n=8)
    opts = P.PlanOptions(method="dpo", device="cpu", dtype="fp32", max_length=64, prompt_tokens=16, evaluation=False,
                         grad_accum=2)
    shape = P.load_shape(folder, opts)
    peak = {b: P.plan(shape, dataclasses.replace(opts, batch_size=b))["peak_bytes"] for b in (2, 4)}
    assert peak[2] < peak[4]
    budget = f"{(peak[2] + peak[4]) // 2 // 1024}KB"
    argv = ["--model", folder, "--data", data, "--method", "dpo", "--batch-size", "4", "--max-length", "64",
            "--steps", "2", "--eval-size", "0", "--probe-every", "0", "--no-progress", "--device", "cpu"]
    out = str(tmp_path / "run")
    assert train_main([*argv, "--out", out, "--gpu-memory", budget, "--stop-after", "1"]) == 0
    err = capsys.readouterr().err
    assert "micro-batch 2 x accumulation 2, gradient checkpointing off (planned peak" in err, err
    saved = ckpt.read_trainer_state(ckpt.latest_checkpoint(out))["identity"]
    assert saved["gpu_memory_choice"] == {"batch_size": 2, "grad_accum": 2, "gradient_checkpointing": False}
    assert train_main([*argv, "--out", out, "--gpu-memory", "1GB", "--resume"]) == 0
    err = capsys.readouterr().err
    assert "micro-batch 2 x accumulation 2, gradient checkpointing off (as the run being resumed chose)" in err, err
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2]
    assert train_main([*argv, "--out", str(tmp_path / "tiny"), "--gpu-memory", "1KB"]) == 2
    assert "--gpu-memory 1KB: even micro-batch 1 with gradient checkpointing" in capsys.readouterr().err
