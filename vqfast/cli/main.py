"""The ``vqfast`` command (also ``python -m vqfast``).

Each subcommand lives in its own module, which exposes ``register(subparsers, name)``: it adds
the parser for command ``name`` and sets ``run`` (a function taking the parsed arguments). Modules are imported only
for the command that runs, so ``vqfast bench`` never needs Pillow and ``vqfast demo`` never
needs pytest.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: command -> (module that implements it, one-line help)
COMMANDS = {
    "demo": ("vqfast.cli.demo", "encode and decode a bundled image with the embedded model"),
    "encode": ("vqfast.cli.tokens", "turn images (files or folders) into token ids"),
    "decode": ("vqfast.cli.tokens", "turn a token file back into images"),
    "train": ("vqfast.cli.train", "train the small embedded demo model (seeded, CPU)"),
    "bench": ("vqfast.cli.bench", "time vqfast against diffusers; markdown table + JSON"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="vqfast", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        if name == chosen:
            importlib.import_module(module).register(sub, name)
        else:  # listed in --help without importing its module
            sub.add_parser(name, help=help_text, add_help=False)
    args = parser.parse_args(argv)
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
