"""Escaping for the self-contained HTML pages with inline SVG: the builder's compression report
and the fleet report. Shared core beside clikit: the builder and the fleet may import it (they
may not import each other), and it is stdlib only so the agent carries it at no cost."""

from __future__ import annotations

import html
from typing import Any


def esc(value: Any) -> str:
    """``str(value)`` safe as HTML/SVG text and as a double- or single-quoted attribute value."""
    return html.escape(str(value), quote=True)
