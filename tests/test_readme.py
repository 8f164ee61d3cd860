"""The README's examples cannot rot: its Python blocks run, its `moeplan ...` lines parse.

Every ```python fence is executed in order, in one namespace, with the repository root as the working
directory. Every command line of a ```bash fence that starts with `moeplan` (continuation lines joined,
comments stripped) must parse with the CLI's own argparse parser; make targets and other commands are
skipped.
"""

from __future__ import annotations

import re
import shlex

import pytest

from moeplan.cli import build_parser
from tests.conftest import ROOT

README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```", re.MULTILINE | re.DOTALL)


def blocks(language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(README.read_text(encoding="utf-8")) if lang == language]


def command_lines() -> list[str]:
    """`moeplan ...` commands of the bash blocks, with backslash continuations joined."""
    out = []
    for body in blocks("bash"):
        logical, pending = [], ""
        for line in body.splitlines():
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            logical.append(pending + line)
            pending = ""
        for line in logical:
            words = shlex.split(line, comments=True)
            if words and words[0] == "moeplan":
                out.append(line)
    return out


def test_readme_has_examples():
    assert len(blocks("python")) >= 3
    assert len(command_lines()) >= 8


def test_readme_python_blocks_run(monkeypatch):
    pytest.importorskip("scipy")
    monkeypatch.chdir(ROOT)
    namespace: dict = {"__name__": "__readme__"}
    for index, code in enumerate(blocks("python")):
        try:
            exec(compile(code, f"README.md python block {index + 1}", "exec"), namespace)
        except Exception as exc:  # name the block, not only the line
            raise AssertionError(f"README.md python block {index + 1} failed: {exc!r}\n{code}") from exc


@pytest.mark.parametrize("line", command_lines())
def test_readme_command_parses(line):
    parser, handlers = build_parser()
    words = shlex.split(line, comments=True)[1:]
    try:
        args = parser.parse_args(words)
    except SystemExit as exc:  # argparse exits on a bad command line
        raise AssertionError(f"README command does not parse: {line}") from exc
    assert args.command in handlers
