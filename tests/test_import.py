"""What the package needs at run time: torch and safetensors, never diffusers, triton optional."""

import subprocess
import sys
import textwrap


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=True).stdout


def test_import_and_run_without_triton_or_diffusers():
    out = _run(
        """
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("triton", "diffusers"):
                    raise ImportError(f"{name} is blocked for this test")
        sys.meta_path.insert(0, Block())
        import torch, vqfast
        m = vqfast.VQModel()
        with torch.no_grad():
            out = m(torch.randn(1, 3, 16, 16))
        print(out.sample.shape, "triton" in sys.modules, "diffusers" in sys.modules)
        """
    )
    assert out.strip() == "torch.Size([1, 3, 16, 16]) False False"


def test_public_names():
    import vqfast

    for name in ("VQModel", "VQEncoderOutput", "DecoderOutput", "VectorQuantizer"):
        assert hasattr(vqfast, name)
    import vqfast.kernels  # noqa: F401


def test_documented_names():
    """Every name the README documents imports from where it says."""
    import vqfast
    import vqfast.derived
    import vqfast.functional
    from vqfast import (  # noqa: F401
        DecoderOutput, VectorQuantizer, VQEncoderOutput, VQModel, backend_info, get_backend, patch,
        set_backend, unpatch,
    )
    from vqfast.functional import group_norm, nearest_code, quantize, spatial_norm  # noqa: F401

    assert vqfast.functional is vqfast.ops.functional and vqfast.derived is vqfast.ops.derived
    assert callable(vqfast.derived.clear)
    out = subprocess.run([sys.executable, "-m", "vqfast", "--help"], capture_output=True, text=True, check=True)
    assert "encode" in out.stdout and "decode" in out.stdout



def test_import_is_light():
    """`import vqfast` after `import torch` loads vqfast's own modules and nothing else: no
    torch._dynamo (about a second), no triton, no sympy. Counted in modules, not seconds. A CPU
    GroupNorm does not import triton either."""
    out = _run(
        """
        import sys, torch
        before = set(sys.modules)
        import vqfast
        new = sorted(set(sys.modules) - before)
        print(len(new)); print(" ".join(m for m in new if m.split(".")[0] != "vqfast"))
        from vqfast import functional as vf
        with torch.no_grad():
            vf.group_norm(torch.randn(1, 32, 8, 8), 8, activation="silu")
        print("triton" in sys.modules)
        """
    )
    count, foreign, triton_after_norm = (out.splitlines() + [""])[:3]
    assert foreign.strip() == "", f"import vqfast pulled in modules beyond its own: {foreign}"
    assert int(count) <= 30, f"import vqfast loaded {count} modules"
    # the automatic path on CPU never asks for the kernels: triton (~80 MiB resident) stays out
    assert triton_after_norm == "False"

# --- layout: three parts, one import direction -------------------------------------------------

import ast  # noqa: E402
from pathlib import Path  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
#: part -> the parts it may import (cli -> models -> ops -> kernels; skipping a layer is fine)
MAY_IMPORT = {"cli": {"cli", "models", "ops", "kernels"}, "models": {"models", "ops", "kernels"},
              "ops": {"ops", "kernels"}, "kernels": {"kernels"}}


def _part_files(part: str) -> list[Path]:
    folder = ROOT / "vqfast" / part
    bridge = [ROOT / "vqfast" / "diffusers.py"] if part == "models" else []  # imports as the models part does
    return sorted(folder.glob("*.py")) + bridge


def _vqfast_imports(path: Path, part: str) -> set[str]:
    """Absolute vqfast module names that the file imports (relative imports resolved)."""
    package = ["vqfast", part]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "vqfast"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module.split(".")[0] == "vqfast":
                # `from vqfast import models` and `from . import x` name modules in the import list
                found |= {f"{module}.{a.name}" for a in node.names} if module.count(".") < 2 else {module}
    return found


def test_three_parts_and_kernels():
    top = {p.name for p in (ROOT / "vqfast").glob("*.py")}
    # diffusers.py: the opt-in bridge for diffusers' pipelines, the one module that imports diffusers
    assert top == {"__init__.py", "__main__.py", "diffusers.py"}, f"vqfast/ holds only the package entry points, found {top}"
    for part in MAY_IMPORT:
        assert _part_files(part), f"{part} has no modules"


def test_one_import_direction():
    for part, allowed in MAY_IMPORT.items():
        for path in _part_files(part):
            for module in _vqfast_imports(path, part):
                parts = module.split(".")
                target = parts[1] if len(parts) > 1 else ""
                if target in MAY_IMPORT:
                    assert target in allowed, f"{path.relative_to(ROOT)} imports {module} ({part} -> {target})"
                elif part != "cli":  # only the command may use the package's top level (its version)
                    raise AssertionError(f"{path.relative_to(ROOT)} imports the package top level: {module}")


def test_kernels_never_import_the_compile_tooling():
    for path in _part_files("kernels"):
        if path.name == "aot.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "aot" and "aot" not in {a.name for a in node.names}, path.name
