"""Read and verify an artifact (NAME-VERSION-PROFILE.efa, an uncompressed tar).

The tar holds exactly manifest.json, manifest.sig and the files the manifest lists, all as
regular files at the top level or one folder deep (a text-generation model's folder, with no
folder member of its own). Verification checks the signature against trusted keys,
then every file's size and sha256; anything extra, missing, linked or nested is refused.

The layout is canonical (member order, header fields and padding are fixed by
``write_canonical_tar``), and the verifier rebuilds those bytes and compares hashes: so a
change to *any* byte of the file, header and padding included, is detected, not only a
change inside a signed member.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING

from agent.errors import IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.manifest import (
    MANIFEST_NAME,
    SIGNATURE_NAME,
    Manifest,
    file_name_problem,
    parse_manifest,
)
from agent.protocol.signing import Signature, TrustedKey, verify

if TYPE_CHECKING:  # cryptography itself loads only when a signature is checked (signing.py)
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

MAX_MANIFEST_BYTES = 4 * 1024 * 1024
CHUNK = 1 << 20


@dataclass(frozen=True)
class VerifiedArtifact:
    path: Path
    manifest: Manifest
    key_id: str
    sha256: str


class _HashSink:
    """A write-only file object that hashes what tarfile writes into it."""

    def __init__(self) -> None:
        self.h = hashlib.sha256()
        self.n = 0

    def write(self, data: bytes) -> int:
        self.h.update(data)
        self.n += len(data)
        return len(data)

    def tell(self) -> int:
        return self.n


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o644
    info.mtime = 0
    return info


def write_canonical_tar(
    out: IO[bytes] | _HashSink, members: list[tuple[str, int, IO[bytes]]]
) -> None:
    """Write (name, size, stream) members in the canonical layout: given order, fixed headers."""
    with tarfile.open(fileobj=out, mode="w:", format=tarfile.USTAR_FORMAT) as tar:  # type: ignore[call-overload]
        for name, size, stream in members:
            tar.addfile(_tarinfo(name, size), stream)


def member_order(files: list[str]) -> list[str]:
    return [MANIFEST_NAME, SIGNATURE_NAME, *sorted(files)]


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    seen: set[str] = set()
    for m in tar:
        name = m.name
        # a plain name, or folder/name one level deep (a text-generation model's folder)
        if name not in (MANIFEST_NAME, SIGNATURE_NAME) and file_name_problem(name) is not None:
            raise IntegrityError(
                f"artifact member {name!r} is not a plain top-level file name or folder/name"
            )
        if not m.isreg():
            raise IntegrityError(f"artifact member {name!r} is not a regular file")
        if name in seen:
            raise IntegrityError(f"artifact member {name!r} appears twice")
        seen.add(name)
        yield m


def _read_member(tar: tarfile.TarFile, m: tarfile.TarInfo, limit: int) -> bytes:
    if m.size > limit:
        raise IntegrityError(f"{m.name} is {m.size} bytes, more than the {limit} allowed")
    fh = tar.extractfile(m)
    if fh is None:
        raise IntegrityError(f"cannot read {m.name}")
    return fh.read()


def _hash_member(tar: tarfile.TarFile, m: tarfile.TarInfo) -> str:
    fh = tar.extractfile(m)
    if fh is None:
        raise IntegrityError(f"cannot read {m.name}")
    h = hashlib.sha256()
    for block in iter(lambda: fh.read(CHUNK), b""):
        h.update(block)
    return h.hexdigest()


def verify_artifact(
    path: Path, trusted: Sequence[Ed25519PublicKey | TrustedKey]
) -> VerifiedArtifact:
    """Check structure, signature and every file hash; return the parsed manifest."""
    if not path.is_file():
        raise IntegrityError(f"{path}: no such artifact file")
    try:
        with tarfile.open(path, mode="r:") as tar:
            members = {m.name: m for m in _members(tar)}
            for required in (MANIFEST_NAME, SIGNATURE_NAME):
                if required not in members:
                    raise IntegrityError(
                        f"{path}: {required} is missing (unsigned or not an artifact)"
                    )
            manifest_bytes = _read_member(tar, members[MANIFEST_NAME], MAX_MANIFEST_BYTES)
            sig = Signature.from_bytes(_read_member(tar, members[SIGNATURE_NAME], 4096))
            try:
                doc = json.loads(manifest_bytes)
            except (ValueError, UnicodeDecodeError):
                raise IntegrityError(f"{path}: manifest.json is not valid JSON") from None
            # The signature covers the canonical form, whatever the file's formatting.
            try:
                message = canonical_json(doc)
            except ValueError:
                raise IntegrityError(f"{path}: manifest.json holds non-finite numbers") from None
            kid = verify(message, sig, trusted)
            manifest = parse_manifest(doc, f"{path.name}:manifest.json")
            listed = set(manifest.files)
            present = set(members) - {MANIFEST_NAME, SIGNATURE_NAME}
            if listed - present:
                raise IntegrityError(
                    f"{path}: files missing from the artifact: {sorted(listed - present)}"
                )
            if present - listed:
                raise IntegrityError(
                    f"{path}: files not listed in the manifest: {sorted(present - listed)}"
                )
            for name, entry in manifest.files.items():
                m = members[name]
                if m.size != entry.size:
                    raise IntegrityError(
                        f"{path}: {name} is {m.size} bytes, manifest says {entry.size}"
                    )
                if _hash_member(tar, m) != entry.sha256:
                    raise IntegrityError(
                        f"{path}: {name} sha256 does not match the manifest (corrupted or tampered)"
                    )
            order = member_order(list(manifest.files))
            if list(members) != order:
                raise IntegrityError(f"{path}: members are not in the canonical order")
            sink = _HashSink()
            streams = []
            for name in order:
                fh = tar.extractfile(members[name])
                assert fh is not None
                streams.append((name, members[name].size, fh))
            write_canonical_tar(sink, streams)
    except tarfile.TarError as exc:
        raise IntegrityError(f"{path}: not a readable artifact tar ({exc})") from None
    except EOFError:
        raise IntegrityError(f"{path}: artifact is truncated") from None
    digest = file_sha256(path)
    if digest != sink.h.hexdigest() or path.stat().st_size != sink.n:
        raise IntegrityError(
            f"{path}: tar headers or padding were modified (not the canonical layout)"
        )
    return VerifiedArtifact(path=path, manifest=manifest, key_id=kid, sha256=digest)


def extract_verified(artifact: VerifiedArtifact, dest: Path) -> None:
    """Write the listed files of a verified artifact into ``dest`` (which must be empty/new).

    Files are re-hashed while written, so a file swapped after verification is still caught.
    """
    dest.mkdir(parents=True, exist_ok=True)
    with tarfile.open(artifact.path, mode="r:") as tar:
        members = {m.name: m for m in _members(tar)}
        for name in [MANIFEST_NAME, SIGNATURE_NAME, *artifact.manifest.files]:
            src = tar.extractfile(members[name])
            if src is None:
                raise IntegrityError(f"cannot read {name}")
            h = hashlib.sha256()
            target = dest / name
            target.parent.mkdir(exist_ok=True)  # a model folder (names are checked: one level)
            tmp = target.parent / f".{target.name}.part"
            with tmp.open("wb") as out:
                for block in iter(lambda s=src: s.read(CHUNK), b""):  # type: ignore[misc]
                    h.update(block)
                    out.write(block)
                out.flush()
                os.fsync(out.fileno())
            entry = artifact.manifest.files.get(name)
            if entry is not None and h.hexdigest() != entry.sha256:
                tmp.unlink()
                raise IntegrityError(f"{name} changed after verification")
            os.replace(tmp, target)
