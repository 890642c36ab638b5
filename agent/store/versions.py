"""Installed versions under STATE/versions/ and the atomic 'active' pointer.

``STATE/active`` is a symlink to ``versions/<version>-<sha12>``, replaced with rename(2) and
followed by an fsync of the directory, so after a crash at any point it names either the old or
the new version, and both are complete on disk (a version directory appears by rename only
after its files were extracted and fsync'd). ``history.json`` lists activations, newest last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from agent.protocol.artifact import VerifiedArtifact, extract_verified
from agent.protocol.manifest import MANIFEST_NAME, Manifest, parse_manifest
from agent.store.fsutil import fsync_dir, read_json, remove, write_json
from agent.store.space import is_disk_full

log = logging.getLogger(__name__)

INFO_NAME = ".edgefleet.json"


@dataclass(frozen=True)
class Installed:
    dir: Path
    manifest: Manifest
    sha256: str
    key_id: str = ""  # the release key that signed it (checked again when trust changes)

    @property
    def label(self) -> str:
        return f"{self.manifest.name}@{self.manifest.version}"


class VersionStore:
    def __init__(self, state_dir: Path, keep: int) -> None:
        self.root = state_dir
        self.versions = state_dir / "versions"
        self.active_link = state_dir / "active"
        self.history_path = state_dir / "history.json"
        self.keep = keep
        self.versions.mkdir(parents=True, exist_ok=True)

    # -- queries --------------------------------------------------------------------------------
    def dir_name(self, manifest: Manifest, sha256: str) -> str:
        return f"{manifest.version}-{sha256[:12]}"

    def load(self, name: str) -> Installed | None:
        """The installed version in versions/NAME, or None when it is absent or incomplete."""
        d = self.versions / name
        info = read_json(d / INFO_NAME)
        if not isinstance(info, dict) or not isinstance(info.get("sha256"), str):
            return None
        try:
            manifest = parse_manifest(json.loads((d / MANIFEST_NAME).read_bytes()), str(d))
        except (OSError, ValueError):
            return None
        except Exception:
            return None
        kid = info.get("key_id")
        return Installed(d, manifest, info["sha256"], kid if isinstance(kid, str) else "")

    def active(self) -> Installed | None:
        try:
            target = os.readlink(self.active_link)
        except OSError:
            return None
        return self.load(Path(target).name)

    def history(self) -> list[str]:
        doc = read_json(self.history_path)
        if not isinstance(doc, list):
            return []
        return [str(x) for x in doc if isinstance(x, str)]

    def previous(self) -> Installed | None:
        """The newest earlier activation that is still installed and not the active one."""
        active = self.active()
        for name in reversed(self.history()):
            if active is not None and name == active.dir.name:
                continue
            inst = self.load(name)
            if inst is not None:
                return inst
        return None

    def kept(self) -> list[Installed]:
        """Installed versions other than the active one, newest activation first."""
        active = self.active()
        out: list[Installed] = []
        for name in reversed(self.history()):
            if active is not None and name == active.dir.name:
                continue
            inst = self.load(name)
            if inst is not None:
                out.append(inst)
        return out

    def find(self, version: str) -> Installed | None:
        """The kept (not active) version named ``version``, ``NAME@VERSION`` or by its directory."""
        for inst in self.kept():
            if version in (inst.manifest.version, inst.label, inst.dir.name):
                return inst
        return None

    # -- changes --------------------------------------------------------------------------------
    def clean_partial(self) -> None:
        for p in self.versions.glob(".tmp-*"):
            shutil.rmtree(p, ignore_errors=True)
        remove(self.root / ".active.tmp")

    def unpack(self, va: VerifiedArtifact) -> Installed:
        """Extract into versions/<version>-<sha12> via a temp dir and a rename."""
        name = self.dir_name(va.manifest, va.sha256)
        final = self.versions / name
        active = self.active()
        if active is not None and active.dir.name == name:
            return active
        tmp = self.versions / f".tmp-{name}"
        shutil.rmtree(tmp, ignore_errors=True)
        extract_verified(va, tmp)
        write_json(
            tmp / INFO_NAME, {"sha256": va.sha256, "key_id": va.key_id, "unpacked": time.time()}
        )
        fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync_dir(self.versions)
        inst = self.load(name)
        assert inst is not None
        return inst

    def activate(self, inst: Installed) -> None:
        tmp = self.root / ".active.tmp"
        remove(tmp)
        os.symlink(f"versions/{inst.dir.name}", tmp)
        os.replace(tmp, self.active_link)
        fsync_dir(self.root)
        hist = [h for h in self.history() if h != inst.dir.name]
        hist.append(inst.dir.name)
        try:
            write_json(self.history_path, hist)
        except OSError as exc:
            # Activated all the same (history only orders rollback targets); the old history
            # stays intact and the next activation writes it whole.
            if not is_disk_full(exc):
                raise
            log.warning("cannot save %s: %s", self.history_path, exc)

    def deactivate(self) -> None:
        remove(self.active_link)
        fsync_dir(self.root)

    def forget(self, inst: Installed) -> None:
        """Remove a version that failed (never the active one)."""
        active = self.active()
        if active is not None and active.dir == inst.dir:
            return
        # Removed first: on a full disk its space is what rewriting the history needs.
        shutil.rmtree(inst.dir, ignore_errors=True)
        hist = self.history()
        if inst.dir.name in hist:  # a candidate that failed before activation is not listed
            write_json(self.history_path, [h for h in hist if h != inst.dir.name])

    def prune(self) -> list[str]:
        """Keep the active version and the ``keep`` most recent previous ones; delete the rest."""
        active = self.active()
        hist = self.history()
        keep: set[str] = set()
        if active is not None:
            keep.add(active.dir.name)
        for name in reversed(hist):
            if len(keep) >= self.keep + (1 if active is not None else 0):
                break
            keep.add(name)
        removed = []
        for d in self.versions.iterdir():
            if d.name.startswith(".") or d.name in keep:
                continue
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d.name)
        if removed:
            write_json(self.history_path, [h for h in hist if h in keep])
        return removed
