"""MkDocs hook: the docstrings' reStructuredText roles (``:math:`...```, ``:func:`...```) read as
plain code in the rendered pages (mkdocstrings renders docstrings as Markdown)."""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:math|func|class|meth|mod|attr):(?=<code>)")


def on_page_content(html: str, **_: Any) -> str:
    """Drop the role names in front of the code spans they mark."""
    return _ROLE.sub("", html)
