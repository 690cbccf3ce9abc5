"""Kernel-level tests of the Triton backend, run on CPU under the Triton interpreter (set in conftest).

What the shared oracle tests in test_op.py do not reach: vocabulary splits and their merge, tiles
smaller than every dimension (ragged last tiles along tokens, vocabulary and hidden size), a reference
head with another hidden size, the chunked backward, the logit-gradient kernel's formula and store
mask, the frozen-head moments, and that fp64 inputs really run in fp64.
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton")

import prefopt.ops.triton_backend as triton_backend  # noqa: E402
from prefopt.bench.oracle import oracle_linear_logprobs  # noqa: E402
from prefopt import linear_logprobs  # noqa: E402
from prefopt.kernels import linear_logprobs as K  # noqa: E402

SMALL = K.Blocks(block_n=16, block_v=16, block_h=16, num_warps=1, num_stages=1, group_n=2)
STATS = ("logp", "lse", "entropy", "ref_logp", "kl", "uniform_nll")


def dense_logits(h, w, b, temperature, softcap):
    """z and f = d softcap / d s (1 without softcap), in float64."""
    s = h.double() @ w.double().T
    if b is not None:
        s = s + b.double()
    f = torch.ones_like(s)
    if softcap is not None:
        t = torch.tanh(s / softcap)
        s, f = softcap * t, 1 - t * t
    return s / temperature, f


def close(actual, expected, tol, what, seed):
    err = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() + 1.0
    assert err <= tol * scale, f"{what}: max error {err:.3g} (scale {scale:.3g}, seed {seed})"


def make(n, vocab, hidden, dtype=torch.float32, ref_hidden_size=None, scale=1.0, bias=True):
    h = (torch.randn(n, hidden) * scale).to(dtype)
    w = (torch.randn(vocab, hidden) / hidden**0.5).to(dtype)
    b = (torch.randn(vocab) * 0.1).to(dtype) if bias else None
    y = torch.randint(0, vocab, (n,))
    ref = None
    if ref_hidden_size:
        ref = ((torch.randn(n, ref_hidden_size) * scale).to(dtype),
               (torch.randn(vocab, ref_hidden_size) / ref_hidden_size**0.5).to(dtype),
               (torch.randn(vocab) * 0.1).to(dtype) if bias else None)
    return h, w, b, y, ref


@pytest.mark.parametrize("split", [1, 3, 4, 50])
@pytest.mark.parametrize("scale", [1.0, 300.0], ids=["normal", "huge-logits"])
def test_forward_splits_and_ragged_tiles(seed, split, scale):
    # 16-wide tiles against n=37, V=131, H=40, H'=24: every dimension has a ragged last tile; the splits
    # own 3 tiles each (split=4 becomes 3 splits, 50 becomes one per tile) and are merged by log-sum-exp.
    n, vocab = 37, 131
    h, w, b, y, (rh, rw, rb) = make(n, vocab, 40, ref_hidden_size=24, scale=scale)
    temperature, softcap = 0.8, 30.0
    stats = K.forward(h, w, b, y, temperature=temperature, softcap=softcap, ref_hidden=rh, ref_weight=rw,
                      ref_bias=rb, mean_logit=True, logit_sum=True, mean_ref_logit=True, split=split, blocks=SMALL)
    z, _ = dense_logits(h, w, b, temperature, softcap)
    zr, _ = dense_logits(rh, rw, rb, temperature, softcap)
    p = torch.softmax(z, -1)
    tol = 2e-6 * scale
    close(stats.lse, torch.logsumexp(z, -1), tol, "lse", seed)
    close(stats.target_logit, z.gather(1, y[:, None]).squeeze(1), tol, "target logit", seed)
    close(stats.mean_logit, (p * z).sum(-1), tol, "E_p[z]", seed)
    close(stats.logit_sum / vocab, z.mean(-1), tol, "sum z / V", seed)
    close(stats.ref_lse, torch.logsumexp(zr, -1), tol, "ref lse", seed)
    close(stats.ref_target_logit, zr.gather(1, y[:, None]).squeeze(1), tol, "ref target logit", seed)
    close(stats.mean_ref_logit, (p * zr).sum(-1), tol, "E_p[zr]", seed)
    assert stats.lse.dtype == torch.float32 and stats.moments is None


def without_target(p, y):
    return p.scatter(1, y[:, None], 0.0)


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_frozen_head_moments(seed, monkeypatch, softcap):
    # M' = sum_{v != y} p_v f_v W_v over 3 chunks of 48 columns (9 tiles of 16, the last ragged), each
    # tile rescaled to its token's running max, the chunk products accumulated with M rescaled between
    monkeypatch.setattr(K, "CHUNK_BYTES", 21 * 48 * 4)
    monkeypatch.setattr(K, "WIDTH_PER_HIDDEN", 1)
    assert K.chunk_width(21, 131, 40, 4, 16) == 48
    h, w, b, y, _ = make(21, 131, 40, scale=2.0)
    y[:3] = torch.tensor([0, 60, 130])  # targets in the first, a middle and the last tile
    stats = K.forward(h, w, b, y, temperature=1.3, softcap=softcap, moments=True, argmax=True, logit_sum=True,
                      blocks=SMALL)
    z, f = dense_logits(h, w, b, 1.3, softcap)
    expected = without_target(torch.softmax(z, -1) * f, y) @ w.double()
    assert stats.moments.shape == (21, 40) and stats.moments.dtype == torch.float32
    close(stats.moments, expected, 2e-6, "moments", seed)
    close(stats.lse, torch.logsumexp(z, -1), 2e-6, "lse", seed)
    close(stats.target_logit, z.gather(1, y[:, None]).squeeze(1), 2e-6, "target logit", seed)
    close(stats.logit_sum, z.sum(-1), 2e-6, "sum z", seed)
    assert torch.equal(stats.argmax, z.argmax(-1)), f"seed {seed}"


def test_peaked_frozen_head_keeps_the_target_out_of_low_precision(seed):
    # Tokens with p_y > 0.999, bf16 inputs: d hidden = a (W_y - M) is a difference of nearly
    # equal vectors; the shortcut forms (1 - p_y) in fp32, so each row keeps bf16-input accuracy relative
    # to its own (small) size, where a bf16 p_y inside M would leave an error of ~2^-9 |W_y| (measured
    # while writing this test: 4-10% against 0.3-0.5% here).
    n, vocab, hidden = 64, 131, 32
    w = (torch.randn(vocab, hidden) / hidden**0.5).bfloat16()
    y = torch.randint(0, vocab, (n,))
    h = (w[y].float() * 20.0).bfloat16().requires_grad_()
    linear_logprobs(h, w, y, backend="triton").logp.sum().backward()
    h64 = h.detach().double().requires_grad_()
    want = oracle_linear_logprobs(h64, w.double(), y)
    want.logp.sum().backward()
    p_y = want.logp.exp()
    peaked = p_y > 0.999
    assert peaked.sum() >= 8, f"only {int(peaked.sum())} peaked tokens (seed {seed})"
    err = (h.grad.double() - h64.grad).norm(dim=1) / h64.grad.norm(dim=1)
    assert err[peaked].max() < 1e-2, f"relative errors {err[peaked].tolist()} (seed {seed})"


def test_fp64_runs_in_fp64(seed):
    # fp64 inputs: fp64 tl.dot and fp64 accumulators, so agreement is far below fp32 resolution
    h, w, b, y, (rh, rw, rb) = make(19, 45, 20, dtype=torch.float64, ref_hidden_size=12)
    stats = K.forward(h, w, b, y, softcap=5.0, ref_hidden=rh, ref_weight=rw, ref_bias=rb, mean_logit=True,
                      mean_ref_logit=True, split=2, blocks=SMALL)
    m = K.forward(h, w, b, y, softcap=5.0, moments=True, blocks=SMALL).moments
    z, f = dense_logits(h, w, b, 1.0, 5.0)
    zr, _ = dense_logits(rh, rw, rb, 1.0, 5.0)
    p = torch.softmax(z, -1)
    assert stats.lse.dtype == torch.float64 and m.dtype == torch.float64
    close(stats.lse, torch.logsumexp(z, -1), 1e-12, "lse", seed)
    close(stats.mean_ref_logit, (p * zr).sum(-1), 1e-12, "E_p[zr]", seed)
    close(m, without_target(p * f, y) @ w, 1e-12, "moments", seed)


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_grad_logits_formula_and_store_mask(seed, softcap):
    # ds = (a*onehot + p*(c0 + c1 z + c2 zr) + c3) * f / temperature for columns [v0, v0 + width), written
    # into a wider buffer: the columns beyond width must stay untouched.
    n, vocab, v0, width, temperature = 23, 77, 21, 37, 0.9
    h, w, b, y, (rh, rw, rb) = make(n, vocab, 40, ref_hidden_size=24)
    y[:5] = torch.arange(v0, v0 + 5)  # some targets inside the chunk for sure
    z, f = dense_logits(h, w, b, temperature, softcap)
    zr, _ = dense_logits(rh, rw, rb, temperature, softcap)
    lse = torch.logsumexp(z, -1)
    a, c0, c1, c2, c3 = (torch.randn(n, dtype=torch.float64) for _ in range(5))
    buffer = torch.full((n, width + 5), 7.0)
    K.grad_logits(buffer[:, :width], v0, h, w, b, y, lse.float(), a.float(), c0.float(), c1.float(), c2.float(),
                  c3.float(), temperature=temperature, softcap=softcap, ref_hidden=rh, ref_weight=rw, ref_bias=rb,
                  blocks=SMALL)
    dz = torch.exp(z - lse[:, None]) * (c0[:, None] + c1[:, None] * z + c2[:, None] * zr) + c3[:, None]
    dz = dz + a[:, None] * torch.nn.functional.one_hot(y, vocab)
    expected = (dz * f / temperature)[:, v0:v0 + width]
    close(buffer[:, :width], expected, 1e-5, "ds", seed)
    assert torch.equal(buffer[:, width:], torch.full((n, 5), 7.0)), "wrote past the chunk"
    # only c0 live (log-probs only): no reference head needed
    K.grad_logits(buffer[:, :width], v0, h, w, b, y, lse.float(), a.float(), c0.float(), temperature=temperature,
                  softcap=softcap, blocks=SMALL)
    dz = torch.exp(z - lse[:, None]) * c0[:, None] + a[:, None] * torch.nn.functional.one_hot(y, vocab)
    close(buffer[:, :width], (dz * f / temperature)[:, v0:v0 + width], 1e-5, "ds (logp only)", seed)


def _op_vs_oracle(seed, dtype, tol, frozen=False):
    torch.manual_seed(seed)
    rows, length, hidden, vocab = 3, 9, 40, 131  # 24 tokens are scored
    h = torch.randn(rows, length, hidden, dtype=dtype, requires_grad=True)
    w = (torch.randn(vocab, hidden, dtype=dtype) / hidden**0.5).requires_grad_(not frozen)
    b = (torch.randn(vocab, dtype=dtype) * 0.1).requires_grad_(not frozen)
    rh, rw = torch.randn(rows, length, 24, dtype=dtype), torch.randn(vocab, 24, dtype=dtype) / 24**0.5
    y = torch.randint(0, vocab, (rows, length))
    y[0, :3] = -100
    common = dict(bias=b, ref_hidden=rh, ref_weight=rw, temperature=0.9, softcap=20.0)
    flags = dict(entropy=True, kl=True, uniform_nll=True) if not frozen else {}
    up = {k: torch.randn(rows, length, dtype=torch.float64) for k in STATS}
    leaves = [t for t in (h, w, b) if t.requires_grad]
    out = linear_logprobs(h, w, y, backend="triton", **flags, **common)
    total = sum((getattr(out, k).double() * up[k]).sum() for k in STATS if k != "ref_logp" and getattr(out, k) is not None)
    grads = torch.autograd.grad(total, leaves)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    h64 = leaves64[0]
    w64, b64 = (leaves64[1], leaves64[2]) if not frozen else (w.detach().double(), b.detach().double())
    exp = oracle_linear_logprobs(h64, w64, y, **{**common, "bias": b64, "ref_hidden": rh.double(),
                                                  "ref_weight": rw.double()})
    total = sum((getattr(exp, k) * up[k]).sum() for k in STATS
                if k != "ref_logp" and getattr(out, k) is not None)
    exp_grads = torch.autograd.grad(total, leaves64)
    for k in STATS:
        if getattr(out, k) is not None:
            close(getattr(out, k), getattr(exp, k), tol, k, seed)
    for got, want, name in zip(grads, exp_grads, ("hidden", "weight", "bias")):
        assert got.dtype == dtype
        close(got, want, tol, f"d {name}", seed)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.float64, 1e-11)], ids=["fp32", "fp64"])
def test_op_with_splits_and_backward_chunks(seed, monkeypatch, dtype, tol):
    # The autograd Function end to end with 3 vocabulary splits in forward and 32-column backward chunks
    # (5 chunks, the last one ragged), with every statistic and a trainable head.
    monkeypatch.setattr(K, "default_split", lambda *a, **k: 3)
    monkeypatch.setattr(K, "backward_blocks", lambda *a, **k: SMALL)
    item = torch.empty((), dtype=dtype).element_size()
    monkeypatch.setattr(K, "CHUNK_BYTES", 24 * 32 * item)
    monkeypatch.setattr(K, "WIDTH_PER_HIDDEN", 0)
    assert K.chunk_width(24, 131, 40, item, 16) == 32
    chunks = []
    original = K.grad_logits
    monkeypatch.setattr(K, "grad_logits", lambda out, v0, *a, **k: chunks.append((v0, out.shape[1])) or original(out, v0, *a, **k))
    _op_vs_oracle(seed, dtype, tol)
    assert chunks == [(0, 32), (32, 32), (64, 32), (96, 32), (128, 3)]


@pytest.mark.parametrize("softcap", [None, 3.0])
def test_frozen_shortcut_matches_recompute(seed, monkeypatch, softcap):
    # For a frozen head the moments shortcut and the recompute path give the same d hidden; the shortcut
    # never launches the logit-gradient kernel.
    h, w, b, y, _ = make(29, 131, 40, scale=2.0)
    grads = {}
    for shortcut in (True, False):
        monkeypatch.setattr(triton_backend.LinearLogprobsTriton, "frozen_head_shortcut", shortcut)
        calls = []
        original = K.grad_logits
        monkeypatch.setattr(K, "grad_logits", lambda *a, **k: calls.append(1) or original(*a, **k))
        x = h.clone().requires_grad_()
        out = linear_logprobs(x, w, y, bias=b, temperature=0.7, softcap=softcap, backend="triton")
        (out.logp * torch.linspace(-1, 2, 29)).sum().add(out.lse.sum() * 0.3).backward()
        grads[shortcut] = x.grad
        assert bool(calls) != shortcut
        monkeypatch.setattr(K, "grad_logits", original)
    close(grads[True], grads[False], 2e-6, "d hidden", seed)


def test_bf16_frozen_head(seed):
    # bf16 under the interpreter (operands cast to fp32 for tl.dot), through the moments shortcut
    _op_vs_oracle(seed, torch.bfloat16, 3e-2, frozen=True)


def test_cpu_tensors_need_the_interpreter(monkeypatch):
    monkeypatch.setattr(K, "INTERPRET", False)
    h, w, b, y, _ = make(4, 10, 16)
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        K.forward(h, w, b, y)


def test_block_choices_are_valid():
    # tl.dot needs every tile dimension >= 16; GPU tiles must be powers of two
    for interpret in (True, False):
        K_interp = K.INTERPRET
        try:
            K.INTERPRET = interpret
            for dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
                for n, vocab, hidden in ((1, 1, 1), (37, 131, 40), (16384, 152064, 4096)):
                    for blocks in (K.forward_blocks(n, vocab, hidden, dtype), K.backward_blocks(n, vocab, hidden, dtype),
                                   K.forward_blocks(n, vocab, hidden, dtype, ref=True, extras=True),
                                   K.forward_blocks(n, vocab, hidden, dtype, write_e=True)):
                        for size in (blocks.block_n, blocks.block_v, blocks.block_h):
                            assert size >= 16 and size & (size - 1) == 0
        finally:
            K.INTERPRET = K_interp
    # chunks at least 2H wide (the fp32 accumulator's traffic per chunk), the buffer at most twice hidden
    width = K.chunk_width(16384, 152064, 4096, 2, 128)
    assert width % 128 == 0 and width >= 2 * 4096 and 16384 * width * 2 <= max(K.CHUNK_BYTES, 2 * 16384 * 4096 * 2)


@pytest.mark.skipif(importlib.util.find_spec("triton.backends.nvidia") is None, reason="triton without its NVIDIA backend")
def test_kernels_compile_for_h100():
    # The real compiler, down to a cubin for sm_90, in a process without the interpreter, for every
    # variant the launchers pick: bf16 tiles on wgmma tensor cores (fp32 too, as TF32), fp64 on DMMA,
    # loads pipelined with cp.async, no register spills (ptxas -v), shared memory within 227 KiB; the
    # fused-gradient path's element-wise kernels (tile-*: no products) without spills either.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "prefopt.bench.aot_compile"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["name"]: r for r in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))}
    assert len(results) == 14 and sum(name.startswith("tile-") for name in results) == 4, done.stdout
    for name, r in results.items():
        assert r["shared"] <= 227 * 1024, r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0 and r["local_loads"] == 0, r
        if name.startswith("tile-"):
            continue
        assert r["cp_async"] > 0, r
        if "bf16" in name or "tf32" in name:
            assert r["wgmma"] > 0, r
        if "fp64" in name:
            assert r["mma"] > 0, r


def test_no_tokens_by_vocab_tensor(monkeypatch):
    # Every tensor the op creates, forward and backward, with 32-column backward chunks: none is [n, V]
    from torch.utils._python_dispatch import TorchDispatchMode

    class Watch(TorchDispatchMode):
        largest = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                # (the interpreter moves argument storages as uint8 byte views: not tensors of the op)
                if isinstance(t, torch.Tensor) and t.dtype != torch.uint8:
                    Watch.largest = max(Watch.largest, t.numel())
            return out

    n, vocab, hidden = 64, 400, 8
    monkeypatch.setattr(K, "CHUNK_BYTES", n * 32 * 4)
    monkeypatch.setattr(K, "WIDTH_PER_HIDDEN", 0)
    monkeypatch.setattr(K, "backward_blocks", lambda *a, **k: K.Blocks(64, 32, 16, 1, 1, 1))
    h = torch.randn(n, hidden, requires_grad=True)
    w = torch.randn(vocab, hidden, requires_grad=True)
    y = torch.randint(0, vocab, (n,))
    with Watch():
        out = linear_logprobs(h, w, y, ref_hidden=torch.randn(n, hidden), entropy=True, kl=True, backend="triton")
        (out.logp.sum() + out.kl.sum() + out.entropy.sum()).backward()
    assert 0 < Watch.largest <= max(n * 32, n * hidden, vocab * hidden) < n * vocab // 4
    assert h.grad is not None and w.grad is not None


def test_kernels_import_nothing_from_prefopt():
    # kernels/ is the bottom layer: the library imports it, never the other way round
    import ast
    import pathlib

    root = pathlib.Path(K.__file__).parent
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] if node.level == 0 else []
            assert not any(name.split(".")[0] == "prefopt" for name in names), f"{path} imports {names}"


@pytest.mark.parametrize("split", [1, 4])
def test_argmax_first_maximum_across_tiles_and_splits(seed, split):
    # Rows 5, 40 and 100 of the head are equal and dominate for tokens 0-7: the tie spans 16-wide tiles
    # and (split=4: 3 tiles per split) splits, and the first maximum (5) must win; other tokens get the
    # float64 argmax. Token 8's maximum sits in the last, ragged tile.
    n, vocab, hidden = 23, 131, 24
    h, w, b, y, _ = make(n, vocab, hidden, bias=False)
    w[5] = w[40] = w[100] = 1.0
    h[:8] = h[:8].abs() + 1.0
    w[130] = -3.0
    h[8] = -1.0
    stats = K.forward(h, w, None, y, argmax=True, split=split, blocks=SMALL)
    z, _ = dense_logits(h, w, None, 1.0, None)
    assert stats.argmax.dtype == torch.int64
    assert stats.argmax[:8].tolist() == [5] * 8 and stats.argmax[8] == 130, f"seed {seed}"
    assert torch.equal(stats.argmax, z.argmax(-1)), f"seed {seed}"


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_transposed_fp32_head_with_bf16_hidden(seed, monkeypatch, frozen):
    # An fp32 head stored transposed ([H, V] memory, as a tied or autocast head can be) with bf16 hidden
    # states: the kernels read the head through its strides and cast each tile to bf16 (the torch
    # backend's rule); nothing the size of the head is created besides its gradient.
    from torch.utils._python_dispatch import TorchDispatchMode

    monkeypatch.setattr(K, "CHUNK_BYTES", 24 * 32 * 2)
    monkeypatch.setattr(K, "WIDTH_PER_HIDDEN", 0)
    monkeypatch.setattr(K, "forward_blocks", lambda *a, **k: SMALL)
    monkeypatch.setattr(K, "backward_blocks", lambda *a, **k: SMALL)
    n, vocab, hidden = 24, 131, 40
    h = torch.randn(n, hidden).bfloat16().requires_grad_()
    w = (torch.randn(hidden, vocab) / hidden**0.5).T.requires_grad_(not frozen)
    assert not w.is_contiguous()
    y = torch.randint(0, vocab, (n,))

    class Watch(TorchDispatchMode):
        sizes = []  # new storages made by the op (views excluded; the interpreter's own copies inside a launch too)
        launching = False

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor) and not t._is_view() and not Watch.launching:
                    Watch.sizes.append(t.numel())
            return out

    class Launches:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                Watch.launching = True
                try:
                    return self.kernel[grid](*args, **kwargs)
                finally:
                    Watch.launching = False

            return launch

    for name in ("_fwd_kernel", "_bwd_dlogits_kernel"):
        monkeypatch.setattr(K, name, Launches(getattr(K, name)))

    with Watch():
        out = linear_logprobs(h, w, y, backend="triton", entropy=not frozen)
        loss = out.logp.sum() + (out.entropy.sum() if not frozen else 0)
        grads = torch.autograd.grad(loss, [h] if frozen else [h, w])
    head_sized = [size for size in Watch.sizes if size > max(n * 32, 32 * hidden, n * hidden)]
    assert head_sized == ([] if frozen else [vocab * hidden]), head_sized  # only d weight itself
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_(not frozen)
    want = oracle_linear_logprobs(h64, w64, y)
    close(out.logp, want.logp, 3e-2, "logp", seed)
    (want.logp.sum() + (want.entropy.sum() if not frozen else 0)).backward()
    close(grads[0], h64.grad, 3e-2, "d hidden", seed)
    if not frozen:
        assert grads[1].dtype == torch.float32
        close(grads[1], w64.grad, 3e-2, "d weight", seed)


def test_addmm_out_dtype_rejected_at_call_time_falls_back(monkeypatch):
    # A torch release that lists addmm's out_dtype overload but rejects bf16 inputs into an fp32 out when
    # called: the product takes the existing fallback (same sum) and the process stops trying. Forced
    # here with CPU tensors, whose real addmm(out_dtype=) raises NotImplementedError in torch 2.13.
    monkeypatch.setattr(K, "ADDMM_OUT_DTYPE", True)
    monkeypatch.setattr(K, "ADDMM_OUT_DTYPE_REJECTED", None)
    monkeypatch.setattr(K, "_addmm_out_dtype_applies", lambda acc: K.ADDMM_OUT_DTYPE)
    a = torch.randn(37, 24).to(torch.bfloat16)
    b = torch.randn(24, 16).to(torch.bfloat16)
    start = torch.randn(37, 16)
    acc = start.clone()
    K.accumulate_product(acc, a, b, rows_per_product=8)
    expected = start.double() + a.double() @ b.double()
    assert (acc.double() - expected).abs().max() < 0.05 * expected.abs().max()
    assert K.ADDMM_OUT_DTYPE is False and "addmm" in K.ADDMM_OUT_DTYPE_REJECTED, K.ADDMM_OUT_DTYPE_REJECTED
    calls = []
    monkeypatch.setattr(K, "_addmm_fp32_out", lambda *args: calls.append(args) or True)
    K.accumulate_product(acc, a, b, rows_per_product=8)
    assert not calls  # rejected once: never tried again in this process
