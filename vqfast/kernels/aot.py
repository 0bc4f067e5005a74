"""Ahead-of-time compilation for NVIDIA targets, and a static cost report, on a machine with no GPU.

The interpreter accepts programs the GPU compiler rejects and hides register spills, so every
launch configuration is also compiled here for real targets (``triton.compile`` with a
``GPUTarget``) and read back with the cuobjdump that ships in the triton wheel: registers, shared
memory, spills, and the SASS of the hot loop (the largest region closed by a backward branch):
its instructions per item (inner loops multiplied by their trip counts), shuffles, barriers and
the widths of its global loads and stores. From those, ``estimate_us_h200`` is a static
estimate, never a measurement (see ``estimate_us``).

    python -m vqfast.kernels.aot      # the rows as one JSON list on the last line

Each kernel module lists its launches with ``aot_launches()``: dicts with the kernel, the case
(reported as is), the compile spec (signature with pointers as torch dtypes, constexprs,
num_warps), ``divisible`` (the arguments the JIT would find 16-divisible at that launch: 16-byte
aligned pointers, ints that are multiples of 16; the launcher guards them), ``items_per_iteration``
(items of one program's hot-loop trip: elements for a norm, (row, code) pairs for the search),
``inner_trips`` (trip count of loops nested in the hot loop, if any), and ``items`` / ``bytes`` of
the benchmark case for the estimate.
"""

from __future__ import annotations

import functools
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

#: The static time model's machine: an H200 SXM (132 SMs x 4 warp schedulers at 1.98 GHz, one
#: warp-instruction per scheduler per cycle; 4.3 TB/s, the copy bandwidth measured on that card).
H200 = dict(sms=132, schedulers=4, clock_hz=1.98e9, bytes_per_s=4.3e12)
ESTIMATE_MODEL = ("estimate_us_h200 = max(bytes / 4.3e12 B/s, warp-instructions / (132 x 4 x 1.98e9 /s)) x 1e6, "
                  "warp-instructions = loop_instructions_per_item x items / 32 (the hot loop only; an MMA "
                  "counts as one issue, its tensor-core time is not modelled): "
                  "a static estimate from the compiled code, not a measurement")


def triton_signature(signature: dict) -> dict:
    """The kernels' compile specs name a pointer argument by the torch dtype it points to."""
    return {name: _POINTER[t] if isinstance(t, torch.dtype) else t for name, t in signature.items()}


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def compile_cubin(fn, signature: dict, constexprs: dict, num_warps: int, arch: int,
                  divisible: tuple[str, ...] = ()) -> bytes:
    """The cubin of ``fn`` for sm_<arch>, specialised as the JIT would be at a launch where the
    arguments named in ``divisible`` are 16-divisible (pointers 16-byte aligned)."""
    if not isinstance(fn, JITFunction):  # under TRITON_INTERPRET=1 triton.jit gave a wrapper
        fn = JITFunction(fn.fn)
    sig = triton_signature(signature)
    sig.update({name: "constexpr" for name in constexprs})
    unknown = set(divisible) - set(signature)
    if unknown:
        raise ValueError(f"divisible names {sorted(unknown)} are not runtime arguments of {fn.__name__}")
    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    return kernel.asm["cubin"]


def _cuobjdump(cubin: bytes) -> tuple[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("cuobjdump"), "-res-usage", path], capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "-sass", path], capture_output=True, text=True, check=True).stdout
    return res, sass


# ---------------------------------------------------------------------------------------------
# SASS reading

_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;")


def parse_sass(sass: str) -> list[tuple[int, str, str]]:
    """[(address, opcode with modifiers, operands)] of every instruction, predicates dropped."""
    out = []
    for line in sass.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        text = re.sub(r"^@!?U?P\w+\s+", "", m.group(2))
        op, _, rest = text.partition(" ")
        out.append((int(m.group(1), 16), op, rest))
    return out


def loops(instrs: list[tuple[int, str, str]]) -> list[tuple[int, int]]:
    """(first, last) instruction positions of every region closed by a backward branch; the
    self-branch that pads the end of a kernel is not a loop."""
    where = {addr: i for i, (addr, _, _) in enumerate(instrs)}
    found = []
    for i, (addr, op, rest) in enumerate(instrs):
        if not op.startswith("BRA"):
            continue
        m = re.search(r"0x([0-9a-f]+)", rest)
        target = int(m.group(1), 16) if m else None
        if target is not None and target < addr and target in where:
            found.append((where[target], i))
    return found


def access_bits(op: str) -> int | None:
    """Width in bits of a global load or store (LDG, STG, LDGSTS), else None. Cache hints such
    as .LTC128B are not widths."""
    head, *mods = op.split(".")
    if head not in ("LDG", "STG", "LDGSTS"):
        return None
    sizes = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "32": 32, "64": 64, "128": 128}
    found = [sizes[m] for m in mods if m in sizes]
    return found[-1] if found else 32


def is_mma(op: str) -> bool:
    """A tensor-core instruction: HMMA (sm_80 and sm_90's warp-level MMA) or HGMMA (sm_90's
    warpgroup MMA)."""
    return op.split(".")[0] in ("HMMA", "HGMMA")


def hot_loop(instrs: list[tuple[int, str, str]], inner_trips: int | None) -> dict:
    """Counts over the hot loop: the outermost loop that costs the most once its inner loops are
    multiplied by ``inner_trips``. Returns instructions (weighted), shuffles, barriers, load and
    store widths (sorted, distinct), and the nesting depth found."""
    regions = loops(instrs)
    if not regions:
        raise ValueError("no loop in the SASS: the kernel has no hot loop to read")

    def inside(a, b):  # region a strictly inside region b
        return b[0] <= a[0] and a[1] <= b[1] and a != b

    def weight(region, trips, counted=lambda op: True):
        inner = [r for r in regions if inside(r, region)]
        direct = [r for r in inner if not any(inside(r, o) for o in inner)]
        if direct and trips is None:
            raise ValueError(f"the hot loop holds {len(direct)} inner loop(s) but no inner trip count was given")
        own = sum(counted(instrs[i][1]) for i in range(region[0], region[1] + 1)
                  if not any(r[0] <= i <= r[1] for r in direct))
        return own + sum(trips * weight(r, trips, counted) for r in direct)

    outer = [r for r in regions if not any(inside(r, o) for o in regions)]
    if inner_trips is None:  # no nest is hot: loop nests run once after the walk (codebook's rescan)
        flat = [r for r in outer if not any(inside(i, r) for i in regions)]
        outer = flat or outer  # none flat: weight() says the trip count is missing
    best = max(outer, key=lambda r: weight(r, inner_trips))
    body = instrs[best[0]:best[1] + 1]
    loads = sorted({b for _, op, _ in body if op.split(".")[0] in ("LDG", "LDGSTS") and (b := access_bits(op))})
    stores = sorted({b for _, op, _ in body if op.split(".")[0] == "STG" and (b := access_bits(op))})
    return dict(
        instructions=weight(best, inner_trips),
        mma=weight(best, inner_trips, is_mma),
        shuffles=sum(op.startswith("SHFL") for _, op, _ in body),
        barriers=sum(op.startswith("BAR") for _, op, _ in body),
        load_bits=loads, store_bits=stores,
        inner_loops=sum(1 for r in regions if inside(r, best)),
    )


def estimate_us(instructions_per_item: float, items: int, nbytes: int) -> float:
    """The static model (ESTIMATE_MODEL): an estimate in microseconds, not a measurement."""
    issue = H200["sms"] * H200["schedulers"] * H200["clock_hz"]
    return 1e6 * max(nbytes / H200["bytes_per_s"], instructions_per_item * items / 32 / issue)


def analyse(cubin: bytes, num_warps: int, items_per_iteration: int, inner_trips: int | None) -> dict:
    """Resources and the hot loop's cost per item of one compiled kernel."""
    res, sass = _cuobjdump(cubin)
    found = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|SHARED|STACK|LOCAL):(\d+)", res)}
    instrs = parse_sass(sass)
    loop = hot_loop(instrs, inner_trips)
    threads = 32 * num_warps
    return {
        "registers": found["reg"], "shared": found["shared"], "stack": found["stack"], "local": found["local"],
        # register spills show as local-memory stores and loads anywhere in the SASS
        "spill_stores": sum(op.startswith("STL") for _, op, _ in instrs),
        "spill_loads": sum(op.startswith("LDL") for _, op, _ in instrs),
        # every thread runs the loop's instructions once per trip; a trip covers items_per_iteration
        "loop_instructions_per_item": round(loop["instructions"] * threads / items_per_iteration, 2),
        # tensor-core instructions in the hot loop, and everything else in it per item
        "loop_mma": loop["mma"],
        "loop_other_instructions_per_item": round((loop["instructions"] - loop["mma"]) * threads / items_per_iteration, 2),
        "loop_shuffles": loop["shuffles"], "loop_barriers": loop["barriers"],
        "global_load_bits": loop["load_bits"], "global_store_bits": loop["store_bits"],
    }


@functools.lru_cache(maxsize=None)
def _compiled(key):
    fn, signature, constexprs, num_warps, arch, divisible = key
    return compile_cubin(fn, dict(signature), dict(constexprs), num_warps, arch, divisible)


def _freeze(d: dict) -> tuple:
    return tuple(sorted(d.items(), key=lambda kv: kv[0]))


def launches(arch: int) -> list[dict]:
    """Every launch the kernels' launchers can choose on sm_<arch>, from the kernel modules'
    aot_launches(arch)."""
    from . import codebook, group_norm
    return codebook.aot_launches(arch) + group_norm.aot_launches(arch)


def report(archs: tuple[int, ...] = (80, 90)) -> list[dict]:
    """One row per launch and target: the case, the launch configuration, resources, the hot
    loop's counts and the static estimate for the case's benchmark size."""
    rows = []
    for arch in archs:
        for launch in launches(arch):
            fn = launch["kernel"]
            name = launch.get("name") or (getattr(fn, "__name__", None) or fn.fn.__name__).removesuffix("_kernel")
            constexprs = launch["constexprs"]
            config = {k: v for k, v in constexprs.items()
                      if k.startswith(("BLOCK", "USE", "SPATIAL", "SILU", "VEC", "PATH")) and not callable(v)}
            config.update(kernel_function=getattr(fn, "__name__", None) or fn.fn.__name__)
            key = (fn, _freeze(launch["signature"]), _freeze(constexprs), launch["num_warps"], arch,
                   tuple(sorted(launch.get("divisible", ()))))
            cost = analyse(_compiled(key), launch["num_warps"], launch["items_per_iteration"], launch.get("inner_trips"))
            case = {k: (str(v).removeprefix("torch.") if isinstance(v, torch.dtype) else v)
                    for k, v in launch["case"].items()}
            rows.append(dict(kernel=name, **case, arch=f"sm_{arch}", num_warps=launch["num_warps"], **config,
                             **cost, estimate_us_h200=round(estimate_us(cost["loop_instructions_per_item"],
                                                                          launch["items"], launch["bytes"]), 1)))
    return rows


if __name__ == "__main__":
    # Run in a process of its own: under TRITON_INTERPRET=1 triton.language is patched for the
    # interpreter and cannot compile for a GPU.
    import json

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("run with TRITON_INTERPRET unset or 0: the interpreter cannot compile for a GPU")
    print(json.dumps(report()))
