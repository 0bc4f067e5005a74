"""One place decides the path of each fused op; the choice is observable and never silent."""

import os

import pytest
import torch

import vqfast
from vqfast.ops import dispatch
from vqfast import kernels


@pytest.fixture(autouse=True)
def clean(monkeypatch):
    monkeypatch.delenv("VQFAST_BACKEND", raising=False)
    vqfast.set_backend(None)
    yield
    vqfast.set_backend(None)


def test_auto_takes_triton_for_cuda_and_eager_for_cpu():
    assert vqfast.get_backend() == "auto"
    ops = ("nearest_code", "quantize", "group_norm", "spatial_norm")
    from vqfast.ops import search_cpu

    search = "eager (compiled search for float32)" if search_cpu.library() is not None else "eager"
    assert vqfast.backend_info("cpu") == {**dict.fromkeys(ops, "eager"), "nearest_code": search, "quantize": search}
    assert vqfast.backend_info("cuda") == dict.fromkeys(ops, "triton")


def test_auto_falls_back_to_eager_only_when_triton_cannot_import(monkeypatch):
    monkeypatch.setattr(dispatch, "triton_problem", lambda: "ImportError: no triton")
    assert vqfast.backend_info("cuda")["quantize"] == "eager"
    vqfast.set_backend("triton")
    with pytest.raises(RuntimeError, match="'triton' backend is forced but the kernels cannot be imported .*no triton"):
        vqfast.backend_info("cuda")


def test_forcing_eager_and_triton(device):
    vqfast.set_backend("eager")
    assert vqfast.backend_info("cuda")["quantize"] == "eager"
    vqfast.set_backend("triton")
    assert set(vqfast.backend_info("cuda").values()) == {"triton"}
    if kernels.INTERPRETED:  # the CPU suite runs the kernels in the interpreter, on CPU tensors
        assert set(vqfast.backend_info("cpu").values()) == {"triton"}
    else:  # compiled: CPU tensors are refused by name (a GPU run, or TRITON_INTERPRET=0 on CPU)
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            vqfast.backend_info("cpu")
    assert kernels.INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")


def test_forced_triton_on_cpu_without_the_interpreter_raises(monkeypatch):
    monkeypatch.setattr(kernels, "INTERPRETED", False)
    vqfast.set_backend("triton")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        vqfast.backend_info("cpu")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        vqfast.functional.nearest_code(torch.randn(3, 4), torch.randn(5, 4))
    with pytest.raises(RuntimeError, match="cannot run|Triton runs on CUDA"):
        vqfast.backend_info("meta")


def test_environment_variable(monkeypatch):
    monkeypatch.setenv("VQFAST_BACKEND", "eager")
    assert vqfast.get_backend() == "eager" and vqfast.backend_info("cuda")["quantize"] == "eager"
    vqfast.set_backend("auto")  # the call wins over the variable
    assert vqfast.backend_info("cuda")["quantize"] == "triton"
    vqfast.set_backend(None)
    monkeypatch.setenv("VQFAST_BACKEND", "fast")
    with pytest.raises(ValueError, match=r"VQFAST_BACKEND must be one of \['auto', 'triton', 'eager'\], got 'fast'"):
        vqfast.get_backend()


def test_set_backend_refuses_unknown_names():
    with pytest.raises(ValueError, match=r"backend must be one of \['auto', 'triton', 'eager'\] or None, got 'cuda'"):
        vqfast.set_backend("cuda")
