"""A real checkpoint's encode or decode (MoVQ, aMUSEd or LDM-f4; 256x256, batch 1, fp32 or bf16) by vqfast,
compiled vqfast, diffusers and compiled diffusers, alternating in one process: the four see the same
machine state in every round, which separate processes (``vqfast bench``) do not on a shared CPU.

    python bench/side_by_side.py decode --rounds 5     # writes bench/results/side-by-side-<date>-decode.json
    python bench/side_by_side.py encode --dtype bfloat16   # ...-encode-bfloat16.json
    python bench/side_by_side.py encode --config amused --busy 1   # ...-amused-encode-busy1.json

``--busy N`` starts N processes that spin on a core each (as a data loader or another job would)
before the models are built, and ends them when the run ends: the CPU a user of a shared machine
has. aMUSEd's decode quantizes its latents first (its decoder takes token ids), the others decode
the latents as given.

Each round runs the four once, starting from a different one each round (so no variant always
follows the same one: what the previous call freed changes what the next one's allocations
cost). A ratio is the median over rounds of the two variants' times in that round, which cancels
the machine's drift across rounds; the quartiles of those per-round ratios show the spread.
Prints each variant's error against diffusers and its median time, and the ratios; the JSON keeps
every run's time with the machine, versions and date.
"""

import argparse
import json
import statistics
import subprocess
import time
from pathlib import Path

import diffusers
import torch

import vqfast
from vqfast.cli.bench import busy_processes, environment, real_config

PAIRS = [("vqfast", "diffusers"), ("vqfast", "diffusers-compile"), ("vqfast-compile", "vqfast"),
         ("vqfast-compile", "diffusers-compile")]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=["encode", "decode"])
    p.add_argument("--config", choices=["movq", "amused", "ldm_f4"], default="movq")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--busy", type=int, default=0, metavar="N", help="competing busy processes (default 0)")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = p.parse_args()
    with busy_processes(args.busy):
        run(args)


def run(args: argparse.Namespace) -> None:
    torch.manual_seed(0)
    cfg = real_config(args.config)
    dtype = getattr(torch, args.dtype)
    ours = vqfast.VQModel(**cfg).eval()
    theirs = diffusers.VQModel(**cfg).eval()
    theirs.load_state_dict(ours.state_dict())
    ours, theirs = ours.to(dtype), theirs.to(dtype)
    f = 2 ** (len(cfg["block_out_channels"]) - 1)
    latent = cfg.get("vq_embed_dim") or cfg["latent_channels"]
    h, x = torch.randn(1, latent, 256 // f, 256 // f).to(dtype), (torch.rand(1, 3, 256, 256) * 2 - 1).to(dtype)
    if args.kind == "decode":
        as_given = not cfg.get("lookup_from_codebook", False)
        call = lambda m: lambda: m.decode(h, force_not_quantize=as_given).sample  # noqa: E731
    else:
        call = lambda m: lambda: m.encode(x).latents  # noqa: E731
    fns = {"vqfast": call(ours), "vqfast-compile": torch.compile(call(ours)),
           "diffusers": call(theirs), "diffusers-compile": torch.compile(call(theirs))}
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.no_grad():
        outs = {k: f() for k, f in fns.items()}  # compiles the compiled two
        ref = outs["diffusers"]
        errors = {k: ((o.float() - ref.float()).abs().max() / ref.float().abs().max()).item() for k, o in outs.items()}
        for f in fns.values():  # a warm round: first calls after compiling
            f()
        order = list(fns)
        for r in range(args.rounds):
            for k in order[r % 4:] + order[: r % 4]:
                t = time.perf_counter()
                fns[k]()
                times[k].append(time.perf_counter() - t)
    median = {k: statistics.median(v) for k, v in times.items()}
    for k in fns:
        runs = " ".join(f"{t:.2f}" for t in times[k])
        print(f"{args.kind} {k}: {median[k]:.3f} s (runs {runs}), error vs diffusers {errors[k]:.1e}")
    ratios, quartiles = {}, {}
    for a, b in PAIRS:
        per_round = [tb / ta for ta, tb in zip(times[a], times[b])]
        ratios[f"{a} vs {b}"] = statistics.median(per_round)
        quartiles[f"{a} vs {b}"] = statistics.quantiles(per_round, n=4)[::2] if len(per_round) > 1 else per_round * 2
    for name, r in ratios.items():
        q = quartiles[name]
        print(f"{args.kind} {name}: {r:.2f}x (per-round quartiles {q[0]:.2f}x to {q[1]:.2f}x)")
    env = environment("cpu")
    try:  # which code ran: results outlive the code that made them
        env["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                       cwd=Path(__file__).parent).stdout.strip() or None
    except OSError:
        env["commit"] = None
    args.out.mkdir(parents=True, exist_ok=True)
    config = "" if args.config == "movq" else f"-{args.config}"
    suffix = ("" if args.dtype == "float32" else f"-{args.dtype}") + (f"-busy{args.busy}" if args.busy else "")
    path = args.out / f"side-by-side-{env['date'][:10]}{config}-{args.kind}{suffix}.json"
    path.write_text(json.dumps({**env, "kind": args.kind, "case": f"{args.config} batch 1 256x256 {args.dtype}",
                                "busy_processes": args.busy, "times_s": times, "errors_vs_diffusers": errors,
                                "ratios": ratios, "ratio_quartiles": quartiles, "order": "rotated each round"},
                               indent=1))
    print("wrote", path)


if __name__ == "__main__":
    main()
