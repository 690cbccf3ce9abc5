"""Runs that lose nothing and trust nothing: signals, faults, resume checks, checkpoint integrity, no pickle.

The embedded tiny text model (``tiny-llama``) on text-only records, a handful of steps on the CPU. The
cases that need a real process (signals, SIGKILL, two ranks) run ``prefopt.train.cli`` in subprocesses;
the rest run in this process to keep CI time small (each subprocess pays ~5-10 s of imports).
"""
import dataclasses
import json
import math
import os
import random
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from prefopt.train import checkpoint as ckpt  # noqa: E402
from prefopt.train.cli import main  # noqa: E402
from prefopt.train.distributed import _free_port as free_port  # noqa: E402
from prefopt.train.faultpoints import FAULT_ENV  # noqa: E402
from prefopt.train.interrupts import SKIPPED_FILE  # noqa: E402
from prefopt.train.loop import DataPlan, TrainConfig, prepare, train  # noqa: E402
from prefopt.train.methods import MethodOptions  # noqa: E402
from prefopt.train.summary import METRICS_FILE  # noqa: E402

from test_train_loop import write_text_data  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="",
           PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
ENV.pop(FAULT_ENV, None)


@pytest.fixture(scope="module")
def text_data(tmp_path_factory):
    return write_text_data(tmp_path_factory.mktemp("rel_data"), train=24, heldout=4)


def cli_args(data, out, *extra):
    return ["--model", "tiny-llama", "--data", data, "--out", str(out), "--batch-size", "2", "--probe-size", "2",
            "--max-new-tokens", "6", "--no-progress", "--device", "cpu", "--save-minutes", "0", "--eval-size", "0",
            *extra]


# cw-dpo with on-policy negatives: a reference point (step 2) and sampling, so the RNG state matters.
CWDPO = ["--method", "cw-dpo", "--steps", "6", "--sftc-fraction", "0.34", "--onpolicy-fraction", "0.5",
         "--probe-every", "2", "--save-every", "2"]


def spawn(args, env=None, **kw):
    return subprocess.Popen([sys.executable, "-m", "prefopt.train.cli", *args], cwd=REPO, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def rows(out):
    with open(os.path.join(out, METRICS_FILE), encoding="utf-8") as f:
        timings = ("tokens_per_second", "step_seconds", "peak_memory_mb")
        return [{k: v for k, v in json.loads(line).items() if k not in timings} for line in f]


def final_weights(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(ckpt.latest_checkpoint(str(out)), ckpt.WEIGHTS_FILE))


def assert_same_run(a, b):
    assert rows(a) == rows(b)
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=0, msg=k)


def wait_for_steps(out, n, proc, timeout=120):
    """Wait until ``proc`` has logged ``n`` training steps to metrics.jsonl."""
    path = os.path.join(out, METRICS_FILE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                if sum(1 for line in f if '"loss"' in line) >= n:
                    return
        time.sleep(0.02)
    raise AssertionError("the run did not get going")


@pytest.fixture(scope="module")
def straight(tmp_path_factory, text_data):
    """The uninterrupted cw-dpo run every interrupted one must reach."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(cli_args(text_data, out, *CWDPO)) == 0
    return out


# ------------------------------------------------------------------------------------------ signals


def test_sigterm_checkpoints_at_the_next_step_and_the_printed_command_resumes(tmp_path, text_data, capsys):
    """A real SIGTERM to a running ``prefopt train`` (long before its first checkpoint): one line naming the
    checkpoint and the resume command, exit 143, no traceback; running that command continues the run."""
    out = tmp_path / "run"
    args = cli_args(text_data, out, "--method", "dpo", "--steps", "400", "--probe-every", "0")
    proc = spawn(args)
    wait_for_steps(out, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    m = re.match(r"prefopt train: stopped by SIGTERM at step (\d+)/400; checkpoint (\S+); resume with: (.*)$", last)
    assert m, err
    step, path, command = int(m.group(1)), m.group(2), shlex.split(m.group(3))
    assert path == str(out / f"checkpoint-{step}") and ckpt.verify(path) is None
    assert len(rows(out)) == step
    assert command[:2] == ["prefopt", "train"] and "--resume" in command
    # Continue two more steps with the printed command: same numbers as a run stopped there directly.
    assert main(command[2:] + ["--stop-after", str(step + 2)]) == 0
    direct = tmp_path / "direct"
    assert main(cli_args(text_data, direct, "--method", "dpo", "--steps", "400", "--probe-every", "0",
                         "--stop-after", str(step + 2))) == 0
    capsys.readouterr()
    assert_same_run(out, direct)


def test_a_second_sigint_exits_at_once(tmp_path, text_data):
    """The run hangs at its first step boundary (a fault hook): the first SIGINT asks for a checkpoint the
    run never reaches, the second exits at once."""
    out = tmp_path / "run"
    proc = spawn(cli_args(text_data, out, "--method", "dpo", "--steps", "400", "--probe-every", "0"),
                 env=dict(ENV, **{FAULT_ENV: "step-1:hang"}))
    wait_for_steps(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    while "stopping with a checkpoint" not in proc.stderr.readline():
        pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "second SIGINT: exiting now without a checkpoint" in err and "Traceback" not in err
    assert len(rows(out)) == 1 and not ckpt.checkpoints(str(out))


# ------------------------------------------------------------------------------------------ faults


FILES = ("rng_state_0.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json",
         "trainable.safetensors", "trainer_state.json", "manifest.json")
# Every point a run can die at: each step boundary, and just before each file of each checkpoint (and
# the `latest` pointer) is written. Three are drawn per CI run (each costs a subprocess), from the seed.
POINTS = ([f"step-{n}" for n in range(1, 6)] + [f".checkpoint-{s}.tmp/{f}" for s in (2, 4) for f in FILES]
          + ["latest.tmp"])


def test_sigkill_at_seeded_points_then_resume_reaches_the_uninterrupted_numbers(tmp_path, text_data, straight,
                                                                               seed, capsys):
    points = random.Random(seed).sample(POINTS, 3)
    for point in points:
        out = tmp_path / point.replace("/", "_")
        proc = spawn(cli_args(text_data, out, *CWDPO), env=dict(ENV, **{FAULT_ENV: f"{point}:kill"}))
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == -signal.SIGKILL, (point, seed, err[-2000:])
        # A killed run: --resume continues from its newest intact checkpoint, or starts again when it died
        # before its first one; either way it ends where the uninterrupted run ends.
        assert main(cli_args(text_data, out, *CWDPO, "--resume")) == 0, (point, seed)
        assert not [n for n in os.listdir(out) if n.endswith(".tmp")], (point, seed)
        assert_same_run(out, straight)
    capsys.readouterr()


def test_an_exception_checkpoints_the_steps_trained_so_far(tmp_path, text_data, monkeypatch):
    from prefopt.train import loop

    cfg = TrainConfig(method="dpo", model="tiny-llama", data=text_data, out=str(tmp_path), steps=6, batch_size=2,
                      probe_every=0, probe_size=2, progress=False, device="cpu", save_minutes=0)
    real = loop.Run.train_step

    def failing(self, step, stage):
        if step == 3:
            raise RuntimeError("boom")
        return real(self, step, stage)

    monkeypatch.setattr(loop.Run, "train_step", failing)
    with pytest.raises(RuntimeError, match="boom"):
        train(cfg)
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-3")
    monkeypatch.setattr(loop.Run, "train_step", real)
    assert train(dataclasses.replace(cfg, resume=True))["steps"] == 6


@pytest.mark.parametrize("fault,cause", [("trainable.safetensors:enospc", "No space left on device (ENOSPC)"),
                                         ("rng_state_0.safetensors:erofs", "Read-only file system (EROFS)")])
def test_disk_full_or_read_only_is_one_line_and_leaves_no_tmp(tmp_path, text_data, monkeypatch, capsys, fault, cause):
    monkeypatch.setenv(FAULT_ENV, fault)
    assert main(cli_args(text_data, tmp_path / "run", "--method", "sft", "--steps", "1", "--probe-every", "0")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("prefopt train: error: cannot write checkpoint"), err
    assert cause in err[0] and fault.split(":")[0] in err[0]
    assert not [n for n in os.listdir(tmp_path / "run") if n.endswith(".tmp")]


def test_a_read_only_run_folder_is_one_line(tmp_path, text_data, monkeypatch, capsys):
    """EROFS on the first file the run writes, its lock (injected: CI runs as root, where chmod does not bite)."""
    import errno

    real_open = os.open

    def read_only(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR) and str(path).startswith(str(tmp_path / "run")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *a, **k)

    monkeypatch.setattr(os, "open", read_only)
    assert main(cli_args(text_data, tmp_path / "run", "--method", "sft", "--steps", "1", "--probe-every", "0")) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"prefopt train: error: {tmp_path / 'run' / 'prefopt-run.lock'}: Read-only file system (EROFS)"], err


def test_a_folder_without_a_checkpoint_can_be_started_again(tmp_path, text_data, capsys):
    """What a run killed before its first checkpoint leaves (its marker, written first, and its files): the
    same command (or --resume) starts again and removes only what the run wrote."""
    from prefopt.train import runfolder

    out = tmp_path / "run"
    out.mkdir()
    runfolder.write_marker(str(out))
    (out / "config.json").write_text("{}")
    (out / METRICS_FILE).write_text('{"step": 1, "loss": 1.0}\n')
    (out / ".checkpoint-2.tmp").mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(cli_args(text_data, out, "--method", "sft", "--steps", "1", "--probe-every", "0")) == 0
    assert "holds no checkpoint yet" in capsys.readouterr().err
    assert len(rows(out)) == 1 and not (out / ".checkpoint-2.tmp").exists()
    assert (out / "notes.txt").read_text() == "mine"  # not the run's: left alone


# ------------------------------------------------------------------------------------------ ownership, lock


def test_a_folder_without_the_run_marker_is_refused_whatever_its_file_names(tmp_path, text_data, capsys):
    """The user's files named like a run's: refused in one line, nothing touched (today: all deleted)."""
    out = tmp_path / "u2"
    (out / ".checkpoint-old").mkdir(parents=True)
    files = {"config.json": "{}", METRICS_FILE: "{}\n", "reference-letter.docx": "dear", ".checkpoint-old/x": "x"}
    for name, text in files.items():
        (out / name).write_text(text)
    for resume in ([], ["--resume"]):
        assert main(cli_args(text_data, out, "--method", "sft", "--steps", "1", "--probe-every", "0", *resume)) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"prefopt train: error: --out {out}: holds files but no prefopt run (prefopt-run.json) and no "
                       "checkpoint; remove them or choose another --out"], err
    assert {n: (out / n).read_text() for n in files} == files and len(os.listdir(out)) == 4


def test_one_writer_per_run_and_no_writing_through_links(tmp_path, text_data, capsys):
    """A finished run: while another process holds its lock a --resume is one line naming the holder, exit 2;
    a lock left by a dead process does not block. A run folder of an earlier version (no marker, an intact
    checkpoint) resumes and is marked. OUT/model and OUT/eval replaced by links: the resume's export and
    evaluation replace the links and write nothing into their targets."""
    from prefopt.train import runfolder
    from prefopt.train.eval import main as eval_main

    out = tmp_path / "run"
    args = cli_args(text_data, out, "--method", "sft", "--steps", "1", "--probe-every", "0", "--eval-size", "2")
    assert main(args) == 0
    run_id = runfolder.read_marker(str(out))
    assert run_id is not None
    holder = f"in use by pid {os.getpid()} on host {os.uname().nodename} (one writer per run folder; wait for it or "
    with runfolder.FolderLock(str(tmp_path / "run")):
        assert main(args + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1] == f"prefopt train: error: --out {out}: {holder}choose another folder)", err
        assert eval_main(["--model", str(out / "model"), "--size", "2", "--out", str(out)]) == 2
        assert capsys.readouterr().err.strip() == f"prefopt eval: error: --out {out}: {holder}choose another folder)"
    (out / runfolder.LOCK_FILE).write_text("pid 999999 on host gone\n")  # its holder died: no flock is held
    os.remove(out / runfolder.MARKER)  # as an earlier version left it
    elsewhere = {name: tmp_path / f"user-{name}" for name in ("model", "eval")}
    for name, target in elsewhere.items():
        target.mkdir()
        (target / "keep.txt").write_text("mine")
        __import__("shutil").rmtree(out / name)
        os.symlink(target, out / name)
    assert main(args + ["--resume"]) == 0
    capsys.readouterr()
    assert runfolder.read_marker(str(out)) not in (None, run_id)
    for name, target in elsewhere.items():
        assert os.listdir(target) == ["keep.txt"] and not os.path.islink(out / name)
    assert sorted(os.listdir(out / "eval")) == ["eval.json", "eval.md", "per_type.png", "reliability.png"]


def test_an_interrupted_export_leaves_no_folder_to_take_for_a_model(tmp_path, text_data, monkeypatch, capsys):
    """SIGINT just before an export's last file (the fault hook): one line, no OUT and no temporary folder
    left, so --init-from OUT is refused (today: the half folder was taken for a generic model); the same
    command again writes the whole folder."""
    from prefopt.train.export import is_model_folder
    from prefopt.train.export import main as export_main

    run = tmp_path / "run"
    assert main(cli_args(text_data, run, "--method", "sft", "--steps", "1", "--probe-every", "0")) == 0
    exported = tmp_path / "exported"
    monkeypatch.setenv(FAULT_ENV, "prefopt.json:sigint")
    capsys.readouterr()
    assert export_main([str(run / "checkpoint-1"), str(exported)]) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"prefopt export: interrupted; nothing was written to {exported}")
    monkeypatch.delenv(FAULT_ENV)
    assert sorted(os.listdir(tmp_path)) == ["run"]
    assert main(cli_args(text_data, tmp_path / "next", "--method", "sft", "--steps", "1", "--probe-every", "0",
                         "--init-from", str(exported))[2:]) == 2  # [2:]: without --model
    assert f"--init-from {exported}: not a folder" in capsys.readouterr().err
    assert export_main([str(run / "checkpoint-1"), str(exported)]) == 0 and is_model_folder(str(exported))


def test_sigint_in_the_end_of_run_export_leaves_no_model_folder_and_resume_writes_it(tmp_path, text_data, monkeypatch,
                                                                                   capsys):
    """SIGINT just before the run's own export writes its last file: one line, no OUT/model (nor a temporary
    folder) that --init-from or eval could take for a whole model; --resume writes the whole folder."""
    from prefopt.train.eval import main as eval_main
    from prefopt.train.export import is_model_folder

    out = tmp_path / "run"
    args = cli_args(text_data, out, "--method", "sft", "--steps", "1", "--probe-every", "0")
    monkeypatch.setenv(FAULT_ENV, "prefopt.json:sigint")
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "prefopt train: interrupted outside the training steps; the run folder keeps its last checkpoint")
    monkeypatch.delenv(FAULT_ENV)
    assert not os.path.lexists(out / "model") and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert main(cli_args(text_data, tmp_path / "next", "--method", "sft", "--steps", "1", "--probe-every", "0",
                         "--init-from", str(out / "model"))[2:]) == 2  # [2:]: without --model
    assert f"--init-from {out / 'model'}: not a folder" in capsys.readouterr().err
    assert eval_main(["--model", str(out / "model"), "--size", "2"]) == 2
    capsys.readouterr()
    assert main(args + ["--resume"]) == 0 and is_model_folder(str(out / "model"))
    assert [r["step"] for r in rows(out)] == [1]


def test_sigint_in_the_final_evaluation_then_resume_writes_its_report_and_line_once(tmp_path, text_data, monkeypatch,
                                                                                   capsys):
    """SIGINT just before the evaluation's last plot: one line, no eval/ and no eval_ line; --resume evaluates
    again: the whole report, and one eval_ line in metrics.jsonl."""
    out = tmp_path / "run"
    args = cli_args(text_data, out, "--method", "sft", "--steps", "1", "--probe-every", "0", "--eval-size", "2")
    monkeypatch.setenv(FAULT_ENV, "per_type.png:sigint")
    assert main(args) == 130
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        "prefopt train: interrupted outside the training steps; the run folder keeps its last checkpoint")
    assert not (out / "eval").exists() and not [n for n in os.listdir(out) if n.endswith(".tmp")]
    monkeypatch.delenv(FAULT_ENV)
    assert main(args + ["--resume"]) == 0
    assert sorted(os.listdir(out / "eval")) == ["eval.json", "eval.md", "per_type.png", "reliability.png"]
    assert sum("eval_pair_accuracy" in r for r in rows(out)) == 1 and "eval_pair_accuracy" in rows(out)[-1]


# ------------------------------------------------------------------------------------------ resume checks


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, text_data):
    """A dpo run stopped after 3 of 4 steps, with checkpoints 2 and 3."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    cfg = TrainConfig(method="dpo", model="tiny-llama", data=text_data, out=str(out), steps=4, batch_size=2,
                      probe_every=0, probe_size=2, progress=False, device="cpu", save_every=1, stop_after=3,
                      save_minutes=0)
    train(cfg)
    return dataclasses.replace(cfg, resume=True, stop_after=None)


@pytest.mark.parametrize("change,message", [
    ({"lr": 5e-3}, "--lr is 0.005"), ({"seed": 1}, "--seed"), ({"batch_size": 1}, "--batch-size"),
    ({"grad_accum": 2}, "--grad-accum"), ({"max_length": 100}, "--max-length"),
    ({"max_grad_norm": 0.5}, "--max-grad-norm"), ({"weight_decay": 0.1}, "--weight-decay"),
    ({"warmup_ratio": 0.2}, "--warmup-ratio"), ({"dtype": "bf16"}, "parameter dtype"), ({"method": "sft"}, "--method"),
    ({"options": MethodOptions(beta=0.2)}, "--beta is 0.2"), ({"lora": True}, "--lora"),
    ({"optim": "adamw8bit"}, "--optim is 'adamw8bit' but the run in"), ({"qlora": True}, "--qlora is True"),
    ({"steps": 2}, "fewer than the 3"),
])
def test_resume_refuses_what_changes_the_numbers(stopped, change, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        prepare(dataclasses.replace(stopped, **change))


def test_resume_refuses_another_world_size():
    from prefopt.train.loop import check_resume_identity, run_identity

    cfg = TrainConfig(model="tiny-llama")
    saved = run_identity(cfg, 2, torch.float32, "abc")
    check_resume_identity(saved, run_identity(cfg, 2, torch.float32, "abc"), "OUT")
    with pytest.raises(ValueError, match="the world size is 1 but the run in OUT used 2"):
        check_resume_identity(saved, run_identity(cfg, 1, torch.float32, "abc"), "OUT")
    # A run saved before an option existed used its default: it resumes with the default, not with another value.
    older = {k: v for k, v in saved.items() if k != "optim"}
    check_resume_identity(older, run_identity(cfg, 2, torch.float32, "abc"), "OUT")
    with pytest.raises(ValueError, match="--optim is 'adamw8bit' but the run in OUT used 'adamw'"):
        check_resume_identity(older, run_identity(dataclasses.replace(cfg, optim="adamw8bit"), 2, torch.float32, "abc"),
                              "OUT")


def test_resume_refuses_changed_data_and_notes_longer_steps(stopped, capsys):
    path = os.path.join(stopped.data, "train.jsonl")
    original = open(path, encoding="utf-8").read()
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original.replace("colour", "color", 1))
        with pytest.raises(ValueError, match="the data content"):
            prepare(stopped)
    finally:
        with open(path, "w", encoding="utf-8") as f:
            f.write(original)
    run = prepare(dataclasses.replace(stopped, steps=8))
    assert run.total_steps == 8 and "the run now lasts 8 steps instead of 4" in capsys.readouterr().err


def test_image_sizes_are_in_the_data_fingerprint(tmp_path):
    from PIL import Image

    from prefopt.train.data import data_fingerprint, load_records

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"images": ["a.png"], "prompt": "p", "chosen": "c"}) + "\n")
    before = data_fingerprint(str(tmp_path / "d.jsonl"), load_records(str(tmp_path / "d.jsonl")))
    Image.new("RGB", (9, 8), (1, 2, 3)).save(tmp_path / "a.png")
    assert data_fingerprint(str(tmp_path / "d.jsonl"), load_records(str(tmp_path / "d.jsonl"))) != before


def copy_run(stopped, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(stopped.out, out)
    return dataclasses.replace(stopped, out=str(out)), out


def test_a_corrupt_latest_checkpoint_falls_back_to_the_previous(stopped, tmp_path, capsys):
    cfg, out = copy_run(stopped, tmp_path)
    weights = out / "checkpoint-3" / ckpt.WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[:100])  # truncated
    run = prepare(cfg)
    err = capsys.readouterr().err.strip().splitlines()
    assert run.resume_state["path"].endswith("checkpoint-2")
    assert len(err) == 1 and "checkpoint-3: trainable.safetensors does not match its sha256" in err[0], err
    assert run.execute()["steps"] == 4


def test_latest_may_not_point_outside_the_run(stopped, tmp_path):
    cfg, out = copy_run(stopped, tmp_path)
    (out / "latest").write_text("../../elsewhere")
    with pytest.raises(ValueError, match="not a checkpoint folder inside"):
        prepare(cfg)


def test_resume_never_reads_or_writes_through_planted_links(stopped, tmp_path, capsys):
    """OUT/latest replaced by a link to a file outside the run: --resume refuses in one line (today: it read
    the target). checkpoint-3 (the one latest names) replaced by a link to a folder outside: refused in one
    line. checkpoint-4 (the next one the run writes) a link to a folder outside: the resumed run replaces
    the link, never writing through it. Every target stays as it was."""
    cfg, out = copy_run(stopped, tmp_path)
    outside = tmp_path / "user-latest.txt"
    outside.write_text("checkpoint-3")
    os.remove(out / "latest")
    os.symlink(outside, out / "latest")
    with pytest.raises(ValueError) as e:
        prepare(cfg)
    assert str(e.value) == f"--resume: {out / 'latest'}: a symbolic link, not the run's pointer file; remove it to " \
                           "resume from the newest intact checkpoint"
    assert outside.read_text() == "checkpoint-3" and os.path.islink(out / "latest")
    os.remove(out / "latest")
    (out / "latest").write_text("checkpoint-3")
    user = {name: tmp_path / f"user-{name}" for name in ("checkpoint-3", "checkpoint-4")}
    for name, target in user.items():
        target.mkdir()
        (target / "keep.txt").write_text("mine")
    os.rename(out / "checkpoint-3", tmp_path / "moved-checkpoint-3")
    os.symlink(user["checkpoint-3"], out / "checkpoint-3")
    with pytest.raises(ValueError, match=re.escape("names 'checkpoint-3', not a checkpoint folder inside")):
        prepare(cfg)
    os.remove(out / "checkpoint-3")
    os.rename(tmp_path / "moved-checkpoint-3", out / "checkpoint-3")
    os.symlink(user["checkpoint-4"], out / "checkpoint-4")
    capsys.readouterr()
    assert prepare(cfg).execute()["steps"] == 4
    assert not os.path.islink(out / "checkpoint-4") and ckpt.verify(str(out / "checkpoint-4")) is None
    assert (out / "latest").read_text() == "checkpoint-4"
    assert {n: os.listdir(t) for n, t in user.items()} == {n: ["keep.txt"] for n in user}
    assert {n: (t / "keep.txt").read_text() for n, t in user.items()} == {n: "mine" for n in user}


def test_a_reference_file_is_never_written_through_a_link(tmp_path, monkeypatch):
    """A link at the name the reference file was once written under (``reference-2.safetensors.tmp``), which
    appears after any check for it (the check made blind): safetensors is never handed a name that existed
    before (today it was, and what happened then was safetensors' choice: 0.8 replaces the link, an opener
    of the path writes through it), so the link and its target stay as they were; the file is written
    whole at its name, and no temporary entry is left."""
    from safetensors.torch import load_file

    from prefopt.train import reference as ref_mod
    from prefopt.train.distributed import DistState

    path = tmp_path / "reference-2.safetensors"
    target = tmp_path / "user.txt"
    target.write_text("mine")
    os.symlink(target, str(path) + ".tmp")
    lexists = os.path.lexists
    monkeypatch.setattr(os.path, "lexists", lambda p: False if str(p).endswith(".tmp") else lexists(p))
    ref_mod.save_tensors(str(path), {"w": torch.arange(3.0)}, DistState())
    monkeypatch.undo()
    assert target.read_text() == "mine"
    assert torch.equal(load_file(str(path))["w"], torch.arange(3.0))
    assert sorted(os.listdir(tmp_path)) == ["reference-2.safetensors", "reference-2.safetensors.tmp", "user.txt"]


def test_a_missing_rng_file_is_an_error(stopped, tmp_path, capsys):
    cfg, out = copy_run(stopped, tmp_path)
    for name in ("checkpoint-2", "checkpoint-3"):
        os.remove(out / name / ckpt.rng_file(0))
    with pytest.raises(ValueError, match="no intact checkpoint"):
        prepare(cfg)
    assert "rng_state_0.safetensors is missing" in capsys.readouterr().err
    ckpt.write_manifest(str(out / "checkpoint-3"))  # even with a manifest that agrees
    with pytest.raises(ckpt.CheckpointError, match="no RNG state for rank 0"):
        prepare(cfg).execute()


# ------------------------------------------------------------------------------------------ no pickle


class _Marker:
    """Unpickling this writes the file ``path``."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def plant_pickle(path, marker):
    torch.save({"state": _Marker(str(marker))}, path)


def test_the_crafted_pickle_runs_when_unpickled(tmp_path):
    """The probe of the next tests is real: loading it the unsafe way writes the marker."""
    plant_pickle(tmp_path / "f.pt", tmp_path / "marker")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert (tmp_path / "marker").exists()


def plant_everywhere_and_resume(out, args, marker, *, refresh_manifest=True):
    """Replace every file of the run folder ``out``, one at a time, with a crafted pickle (and, as an
    attacker holding the folder would, a manifest that agrees with it), resume with ``args``, and check
    the pickle never ran; returns the resume exit codes by file."""
    codes = {}
    for root, _, names in os.walk(out):
        for name in names:
            path = os.path.join(root, name)
            saved = open(path, "rb").read()
            plant_pickle(path, marker)
            folder = os.path.dirname(path)
            manifest = os.path.join(folder, ckpt.MANIFEST_FILE)
            before = open(manifest, "rb").read() if os.path.isfile(manifest) and name != ckpt.MANIFEST_FILE else None
            if refresh_manifest and before is not None:
                ckpt.write_manifest(folder)
            try:
                codes[os.path.relpath(path, out)] = main(args)
            except Exception as e:  # a crash is a failure of another test; here only the marker matters
                codes[os.path.relpath(path, out)] = repr(e)
            assert not marker.exists(), f"unpickled {path}"
            with open(path, "wb") as f:
                f.write(saved)
            if before is not None:
                with open(manifest, "wb") as f:
                    f.write(before)
    return codes


def test_no_file_of_a_run_folder_is_unpickled_on_resume(tmp_path, text_data, capsys):
    out = tmp_path / "run"
    args = cli_args(text_data, out, "--method", "cw-dpo", "--steps", "2", "--sftc-fraction", "0.5",
                    "--onpolicy-fraction", "0", "--probe-every", "0", "--keep-checkpoints", "1")
    assert main(args) == 0
    names = {os.path.relpath(os.path.join(r, n), out) for r, _, ns in os.walk(out) for n in ns}
    assert "reference-1.safetensors" in names and f"checkpoint-2/{ckpt.rng_file(0)}" in names
    codes = plant_everywhere_and_resume(out, args + ["--resume"], tmp_path / "marker")
    capsys.readouterr()
    assert set(codes) == names
    # Every file that is read is refused with a one-line error (never a crash, never a silent resume);
    # config.json, metrics.jsonl, the exported model/ and the eval/ report are only written (the finished
    # run resumes and rewrites them), and so are the lock and the marker (unreadable: an unmarked folder with
    # an intact checkpoint, which resumes). Exit 2: refused while preparing (the pointer, manifest, trainer
    # state); 1: while loading the rest.
    expected = {name: 0 if name.startswith(("model/", "eval/")) else 1 for name in names}
    expected.update({"config.json": 0, METRICS_FILE: 0, "prefopt-run.json": 0, "prefopt-run.lock": 0,
                     "latest": 2, f"checkpoint-2/{ckpt.MANIFEST_FILE}": 2,
                     f"checkpoint-2/{ckpt.STATE_FILE}": 2})
    assert codes == expected


# ------------------------------------------------------------------------------------------ two ranks


def launch_two(args, fault, timeout=180):
    """Two ranks of ``prefopt train`` (DDP over gloo) started the way torchrun starts them (its agent
    would add a 30 s grace period before it kills a rank that ignores SIGTERM); returns (rank 0's
    stderr, its exit code, seconds until it exited). Rank 1 is killed once rank 0 is done."""
    port = str(free_port())
    procs = [spawn(args, env=dict(ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=port, **{FAULT_ENV: fault})) for r in (0, 1)]
    started = time.monotonic()
    try:
        _, err = procs[0].communicate(timeout=timeout)
        elapsed = time.monotonic() - started
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
    return err, procs[0].returncode, elapsed


def test_a_signal_on_one_rank_stops_every_rank_with_a_checkpoint(tmp_path, text_data):
    """Rank 1 alone gets SIGINT after step 2: the flag is all-reduced, both ranks checkpoint step 2 and
    stop (no rank waits alone in a collective)."""
    out = tmp_path / "run"
    err, code, _ = launch_two(cli_args(text_data, out, "--method", "dpo", "--steps", "40", "--probe-every", "0",
                                       "--batch-size", "1"), "step-2:sigint:1")
    assert code == 128 + signal.SIGINT, err[-3000:]
    assert "prefopt train: stopped by SIGINT at step 2/40; checkpoint" in err, err[-3000:]
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-2")
    assert set(os.listdir(out / "checkpoint-2")) >= {ckpt.rng_file(0), ckpt.rng_file(1)}


def test_a_hung_rank_is_a_clear_error_after_the_timeout(tmp_path, text_data):
    out = tmp_path / "run"
    err, code, elapsed = launch_two(cli_args(text_data, out, "--method", "dpo", "--steps", "40", "--probe-every", "0",
                                             "--batch-size", "1", "--dist-timeout", "5"), "step-2:hang:1")
    assert code == 1, err[-3000:]
    assert err.strip().splitlines()[-1].startswith("prefopt train: error: rank 0: a collective failed, another rank "
                                                   "hung past --dist-timeout 5 s or died"), err[-3000:]
    assert "Traceback" not in err and elapsed < 150


def test_a_rank_missing_at_setup_is_a_clear_error_after_the_timeout(tmp_path, text_data):
    """Rank 0 alone of 2: the rendezvous gives up after --dist-timeout with one line, no traceback."""
    env = dict(ENV, RANK="0", LOCAL_RANK="0", WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    proc = spawn(cli_args(text_data, tmp_path / "run", "--method", "dpo", "--steps", "2", "--dist-timeout", "3"), env=env)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1, err[-3000:]
    (line,) = err.strip().splitlines()
    assert line.startswith("prefopt train: error: rank 0: setting up the run failed (") and "1/2 clients" in line
    assert line.endswith("a rank that hung past --dist-timeout 3 s or died says why in its own output")


# ------------------------------------------------------------------------------- a record failing in a step


# The bad record passes the loader's checks and collates; its forward raises. It is the first record of the
# second micro-batch of step 4 (the plan of 24 records, batch 2, accumulation 2, seed 0): a step of cw-dpo's
# second stage, where on-policy sampling draws from the generators, after a micro-batch that backpropagated.
BAD = DataPlan(24, 2, 2, 1, 0).indices(3, 1, 0)[0]


def failing_forward(monkeypatch, fails):
    """Make the objective's forward raise ``ValueError`` when ``fails(indices)``; returns the record indices
    of every forward that trained (ran with gradients)."""
    from prefopt.train.methods import PolicyObjective

    real, trained = PolicyObjective.forward, []

    def forward(self, batch, stage=None, num_items=None, indices=None):
        if stage is not None and fails(indices):
            raise ValueError("the model cannot take this record")
        if stage is not None and torch.is_grad_enabled():
            trained.append(list(indices))
        return real(self, batch, stage=stage, num_items=num_items, indices=indices)

    monkeypatch.setattr(PolicyObjective, "forward", forward)
    return trained


def reliability_config(data, out, **kw):
    base = dict(method="cw-dpo", model="tiny-llama", data=data, out=str(out), steps=6, batch_size=2, grad_accum=2,
                options=MethodOptions(sftc_fraction=0.34, onpolicy_fraction=0.5), max_new_tokens=6, probe_every=0,
                probe_size=2, progress=False, device="cpu", save_minutes=0, eval_size=0)
    return TrainConfig(**{**base, **kw})


def test_a_record_failing_inside_a_step_is_skipped_reported_and_replaced(tmp_path, text_data, monkeypatch, capsys):
    from prefopt.train import loop

    summaries, forwards = [], []
    for name in ("a", "b"):  # the same run twice: the same numbers
        trained = failing_forward(monkeypatch, lambda indices: BAD in indices)
        summaries.append(train(reliability_config(text_data, tmp_path / name)))
        forwards.append(trained)
        monkeypatch.undo()
    err = capsys.readouterr().err
    problems = [line for line in err.splitlines() if "fails inside a training step" in line]
    assert problems == [f"{os.path.join(text_data, 'train.jsonl')}:{BAD + 1}: fails inside a training step "
                        f"(ValueError: the model cannot take this record) (skipped)"] * 2
    # Every micro-batch full: the bad record replaced by the next one in data order; step 4's first
    # micro-batch trained twice (its first try was abandoned with the step); between the tries, the
    # failing micro-batch's records ran alone (the bad one raising).
    plan = DataPlan(24, 2, 2, 1, 0)
    replaced = [[BAD + 1 if i == BAD else i for i in plan.indices(s, m, 0)] for s in range(6) for m in range(2)]
    alone = [[i] for i in plan.indices(3, 1, 0) if i != BAD]
    for summary, trained in zip(summaries, forwards):
        assert summary["steps"] == 6 and summary["skipped_records"] == 1
        assert trained == replaced[:7] + alone + replaced[6:]
    assert_same_run(tmp_path / "a", tmp_path / "b")

    # The redone step is the step that would have run with the record known unusable from the start: the
    # gradients of its first try are gone and the generators are where they were.
    real_init = loop.Run.__init__

    def known_unusable(self, *args, **kw):
        real_init(self, *args, **kw)
        self.unusable.add(BAD)

    monkeypatch.setattr(loop.Run, "__init__", known_unusable)
    train(reliability_config(text_data, tmp_path / "known"))
    assert_same_run(tmp_path / "a", tmp_path / "known")


def test_a_micro_batch_of_one_failing_record_is_skipped_when_its_replacement_runs(tmp_path, text_data, monkeypatch,
                                                                                    capsys):
    # Every record of the micro-batch fails alone: a data problem only because the next record does not.
    trained = failing_forward(monkeypatch, lambda indices: BAD in indices)
    summary = train(reliability_config(text_data, tmp_path, batch_size=1, steps=12))  # one epoch
    assert summary["steps"] == 12 and summary["skipped_records"] == 1
    assert f"train.jsonl:{BAD + 1}: fails inside a training step" in capsys.readouterr().err
    assert len(trained) >= 24 and all(len(idx) == 1 and BAD not in idx for idx in trained)


@pytest.mark.parametrize("method", ["grpo", "cw-dpo"])
def test_a_prompt_failing_before_sampling_is_skipped_reported_and_replaced(tmp_path, text_data, monkeypatch, capsys,
                                                                           method):
    """GRPO's prompts, and on-policy negatives' (cw-dpo, every record sampled), are collated for sampling
    inside the step: one that fails there (its image went bad after the up-front check, say) is reported,
    skipped and replaced by the next record."""
    from prefopt.train import loop
    from prefopt.train.data import PreferenceCollator, load_records

    bad_prompt = load_records(text_data)[BAD].prompt
    real_features, sampled = PreferenceCollator._features, []

    def features(self, text, images, where):
        if bad_prompt in text and len(sampled) > 0:  # the up-front check (before any sampling) passes
            raise OSError("image file is truncated")
        return real_features(self, text, images, where)

    def sample_answers(self, records, num, prompts=None):  # collates as the real one does, samples nothing
        if prompts is None:
            self.collator.generation_inputs(records)
        sampled.append([r.prompt for r in records])
        return [r.chosen for r in records for _ in range(num)]

    monkeypatch.setattr(PreferenceCollator, "_features", features)
    monkeypatch.setattr(loop.Run, "sample_answers", sample_answers)
    options = MethodOptions(num_generations=2, sftc_fraction=0.34, onpolicy_fraction=1.0)
    summary = train(reliability_config(text_data, tmp_path, method=method, steps=12, grad_accum=1,
                                       options=options))  # one epoch
    assert summary["steps"] == 12 and summary["skipped_records"] == 1
    assert (f"train.jsonl:{BAD + 1}: image file is truncated (skipped)"
            in capsys.readouterr().err)
    assert all(len(prompts) == 2 and bad_prompt not in prompts for prompts in sampled[1:])


def test_a_record_failing_only_in_its_backward_is_skipped(tmp_path, text_data, monkeypatch, capsys):
    """One process: the record's forward runs, its backward raises; found by running records alone with
    their backward, reported and replaced."""
    from prefopt.train.methods import PolicyObjective

    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, loss):
            return loss.clone()

        @staticmethod
        def backward(ctx, grad):
            raise ValueError("this record's backward fails")

    real = PolicyObjective.forward

    def forward(self, batch, stage=None, num_items=None, indices=None):
        out = real(self, batch, stage=stage, num_items=num_items, indices=indices)
        if stage is not None and BAD in indices:
            out = out._replace(loss=FailingBackward.apply(out.loss))
        return out

    monkeypatch.setattr(PolicyObjective, "forward", forward)
    summary = train(reliability_config(text_data, tmp_path))
    assert summary["steps"] == 6 and summary["skipped_records"] == 1
    assert (f"train.jsonl:{BAD + 1}: fails inside a training step (ValueError: this record's backward fails) "
            "(skipped)") in capsys.readouterr().err


def test_a_skipped_record_is_not_scored_by_the_precomputed_reference(tmp_path, text_data, monkeypatch, capsys):
    """cw-dpo with --reference precompute: a record found failing to collate in the SFT-C stage is left out
    of the reference pass at the reference point (it would fail there too)."""
    from prefopt.train import loop
    from prefopt.train.data import PreferenceCollator, load_records

    bad = load_records(text_data)[BAD]
    real_features, stepped = PreferenceCollator._features, []
    real_step = loop.Run.try_step

    def features(self, text, images, where):
        if stepped and bad.prompt in text and bad.chosen in text:
            raise OSError("image file is truncated")
        return real_features(self, text, images, where)

    def try_step(self, step, stage):
        stepped.append(step)
        return real_step(self, step, stage)

    monkeypatch.setattr(PreferenceCollator, "_features", features)
    monkeypatch.setattr(loop.Run, "try_step", try_step)
    summary = train(reliability_config(text_data, tmp_path, reference="precompute", steps=12, grad_accum=1,
                                       options=MethodOptions(sftc_fraction=0.75, onpolicy_fraction=0.0)))
    assert summary["steps"] == 12 and summary["skipped_records"] == 1
    assert f"train.jsonl:{BAD + 1}: image file is truncated (skipped)" in capsys.readouterr().err


def test_the_skipped_records_file_names_records_by_content(tmp_path, text_data):
    """OUT/skipped_records.json names records by content, so another filtering or order of the data (a
    restart with other options) skips the same records."""
    from prefopt.train.data import load_records
    from prefopt.train.faults import read_skipped_records, record_key
    from prefopt.train.loop import SKIPPED_FILE

    records = load_records(text_data)
    (tmp_path / SKIPPED_FILE).write_text(json.dumps({"records": [{"where": records[5].where,
                                                                   "key": record_key(records[5])}]}))
    assert read_skipped_records(str(tmp_path), records) == {5}
    assert read_skipped_records(str(tmp_path), records[3:]) == {2}
    assert read_skipped_records(str(tmp_path), records[6:]) == set()
    (tmp_path / SKIPPED_FILE).write_text('{"records": [5]}')
    with pytest.raises(ValueError, match="skipped_records.json: unreadable"):
        read_skipped_records(str(tmp_path), records)


def test_out_of_memory_in_a_step_is_not_a_data_problem(tmp_path, text_data, monkeypatch):
    from prefopt.train.methods import PolicyObjective

    def forward(self, *args, **kw):
        raise torch.OutOfMemoryError("no memory left")

    monkeypatch.setattr(PolicyObjective, "forward", forward)
    with pytest.raises(torch.OutOfMemoryError):
        train(reliability_config(text_data, tmp_path))


def test_an_error_of_every_forward_still_ends_the_run_with_a_checkpoint(tmp_path, text_data, monkeypatch):
    trained = failing_forward(monkeypatch, lambda indices: len(trained) >= 6)  # from step 4 on (3 steps x 2)
    with pytest.raises(ValueError, match="the model cannot take this record"):
        train(reliability_config(text_data, tmp_path))
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("checkpoint-3")


def test_a_failure_after_the_optimizer_step_writes_no_mislabelled_checkpoint(tmp_path, text_data, monkeypatch):
    """Step 3's weights are updated before its metrics are written; a failure there must not save them as
    checkpoint-2 (a resume would train step 3 twice): the last intact checkpoint stands, here none."""
    from prefopt.train import loop

    written = []

    def write_metrics(self, metrics):
        written.append(metrics["step"])
        if metrics["step"] == 3:
            raise OSError("metrics.jsonl: injected failure")

    monkeypatch.setattr(loop.Run, "write_metrics", write_metrics)
    with pytest.raises(OSError, match="injected failure"):
        train(reliability_config(text_data, tmp_path))
    assert written == [1, 2, 3]
    assert ckpt.latest_checkpoint(str(tmp_path)) is None


# ------------------------------------------------------------------- a record failing in a step, two ranks

# Rank 1's record of step 3's second micro-batch (the plan of 24 records, batch 1, accumulation 2, 2 ranks,
# seed 0): rank 0's forward of that micro-batch succeeded and expects its backward (DDP's reducer is armed).
BAD_RANK1 = DataPlan(24, 1, 2, 2, 0).indices(2, 1, 1)[0]

# Runs prefopt train with the objective's forward patched (argv[1] record numbers, comma-separated; argv[2]
# how): "fails" raises in the forward of those records, or, for a number written cN, in the collation of
# record N once training has started; "known" marks them unusable from the start instead; "broken" raises
# for every forward on rank 1 once it has trained argv[1] micro-batches (an error that is not the data's);
# "nanloss" makes rank 1's loss of its micro-batch number argv[1] (from 0) NaN with finite gradients.
FAILING_RECORD_PROGRAM = """
import os, sys
import torch
from prefopt.train import loop
from prefopt.train.cli import main
from prefopt.train.data import PreferenceCollator, load_records
from prefopt.train.methods import PolicyObjective
names, how = sys.argv[1].split(","), sys.argv[2]
numbers = [int(n) for n in names if not n.startswith("c")]
collated = [int(n[1:]) for n in names if n.startswith("c")]
real_forward, real_init, real_features, trained = PolicyObjective.forward, loop.Run.__init__, PreferenceCollator._features, []
texts = [(r.prompt, r.chosen) for r in load_records(sys.argv[sys.argv.index("--data") + 1])]
def features(self, text, images, where):
    if how == "fails" and trained and any(all(t in text for t in texts[i]) for i in collated):
        raise OSError("image file is truncated")
    return real_features(self, text, images, where)
PreferenceCollator._features = features
def forward(self, batch, stage=None, num_items=None, indices=None):
    if stage is not None and how == "fails" and set(numbers) & set(indices):
        raise ValueError("the model cannot take this record")
    if stage is not None and how == "broken" and os.environ["RANK"] == "1" and len(trained) >= numbers[0]:
        raise ValueError("the model is broken")
    nan = how == "nanloss" and os.environ["RANK"] == "1" and len(trained) == numbers[0]
    if stage is not None and torch.is_grad_enabled():
        trained.append(indices)
    out = real_forward(self, batch, stage=stage, num_items=num_items, indices=indices)
    if stage is not None and torch.is_grad_enabled() and nan:  # NaN + the loss: its gradient is the loss's
        return out._replace(loss=out.loss + out.loss.detach() * float("nan"))
    return out
def known(self, *args, **kw):
    real_init(self, *args, **kw)
    self.unusable.update(numbers + collated)
PolicyObjective.forward = forward
if how == "known":
    loop.Run.__init__ = known
sys.exit(main(sys.argv[3:]))
"""


def launch_ranks(program_args, args, world=2, timeout=240, env=None):
    """``world`` ranks of FAILING_RECORD_PROGRAM; returns [(exit code, stderr)] by rank."""
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, "-c", FAILING_RECORD_PROGRAM, *program_args, *args], cwd=REPO,
                              env=dict(env or ENV, RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(world)]
    try:
        return [(p.wait(timeout=timeout), p.communicate()[1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def two_rank_dpo(data, out, *extra):
    return cli_args(data, out, "--method", "dpo", "--batch-size", "1", "--grad-accum", "2", "--probe-every", "0",
                    *extra)


# Rank 0's record of step 3's first micro-batch, failing to collate.
BAD_COLLATE = DataPlan(24, 1, 2, 2, 0).indices(2, 0, 0)[0]


def test_a_record_failing_inside_a_step_on_one_rank_is_skipped_by_every_rank(tmp_path, text_data):
    """DDP: rank 1's forward raises for a record; the ranks agree before any backward, rank 1 reports the
    record, both redo the step with its replacement. In the same step a record fails to collate on rank 0,
    which reports and replaces it. Both are listed for a resume, and the run is the one that never used
    either record."""
    bad = f"{BAD_RANK1},c{BAD_COLLATE}"
    (code0, err0), (code1, err1) = launch_ranks([bad, "fails"],
                                                two_rank_dpo(text_data, tmp_path / "failing", "--steps", "4"))
    assert code0 == code1 == 0, err0[-3000:] + err1[-3000:]
    data = os.path.join(text_data, "train.jsonl")
    line = (f"{data}:{BAD_RANK1 + 1}: fails inside a training step (ValueError: the model cannot take this record) "
            "(skipped)")
    assert [ln for ln in err1.splitlines() if ln.startswith(data)] == [line]
    assert [ln for ln in err0.splitlines() if ln.startswith(data)] == [
        f"{data}:{BAD_COLLATE + 1}: image file is truncated (skipped)"]
    assert "Traceback" not in err0 + err1
    listed = json.loads((tmp_path / "failing" / SKIPPED_FILE).read_text())["records"]
    assert [entry["where"] for entry in listed] == [f"{data}:{i + 1}" for i in sorted([BAD_RANK1, BAD_COLLATE])]

    known = launch_ranks([bad, "known"], two_rank_dpo(text_data, tmp_path / "known", "--steps", "4"))
    assert [code for code, _ in known] == [0, 0], known[0][1][-3000:]
    assert_same_run(tmp_path / "failing", tmp_path / "known")


def test_an_error_of_one_ranks_forward_stops_every_rank_with_a_checkpoint(tmp_path, text_data):
    """Not the data's: from step 3 every forward of rank 1 fails. Both ranks stop together, after writing a
    checkpoint of the 2 steps trained; rank 1 gives its error, rank 0 names the rank that failed."""
    out = tmp_path / "run"
    (code0, err0), (code1, err1) = launch_ranks(["4", "broken"], two_rank_dpo(text_data, out, "--steps", "6",
                                                                              "--save-every", "10"))
    assert (code0, code1) == (1, 1), err0[-3000:] + err1[-3000:]
    assert err1.strip().splitlines()[-1] == "prefopt train: error: rank 1: the model is broken"
    assert err0.strip().splitlines()[-2:] == [
        f"prefopt train: the run failed after step 2; the steps trained so far are in {out / 'checkpoint-2'} "
        "(continue with --resume)",
        "prefopt train: error: rank 0: rank 1 failed in a training step (its error is on its stderr)"]
    assert ckpt.latest_checkpoint(str(out)).endswith("checkpoint-2")


# Under DeepSpeed: rank 0's record of step 2's first micro-batch (that step is redone in place), and rank 1's
# of step 1's second micro-batch (the run stops before its first checkpoint).
BAD_RANK0 = DataPlan(24, 1, 2, 2, 0).indices(1, 0, 0)[0]
BAD_STEP1 = DataPlan(24, 1, 2, 2, 0).indices(0, 1, 1)[0]


def test_under_deepspeed_a_failing_record_is_skipped_in_place_or_by_running_again(tmp_path, text_data):
    """ZeRO-2: a record failing in a step's first micro-batch is skipped and the step redone in place; one
    failing after a micro-batch backpropagated (its gradients are in DeepSpeed's partitions) stops both
    ranks, here before the first checkpoint, and the record is listed in OUT/skipped_records.json: the
    same command again starts the run over without it, to the numbers of the run that never used either
    record."""
    pytest.importorskip("deepspeed")
    bad = f"{BAD_RANK0},{BAD_STEP1}"
    args = two_rank_dpo(text_data, tmp_path / "failing", "--steps", "4", "--deepspeed", "zero2")
    (code0, err0), (code1, err1) = launch_ranks([bad, "fails"], args)
    assert (code0, code1) == (1, 1), err0[-3000:] + err1[-3000:]
    assert f"train.jsonl:{BAD_STEP1 + 1}: fails inside a training step" in err1
    assert err0.strip().splitlines()[-1].startswith(
        "prefopt train: error: rank 0: a record failed inside step 1 after a micro-batch of it backpropagated")
    assert ckpt.latest_checkpoint(str(tmp_path / "failing")) is None
    listed = json.loads((tmp_path / "failing" / SKIPPED_FILE).read_text())["records"]
    assert [entry["where"] for entry in listed] == [f"{os.path.join(text_data, 'train.jsonl')}:{BAD_STEP1 + 1}"]
    (code0, err0), (code1, err1) = launch_ranks([bad, "fails"], args)
    assert (code0, code1) == (0, 0), err0[-3000:] + err1[-3000:]
    assert f"train.jsonl:{BAD_RANK0 + 1}: fails inside a training step" in err0
    assert "1 records that failed inside a step before are skipped" in err0

    known = launch_ranks([bad, "known"], two_rank_dpo(text_data, tmp_path / "known", "--steps", "4",
                                                      "--deepspeed", "zero2"))
    assert [code for code, _ in known] == [0, 0], known[0][1][-3000:]
    assert_same_run(tmp_path / "failing", tmp_path / "known")


# ------------------------------------------------------------------------------------------ finite or nothing


def checkpoint_weights(out, step):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, f"checkpoint-{step}", ckpt.WEIGHTS_FILE))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


def test_a_nonfinite_step_is_not_applied_and_three_in_a_row_stop_the_run(tmp_path, text_data, monkeypatch, capsys):
    """Step 2's loss is NaN (the fault hook): its update is not applied (checkpoints 1 and 2 hold the same
    weights), metrics.jsonl stays strict JSON, and training goes on. At lr 1e30 every step after the first is
    non-finite: the third in a row stops the run with exit code 3 and one line naming the option; it keeps the
    last checkpoint (finite: the skipped steps left the weights as they were) and exports it, or, with none, writes no model and says so."""
    out = tmp_path / "nan"
    monkeypatch.setenv(FAULT_ENV, "loss-2:nan")
    assert main(cli_args(text_data, out, "--method", "dpo", "--steps", "3", "--probe-every", "0", "--save-every", "1",
                         "--keep-checkpoints", "0", "--json")) == 0
    monkeypatch.delenv(FAULT_ENV)
    assert math.isfinite(json.loads(capsys.readouterr().out)["loss"])  # the mean of the steps applied
    logged = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [m.get("nonfinite", False) for m in logged] == [False, True, False] and logged[1]["loss"] is None
    assert_same_weights(checkpoint_weights(out, 1), checkpoint_weights(out, 2))
    two, three = checkpoint_weights(out, 2), checkpoint_weights(out, 3)
    assert any(not torch.equal(two[k], three[k]) for k in two)
    capsys.readouterr()

    for save_every, kept in (("1", "checkpoint-3"), ("0", None)):
        out = tmp_path / f"diverged-{save_every}"
        code = main(cli_args(text_data, out, "--method", "dpo", "--steps", "6", "--probe-every", "0", "--lr", "1e30",
                             "--warmup-ratio", "0", "--save-every", save_every))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 3 and len(err) == 1, err
        assert err[0].startswith("prefopt train: stopped: diverged at step 4: 3 steps in a row with a non-finite loss "
                                 "or gradient norm, none applied (--max-nonfinite-steps 3); "), err
        if kept:
            assert err[0].endswith(f"kept {out / kept}, exported to {out / 'model'}")
            assert json.loads((out / "model" / "prefopt.json").read_text())["step"] == 3
        else:
            assert err[0].endswith("no earlier checkpoint, so no model was written")
            assert not (out / "model").exists() and not ckpt.checkpoints(str(out))


def test_a_collapse_without_nan_stops_the_same_way(tmp_path, text_data, capsys):
    """--lr 1e3: the numbers stay finite but the probe positives fall from -6 to -1e7 nats per token at step 2,
    below -2 ln V: the run stops there with exit code 3, keeps checkpoint 1 and exports it."""
    out = tmp_path / "run"
    code = main(cli_args(text_data, out, "--method", "dpo", "--steps", "6", "--probe-every", "1", "--lr", "1e3",
                         "--save-every", "1"))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 3 and len(err) == 1, err
    assert re.match(r"prefopt train: stopped: diverged at step 2: the probe positives' log-prob is -\S+ nats/token, "
                    r"below the collapse bound -12\.3 ", err[0]), err
    assert err[0].endswith(f"kept {out / 'checkpoint-1'}, exported to {out / 'model'}")
    assert ckpt.checkpoints(str(out)) == ["checkpoint-1"]


def test_nonfinite_weights_are_never_written_nor_evaluated(tmp_path, capsys):
    from types import SimpleNamespace

    from prefopt.train.distributed import DistState
    from prefopt.train.eval import main as eval_main
    from prefopt.train.export import export_model
    from prefopt.train.models import build_model

    adapter, processor = build_model("tiny-llama", device="cpu", seed=0)
    with torch.no_grad():
        adapter.model.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ckpt.NonFiniteWeights, match="the weights hold 1 non-finite values"):
        ckpt.save_checkpoint(str(tmp_path), 1, engine=SimpleNamespace(module=adapter.model), trainer_state={},
                             state=DistState())
    assert os.listdir(tmp_path) == []
    with pytest.raises(ValueError, match="the model holds 1 non-finite weights"):
        export_model(adapter, processor, str(tmp_path / "model"))
    assert not (tmp_path / "model").exists()
    adapter.model.save_pretrained(tmp_path / "nan-model")
    processor.save_pretrained(tmp_path / "nan-model")
    assert eval_main(["--model", str(tmp_path / "nan-model"), "--size", "2"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"prefopt eval: error: --model {tmp_path / 'nan-model'}: the model holds 1 non-finite weights (a diverged run?)")


def zero_state(out, step):
    """Checkpoint ``step``'s ZeRO optimizer partitions of both ranks (tensors, and the JSON less ``overflow``:
    the last step's flag, which the next step sets afresh) and scheduler."""
    from safetensors.torch import load_file

    folder = out / f"checkpoint-{step}"
    files = [name for r in range(2) for name in ckpt.deepspeed_files(r)]
    tensors = {name: load_file(folder / name) for name in files if name.endswith(".safetensors")}
    texts = {name: [kv for kv in json.loads((folder / name).read_text())["__dict__"] if kv[0] != "overflow"]
             for name in files if name.endswith(".json")}
    return tensors, texts, ckpt.load_state_dict(str(folder / ckpt.SCHEDULER_FILE), None)["scheduler"]


@pytest.mark.parametrize("zero,nan", [("zero2", "loss-and-gradients"), ("zero2", "loss-only"), ("zero3", "loss-only")])
def test_under_deepspeed_a_nonfinite_loss_on_one_rank_is_applied_by_no_rank(tmp_path, text_data, zero, nan):
    """ZeRO-2 or 3, two processes: rank 1's loss of step 2 is NaN, its gradients NaN too (the fault hook) or
    finite (NaN added to the loss). Neither rank applies that step: checkpoints 1 and 2 hold the same weights,
    ZeRO optimizer partitions (master weights, moments, step counts) and scheduler state (today, with finite
    gradients, DeepSpeed applied it); both log it as non-finite, and training goes on."""
    pytest.importorskip("deepspeed")
    out = tmp_path / "run"
    args = two_rank_dpo(text_data, out, "--steps", "3", "--deepspeed", zero, "--save-every", "1",
                        "--keep-checkpoints", "0")
    if nan == "loss-only":
        results = launch_ranks(["2", "nanloss"], args)  # micro-batch 2: the first of step 2
    else:
        results = launch_ranks(["-1", "plain"], args, env=dict(ENV, **{FAULT_ENV: "loss-2:nan:1"}))
    assert [code for code, _ in results] == [0, 0], results[0][1][-3000:] + results[1][1][-3000:]
    logged = [json.loads(line) for line in (out / METRICS_FILE).read_text().splitlines()]
    assert [m.get("nonfinite", False) for m in logged] == [False, True, False] and logged[1]["loss"] is None
    assert_same_weights(checkpoint_weights(out, 1), checkpoint_weights(out, 2))
    (tensors1, texts1, scheduler1), (tensors2, texts2, scheduler2) = zero_state(out, 1), zero_state(out, 2)
    assert texts1 == texts2 and scheduler1 == scheduler2 and tensors1.keys() == tensors2.keys()
    for name in tensors1:
        assert_same_weights(tensors1[name], tensors2[name])
    two, three = checkpoint_weights(out, 2), checkpoint_weights(out, 3)
    assert any(not torch.equal(two[k], three[k]) for k in two)
