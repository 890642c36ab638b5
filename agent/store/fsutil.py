"""Crash-safe file helpers: write to a temp file, fsync, rename, fsync the directory."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, durable: bool = True) -> None:
    """Replace ``path`` with ``data`` so a reader (or a restart after SIGKILL) sees old or new;
    on an error the old file stays and the temp file is removed."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        # A failed write (a full disk: ENOSPC on write, flush or close) leaves the old file
        # intact and no temp file taking the space that is short.
        remove(tmp)
        raise
    if durable:
        fsync_dir(path.parent)


def write_json(path: Path, doc: Any, durable: bool = True) -> None:
    atomic_write(path, json.dumps(doc, indent=1, sort_keys=True).encode(), durable)


def read_json(path: Path) -> Any:
    """The parsed file, or None when it is missing or unreadable (treated as absent)."""
    try:
        return json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None


def remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
