"""The H100 IO and FLOP model of bench/io_model.py: its product counts against torch.profiler's FLOP
counts of the torch backend (run on CPU), its traffic bounded from shapes, and the issue's targets.

No timing is asserted: the model's predictions are arithmetic on shapes and the launchers' own tile,
split and chunk functions, so a design regression (for example the frozen head's old per-tile
read-modify-write of M, about 640 GB per call at N=16384) fails here without a GPU.
"""
import math
import re

import pytest
import torch

import prefopt.ops.torch_backend as torch_backend
from prefopt import linear_logprobs
from prefopt.bench import cli, io_model
from prefopt.bench.workloads import WORKLOADS, Shape
from prefopt.ops.launch_model import H100, H100_AT_CUBLAS_RATE

pytest.importorskip("triton")
from prefopt.kernels import linear_logprobs as K  # noqa: E402

ISSUE_SHAPES = [Shape(8, 2048, 4096, 128256), Shape(8, 2048, 4096, 152064)]  # N=16384, H=4096


def _profiled_flops(fn) -> float:
    """torch.profiler's FLOP count of the matrix products (elementwise ops left out); its formula table has no entry for the in-place
    ``addmm_`` (it reports 0), so those are counted from the shapes the profiler recorded."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof:
        fn()
    total = 0.0
    for event in prof.events():
        if event.name == "aten::addmm_":
            (m, k), (_, cols) = event.input_shapes[1], event.input_shapes[2]
            total += 2.0 * m * k * cols
        elif event.name in ("aten::mm", "aten::addmm", "aten::bmm"):
            total += event.flops
    return total


@pytest.mark.parametrize("workload", ["dpo-precomputed", "dpo-ref", "dpo-frozen", "nsft-kl"])
def test_product_counts_match_the_profiler(monkeypatch, workload):
    # The torch backend on CPU with 4 token x 4 vocabulary tiles, forward + backward of the statistics the
    # workload asks for: the FLOPs torch.profiler counts in its matrix products equal the model's.
    monkeypatch.setitem(torch_backend.CHUNK_SIZES, "cpu", (16, 64))
    wl = WORKLOADS[workload]
    shape = Shape(2, 32, 24, 256)
    n, h, v = shape.scored, shape.hidden, shape.vocab
    hidden = torch.randn(n, h, requires_grad=True)
    weight = (torch.randn(v, h) / h**0.5).requires_grad_(not wl.frozen)
    targets = torch.randint(0, v, (n,))
    ref = dict(ref_hidden=torch.randn(n, h)) if wl.ref_head else {}
    if wl.ref_head and not wl.frozen:
        ref["ref_weight"] = torch.randn(v, h) / h**0.5

    def call():
        out = linear_logprobs(hidden, weight, targets, kl=wl.kl, backend="torch", **ref)
        (out.logp.sum() + (out.kl.sum() if wl.kl else 0)).backward()

    measured = _profiled_flops(call)
    model = io_model.torch_model(wl, shape, torch.float32)
    assert measured == pytest.approx(model.flops, rel=1e-9), (measured / (2 * n * h * v), model.products())
    assert model.products() == {"dpo-precomputed": 4, "dpo-ref": 5, "dpo-frozen": 3, "nsft-kl": 6}[workload]


@pytest.mark.parametrize("shape", ISSUE_SHAPES, ids=lambda s: f"V{s.vocab}")
def test_issue_targets_at_the_issue_shapes(shape):
    # Done-when of issue 11, on the design's products and traffic alone (every kernel at cuBLAS's rate):
    # <= 1.15x the floor for a trainable head, <= 1.3x for a frozen one (bf16)
    for name, limit in (("dpo-precomputed", 1.15), ("dpo-ref", 1.15), ("grpo", 1.15), ("dpo-frozen", 1.3)):
        wl = WORKLOADS[name]
        model = io_model.triton_model(wl, shape, torch.bfloat16, device=H100_AT_CUBLAS_RATE)
        ratio = model.time() / io_model.floor_time(wl, shape, torch.bfloat16)
        assert ratio <= limit, f"{name}: {ratio:.3f}x the floor\n{io_model.launches_table(model)}"


@pytest.mark.parametrize("shape", ISSUE_SHAPES, ids=lambda s: f"V{s.vocab}")
def test_default_efficiencies_give_the_independent_reading(shape):
    # Issue 14's review read the design at 1.1-1.45x its floor for a trainable head and 1.4-2.2x for a
    # frozen one; the default per-kernel efficiencies (not measured) must reproduce that, and both floors
    # are reported: the naive path's products (3 trainable, 2 frozen, +1 per reference head) and the
    # recomputing design's (one more).
    for name, low, high in (("dpo-precomputed", 1.1, 1.45), ("dpo-ref", 1.1, 1.45), ("grpo", 1.1, 1.45),
                            ("dpo-frozen", 1.4, 2.2)):
        wl = WORKLOADS[name]
        model = io_model.triton_model(wl, shape, torch.bfloat16)
        ratio = model.time() / io_model.floor_time(wl, shape, torch.bfloat16)
        assert low <= ratio <= high, f"{name}: {ratio:.3f}x the floor\n{io_model.launches_table(model)}"
        both = io_model.floors(wl, shape, torch.bfloat16)
        assert both["naive"]["products"] == (2 if wl.frozen else 3) + wl.ref_head
        assert both["recompute"]["products"] == both["naive"]["products"] + 1
        assert both["naive"]["seconds"] < both["recompute"]["seconds"]


def test_measured_device_model_replaces_the_defaults(tmp_path):
    # The device_model.json a first contact writes: measured kinds replace the defaults, the rest stay;
    # malformed entries are refused with their name.
    path = tmp_path / "device_model.json"
    path.write_text('{"name": "H200", "peak_flops": {"bfloat16": 8.0e14}, "hbm_bytes_per_s": 4.8e12,'
                    ' "efficiency": {"forward": 0.35}, "source": "measured"}')
    device = io_model.load_device_model(str(path))
    assert device.efficiency["forward"] == 0.35 and device.efficiency["cublas"] == H100.efficiency["cublas"]
    shape, wl = ISSUE_SHAPES[0], WORKLOADS["dpo-precomputed"]
    slow = io_model.triton_model(wl, shape, torch.bfloat16, device=device)
    assert slow.time() > io_model.triton_model(wl, shape, torch.bfloat16).time() * 1.05
    for bad, what in (('{"efficiency": {"forwards": 0.5}}', "unknown kind 'forwards'"),
                      ('{"efficiency": {"forward": 0}}', "efficiency['forward']"), ('{"sms": -1}', "sms"),
                      ('{"colour": 1}', "unknown entries"), ("[1", "not JSON")):
        path.write_text(bad)
        with pytest.raises(ValueError, match=re.escape(what)):
            io_model.load_device_model(str(path))


@pytest.mark.parametrize("shape", ISSUE_SHAPES + [Shape(8, 256, 4096, 152064), Shape(4, 512, 1024, 32000)],
                         ids=lambda s: f"N{s.scored}-H{s.hidden}-V{s.vocab}")
def test_traffic_is_bounded_by_the_shapes(shape):
    # The design's byte budget per call, from the shapes and the launchers' tiles, for bf16:
    # frozen head: the probability tiles are written, rescaled and read once (4 passes over N x V), the
    # fp32 moments cost 2 passes per chunk (chunks <= V / 2H + 1), each head is read once per group of
    # group_n token blocks (and once by the moments product), hidden once per chunk: nothing proportional
    # to N x H x V / BLOCK_V.
    # trainable head: the same for ds, and d hidden's fp32 accumulator 2 passes per chunk.
    e = 2
    n, h, v = shape.scored, shape.hidden, shape.vocab
    fb = K.forward_blocks(n, v, h, torch.bfloat16, ref=True, write_e=True, interpret=False)
    chunks = math.ceil(v / K.chunk_width(n, v, h, e, fb.block_v))
    assert chunks <= v // (2 * h) + 1 or chunks == 1
    heads = 2
    groups = math.ceil(n / (fb.block_n * fb.group_n))
    frozen = io_model.triton_model(WORKLOADS["dpo-frozen"], shape, torch.bfloat16)
    bound = 4 * n * v * e + 2 * 8 * n * h * chunks + (heads * groups + 1) * v * h * e + (heads + 1) * n * h * e * chunks + 16 * n * h
    assert frozen.bytes <= bound
    # the old in-kernel moments: an fp32 [BLOCK_N, H] read-modify-write per vocabulary tile
    assert frozen.bytes < 8 * n * h * (v / fb.block_v) / 2
    trainable = io_model.triton_model(WORKLOADS["dpo-precomputed"], shape, torch.bfloat16)
    fb = K.forward_blocks(n, v, h, torch.bfloat16, interpret=False)
    bb = K.backward_blocks(n, v, h, torch.bfloat16, interpret=False)
    tchunks = math.ceil(v / K.chunk_width(n, v, h, e, bb.block_v))
    split_waves = math.ceil(K.split_for(n, v, fb, io_model.SMS) * math.ceil(n / fb.block_n) / io_model.SMS)
    bound = (n * h * e + split_waves * v * h * e  # forward
             + tchunks * (n * h * e + 2 * n * h * e + 8 * n * h) + v * h * e * (math.ceil(n / (bb.block_n * bb.group_n)) + 2)
             + 3 * n * v * e + 12 * n * h)
    assert trainable.bytes <= bound


def test_cli_prints_the_model_without_a_gpu(capsys):
    assert cli.main(["--preset", "gpu", "--io-model"]) == 0
    out = capsys.readouterr()
    assert "IO and FLOP model" in out.out and "| prefopt-triton | 5.0" in out.out
    assert "recompute" in out.out  # the plain-words reason for the fused path's extra product
    assert "nothing measured" in out.err


@pytest.mark.parametrize("hidden,expect", [(256, False), (1024, False), (4096, True)])
def test_frozen_auto_choice_agrees_with_the_model(hidden, expect):
    # On CUDA, frozen_head_shortcut="auto" takes the shortcut where the library's launch model predicts it
    # is faster than recomputing: not at H=256 (its extra traffic outweighs the saved product), yes at
    # H=4096. At H=1024 the per-kernel efficiencies decide: with every kernel at cuBLAS's rate it would
    # pay, with the default efficiencies (the probability-writing forward at half the rate) it does not.
    from prefopt.ops.launch_model import frozen_shortcut_pays
    from prefopt.ops.triton_backend import LinearLogprobsTriton

    assert LinearLogprobsTriton.frozen_head_shortcut == "auto"
    shape = Shape(8, 1024, hidden, 128256)
    wl = WORKLOADS["dpo-precomputed"]
    frozen = type(wl)(**{**wl.__dict__, "frozen": True})
    on = io_model.triton_model(frozen, shape, torch.bfloat16, shortcut=True).time()
    off = io_model.triton_model(frozen, shape, torch.bfloat16, shortcut=False).time()
    assert (on < off) == expect == frozen_shortcut_pays(shape.scored, shape.vocab, hidden, torch.bfloat16)
    at_rate = frozen_shortcut_pays(shape.scored, shape.vocab, hidden, torch.bfloat16, H100_AT_CUBLAS_RATE)
    assert at_rate == (hidden >= 1024)


def test_both_floors_are_reported_for_every_workload():
    # Issue 19: the naive path's floor (3 products for a trainable head, 2 frozen, +1 per reference head) and the
    # recomputing design's (one more), for every workload, in the model table too.
    from prefopt.bench.runner import Point

    shape = ISSUE_SHAPES[0]
    expected_naive = {"dpo-ref": 4, "dpo-precomputed": 3, "dpo-frozen": 3, "nsft-kl": 4, "grpo": 3}
    assert set(expected_naive) == set(WORKLOADS)
    table = io_model.model_table([Point(name, shape) for name in WORKLOADS], torch.bfloat16)
    for name, naive in expected_naive.items():
        both = io_model.floors(WORKLOADS[name], shape, torch.bfloat16)
        assert (both["naive"]["products"], both["recompute"]["products"]) == (naive, naive + 1), name
        line = (f"floors: naive path {naive} products, {both['naive']['seconds'] * 1e3:.1f} ms; recomputing design "
                f"{naive + 1} products, {both['recompute']['seconds'] * 1e3:.1f} ms")
        assert f"### {name}: {shape.label()}\n\n{line}" in table, name
