"""Compile the Triton kernels for an H100 (sm_90) without a GPU: ``python -m bench.aot_compile [NAME...]``.

The interpreter runs the kernels' Python, not Triton's compiler, so it cannot see what only the real
compiler rejects (an unsupported dtype in ``tl.dot``, a constexpr misuse, shared memory overflow).
This module runs the whole compiler down to a cubin with the ptxas bundled in the triton wheel, for
the configurations the launchers pick on an H100, with 16-divisible pointers and sizes (what the
launcher specialises on for real shapes, and what enables the async-copy pipeline). It prints one
JSON object per configuration: shared memory, wgmma / mma / cp.async counts in the PTX, local-memory
loads in the PTX, and ptxas's own report on the PTX (``ptxas -v``: registers per thread, spill stores and
loads in bytes), with the Triton that is installed (the first contact runs it on the GPU machine's). With
names, only those variants (:data:`VARIANTS` and :data:`ALTERNATIVES`). It must run without
TRITON_INTERPRET (the kernels are built for the interpreter when it is set), so it runs in its own process.
"""
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("bench.aot_compile: run without TRITON_INTERPRET=1: the kernels must be built for the compiler")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from prefopt.kernels import linear_logprobs as K  # noqa: E402
from prefopt.kernels import live_tile as LT  # noqa: E402

DIVISIBLE = {"K", "KR", "V", "v_base", "v_stop", "stride_h", "stride_w", "stride_rh", "stride_rw", "stride_e", "stride_ds",
             "width", "v_begin", "stride_s", "stride_sr"}
FLOATS = {"inv_temp", "softcap", "inv_softcap"}
TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}
SHAPE = (16384, 152064, 4096)  # tokens, vocabulary, hidden size (the largest)


UNIT_STRIDES = ("stride_hk", "stride_wk", "stride_rhk", "stride_rwk")  # contiguous rows: specialised to 1 as the JIT does


def compile_kernel(fn, pointers, constexprs, blocks, arch=90):
    names = fn.arg_names
    constexprs = {**constexprs, **{k: 1 for k in UNIT_STRIDES if k in names}}
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = pointers[name]
        elif name in FLOATS:
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    attrs = {(names.index(k),): [["tt.divisibility", 16]]
             for k, v in signature.items() if v.startswith("*") or k in DIVISIBLE}
    src = ASTSource(fn=fn, signature=signature, constexprs={(names.index(k),): v for k, v in constexprs.items()},
                    attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32),
                          options=dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages))


def ptxas_report(ptx: str, arch: str = "sm_90a") -> dict:
    """Registers and spills as ptxas reports them (the ptxas bundled with triton)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas triton itself assembled this PTX with
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", path, "-o", os.path.join(tmp, "k.cubin")],
                              capture_output=True, text=True, check=True)
    text = done.stderr
    regs = re.search(r"Used (\d+) registers", text)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    return dict(registers=int(regs.group(1)) if regs else None,
                spill_stores=int(spills.group(1)) if spills else None,
                spill_loads=int(spills.group(2)) if spills else None)


def forward_variant(dtype, *, moments=False, ref=True, softcap=True, stats=True, sq=None, blocks=None,
                    precision="ieee"):
    sq = stats if sq is None else sq  # log sum p^2 is one of the statistics, and may go alone with the moments
    blocks = blocks or K.forward_blocks(*SHAPE, dtype, ref=ref, extras=softcap or stats or sq, write_e=moments,
                                        interpret=False)
    p, s = "*" + TYPES[dtype], "*" + ("fp64" if dtype == torch.float64 else "fp32")
    pointers = dict(h_ptr=p, w_ptr=p, b_ptr=p, t_ptr="*i64", rh_ptr=p, rw_ptr=p, rb_ptr=p, max_ptr=s, sum_ptr=s,
                    tgt_ptr=s, ez_ptr=s, zsum_ptr=s, arg_ptr="*i32", sq_ptr=s, rest_ptr=s, rmax_ptr=s, rsum_ptr=s,
                    rtgt_ptr=s, ezr_ptr=s, e_ptr=p)
    constexprs = dict(HAS_BIAS=True, HAS_REF_BIAS=ref, SOFTCAP=softcap, WANT_EZ=stats, WANT_ZSUM=stats,
                      WANT_ARGMAX=stats, WANT_SQ=sq, WANT_REF=ref, WANT_EZR=ref and stats, WRITE_E=moments,
                      ACC=K._acc_dtype(dtype),
                      DOT_DTYPE=None, REF_DOT_DTYPE=None, PRECISION=precision,
                      BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h,
                      GROUP_N=blocks.group_n if moments else 0)
    return compile_kernel(K._fwd_kernel, pointers, constexprs, blocks)


def backward_variant(dtype, *, ref=True):
    blocks = K.backward_blocks(*SHAPE, dtype, interpret=False)
    p, s = "*" + TYPES[dtype], "*" + ("fp64" if dtype == torch.float64 else "fp32")
    pointers = dict(h_ptr=p, w_ptr=p, b_ptr=p, t_ptr="*i64", rh_ptr=p, rw_ptr=p, rb_ptr=p, lse_ptr=s, a_ptr=s,
                    c0_ptr=s, c1_ptr=s, c2_ptr=s, c3_ptr=s, ds_ptr=p)
    constexprs = dict(HAS_BIAS=True, HAS_REF_BIAS=ref, SOFTCAP=True, HAS_C1=True, HAS_C2=ref, HAS_C3=True,
                      ACC=K._acc_dtype(dtype), DOT_DTYPE=None, REF_DOT_DTYPE=None, PRECISION="ieee",
                      BLOCK_N=blocks.block_n, BLOCK_V=blocks.block_v, BLOCK_H=blocks.block_h, GROUP_N=blocks.group_n)
    return compile_kernel(K._bwd_dlogits_kernel, pointers, constexprs, blocks)


def live_tile_variant(kernel, dtype, *, ref=True):
    """The fused-gradient path's element-wise kernels on an fp32 (fp64) logits tile, every option on."""
    s = "*" + ("fp64" if dtype == torch.float64 else "fp32")
    acc = K._acc_dtype(dtype)
    if kernel == "stats":
        pointers = {name: s for name in ("s_ptr", "sr_ptr", "lse_ptr", "tgt_ptr", "mean_ptr", "sum_ptr", "rlse_ptr",
                                         "rtgt_ptr", "rmean_ptr")}
        constexprs = dict(SOFTCAP=True, REF=ref, MEAN=True, SUM=True, REF_MEAN=ref, ACC=acc)
        fn = LT._stats_kernel
    else:
        pointers = {name: s for name in ("s_ptr", "sr_ptr", "lse_ptr", "a_ptr", "c0_ptr", "c1_ptr", "c2_ptr", "c3_ptr")}
        constexprs = dict(SOFTCAP=True, HAS_C1=True, HAS_C2=ref, HAS_C3=True, ACC=acc)
        fn = LT._grad_kernel
    pointers["t_ptr"] = "*i64"
    constexprs.update(BLOCK_N=LT.BLOCK_N, BLOCK_V=LT.block_v(dtype))
    return compile_kernel(fn, pointers, constexprs, K.Blocks(LT.BLOCK_N, LT.block_v(dtype), 0, LT.NUM_WARPS, 3))


TILE_64 = K.Blocks(64, 128, 64, 8, 4)
TILE_128 = K.Blocks(128, 128, 64, 8, 3)

#: What the launchers pick on an H100 (compiled by the test): every one must compile without spills.
VARIANTS = {
    "fwd-bf16-plain": lambda: forward_variant(torch.bfloat16, ref=False, softcap=False, stats=False),
    "fwd-bf16-stats": lambda: forward_variant(torch.bfloat16, ref=False),
    "fwd-bf16-ref": lambda: forward_variant(torch.bfloat16, softcap=False, stats=False),
    "fwd-bf16-all": lambda: forward_variant(torch.bfloat16),
    "fwd-bf16-moments": lambda: forward_variant(torch.bfloat16, moments=True, ref=False, stats=False),
    # frozen head with TRL's WPO statistic (no gradient, so the shortcut still applies), softcapped
    "fwd-bf16-moments-sq": lambda: forward_variant(torch.bfloat16, moments=True, ref=False, stats=False, sq=True),
    "bwd-bf16-kl": lambda: backward_variant(torch.bfloat16),
    "fwd-fp32-tf32": lambda: forward_variant(torch.float32, ref=False, softcap=False, stats=False, precision="tf32"),
    "fwd-fp64-all": lambda: forward_variant(torch.float64),
    "bwd-fp64-kl": lambda: backward_variant(torch.float64),
    "tile-stats-fp32-all": lambda: live_tile_variant("stats", torch.float32),
    "tile-grad-fp32-kl": lambda: live_tile_variant("grad", torch.float32),
    "tile-stats-fp64-all": lambda: live_tile_variant("stats", torch.float64),
    "tile-grad-fp64-kl": lambda: live_tile_variant("grad", torch.float64),
}

#: The alternatives the choices were made against (compiled only when named on the command line).
ALTERNATIVES = {
    "fwd-bf16-plain-64x128": lambda: forward_variant(torch.bfloat16, ref=False, softcap=False, stats=False,
                                                     blocks=TILE_64),
    "fwd-bf16-all-128x128": lambda: forward_variant(torch.bfloat16, blocks=TILE_128),
    "fwd-bf16-moments-128x128": lambda: forward_variant(torch.bfloat16, moments=True, ref=False, stats=False,
                                                        blocks=TILE_128),
    "fwd-fp32-ieee": lambda: forward_variant(torch.float32, ref=False, softcap=False, stats=False),
    "fwd-fp64-all-32x64": lambda: forward_variant(torch.float64, blocks=K.Blocks(32, 64, 32, 4, 2)),
    "fwd-fp64-all-32x32": lambda: forward_variant(torch.float64, blocks=K.Blocks(32, 32, 32, 4, 2)),
}


def main(names):
    known = {**VARIANTS, **ALTERNATIVES}
    unknown = [n for n in names if n not in known]
    if unknown:
        sys.exit(f"bench.aot_compile: unknown variant {unknown[0]!r}; choose from {', '.join(known)}")
    for name in names or VARIANTS:
        kernel = known[name]()
        ptx = kernel.asm["ptx"]
        print(json.dumps(dict(
            name=name, shared=kernel.metadata.shared, wgmma=ptx.count("wgmma.mma_async"),
            mma=ptx.count("mma.sync"), cp_async=ptx.count("cp.async"), local_loads=ptx.count("ld.local"),
            **ptxas_report(ptx),
        )), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
