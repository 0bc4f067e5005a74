"""The ``vqfast`` command (also ``python -m vqfast``).

Each subcommand lives in its own module, which exposes ``register(subparsers, name)``: it adds
the parser for command ``name`` and sets ``run`` (a function taking the parsed arguments). Modules are imported only
for the command that runs, so ``vqfast bench`` never needs Pillow and ``vqfast demo`` never
needs pytest.

Every error ends as one line on stderr, ``vqfast COMMAND: error: ...``, naming the argument or
file, and an exit status: 2 for bad input or environment (arguments, files, models, a busy
output), 1 for a run that failed, 130 when interrupted (Ctrl-C) and 143 when terminated
(SIGTERM), with a line saying that rerunning the command resumes. ``--debug`` (anywhere on the
command line) also prints the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import signal
import sys
import traceback

from ..models.messages import one_line

#: command -> (module that implements it, one-line help)
COMMANDS = {
    "demo": ("vqfast.cli.demo", "encode and decode a bundled image with the embedded model"),
    "encode": ("vqfast.cli.tokens", "turn images (files or folders) into token ids"),
    "decode": ("vqfast.cli.tokens", "turn a token file back into images"),
    "train": ("vqfast.cli.train", "train the small embedded demo model (seeded, CPU)"),
    "bench": ("vqfast.cli.bench", "time vqfast against diffusers; markdown table + JSON"),
}

#: Commands whose finished work survives an interruption.
RESUMABLE = ("encode", "decode")
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_INTERRUPTED, EXIT_TERMINATED = 1, 2, 130, 143


class UsageError(Exception):
    """Bad input or environment, found before (or instead of) any compute: exit status 2."""


class RunFailed(Exception):
    """A run that started and could not finish: exit status 1."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that the same clean-up as Ctrl-C runs."""


def exit_status(error: BaseException) -> int:
    """The exit status of an error that reached the command's boundary (see the module docstring)."""
    if isinstance(error, RunFailed):
        return EXIT_FAILED
    if isinstance(error, (UsageError, ValueError, ImportError, json.JSONDecodeError, FileNotFoundError,
                          IsADirectoryError, NotADirectoryError, PermissionError, FileExistsError)):
        return EXIT_BAD_INPUT
    return EXIT_FAILED  # OSError (a full disk...), RuntimeError (out of memory...), anything else


def message(error: BaseException) -> str:
    """What the command prints of ``error``: one line (see vqfast.models.messages.one_line)."""
    text = str(error) or type(error).__name__
    if not isinstance(error, (UsageError, RunFailed, ValueError, FileNotFoundError)):
        text = f"{type(error).__name__}: {text}"
    return one_line(text)


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """The integer in environment variable ``name`` (``default`` when it is not set); UsageError
    naming the variable when it is set to anything else (an empty string included)."""
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        value = int(text.strip())
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise UsageError(f"the environment variable {name} must be an integer of at least {minimum}, "
                         f"got {one_line(repr(text), 80)}")
    return value


def _rank_label() -> str:
    """"[rank N] " for an error printed under a launcher with several ranks; never fails."""
    try:
        return f"[rank {env_int('RANK', 0)}] " if env_int("WORLD_SIZE", 1) > 1 else ""
    except UsageError:
        return ""


def _on_sigterm(signum, frame):
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = "--debug" in argv[:end]
    argv = [a for i, a in enumerate(argv) if i >= end or a != "--debug"]
    parser = argparse.ArgumentParser(prog="vqfast", description=__doc__.splitlines()[0],
                                     epilog="--debug (anywhere): print the traceback of an error too")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = next((a for a in argv if not a.startswith("-")), None)
    try:
        for name, (module, help_text) in COMMANDS.items():
            if name == chosen:
                importlib.import_module(module).register(sub, name)
            else:  # listed in --help without importing its module
                sub.add_parser(name, help=help_text, add_help=False)
    except ImportError as e:  # a command's optional dependency (Pillow, tqdm, ...) is missing
        print(f"vqfast {chosen}: error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_BAD_INPUT
    args = parser.parse_args(argv)  # argparse prints usage and exits 2 on its own
    installed, previous = False, None
    try:
        previous, installed = signal.signal(signal.SIGTERM, _on_sigterm), True
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return args.run(args) or 0
    except KeyboardInterrupt as e:
        if debug:
            traceback.print_exc()
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        resume = "; finished work is kept: rerun the same command to resume" if args.command in RESUMABLE else ""
        print(f"vqfast {args.command}: {what}{resume}", file=sys.stderr)
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            traceback.print_exc()
        hint = "" if debug else " (--debug shows the traceback)"
        status = exit_status(e)
        print(f"vqfast {args.command}: {_rank_label()}error: {message(e)}{hint if status == EXIT_FAILED else ''}",
              file=sys.stderr)
        return status
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
