"""``docs/cli.md``, generated from the parser: ``python -m tools.cli_reference``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from keras_dmr.cli import COMMANDS, PROG, make_parser


def render(width: int = 100) -> str:
    """The page; argparse wraps help to ``width`` columns (fixed, so the page does not depend on
    the terminal it is generated in)."""
    previous = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = str(width)
    try:
        return _render()
    finally:
        if previous is None:
            del os.environ["COLUMNS"]
        else:
            os.environ["COLUMNS"] = previous


def _render() -> str:
    parser = make_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    parts = [
        "# Command line",
        "",
        f"Generated from `{PROG} --help` by `python -m tools.cli_reference`; a test keeps it "
        "current. Argument mistakes exit with code 2 and one `keras-dmr: error: ...` line.",
        "",
        "```text",
        parser.format_help().rstrip(),
        "```",
    ]
    for command in COMMANDS:
        parts += [
            "",
            f"## {PROG} {command.name}",
            "",
            "```text",
            sub.choices[command.name].format_help().rstrip(),
            "```",
        ]
    return "\n".join(parts) + "\n"


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/cli.md")
    target.write_text(render())
    print(f"wrote {target}")
