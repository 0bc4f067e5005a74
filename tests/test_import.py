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
    import vqfast.kernels  # noqa: F401  (ships from the top-level kernels/ folder)
