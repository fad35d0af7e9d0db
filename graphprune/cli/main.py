"""The `graphprune` command: parses, dispatches to one module per command family.

Every failure is one line on stderr and exit status 2; status 0 means the promised file was written
(and verified, unless --no-verify was given).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

import graphprune
from graphprune.cli import criteria as cli_criteria
from graphprune.cli import demo, model
from graphprune.cli import methods as cli_methods
from graphprune.cli import train as cli_train
from graphprune.cli.arguments import HelpFormatter
from graphprune.cli.console import console
from graphprune.errors import GraphPruneError

# Modules that only an extra installs, and what to install for them.
OPTIONAL_MODULES = {
    **dict.fromkeys(("torch", "torchvision", "onnx2torch", "onnxscript"), "graphprune[torch]"),
    "onnxruntime": "graphprune[cpu] (or graphprune[gpu])",
}


def build_parser() -> argparse.ArgumentParser:
    """The parser of every command; each shows its options' meaning and defaults in --help."""
    parser = argparse.ArgumentParser(
        prog="graphprune",
        formatter_class=HelpFormatter,
        description="Exact structured channel pruning of ONNX CNN graphs, verified against the masked "
        "reference. Every command below has its own --help.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    parser.add_argument("--version", action="version", version=f"graphprune {graphprune.__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", title="commands")
    for family in (model, cli_criteria, cli_train, cli_methods, demo):
        family.register(sub)
    for action in sub._choices_actions:
        command = sub.choices[action.dest]
        command.formatter_class = HelpFormatter
        command.description = command.description or action.help
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )
    handler: Callable[[argparse.Namespace], int] = args.func
    threads = getattr(args, "threads", None)
    if threads is not None and threads < 1:
        console.print(f"graphprune: error: --threads must be at least 1, got {threads}.", markup=False)
        return 2
    try:
        return handler(args)
    except GraphPruneError as exc:
        console.print(f"graphprune: error: {' '.join(str(exc).split())}", markup=False, soft_wrap=True)
        return 2
    except Exception as exc:
        extra = OPTIONAL_MODULES.get((getattr(exc, "name", None) or "").partition(".")[0])
        if isinstance(exc, ModuleNotFoundError) and extra is not None:
            console.print(
                f"graphprune: error: graphprune {args.command} needs {exc.name}, which is not installed; "
                f"install {extra}.",
                markup=False,
                soft_wrap=True,
            )
            return 2
        if args.verbose:
            raise
        console.print(
            f"graphprune: internal error: {type(exc).__name__}: {' '.join(str(exc).split())} "
            "(rerun with -v for the traceback, and please report it)",
            markup=False,
            soft_wrap=True,
        )
        return 3
    except KeyboardInterrupt:
        console.print("graphprune: interrupted; nothing was written.")
        return 130
