"""Checks that the vector-ISA cap of `make test-avx2` took effect before its tests run: ATen's
kernels at AVX2 (ATEN_CPU_CAPABILITY), oneDNN's at AVX2 or below (ONEDNN_MAX_CPU_ISA: its verbose
output names the ISA it dispatches for), and MKL told the same (MKL_ENABLE_INSTRUCTIONS, which
MKL reads at its first call and does not report). Exit status 1, saying which, when one did not.
On a CPU without AVX2 ATen runs at its default level and the check says so."""

from __future__ import annotations

import os
import subprocess
import sys

EXPECTED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
PROBE = """
import torch
x = torch.randn(1, 8, 8, 8).contiguous(memory_format=torch.channels_last)
w = torch.randn(8, 8, 3, 3).contiguous(memory_format=torch.channels_last)
torch.ops.mkldnn._convolution_pointwise(x, w, None, [1, 1], [1, 1], [1, 1], 1, "none", [], None)
print("aten", torch.backends.cpu.get_cpu_capability())
"""


def main() -> int:
    problems = [f"{k}={os.environ.get(k)!r}, expected {v!r}" for k, v in EXPECTED.items() if os.environ.get(k) != v]
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         env=dict(os.environ, ONEDNN_VERBOSE="1"))
    text = out.stdout + out.stderr
    aten = next((line.split()[1] for line in text.splitlines() if line.startswith("aten ")), None)
    isa = next((line.rsplit("isa:", 1)[1] for line in text.splitlines() if ",isa:" in line), None)
    if aten != "AVX2":
        problems.append(f"ATen runs at {aten!r}, not AVX2")
    if isa is None or "512" in isa or "AMX" in isa:
        problems.append(f"oneDNN dispatches for {isa!r}, not AVX2 or below")
    for problem in problems:
        print(f"ISA cap not in effect: {problem}", file=sys.stderr)
    if not problems:
        print(f"ISA capped: ATen {aten}, oneDNN {isa}, MKL {os.environ['MKL_ENABLE_INSTRUCTIONS']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
