"""The ``onnxprune`` command line: one module per subcommand, each with ``register(subparsers)``."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import re
import sys

from ..errors import OnnxPruneError, VerificationError
from . import options

COMMANDS = ["inspect", "prune", "eval", "bench", "sensitivity", "sparsify", "share", "finetune", "quantize"]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The argument parser; ``only``: register that command alone (its module alone is imported)."""
    parser = Parser(
        prog="onnxprune",
        description="Prune ONNX models from any exporter: structured channel pruning that really shrinks "
                    "tensors, verified in onnxruntime against the masked original.",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in [only] if only in COMMANDS else COMMANDS:
        try:
            module = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name == f"{__name__}.{name}":
                continue
            raise
        module.register(sub)
    for p in sub.choices.values():  # help is read in a terminal: module docstrings lose their reST markup
        p.description = plain(p.description)
        for action in p._actions:
            action.help = plain(action.help)
    parser.commands = sub.choices
    return parser


def plain(text: str | None) -> str | None:
    """reST markup as plain text: ``code`` and :role:`name` lose their quotes, a literal block's ``::`` is ``:``."""
    if not text:
        return text
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", text)
    text = text.replace("``", "")
    return re.sub(r"(\S)::(\s*\n)", r"\1:\2", text)


def version_line() -> str:
    import numpy
    import onnx

    from .. import __version__, runtime
    return (f"onnxprune {__version__} (onnx {onnx.__version__}, onnxruntime {runtime.version()}, "
            f"numpy {numpy.__version__})")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit 2) instead of usage dumps."""

    def error(self, message: str):  # noqa: D401
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command)  # `onnxprune prune ...` does not import the other commands
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help(sys.stderr)
        return 2
    debug = args.debug or os.environ.get("ONNXPRUNE_DEBUG") == "1"
    try:
        options.check_paths(parser.commands[args.command], args)
        with _runtime(args):
            rc = args.func(args)
        return 0 if rc is None else int(rc)
    except OnnxPruneError as e:
        if debug:
            raise
        print(f"onnxprune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except VerificationError as e:
        if debug:
            raise
        print(f"onnxprune {args.command}: verification failed (a bug in onnxprune, please report it): {e}",
              file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _runtime(args: argparse.Namespace):
    """The runtime flags' target, current for the whole command (see :mod:`onnxprune.runtime`)."""
    if not hasattr(args, "provider"):
        return contextlib.nullcontext()
    from .. import runtime
    from .options import target_from

    return runtime.use(target_from(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
