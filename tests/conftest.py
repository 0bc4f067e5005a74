"""Shared fixtures: scaled-down versions of the real checkpoints' configs and paired models."""

from __future__ import annotations

import os

# Kernels run on CPU tensors through Triton's interpreter, which triton.jit picks when the
# variable is set before the kernels are imported. A GPU run sets TRITON_INTERPRET=0.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import vqfast  # noqa: E402


def _interpreted_scalars_index_as_triton_37_does() -> None:
    """Triton 3.6's interpreter turns a runtime scalar (a loop bound such as K - K % BLOCK_K) into
    a Python int with int() of a one-element array, which numpy 2.4 refuses ("only 0-dimensional
    arrays can be converted to Python scalars"); triton 3.7 and later squeeze it first. The same
    squeeze here, for the interpreter only: compiled kernels never take this path, and users'
    numpy stays unpinned."""
    try:
        from triton.runtime import interpreter
    except ImportError:  # no triton: the eager path only
        return
    patch = interpreter._patch_lang_tensor

    def patch_with_squeeze(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    interpreter._patch_lang_tensor = patch_with_squeeze


_interpreted_scalars_index_as_triton_37_does()


def _nested_jit_calls_keep_the_grids_patch() -> None:
    """Triton's interpreter (3.6 to 3.9 alike) patches triton.language once per grid run, and
    then again on every call of a nested @triton.jit helper, though the modules it patches are
    the ones the grid run already patched: 2-3 ms a call, 40% of an interpreted model forward
    (60 s of 145 s in test_layout's Triton case). Inside a grid run, a helper whose language
    modules the run already patched skips that repeat; anything else is patched as before."""
    try:
        import inspect

        from triton.runtime import interpreter
    except ImportError:
        return
    patch_lang, grid_call = interpreter._patch_lang, interpreter.GridExecutor.__call__
    patched: list = []  # per grid run in flight: the language modules it patched (None: not yet)

    def langs(fn):
        return {id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v.__name__.startswith("triton.language")}

    def patch_once(fn):
        if patched and patched[-1] is None:  # the grid run's own patch
            patched[-1] = langs(fn)
        elif patched and langs(fn) <= patched[-1]:
            return interpreter._LangPatchScope()  # nothing set, nothing to restore
        return patch_lang(fn)

    def grid_run(self, *args, **kwargs):
        patched.append(None)
        try:
            return grid_call(self, *args, **kwargs)
        finally:
            patched.pop()

    interpreter._patch_lang = patch_once
    interpreter.GridExecutor.__call__ = grid_run


_nested_jit_calls_keep_the_grids_patch()

#: Where tests put their tensors (take it from the ``device`` fixture): the GPU when there is one
#: and the kernels are compiled, else the CPU.
INTERPRETED = os.environ["TRITON_INTERPRET"] == "1"
DEVICE = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
#: Whether the Triton kernels can run here: interpreted on CPU tensors, or compiled on a GPU.
KERNELS_RUN = INTERPRETED or DEVICE == "cuda"
NO_GPU = ("needs a CUDA GPU: with TRITON_INTERPRET=0 the kernels are compiled, and compiled kernels "
          "run on CUDA tensors only (TRITON_INTERPRET=1 runs them on CPU)")


@pytest.fixture
def device() -> str:
    """The device a test's tensors and models go to (DEVICE)."""
    return DEVICE


def use_triton() -> None:
    """Force the Triton path, or skip the test where the kernels cannot run (NO_GPU)."""
    if not KERNELS_RUN:
        pytest.skip(NO_GPU)
    vqfast.set_backend("triton")


@pytest.fixture
def triton_backend():
    """The Triton path for one test (skipped where the kernels cannot run)."""
    use_triton()
    yield
    vqfast.set_backend(None)


@pytest.fixture(autouse=True)
def one_thread_count_per_test(monkeypatch):
    """The eager forward's thread policy (vqfast/models/threads.py) may change the thread count
    between two forwards on a busy machine, and another count may sum in another order: tests
    that compare two forwards bit for bit would then depend on the machine's load. In tests every
    forward keeps the count it is given; tests/models/test_threads.py tests the policy itself."""
    import contextlib

    import vqfast.models.model as model_module

    monkeypatch.setattr(model_module, "FAIR_THREADS", contextlib.nullcontext)


@pytest.fixture
def poisoned_allocations(monkeypatch):
    """Canaries: every torch.empty / torch.empty_like made while the test runs starts filled with
    a sentinel (NaN, or -2^30 for integers), so an output element the op never writes shows."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def poison(t):
        return t.fill_(float("nan") if t.is_floating_point() else -(2**30))

    monkeypatch.setattr(torch, "empty", lambda *a, **k: poison(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: poison(real_empty_like(*a, **k)))


@pytest.fixture(params=["eager", "triton"])
def backend(request):
    """Run a test once on each path of the fused ops (the Triton one skipped where the kernels
    cannot run)."""
    if request.param == "triton":
        use_triton()
    else:
        vqfast.set_backend(request.param)
    yield request.param
    vqfast.set_backend(None)

# Scaled-down configs covering the real checkpoints (the full ones live in bench/configs).
CONFIGS = {
    # Kandinsky 2.2 MoVQ: SpatialNorm decoder, attention blocks, K=16384, D=4, f8.
    "movq": dict(
        block_out_channels=(32, 64, 64, 96),
        down_block_types=("DownEncoderBlock2D",) * 3 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 3,
        in_channels=3, out_channels=3, latent_channels=4, vq_embed_dim=4, layers_per_block=2,
        norm_num_groups=32, norm_type="spatial", num_vq_embeddings=16384, sample_size=32,
    ),
    # aMUSEd VQ-GAN: token-id decode, no mid-block attention, K=8192, D=64, f16.
    "amused": dict(
        block_out_channels=(32, 32, 64, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 5,
        up_block_types=("UpDecoderBlock2D",) * 5,
        latent_channels=64, layers_per_block=1, norm_num_groups=8, num_vq_embeddings=8192,
        lookup_from_codebook=True, mid_block_add_attention=False, force_upcast=True,
    ),
    # CompVis LDM VQ-f4: K=8192, D=3, f4, quantizes on every decode.
    "ldm_f4": dict(
        block_out_channels=(32, 48, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=3, layers_per_block=2, norm_num_groups=16, num_vq_embeddings=8192, sample_size=256,
    ),
    "default": dict(),
}


def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Give every parameter a non-trivial value (norm affines away from 1/0, a spread-out codebook
    like a trained one), so that parity tests exercise every weight."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "embedding" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / max(1, p[0].numel()) ** 0.5))
    return model


@pytest.fixture(params=sorted(CONFIGS))
def config_name(request):
    return request.param


def make_ours(name: str, seed: int = 0, **changes):
    """A vqfast model of a test config with randomized weights, in eval mode (no diffusers: the
    GPU machine may not have it)."""
    return randomize(vqfast.VQModel(**{**CONFIGS[name], **changes}), seed).eval()


def make_pair(name: str, seed: int = 0, **changes):
    """(diffusers model, vqfast model) with identical weights, both in eval mode; ``changes``
    override entries of the config."""
    import diffusers

    import vqfast

    config = {**CONFIGS[name], **changes}
    theirs = randomize(diffusers.VQModel(**config), seed).eval()
    ours = vqfast.VQModel(**config)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours.eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|: the parity metric of the issue tracker."""
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def images(batch: int, size: int = 32, seed: int = 1, channels: int = 3) -> torch.Tensor:
    return torch.randn(batch, channels, size, size, generator=torch.Generator().manual_seed(seed))
