"""Download store for one artifact: chunks written in place into a preallocated .part file,
a progress bitmap beside it, resumable after a disconnect or a restart.

The bitmap is updated in place (one byte, no fsync) after every chunk; on open, every chunk it
marks as done is hashed again, so a chunk lost in a power cut is fetched again rather than
trusted. Memory is one chunk at a time.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from agent.errors import IntegrityError
from agent.protocol.messages import ArtifactAnnouncement
from agent.store.fsutil import atomic_write, fsync_dir, read_json, remove, write_json

HASH_BLOCK = 1 << 20


class ChunkStore:
    def __init__(self, directory: Path, ann: ArtifactAnnouncement) -> None:
        self.ann = ann
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.part = directory / f"{ann.sha256}.part"
        self.done_path = directory / f"{ann.sha256}.efa"
        self._bitmap_path = directory / f"{ann.sha256}.progress"
        self._meta_path = directory / f"{ann.sha256}.json"
        n = len(ann.chunks)
        self.done = bytearray(n)
        self.resumed_chunks = 0
        self.duplicate_chunks = 0
        self._fd: int | None = None
        self._bm_fd: int | None = None
        if self.done_path.exists():
            self.done = bytearray(b"\x01" * n)
            return
        meta = read_json(self._meta_path)
        same = (
            isinstance(meta, dict)
            and meta.get("chunk_size") == ann.chunk_size
            and meta.get("size") == ann.size
        )
        if same and self.part.exists() and self.part.stat().st_size == ann.size:
            bits = self._read_bitmap()
            with self.part.open("rb") as fh:
                for i in range(n):
                    if bits[i] and self._chunk_ok(fh, i):
                        self.done[i] = 1
            self.resumed_chunks = sum(self.done)
            self._save_bitmap()
        else:
            with self.part.open("wb") as fh:
                fh.truncate(ann.size)
            write_json(
                self._meta_path,
                {"size": ann.size, "chunk_size": ann.chunk_size, "sha256": ann.sha256},
            )
            self._save_bitmap()

    def _read_bitmap(self) -> bytearray:
        try:
            data = self._bitmap_path.read_bytes()
        except OSError:
            data = b""
        bits = bytearray(len(self.ann.chunks))
        for i in range(min(len(bits), len(data) * 8)):
            bits[i] = (data[i // 8] >> (i % 8)) & 1
        return bits

    def _save_bitmap(self) -> None:
        packed = bytearray((len(self.done) + 7) // 8)
        for i, d in enumerate(self.done):
            if d:
                packed[i // 8] |= 1 << (i % 8)
        atomic_write(self._bitmap_path, bytes(packed), durable=False)

    def _mark(self, index: int) -> None:
        """Set one bit in place: a one-byte pwrite cannot be torn, and costs microseconds."""
        byte = 0
        base = (index // 8) * 8
        for j in range(8):
            if base + j < len(self.done) and self.done[base + j]:
                byte |= 1 << j
        if self._bm_fd is None:
            self._bm_fd = os.open(self._bitmap_path, os.O_WRONLY)
        os.pwrite(self._bm_fd, bytes([byte]), index // 8)

    def close(self) -> None:
        """Release the open files (the download stays on disk for a later resume)."""
        for fd in (self._fd, self._bm_fd):
            if fd is not None:
                os.close(fd)
        self._fd = self._bm_fd = None

    def _chunk_ok(self, fh: object, i: int) -> bool:
        ref = self.ann.chunks[i]
        f = fh  # a binary file opened by the caller
        f.seek(i * self.ann.chunk_size)  # type: ignore[attr-defined]
        data: bytes = f.read(ref.size)  # type: ignore[attr-defined]
        return len(data) == ref.size and hashlib.sha256(data).hexdigest() == ref.sha256

    @property
    def complete(self) -> bool:
        return all(self.done)

    @property
    def count_done(self) -> int:
        return sum(self.done)

    def missing(self) -> list[int]:
        return [i for i, d in enumerate(self.done) if not d]

    def write(self, index: int, data: bytes) -> bool:
        """Store chunk ``index``; False if it was already there; IntegrityError if it is wrong."""
        if not 0 <= index < len(self.ann.chunks):
            raise IntegrityError(
                f"chunk {index} is outside the chunk table ({len(self.ann.chunks)} chunks)"
            )
        if self.done[index]:
            self.duplicate_chunks += 1
            return False
        ref = self.ann.chunks[index]
        if len(data) != ref.size:
            raise IntegrityError(
                f"chunk {index} is {len(data)} bytes, the chunk table says {ref.size}"
            )
        if hashlib.sha256(data).hexdigest() != ref.sha256:
            raise IntegrityError(f"chunk {index} sha256 does not match the chunk table")
        if self._fd is None:
            self._fd = os.open(self.part, os.O_WRONLY)
        os.pwrite(self._fd, data, index * self.ann.chunk_size)
        self.done[index] = 1
        self._mark(index)
        return True

    def finish(self) -> Path:
        """Check the whole-file sha256 and move the download to NAME.efa (fsync'd)."""
        self.close()
        if self.done_path.exists():
            return self.done_path
        h = hashlib.sha256()
        with self.part.open("rb") as fh:
            for block in iter(lambda: fh.read(HASH_BLOCK), b""):
                h.update(block)
            os.fsync(fh.fileno())
        if h.hexdigest() != self.ann.sha256:
            raise IntegrityError("downloaded artifact's sha256 does not match its announcement")
        os.replace(self.part, self.done_path)
        fsync_dir(self.dir)
        remove(self._bitmap_path)
        return self.done_path

    def discard(self) -> None:
        self.close()
        for p in (self.part, self.done_path, self._bitmap_path, self._meta_path):
            remove(p)


def discard_download(directory: Path, sha256: str) -> None:
    for suffix in (".part", ".efa", ".progress", ".json"):
        remove(directory / f"{sha256}{suffix}")
