"""Run inside the bare environment (see bare_install.py): the README's API calls and commands,
with nothing but vqfast's runtime dependencies installed. Fails on any error or warning."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

warnings.simplefilter("error")  # torch's "Failed to initialize NumPy" is a UserWarning

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import vqfast  # noqa: E402

assert "site-packages" in vqfast.__file__, f"not the installed package: {vqfast.__file__}"
TINY = dict(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=4, layers_per_block=1,
            latent_channels=4, num_vq_embeddings=64)
NOISY = ("warning", "numpy", "traceback")


def command(*args: object, processes: int = 1) -> str:
    launcher = [sys.executable]
    if processes > 1:
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    done = subprocess.run([*launcher, "-m", "vqfast", *map(str, args)], capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, f"vqfast {args[0]} exited {done.returncode}:\n{output}"
    noisy = [line for line in done.stderr.splitlines() if any(w in line.lower() for w in NOISY)]
    assert not noisy, f"vqfast {args[0]} printed:\n" + "\n".join(noisy)
    print(f"ok: {'torchrun x%d ' % processes if processes > 1 else ''}vqfast {args[0]}", flush=True)
    return output


def main() -> None:
    work = Path.cwd()
    torch.manual_seed(0)
    model = vqfast.VQModel.from_config(TINY)
    model.save_pretrained(work / "model")  # safetensors' save_file
    again = vqfast.VQModel.from_pretrained(work / "model")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    print("ok: save_pretrained / from_pretrained", flush=True)

    images = work / "images"
    images.mkdir()
    for i in range(5):
        g = torch.Generator().manual_seed(i)
        pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8, generator=g)
        Image.frombytes("RGB", (16, 16), bytes(pixels.flatten().tolist())).save(images / f"img{i}.png")

    command("encode", images, "--model", work / "model", "-o", work / "one" / "t.safetensors", "--batch-size", 2)
    command("decode", work / "one" / "t.safetensors", "--model", work / "model", "-o", work / "one" / "png")
    command("encode", images, "--model", work / "model", "-o", work / "two" / "t.safetensors", "--batch-size", 2,
            processes=2)
    assert (work / "two" / "t.safetensors").read_bytes() == (work / "one" / "t.safetensors").read_bytes()
    print("ok: two processes wrote the same bytes as one", flush=True)
    command("demo", "--out", work / "demo.png")
    assert (work / "demo.png").stat().st_size > 0


if __name__ == "__main__":
    main()
    print("bare-install: 6 passed, 0 failed")  # save/load, encode, decode, torchrun encode, same bytes, demo
