"""Helpers the examples' prepare steps share."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path


def stderr_say(quiet: bool) -> Callable[[str], None]:
    """A progress printer to stderr that does nothing when ``quiet``."""

    def say(msg: str) -> None:
        if not quiet:
            print(msg, file=sys.stderr)

    return say


def ensure_signing_key(work: Path, say: Callable[[str], None]) -> None:
    """Create work/keys/edgefleet.key (+ .pub) unless it exists: the key build configs name."""
    if (work / "keys" / "edgefleet.key").exists():
        return
    from agent.protocol.signing import generate_keypair

    priv, pub = generate_keypair(work / "keys")
    say(f"signing key created: {priv} (public: {pub})")
