"""Small shims so the agent runs on Python 3.10 (Ubuntu 22.04 / JetPack 6)."""

from __future__ import annotations

import sys

if sys.version_info >= (3, 11):
    import tomllib as tomllib
else:  # pragma: no cover - exercised on 3.10 devices
    import tomli as tomllib

__all__ = ["tomllib"]
