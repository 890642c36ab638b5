"""Artifact prune bench: retained messages and bytes on a local mosquitto before and after
`edgefleet artifacts prune` for a fixed set (NAME tiny, --versions versions x 2 profiles, the
oldest deployed to a device and the next to a group), then after a broker restart.

Figures: retained messages and payload bytes seen by a fresh '#' subscriber, and mosquitto's
own `$SYS/broker/retained messages/count` (it counts $SYS topics too). Last line: one JSON object.
Needs mosquitto on PATH and onnx (to make the tiny models).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fleet.artifacts import plan, prune, scan  # noqa: E402
from fleet.deploy import deploy  # noqa: E402
from fleet.mqtt import SyncClient, broker_config  # noqa: E402
from tests.agent_helpers import (  # noqa: E402
    Broker,
    make_artifact,
    make_keys,
    operator,
    publish,
    retained_figures,
)


def settled(broker: Broker) -> dict[str, int]:
    """Figures once the $SYS count (published every second) stopped moving."""
    last = retained_figures(broker.url)
    for _ in range(10):
        time.sleep(1.2)
        fig = retained_figures(broker.url)
        if fig == last:
            break
        last = fig
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--versions", type=int, default=6)
    ap.add_argument("--keep", type=int, default=2)
    ap.add_argument("--chunk-size", type=int, default=4096)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="prune-bench-"))
    broker = Broker(tmp / "broker")
    with broker.conf.open("a") as fh:
        fh.write("sys_interval 1\n")
    broker.start()
    try:
        keys = make_keys(tmp / "keys")
        for v in range(1, args.versions + 1):
            for profile in ("test-cpu", "test-gpu"):
                art = make_artifact(tmp / "art", keys, version=f"{v}.0.0", profile=profile, seed=v)
                publish(broker.url, art, args.chunk_size)
        cfg = broker_config(broker.url)
        deploy(cfg, "tiny@1.0.0", operator(), device="d1", profile="test-cpu")
        deploy(cfg, "tiny@2.0.0", operator(), group="test-cpu")
        before = settled(broker)
        with SyncClient(broker_config(broker.url)) as c:
            t0 = time.monotonic()
            p = plan(scan(c), args.keep)
            scanned = time.monotonic() - t0
            t0 = time.monotonic()
            p, cleared = prune(c, p)
            pruned = time.monotonic() - t0
        after = settled(broker)
        broker.restart()
        restarted = settled(broker)
        out = {
            "artifacts": args.versions * 2,
            "keep": args.keep,
            "removed": len(p.remove),
            "cleared_topics": len(cleared),
            "planned_bytes_freed": p.bytes_freed,
            "before": before,
            "after": after,
            "after_restart": restarted,
            "retained_bytes_ratio": round(after["retained_bytes"] / before["retained_bytes"], 3),
            "scan_s": round(scanned, 3),
            "prune_s": round(pruned, 3),
        }
        for k in ("before", "after", "after_restart"):
            f = out[k]
            assert isinstance(f, dict)
            print(
                f"{k:14s} {f['retained_messages']:5d} messages {f['retained_bytes']:9d} bytes "
                f"($SYS count {f['sys_retained_count']})"
            )
        print(json.dumps(out))
    finally:
        broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
