"""Disk space: what a deployment needs on the state dir's filesystem, and telling a full disk
(ENOSPC, or a quota: EDQUOT) from other I/O errors, which a refusal handles differently.

A deployment needs room for its download (the .part file, renamed to .efa in place) plus its
unpacked files (``manifest.files`` sizes, the manifest and its signature), both on disk at once
until the download is discarded after activation, plus the configured margin. Chunks of an
interrupted download already on disk are counted as room it has.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from agent.errors import EdgefleetError
from agent.protocol.manifest import Manifest

MB = 1024 * 1024
# Manifest, signature and the install record beside the unpacked files (a generous bound).
UNPACK_OVERHEAD = 256 * 1024
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
SQLITE_FULL = 13  # sqlite3.SQLITE_FULL, named only from Python 3.11


class TooLargeError(EdgefleetError):
    """An artifact this device refuses for its size (``transfer.max_artifact_mb``)."""

    exit_code = 6


def is_disk_full(exc: BaseException) -> bool:
    """True for a write refused for lack of space: ENOSPC/EDQUOT, or SQLite's SQLITE_FULL."""
    if isinstance(exc, OSError):
        return exc.errno in FULL_ERRNOS
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        return code == SQLITE_FULL or (code is None and "disk is full" in str(exc))
    return False


def fmt_bytes(n: float) -> str:
    """``100.0 GB`` from 10 GB, ``4096 MB`` / ``9.5 MB`` below, ``40 KB`` under 1 MB."""
    if n >= 10 * 1024 * MB:
        return f"{n / (1024 * MB):.1f} GB"
    if n < MB:
        return f"{n / 1024:.0f} KB"
    return f"{n / MB:.0f} MB" if n >= 10 * MB else f"{n / MB:.1f} MB"


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on ``path``'s filesystem."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def allocated(path: Path) -> int:
    """Bytes ``path`` holds on disk (a sparse .part holds only the chunks written)."""
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


def unpacked_size(manifest: Manifest) -> int:
    return sum(f.size for f in manifest.files.values()) + UNPACK_OVERHEAD


def check_size(size: int, max_mb: float) -> None:
    """Refuse an artifact larger than the device allows (raises TooLargeError)."""
    if size > max_mb * MB:
        raise TooLargeError(
            f"artifact is {fmt_bytes(size)}, this device allows {max_mb:g} MB "
            "(transfer.max_artifact_mb)"
        )


def space_short(
    directory: Path, size: int, manifest: Manifest, margin_mb: float, have: int = 0
) -> tuple[str, dict[str, int]] | None:
    """None when ``directory`` has room for the deployment (``have``: bytes of its download
    already on disk), else the reason and the figures."""
    need = size - min(have, size) + unpacked_size(manifest) + int(margin_mb * MB)
    free = free_bytes(directory)
    if free >= need:
        return None
    return (
        f"needs {fmt_bytes(need)} free on {directory}, {fmt_bytes(free)} free",
        {"needs_bytes": need, "free_bytes": free},
    )
