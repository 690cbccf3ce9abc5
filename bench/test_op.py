"""Forward+backward of ``prefopt.linear_logprobs`` against the materialised path, timed by pytest-benchmark.

    pytest bench/ --benchmark-columns=median,iqr,rounds --benchmark-sort=name

Shapes are small enough for a 2-core CPU; on a CUDA machine the same tests run on the GPU, with the
Triton backend beside the torch one. Every case first checks that both paths give the same loss.
"""
import pytest
import torch

import prefopt

pytest.importorskip("pytest_benchmark")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["triton"] if DEVICE == "cuda" and prefopt.ops.triton_available() else [])
SHAPES = {"N1024-H512-V16384": (1024, 512, 16384), "N2048-H1024-V32000": (2048, 1024, 32000)}
CASES = ["trainable", "frozen", "reference+kl"]


def _inputs(n, h, v, case):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(n, h, generator=g).to(DEVICE).requires_grad_()
    weight = (torch.randn(v, h, generator=g) * 2 / h**0.5).to(DEVICE).requires_grad_(case != "frozen")
    targets = torch.randint(0, v, (n,), generator=g).to(DEVICE)
    ref = (hidden.detach() + 0.1 * torch.randn(n, h, generator=g).to(DEVICE)) if case == "reference+kl" else None
    return hidden, weight, targets, ref


def _fused(backend):
    def loss(hidden, weight, targets, ref):
        s = prefopt.linear_logprobs(hidden, weight, targets, ref_hidden=ref, kl=ref is not None, backend=backend)
        return -s.logp.mean() + (s.kl.mean() if ref is not None else 0)

    return loss


def _naive(hidden, weight, targets, ref):
    logq = torch.log_softmax((hidden @ weight.T).float(), -1)
    out = -logq.gather(1, targets[:, None]).mean()
    if ref is not None:
        with torch.no_grad():
            logr = torch.log_softmax((ref @ weight.T).float(), -1)
        out = out + (logq.exp() * (logq - logr)).sum(-1).mean()
    return out


def _step(fn, hidden, weight, targets, ref):
    def run():
        hidden.grad = weight.grad = None
        fn(hidden, weight, targets, ref).backward()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    return run


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("impl", ["naive"] + [f"prefopt-{b}" for b in BACKENDS])
def test_linear_logprobs_fwd_bwd(benchmark, impl, shape, case):
    inputs = _inputs(*SHAPES[shape], case)
    fn = _naive if impl == "naive" else _fused(impl.split("-", 1)[1])
    expected = _naive(*inputs).item()
    assert fn(*inputs).item() == pytest.approx(expected, rel=1e-4, abs=1e-5)
    benchmark.group = f"{shape} {case}"
    benchmark.extra_info.update(device=DEVICE, impl=impl)
    benchmark.pedantic(_step(fn, *inputs), rounds=3, warmup_rounds=1)
