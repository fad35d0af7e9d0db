"""The `graphprune` command line: `main` parses and dispatches; one module per command family."""

from graphprune.cli.main import main

__all__ = ["main"]
