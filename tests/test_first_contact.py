"""The GPU first contact, ``python -m bench --preset gpu-first-contact --out DIR``, without a GPU.

The dry run is the documented command itself, run once (a module fixture, one subprocess) from a copy
of the checkout (its tracked and untracked-but-not-ignored files, as the GPU machine receives them) in
a temporary folder outside the repository, with this environment's installation of prefopt hidden:
``python -S`` skips the site module, so no ``.pth`` file maps ``prefopt`` to this worktree, and only
the site-packages folders are on ``PYTHONPATH`` (torch, triton). Every section runs at small shapes on
the CPU, the kernels under the Triton interpreter (conftest sets ``TRITON_INTERPRET=1``), or says that
only a GPU can give it; none may pretend to have measured a GPU.

The gate's self-test is also checked in-process: planted defects (a dropped last vocabulary tile, a
lost split) must fail the gate that passes the clean kernels.
"""
import json
import math
import os
import shutil
import site
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

from prefopt.bench import first_contact, gate  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _copy_checkout(dest):
    """The checkout's files as the GPU machine gets them: tracked, and untracked but not ignored."""
    try:
        listed = subprocess.run(["git", "-C", ROOT, "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.skip(f"not a git checkout: {exc}")
    for rel in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, rel)):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)) or dest, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, rel), os.path.join(dest, rel))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    copy = str(tmp_path_factory.mktemp("checkout-copy"))
    assert not copy.startswith(ROOT + os.sep)
    _copy_checkout(copy)
    out = os.path.join(copy, "out")
    packages = site.getsitepackages() + [site.getusersitepackages()]  # where torch and triton are, without .pth files
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(packages), "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-S", "-m", "bench", "--preset", "gpu-first-contact", "--device", "cpu",
                           "--out", out], cwd=copy, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(os.path.join(out, "first_contact.json")) as f:
        results = json.load(f)
    return copy, out, results, done.stderr


def test_dry_run_imports_prefopt_from_the_copy(dry_run):
    copy, _, results, _ = dry_run
    env = results["environment"]
    for key in ("prefopt_file", "kernels_file"):
        assert os.path.commonpath([copy, env[key]]) == copy, (key, env[key], copy)
    assert env["status"] == "ok" and env["torch"] and "addmm_out_dtype" in env and "do_bench_args" in env
    assert env["dry_run"] is True and env["triton_interpreter"] is True and env["date"] and env["commit"]


def test_dry_run_sections(dry_run):
    _, out, results, stderr = dry_run
    assert list(results) == first_contact.SECTIONS
    for name in ("ceilings", "end_to_end"):  # only a GPU can give these: said, never pretended
        assert results[name]["status"] == "skipped: no CUDA device", results[name]
    # the IO model's predictions for the end-to-end cells are there even without a GPU, with both floors
    predicted = results["end_to_end"]["predicted_ms"]["dpo-ref"]
    assert predicted["prefopt-triton"] > 0 and 0 < predicted["naive floor"] < predicted["recompute floor"]
    cells = results["end_to_end"]["rows"]
    assert len(cells) == 7 and all(r["status"] == "skipped" for r in cells)
    assert sum("first contact: end_to_end:" in line and "skipped" in line for line in stderr.splitlines()) == 7
    md = open(os.path.join(out, "first_contact.md")).read()
    assert "### correctness: ok" in md and "### gate_self_test: ok" in md


def test_dry_run_gate_and_correctness(dry_run):
    _, _, results, _ = dry_run
    test = results["gate_self_test"]
    assert test["status"] == "ok"
    assert [r["verdict"] for r in test["rows"]] == ["passes, as it must", "caught", "caught"], test["rows"]
    correct = results["correctness"]
    expected = [(v.name, list(gate.SHAPES["dry run"][s])) for v in gate.VARIANTS for s in v.shapes]
    assert [(r["variant"], r["shape"]) for r in correct["variants"]] == expected
    assert correct["status"] == "ok" and correct["addmm_out_dtype_rejected"] is None
    for row in correct["variants"]:
        tol = row["tolerance"]
        assert row["status"] == "ok" and row["top1_agreement"] >= gate.TOP1_AGREEMENT, row
        assert all(e <= tol["gradients" if k.startswith("d ") else "values"] for k, e in row["errors"].items()), row
        assert "d hidden" in row["errors"] and "logp" in row["errors"]
        geo = row["geometry"]  # several chunks (and splits, unless the frozen shortcut runs), ragged tails
        assert geo["chunks"] > 1 and geo["vocab_tiles"] > 1, row
        assert geo["forward_splits"] is None if geo["path"] == "frozen shortcut" else geo["forward_splits"] > 1, row
        if row["shape"] == list(gate.SHAPES["dry run"]["ragged"]):
            block_n, block_v, block_h = geo["tile"]
            assert geo["last_tile_columns"] < block_v and geo["last_hidden_slice"] < block_h, row
            assert geo["last_token_block_rows"] < block_n and geo["last_chunk_columns"] < row["shape"][2] / geo["chunks"]


def test_dry_run_timing_and_compile_sections(dry_run):
    _, _, results, _ = dry_run
    for name, key in (("kernels", "kernel"), ("op", "call")):
        rows = results[name]["rows"]
        assert results[name]["status"] == "ok" and len(rows) >= 5, results[name]
        for row in rows:
            assert row["status"] == "ok", row
            assert row["samples"] >= 20 and len(row["samples_ms"]) == row["samples"] and row["first_call_ms"] > 0
            assert row["min_ms"] == min(row["samples_ms"]) <= row["median_ms"]
    assert {r["kind"] for r in results["kernels"]["rows"]} >= {"forward", "forward_ref", "frozen_path", "logit_gradient",
                                                                "logit_gradient_kl", "cublas"}
    assert results["kernels"]["device_model"] == "not written: dry run"
    assert all(r["predicted_ms"] > 0 for r in results["op"]["rows"])
    aot = results["aot_compile"]
    assert aot["status"] == "ok" and [r["name"] for r in aot["variants"]] == first_contact.DRY_RUN_AOT, aot
    assert isinstance(aot["variants"][0]["registers"], int) and aot["variants"][0]["spill_stores"] >= 0
    assert results["profile"]["status"] == "ok" and "LinearLogprobsTriton" in results["profile"]["table"]


def test_gate_fails_planted_defects():
    # In-process, at the dry run's shape: the clean kernels pass; a forward that skips its last vocabulary
    # tile, and a merge that loses one of its splits, fail the values' tolerance by a wide margin.
    with gate.dry_run_geometry():
        result = gate.self_test(gate.SHAPES["dry run"]["ragged"], torch.device("cpu"))
    clean, tile, split = result["rows"]
    assert result["status"] == "ok" and clean["status"] == "ok" and clean["geometry"]["forward_splits"] > 1
    for row in (tile, split):
        assert row["status"] == "FAILED" and row["verdict"] == "caught"
        assert max(row["errors"][k] for k in ("logp", "lse")) > 10 * gate.TOLERANCES["bf16"]["values"], row


def test_gate_error_and_poison_on_cpu():
    ref = torch.tensor([3.0, 4.0])
    assert gate.relative_error(torch.tensor([3.0, 4.5]), ref) == pytest.approx(0.1)
    assert gate.relative_error(torch.tensor([3.0, float("nan")]), ref) == math.inf  # an unwritten output fails
    assert gate.relative_error(torch.tensor([0.5]), torch.tensor([0.0])) == 0.5
    assert "CPU" in gate.poison_free_memory(torch.device("cpu"))


def test_sections_past_the_deadline_are_skipped_with_one_line(tmp_path, capsys, monkeypatch):
    # With 4 s left after the environment, every other section would pass the deadline by its estimate:
    # each is skipped with one line, the background compile is stopped, and the watchdog never fires.
    exits = []
    monkeypatch.setattr(first_contact.os, "_exit", exits.append)
    assert first_contact.run(str(tmp_path), "cpu", deadline_s=4.0) == 0
    results = json.loads((tmp_path / "first_contact.json").read_text())
    assert results["environment"]["status"] == "ok" and not exits
    err = capsys.readouterr().err
    for name in first_contact.SECTIONS[1:]:
        assert results[name]["status"].startswith("skipped: deadline"), results[name]
        assert sum(line.startswith(f"first contact: {name}: skipped: deadline") for line in err.splitlines()) == 1


def test_absent_peers_are_skipped_with_one_line_each(monkeypatch):
    # The GPU machine has no Liger, Cut Cross-Entropy or TRL: their end-to-end cells are one line each.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in ("liger_kernel", "cut_cross_entropy", "trl") else real(name, *a))
    lines = []
    ctx = first_contact.Context(torch.device("cpu"), "", math.inf, lines.append)
    record = first_contact.end_to_end(ctx)
    assert {r["impl"] for r in record["rows"] if "not installed" in r["reason"]} == {"liger", "cce", "trl"}
    assert len([line for line in lines if "not installed" in line]) == 3


def test_watchdog_ends_the_run_at_the_deadline(tmp_path, capsys, monkeypatch):
    # A section still running at the hard deadline: the watchdog records it as stopped, writes what the
    # finished sections gave, and ends the process (exit status 124; os._exit is recorded here instead).
    import threading

    fired, snapshot = threading.Event(), {}

    def fake_exit(code):
        snapshot.update(code=code, results=json.loads((tmp_path / "first_contact.json").read_text()))
        fired.set()

    monkeypatch.setattr(first_contact.os, "_exit", fake_exit)
    monkeypatch.setattr(first_contact, "ESTIMATE_S", dict.fromkeys(first_contact.ESTIMATE_S, 0))
    monkeypatch.setattr(first_contact, "ceilings", lambda ctx: fired.wait(30) and {"status": "ok"})
    first_contact.run(str(tmp_path), "cpu", deadline_s=1.5)
    assert snapshot["code"] == 124
    assert snapshot["results"]["environment"]["status"] == "ok"
    assert snapshot["results"]["ceilings"]["status"] == "stopped: hard deadline of 1.5 s"
    assert "hard deadline of 1.5 s reached in ceilings" in capsys.readouterr().err


def test_device_model_from_measured_rates(tmp_path):
    # The efficiencies a GPU run writes, from rows as the kernels section records them: each kind's rate
    # over the measured cuBLAS peak; the frozen forward's kernel is its path less the moments products.
    from prefopt.bench.io_model import load_device_model

    ctx = first_contact.Context(torch.device("cuda"), str(tmp_path), math.inf, print)
    ctx.results["environment"] = {"device": "GPU X", "sms": 132, "date": "today", "commit": "abc"}
    ctx.measured.update(peak_flops=800e12, copy_bytes_per_s=4.0e12)
    rows = [{"status": "ok", "kind": kind, "tflops": tflops, "median_ms": ms} for kind, tflops, ms in (
        ("forward", 560.0, 30.0), ("forward_ref", 480.0, 70.0), ("logit_gradient", 520.0, 2.0),
        ("logit_gradient_kl", 400.0, 5.0), ("cublas", 760.0, 1.5), ("moments", 700.0, 20.0), ("frozen_path", 300.0, 100.0))]
    rows.append({"status": "skipped: deadline", "kernel": "policy forward, 64 x 128 tiles"})
    path = first_contact._write_device_model(ctx, rows)
    device = load_device_model(path)
    assert device.name == "GPU X" and device.hbm_bytes_per_s == 4.0e12 and device.peak(torch.bfloat16) == 800e12
    assert device.efficiency["forward"] == pytest.approx(0.70) and device.efficiency["cublas"] == pytest.approx(0.95)
    # moments: 700 TFLOP/s for 20 ms = 14 TFLOP; the kernel alone: 14 TFLOP in 80 ms = 175 TFLOP/s
    assert device.efficiency["frozen_forward"] == pytest.approx(175 / 800)
    assert device.efficiency["memory"] == 1.0 and "commit abc" in device.source
    ctx.measured["peak_flops"] = 100e12  # rates above 1.5x the peak: a broken measurement, not written
    assert first_contact._write_device_model(ctx, rows).startswith("not written: device model: efficiency")


def test_refuses_the_interpreter_on_a_gpu_and_skips_kernels_without_it(tmp_path, capsys, monkeypatch):
    # TRITON_INTERPRET=1 (set by conftest) on a GPU run would time the interpreter: one line, exit 2, nothing
    # written. On CPU without the interpreter the kernel sections say how to get the dry run.
    from prefopt.kernels import linear_logprobs as K

    assert first_contact.run(str(tmp_path / "gpu"), "cuda") == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err and not (tmp_path / "gpu").exists()
    monkeypatch.setattr(K, "INTERPRET", False)
    ctx = first_contact.Context(torch.device("cpu"), str(tmp_path), math.inf, print)
    for section in (first_contact.gate_self_test, first_contact.correctness, first_contact.kernels, first_contact.op):
        assert section(ctx)["status"] == "skipped: no CUDA device (set TRITON_INTERPRET=1 for the dry run under the interpreter)"


def test_rows_stop_at_the_section_share(tmp_path):
    # A section's rows stop at twice its estimate even when the run's deadline is far: one line per row.
    lines = []
    ctx = first_contact.Context(torch.device("cpu"), str(tmp_path), math.inf, lines.append)
    assert ctx.row_fits("kernels: policy forward")
    ctx.section_end = 0.0
    assert not ctx.row_fits("kernels: policy forward")
    assert len(lines) == 1 and lines[0].startswith("first contact: kernels: policy forward: skipped, ")
    assert lines[0].endswith("s left of the section's share of the deadline")


def test_gpu_shapes_span_splits_and_chunks():
    # The shapes the GPU run checks, cut as on a 132-SM GPU with its own tiles: every variant spans several
    # chunks (and splits, unless the frozen shortcut runs), and the ragged shape ends every axis ragged.
    for variant in gate.VARIANTS:
        for name in variant.shapes:
            n, hidden, vocab = gate.SHAPES["cuda"][name]
            geo = gate.geometry(n, hidden, vocab, variant.dtype, torch.device("cuda"), ref=variant.ref,
                                shortcut=bool(variant.frozen and variant.shortcut), gpu_sms=132)
            assert geo["chunks"] > 1 and geo["vocab_tiles"] > 1, (variant.name, geo)
            assert geo["forward_splits"] is None if variant.frozen and variant.shortcut else geo["forward_splits"] > 1
            block_n, block_v, block_h = geo["tile"]
            ragged = (geo["last_tile_columns"] < block_v, geo["last_token_block_rows"] < block_n,
                      geo["last_hidden_slice"] < block_h, geo["last_chunk_columns"] < vocab / geo["chunks"])
            assert all(ragged) if name == "ragged" else not any(ragged[:3]), (variant.name, name, geo)
