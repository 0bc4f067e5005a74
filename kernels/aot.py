"""Ahead-of-time compilation for NVIDIA targets, on a machine with no GPU.

The interpreter accepts programs the GPU compiler rejects and hides register spills, so every
launch configuration is also compiled here for real targets and its resource use read back
from the cubin with the cuobjdump that ships in the triton wheel.
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

_POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16",
            torch.float64: "*fp64", torch.int64: "*i64", torch.int32: "*i32"}


def triton_signature(signature: dict) -> dict:
    """The kernels' compile specs name a pointer argument by the torch dtype it points to."""
    return {name: _POINTER[t] if isinstance(t, torch.dtype) else t for name, t in signature.items()}


def compile_resources(fn, signature: dict, constexprs: dict, num_warps: int, arch: int) -> dict[str, int]:
    """Compile ``fn`` for sm_<arch>; return its registers, stack and local bytes per thread and
    shared bytes per block (cuobjdump -res-usage), and the count of local-memory stores and
    loads in its SASS (spills)."""
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 triton.jit gave a wrapper
        fn = JITFunction(fn.fn)
    sig = triton_signature(signature)
    sig.update({name: "constexpr" for name in constexprs})
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(kernel.asm["cubin"])
        out = subprocess.run([tool, "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED|STACK|LOCAL):(\d+)", out)}
    return {
        "registers": found["reg"], "shared": found["shared"], "stack": found["stack"], "local": found["local"],
        # register spills show as local-memory stores and loads in the SASS
        "spill_stores": len(re.findall(r"\bSTL(?:\.\w+)*\b", sass)),
        "spill_loads": len(re.findall(r"\bLDL(?:\.\w+)*\b", sass)),
    }



def report(archs: tuple[int, ...] = (80, 90)) -> list[dict]:
    """Compile every launch configuration the kernels' launchers can choose, for each target."""
    from . import codebook, group_norm

    jobs = []
    for dtype, D, K, write_zq in codebook.aot_cases():
        signature, constexprs, num_warps = codebook.compile_spec(dtype, dtype, D, K, write_zq)
        jobs.append((dict(dtype=dtype, D=D, K=K, write_zq=write_zq), codebook.nearest_code_kernel,
                     signature, constexprs, num_warps))
    for dtype, B, C, G, P, spatial in group_norm.aot_cases():
        for kernel, signature, constexprs, num_warps in group_norm.compile_spec(dtype, B, C, G, P, spatial):
            jobs.append((dict(dtype=dtype, B=B, C=C, G=G, HW=P, spatial=spatial), kernel,
                         signature, constexprs, num_warps))
    rows = []
    for case, kernel, signature, constexprs, num_warps in jobs:
        config = {k: v for k, v in constexprs.items() if k.startswith(("BLOCK", "USE", "SPATIAL", "SILU"))}
        for arch in archs:
            res = compile_resources(kernel, signature, constexprs, num_warps, arch)
            name = getattr(kernel, "__name__", None) or kernel.fn.__name__
            rows.append(dict(kernel=name.removesuffix("_kernel"), **case, dtype_=None, arch=f"sm_{arch}",
                             num_warps=num_warps, **config, **res))
            rows[-1]["dtype"] = str(case["dtype"]).removeprefix("torch.")
            del rows[-1]["dtype_"]
    return rows


if __name__ == "__main__":
    # Run in a process of its own: under TRITON_INTERPRET=1 triton.language is patched for the
    # interpreter and cannot compile for a GPU.
    import json

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset or 0: the interpreter cannot compile for a GPU")
    print(json.dumps(report()))
