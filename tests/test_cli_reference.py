"""docs/cli.md, one table per installed command, is what the commands' own parsers say.

The tables are made from each console script's argparse parser (pyproject.toml ``[project.scripts]``),
so a flag added, renamed or given another default shows up as a difference here. After changing a
command: ``.venv/bin/python tests/test_cli_reference.py`` rewrites docs/cli.md.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import tomllib
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
REFERENCE = REPO / "docs" / "cli.md"


class _Captured(Exception):
    def __init__(self, parser: argparse.ArgumentParser) -> None:
        self.parser = parser


def _parser(target: str) -> argparse.ArgumentParser:
    """The parser a console script's ``main`` builds, caught at its first parse (nothing runs)."""
    module_name, attribute = target.split(":")
    main = importlib.import_module(module_name).main  # ``console`` wraps ``main``

    def capture(self, *args, **kwargs):
        raise _Captured(self)

    with mock.patch.object(argparse.ArgumentParser, "parse_known_args", capture):
        try:
            main([])
        except _Captured as caught:
            return caught.parser
    raise AssertionError(f"{target}: main() returned without parsing its command line")


def _cell(text: object) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _default(action: argparse.Action) -> str:
    if action.required:
        return "required"
    if action.default in (None, argparse.SUPPRESS, []) or isinstance(action, argparse._HelpAction):
        return "–"
    if isinstance(action.default, bool) or action.nargs == 0:
        return "on" if action.default else "off"
    if isinstance(action.default, (list, tuple)):
        return " ".join(str(v) for v in action.default)
    # Files shipped in the package: their path in the repository (installed, in site-packages).
    return f"`{str(action.default).replace(str(REPO) + '/', '')}`"


def reference() -> str:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    parts = [
        "# Command reference\n",
        "One table per installed command (`pip install .` or `make venv` puts them in `.venv/bin`), made from",
        "the commands' own parsers by `tests/test_cli_reference.py`, which also checks that this page is current.",
        "Every command also takes `--debug` (a traceback instead of the one-line error).\n",
    ]
    for name, target in scripts.items():
        parser = _parser(target)
        summary = (parser.description or "").strip().splitlines()[0] if parser.description else ""
        parts += [f"## `{name}`\n", f"{_cell(summary)} (`{target.split(':')[0]}`)\n", "| flag | default | meaning |"]
        parts.append("|---|---|---|")
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction) or not action.option_strings:
                continue
            flags = ", ".join(f"`{o}`" for o in action.option_strings)
            meaning = action.help or ""
            if action.choices is not None:
                meaning = f"{meaning}; one of {', '.join(str(c) for c in action.choices)}".lstrip("; ")
            parts.append(f"| {flags} | {_cell(_default(action))} | {_cell(meaning)} |")
        parts.append("")
    return "\n".join(parts)


def test_cli_reference_is_current():
    assert REFERENCE.read_text() == reference(), (
        "docs/cli.md differs from the commands' parsers: run `.venv/bin/python tests/test_cli_reference.py`"
    )


if __name__ == "__main__":
    REFERENCE.write_text(reference())
    print(f"wrote {REFERENCE}", file=sys.stderr)
