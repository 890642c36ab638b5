"""Write a signed artifact (tar) atomically: nothing half-written is ever left at the target.

The tar layout is canonical (agent.protocol.artifact.write_canonical_tar): deterministic for a
given manifest and files, and checked byte for byte by the verifier.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from pathlib import Path
from typing import IO

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from agent.errors import UsageError
from agent.protocol.artifact import member_order, write_canonical_tar
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
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{out_path.name}.", suffix=".part", dir=out_path.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as raw:
            sig = signature.to_bytes()
            with contextlib.ExitStack() as stack:
                streams: dict[str, tuple[int, IO[bytes]]] = {
                    MANIFEST_NAME: (len(message), io.BytesIO(message)),
                    SIGNATURE_NAME: (len(sig), io.BytesIO(sig)),
                }
                for name, p in files.items():
                    streams[name] = (p.stat().st_size, stack.enter_context(p.open("rb")))
                write_canonical_tar(raw, [(n, *streams[n]) for n in member_order(list(files))])
            raw.flush()
            os.fsync(raw.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    return out_path
