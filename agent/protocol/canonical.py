"""Canonical JSON: the exact bytes that get signed.

Sorted keys, no insignificant whitespace, UTF-8, no NaN/Infinity. Parsing and re-encoding
canonical bytes yields the same bytes, so a verifier never depends on how a file was written.
"""

from __future__ import annotations

import json
from typing import Any


def canonical_json(obj: Any) -> bytes:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")
