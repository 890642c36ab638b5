"""What `edgefleet-agent status` shows, read from the state directory only (no broker, no lock)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agent.store.fsutil import read_json
from agent.store.versions import VersionStore


def state_summary(state_dir: Path) -> dict[str, Any]:
    """What `edgefleet-agent status` prints: read from the state directory only."""
    vs = VersionStore(state_dir, keep=0) if (state_dir / "versions").is_dir() else None
    active = vs.active() if vs else None
    doc = read_json(state_dir / "agent.json")
    downloads = []
    for meta in (
        sorted((state_dir / "downloads").glob("*.json"))
        if (state_dir / "downloads").is_dir()
        else []
    ):
        sha = meta.stem
        part = meta.with_name(f"{sha}.progress")
        bits = part.read_bytes() if part.exists() else b""
        downloads.append(
            {
                "sha256": sha,
                "chunks_done": sum(bin(b).count("1") for b in bits),
                "complete": meta.with_name(f"{sha}.efa").exists(),
            }
        )
    return {
        "state_dir": str(state_dir),
        "active": None
        if active is None
        else {
            "name": active.manifest.name,
            "version": active.manifest.version,
            "sha256": active.sha256,
            "dir": active.dir.name,
        },
        "history": vs.history() if vs else [],
        "install": read_json(state_dir / "install.json"),
        "rejected": doc.get("rejected", {}) if isinstance(doc, dict) else {},
        "downloads": downloads,
    }
