"""CPU benchmarks: vqfast's eager path against diffusers in the same run.

Run with ``make bench`` (pytest-benchmark). Each case records the peak memory it adds in
``extra_info``; compare the groups' means for the speed-up.
"""

import pytest
import torch
from conftest import peak_rss_growth_mib, real_config

diffusers = pytest.importorskip("diffusers", reason="the comparison needs diffusers (the test extra)")
import vqfast  # noqa: E402

QUANTIZE_SETUP = """
import torch
from diffusers.models.autoencoders.vae import VectorQuantizer as Theirs
import vqfast
torch.manual_seed(0)
theirs = Theirs({K}, {D}, beta=0.25)
theirs.embedding.weight.data.normal_()
ours = vqfast.VectorQuantizer({K}, {D}, beta=0.25)
ours.load_state_dict(theirs.state_dict())
z = torch.randn({B}, {D}, {H}, {H})
torch.set_grad_enabled(False)
"""

# (K, D, batch, side): MoVQ's codebook with N = 4096 and 65536 latent vectors (16 images at 512x512).
QUANTIZE_CASES = {"movq-N4096": (16384, 4, 4, 32), "movq-N65536": (16384, 4, 16, 64), "ldm_f4-N65536": (8192, 3, 16, 64)}


@pytest.mark.parametrize("impl", ["diffusers", "vqfast"])
@pytest.mark.parametrize("case", sorted(QUANTIZE_CASES))
def test_quantize(benchmark, case, impl):
    K, D, B, H = QUANTIZE_CASES[case]
    setup = QUANTIZE_SETUP.format(K=K, D=D, B=B, H=H)
    scope: dict = {}
    exec(setup, scope)
    model = scope["theirs" if impl == "diffusers" else "ours"]
    benchmark.group = f"quantize {case}"
    benchmark.extra_info["peak_mib"] = peak_rss_growth_mib(setup, f"{'theirs' if impl == 'diffusers' else 'ours'}(z)")
    benchmark.pedantic(model, args=(scope["z"],), rounds=3, iterations=1, warmup_rounds=1)


DECODE_CASES = {"movq-256": ("kandinsky-2-2-movq", 256), "ldm_f4-256": ("ldm-vq-f4", 256), "amused-256": ("amused-vqvae", 256)}


@pytest.mark.parametrize("impl", ["diffusers", "vqfast"])
@pytest.mark.parametrize("case", sorted(DECODE_CASES))
def test_decode(benchmark, case, impl):
    name, side = DECODE_CASES[case]
    config = real_config(name)
    torch.manual_seed(0)
    model = (diffusers.VQModel if impl == "diffusers" else vqfast.VQModel)(**config).eval()
    f = 2 ** (len(config["block_out_channels"]) - 1)
    D = config.get("vq_embed_dim") or config["latent_channels"]
    h = torch.randn(1, D, side // f, side // f)
    benchmark.group = f"decode {case} batch 1 fp32"

    def run():
        with torch.no_grad():
            return model.decode(h).sample

    benchmark.pedantic(run, rounds=3, iterations=1, warmup_rounds=1)
