"""The implementations compared: each builds, for one workload and its inputs, a step that returns the loss.

``naive`` and ``cce`` produce per-token statistics and share the objective of :mod:`bench.workloads`
(written independently of prefopt's, so the loss column cross-checks it); prefopt's drop-in modules
and Liger's modules compute their own loss; ``floor`` runs only the matrix products
the op cannot avoid and returns no loss. Static limits (device, workload support, package installed) are
checked by the parent before a subprocess is spent (:func:`static_skip`); whatever fails at run time
becomes a ``failed`` row.
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple

from .workloads import IGNORE_INDEX, BETA, GRPO_BETA, GRPO_EPS, KAPPA, Shape, Workload, element_size, objective


@dataclass(frozen=True)
class Impl:
    name: str
    description: str
    peer: bool  # a peer library (the "best peer" ratios are against these)
    modules: Tuple[str, ...]  # what must be importable
    cuda_only: bool = False
    default_on_cpu: bool = True


IMPLS: Dict[str, Impl] = {
    i.name: i
    for i in [
        Impl("naive", "materialised logits -> log_softmax -> gather, plain torch", False, ()),
        Impl("prefopt-torch", "prefopt's fused loss modules, backend='torch' (chunked autograd Function)", False, ("prefopt",)),
        Impl("prefopt-triton", "prefopt's fused loss modules, backend='triton'", False, ("prefopt", "triton"), cuda_only=True),
        Impl("liger", "Liger-Kernel chunked-loss module, compiled=False", True, ("liger_kernel",)),
        Impl("liger-compiled", "Liger-Kernel chunked-loss module, compiled=True (torch.compile)", True, ("liger_kernel",)),
        Impl("trl", "TRL's fused LM head, trl.kernels.ChunkedLogProbFunction (what DPOTrainer/GRPOTrainer use), chunk 32768", True, ("trl",)),
        Impl("cce", "Cut Cross-Entropy linear_cross_entropy(reduction='none'): impl='cce' on GPU, 'torch_compile' on CPU", True, ("cut_cross_entropy",)),
        Impl("floor", "the bare matrix products (issue 3's floor) via torch.matmul; no loss", False, (), default_on_cpu=False),
    ]
}

PEERS = tuple(n for n, i in IMPLS.items() if i.peer)


def static_skip(name: str, workload: Workload, device: str) -> Optional[str]:
    """Why ``name`` cannot run ``workload`` on ``device`` without trying, or None."""
    impl = IMPLS[name]
    if impl.cuda_only and device != "cuda":
        return f"{name}: CUDA only (on {device} Triton would run under its interpreter, which measures nothing)"
    for mod in impl.modules:
        if importlib.util.find_spec(mod) is None:
            return f"{name}: not installed (python module {mod!r} not found; pip install 'prefopt[bench]')"
    if name == "prefopt-triton" and importlib.util.find_spec("prefopt.ops.triton_backend") is None:
        return f"{name}: prefopt's Triton backend is not in this checkout yet"
    if name == "cce" and workload.kl:
        return "cce: computes only the target's log-prob, not the full-vocabulary KL that nSFT needs"
    if name == "trl" and workload.kl:
        return "trl: ChunkedLogProbFunction gives per-token log-probs (and entropy), not the KL to a reference that nSFT needs"
    return None


def estimate_extra_bytes(name: str, workload: Workload, shape: Shape, dtype) -> int:
    """Rough peak extra memory of one step (gradients included), to refuse cells that cannot fit."""
    e = element_size(dtype)
    n_all, n, v, h = shape.positions, shape.scored, shape.vocab, shape.hidden
    grads = n_all * h * e + (0 if workload.frozen else v * h * e)
    if name == "naive":  # logits, fp32 copy, log_softmax, their grads; reference logits without grad
        per = 3 * e + 12 + ((e + 8) if workload.ref_head else 0) + (12 if workload.kl else 0)
        return grads + n_all * v * per
    if name == "cce":
        return grads + n * v * (e + 8) * (2 if workload.ref_head else 1)
    if name == "trl":  # one [4096, 32768] tile in the compute dtype, fp32 d hidden and d weight accumulators
        return grads + min(n, 4096) * min(v, 32768) * e + n * h * 4 + (0 if workload.frozen else v * h * 4)
    if name.startswith("liger"):  # one pair (DPO) / rollout chunk (GRPO) / 1024 tokens (JSD) at a time
        chunk = 1024 if workload.kl else (2 if workload.paired else 1) * shape.seq
        return grads + v * h * 4 + chunk * v * 16 * (2 if workload.ref_head else 1)
    if name == "floor":
        return grads + n * v * e
    return grads + n * h * 4 + 6 * 2048 * 8192 * 4  # prefopt: fp32 d hidden + a few tiles


# ---------------------------------------------------------------------------------------------------
# Builders: (workload, inputs, device) -> step() returning the loss (None for the floor).


def build(name: str, workload: Workload, inp, device: str) -> Tuple[Callable, str]:
    """The step of ``name`` and a line on how it was called (recorded with the figures)."""
    return _BUILDERS[name](workload, inp, device)


def _build_naive(workload: Workload, inp, device):
    import torch

    def token_stats(hidden, weight, targets):
        logits = (hidden @ weight.T).float()
        logq = torch.log_softmax(logits, -1)
        valid = targets != IGNORE_INDEX
        logp = logq.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1)
        return logq, torch.where(valid, logp, torch.zeros_like(logp)), valid

    def step():
        hidden, weight, targets = inp["hidden"], inp["weight"], inp["targets"]
        logq, logp, valid = token_stats(hidden, weight, targets)
        ref_logp = kl = None
        if workload.ref_head:
            with torch.no_grad():
                logr, ref_logp, _ = token_stats(inp["ref_hidden"], inp.get("ref_weight", weight), targets)
            if workload.kl:
                kl = (logq.exp() * (logq - logr)).sum(-1) * valid
        return objective(workload, inp, logp, ref_logp, kl)

    return step, "materialised [rows, seq, V] logits in fp32, log_softmax, gather; reference under no_grad; the bench's own objective"


def _build_prefopt(backend: str):
    """prefopt's drop-in loss modules (the public API users call), on the chosen backend."""

    def builder(workload: Workload, inp, device):
        import prefopt

        hidden, weight, targets = inp["hidden"], inp["weight"], inp["targets"]
        opts = dict(ignore_index=IGNORE_INDEX, backend=backend)
        if workload.kl:
            mod = prefopt.FusedNSFTLoss(kl_coef=KAPPA, **opts)
            kwargs = dict(ref_hidden=inp["ref_hidden"], ref_weight=inp["ref_weight"])
            how = f"prefopt.FusedNSFTLoss(kl_coef={KAPPA}, backend={backend!r})"
        elif workload.grpo:
            mod = prefopt.FusedGRPOLoss(beta=GRPO_BETA, epsilon_low=GRPO_EPS, epsilon_high=GRPO_EPS,
                                        loss_agg="sequence-mean", **opts)
            kwargs = dict(advantages=inp["advantages"], old_logps=inp["old_logps"], ref_logps=inp["ref_token_logps"])
            how = f"prefopt.FusedGRPOLoss(loss_agg='sequence-mean', backend={backend!r}), precomputed old/ref log-probs"
        else:
            mod = prefopt.FusedDPOLoss(beta=BETA, **opts)
            if workload.ref_precomputed:
                kwargs = dict(ref_logps=inp["ref_logps"])
            else:  # dpo-frozen: ref_weight defaults to the (frozen) policy head
                kwargs = dict(ref_hidden=inp["ref_hidden"], ref_weight=inp.get("ref_weight"))
            how = f"prefopt.FusedDPOLoss(beta={BETA}, backend={backend!r})"

        def step():
            return mod(weight, hidden, targets, **kwargs).loss

        return step, how

    return builder


def _liger_module(compiled: bool):
    def builder(workload: Workload, inp, device):
        import torch
        from liger_kernel import chunked_loss as lk

        if compiled:
            _import_compiler()
        hidden, weight, targets = inp["hidden"], inp["weight"], inp["targets"]
        if workload.kl:
            # beta=1 makes Liger's generalised JSD the reverse KL, KL(student || teacher) = KL(pi || pi_ref).
            mod = lk.LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=KAPPA, beta=1.0,
                                              ignore_index=IGNORE_INDEX, compiled=compiled)
            h = hidden.reshape(-1, hidden.shape[-1])
            rh = inp["ref_hidden"].reshape(-1, hidden.shape[-1])
            y = targets.reshape(-1)

            def step():
                return _first(mod(h, weight, rh, inp["ref_weight"], y))

            return step, f"LigerFusedLinearJSDLoss(beta=1 (reverse KL), weight_hard_loss=1, weight_soft_loss={KAPPA}, compiled={compiled})"
        if workload.grpo:
            mod = lk.LigerFusedLinearGRPOLoss(beta=GRPO_BETA, epsilon_low=GRPO_EPS, epsilon_high=GRPO_EPS,
                                              loss_type="grpo", compiled=compiled, use_ref_model=True)
            ids = targets.clamp_min(0)
            mask = (targets != IGNORE_INDEX).to(torch.int64)

            def step():
                return _first(mod(hidden, weight, ids, mask, inp["advantages"],
                                  ref_per_token_logps=inp["ref_token_logps"], old_per_token_logps=inp["old_logps"]))

            return step, f"LigerFusedLinearGRPOLoss(loss_type='grpo', compiled={compiled}), precomputed old/ref log-probs"
        use_ref = workload.ref_head
        mod = lk.LigerFusedLinearDPOLoss(beta=BETA, ignore_index=IGNORE_INDEX, compiled=compiled, use_ref_model=use_ref)
        ref_weight = inp.get("ref_weight", weight if workload.frozen else None)

        def step():
            if use_ref:
                return _first(mod(weight, hidden, targets, None, inp["ref_hidden"], ref_weight))
            return _first(mod(weight, hidden, targets))

        how = f"LigerFusedLinearDPOLoss(compiled={compiled}, use_ref_model={use_ref})"
        if workload.ref_precomputed:
            how += (": Liger's DPO module takes no precomputed reference log-probs, so it runs without a"
                    " reference (the same head work; its loss value differs)")
        return step, how

    return builder


def _import_compiler():
    """Import torch.compile's machinery before the memory baseline: the compiler's own modules are not
    the implementation's working memory (what it compiles and caches still counts)."""
    import torch._dynamo  # noqa: F401
    import torch._inductor.compile_fx  # noqa: F401


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _token_logp_step(workload: Workload, inp, token_logp):
    """A step for a peer that gives per-token log-probs: the policy's, the reference's under no_grad, then
    the bench's own objective."""
    import torch

    def step():
        hidden, weight, targets = inp["hidden"], inp["weight"], inp["targets"]
        logp = token_logp(hidden, weight, targets)
        ref_logp = None
        if workload.ref_head:
            with torch.no_grad():
                ref_logp = token_logp(inp["ref_hidden"], inp.get("ref_weight", weight), targets)
        return objective(workload, inp, logp, ref_logp)

    return step


def _build_cce(workload: Workload, inp, device):
    from cut_cross_entropy import linear_cross_entropy

    impl = "cce" if device == "cuda" else "torch_compile"
    if impl == "torch_compile":
        _import_compiler()

    def token_logp(hidden, weight, targets):
        return -linear_cross_entropy(hidden, weight, targets, ignore_index=IGNORE_INDEX, reduction="none", impl=impl)

    return _token_logp_step(workload, inp, token_logp), f"linear_cross_entropy(reduction='none', impl={impl!r}) for policy and (no_grad) reference log-probs"


def _build_trl(workload: Workload, inp, device):
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE as chunk

    def token_logp(hidden, weight, targets):
        # as TRL's patched forward calls it on Triton devices: only the scored positions, scattered back
        mask = targets != IGNORE_INDEX
        logp = ChunkedLogProbFunction.apply(hidden[mask], weight, None, targets[mask], 1.0, chunk, None, 1.0, ())[0]
        return logp.new_zeros(mask.shape).masked_scatter(mask, logp)

    return _token_logp_step(workload, inp, token_logp), (f"trl.kernels.ChunkedLogProbFunction(chunk_size={chunk}, outputs=()) on the scored positions for "
                  "policy and (no_grad) reference log-probs; the bench's own objective")


def _build_floor(workload: Workload, inp, device):
    import torch

    valid = (inp["targets"] != IGNORE_INDEX).reshape(-1)
    h = inp["hidden"].detach().reshape(-1, inp["hidden"].shape[-1])[valid].contiguous()
    w = inp["weight"].detach()
    rh = inp["ref_hidden"].reshape(-1, h.shape[1])[valid].contiguous() if workload.ref_head else None
    rw = inp.get("ref_weight", w).detach() if workload.ref_head else None
    out = torch.empty(h.shape[0], w.shape[0], dtype=h.dtype, device=h.device)
    dh = torch.empty_like(h)
    dw = torch.empty_like(w)

    def step():
        torch.mm(h, w.T, out=out)  # forward
        if rh is not None:
            torch.mm(rh, rw.T, out=out)  # reference head, same pass
        if not workload.frozen:
            torch.mm(h, w.T, out=out)  # recompute in backward
            torch.mm(out.T, h, out=dw)  # d weight
        torch.mm(out, w, out=dh)  # d hidden
        return None

    return step, f"{workload.floor_products} torch.mm of N x H x V into preallocated buffers (memory not comparable)"


_BUILDERS = {
    "naive": _build_naive,
    "prefopt-torch": _build_prefopt("torch"),
    "prefopt-triton": _build_prefopt("triton"),
    "liger": _liger_module(compiled=False),
    "liger-compiled": _liger_module(compiled=True),
    "cce": _build_cce,
    "trl": _build_trl,
    "floor": _build_floor,
}
