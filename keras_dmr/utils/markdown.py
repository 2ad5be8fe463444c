"""Generated sections of Markdown pages: ``<!-- BEGIN name -->`` ... ``<!-- END name -->``."""

from __future__ import annotations

import re


def replace_section(text: str, name: str, content: str) -> str:
    """``text`` with the generated section ``name`` replaced by ``content``."""
    pattern = re.compile(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"no generated section {name!r} in the document")
    return pattern.sub(lambda m: m.group(1) + content + "\n" + m.group(2), text)
