"""Write a signed artifact (tar) atomically: nothing half-written is ever left at the target.

The tar is deterministic for a given manifest and files (sorted members, fixed mtime/owner),
so the same build publishes the same sha256.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tarfile
import tempfile
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import UsageError
from agent.protocol.manifest import MANIFEST_NAME, SIGNATURE_NAME, FileEntry, Manifest
from agent.protocol.signing import sign


def file_entry(path: Path) -> FileEntry:
    h = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return FileEntry(sha256=h.hexdigest(), size=size)


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o644
    info.mtime = 0
    tar.addfile(info, io.BytesIO(data))


def _add_file(tar: tarfile.TarFile, name: str, path: Path) -> None:
    info = tarfile.TarInfo(name)
    info.size = path.stat().st_size
    info.mode = 0o644
    info.mtime = 0
    with path.open("rb") as fh:
        tar.addfile(info, fh)


def ensure_writable_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or fail with one line saying why it cannot be written."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{out_dir}: cannot create output directory ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise UsageError(f"{out_dir}: output directory is not writable")


def write_artifact(
    out_path: Path, manifest: Manifest, files: dict[str, Path], key: Ed25519PrivateKey
) -> Path:
    """Sign ``manifest`` and write it with ``files`` to ``out_path`` atomically.

    ``files`` maps artifact member names to local paths; their hashes must already be in the
    manifest (they are checked again here so a file changed in between is caught).
    """
    if set(files) != set(manifest.files):
        raise ValueError(f"files {sorted(files)} differ from manifest {sorted(manifest.files)}")
    for name, path in files.items():
        if file_entry(path) != manifest.files[name]:
            raise ValueError(f"{path} changed after its hash was recorded")
    message = manifest.canonical_bytes()
    signature = sign(message, key)
    ensure_writable_dir(out_path.parent)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            with tarfile.open(fileobj=raw, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                _add_bytes(tar, MANIFEST_NAME, message)
                _add_bytes(tar, SIGNATURE_NAME, signature.to_bytes())
                for name in sorted(files):
                    _add_file(tar, name, files[name])
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out_path
