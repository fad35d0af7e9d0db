"""The README's examples run as shown: its CLI session, its Python snippet and its command table.

Only blocks preceded by a `<!-- readme-test: NAME -->` marker are read, so other sections can change
freely. Shown output lines must appear in the real output token for token, except what depends on the
machine (durations such as "0.16 s" and rounding errors such as "7.5e-07"); a line ending in "..."
is a prefix.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
from pathlib import Path

import pytest

from graphprune.cli.main import build_parser, main
from graphprune.report.tables import fmt_count

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
REFERENCE = ROOT / "graphprune" / "zoo" / "weights" / "resnet20_fmnist.onnx"
SCIENTIFIC = re.compile(r"\d(\.\d+)?e[-+]\d+")
NUMBER = re.compile(r"\d+(\.\d+)?")


def marked(name: str) -> str:
    """The text after the `readme-test: name` marker: the fenced block's body, or up to a blank line."""
    found = re.search(
        rf"<!-- readme-test: {name} -->\n(```\w*\n(?P<fenced>.*?)```|(?P<plain>.*?)\n\n)", README, re.S
    )
    assert found, f"README.md has no block marked readme-test: {name}"
    return found["fenced"] if found["fenced"] is not None else found["plain"]


def sessions(text: str) -> list[tuple[str, list[str]]]:
    """(`$ ` command, the output lines shown under it) pairs of a shell transcript."""
    result: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        if line.startswith("$ "):
            result.append((line[2:], []))
        elif line.strip():
            result[-1][1].append(line)
    return result


def _machine_dependent(tokens: list[str], index: int) -> bool:
    token = tokens[index]
    duration = NUMBER.fullmatch(token) and tokens[index + 1 : index + 2] == ["s"]
    return bool(duration or SCIENTIFIC.fullmatch(token))


def shown_in(shown: str, output: list[str]) -> bool:
    """Whether the README line `shown` is one of the `output` lines (see the module docstring)."""
    tokens = shown.split()
    prefix = tokens[-1] == "..."
    if prefix:
        tokens = tokens[:-1]
    for line in output:
        got = line.split()
        if prefix:
            got = got[: len(tokens)]
        if len(got) == len(tokens) and all(
            a == b or _machine_dependent(tokens, i) for i, (a, b) in enumerate(zip(tokens, got, strict=True))
        ):
            return True
    return False


def run_cli(command: str) -> list[str]:
    """Run a `graphprune ...` line in-process; arguments naming files of the repository are read there."""
    program, *args = shlex.split(command)
    assert program == "graphprune"
    args = [str(ROOT / arg) if (ROOT / arg).is_file() else arg for arg in args]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        assert main(args) == 0, err.getvalue()
    return (out.getvalue() + err.getvalue()).splitlines()


def test_cli_session_prints_what_the_readme_shows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    transcript = sessions(marked("cli"))
    assert any(command.split()[1] == "prune" for command, _ in transcript)
    for command, shown in transcript:
        output = run_cli(command)
        missing = [line for line in shown if not shown_in(line, output)]
        assert not missing, f"{command}: README lines not in the output {output}"
        words = shlex.split(command)
        written = [words[i + 1] for i, word in enumerate(words[:-1]) if word == "-o"]
        assert all((tmp_path / name).is_file() for name in written), f"{command} wrote no {written}"


def test_python_snippet_runs_and_matches_the_cli_figures(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.chdir(tmp_path)
    shutil.copy(REFERENCE, "model.onnx")
    exec(compile(marked("python"), "README.md", "exec"), {})
    before, after, error = map(float, capsys.readouterr().out.split())
    table = {line.split()[0]: line.split()[1:3] for _, shown in sessions(marked("cli")) for line in shown}
    assert [fmt_count(before).split(), fmt_count(after).split()] == [table["before"], table["after"]]
    assert 0 <= error < 1e-4
    assert {"model-pruned.onnx", "model-pruned.plan.json"} <= {path.name for path in tmp_path.iterdir()}


def test_command_table_names_existing_commands_and_options() -> None:
    subcommands = build_parser()._subparsers._group_actions[0].choices  # noqa: SLF001 - argparse has no public API
    rows = [line for line in marked("commands").splitlines() if line.startswith("| `graphprune ")]
    assert len(rows) >= 10
    for row in rows:
        name = re.match(r"\| `graphprune ([\w-]+)", row)[1]
        assert name in subcommands, f"README names a command graphprune {name} that does not exist"
        options = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", row))
        unknown = options - set(subcommands[name]._option_string_actions)  # noqa: SLF001
        assert not unknown, f"README names options of graphprune {name} that it lacks: {sorted(unknown)}"
