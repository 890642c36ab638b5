"""Bridge reconnect bench: what one reconnect of a site's bridge costs the uplink, with every
published artifact retained and after clearing the ones no deployment refers to.

A central mosquitto (``sys_interval 1``) and a site mosquitto bridged to it with the
docs/fleet.md "Bridged sites" topic lines, through a loopback relay the bench cuts and restores
(tests/bridge_helpers.py). On central: --versions versions of a ~--size-mb artifact are
published and the newest is deployed to the site's group. Then --reps bridge reconnects are
measured as the delta of central's ``$SYS/broker/bytes/sent`` (less its idle rate over the same
time) and, as a check, the bytes the relay carried central -> site. Then the unreferenced
artifacts are cleared the way ``edgefleet artifacts prune`` will (empty retained payloads on
their index, manifest and chunk topics; the clears cross the bridge and empty the site's
copies too) and the reconnects are measured again.

Prints its figures; the last line is one JSON object: bytes_per_reconnect_before,
bytes_per_reconnect_after, artifact_bytes (one .efa), ratio (before / after).
Needs mosquitto on PATH (or /usr/sbin), onnx and the agent's deps.
Usage: python3 bench/bridge_reconnect.py [--versions 4] [--size-mb 1] [--reps 3] [--keep-session]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.protocol import topics  # noqa: E402
from fleet.mqtt import SyncClient, broker_config  # noqa: E402
from fleet.publish import publish_artifact  # noqa: E402
from tests.agent_helpers import deploy, make_artifact, make_keys  # noqa: E402
from tests.bridge_helpers import (  # noqa: E402
    Central,
    SiteBroker,
    Uplink,
    bridge_up,
    retained,
    site_topics,
    wait_for,
)

GROUP, DEVICE = "north-lab", "north-01"
BYTES_SENT = "$SYS/broker/bytes/sent"


class SysBytes:
    """Central's $SYS/broker/bytes/sent as it is published (every sys_interval = 1 s)."""

    def __init__(self, url: str) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._cv = threading.Condition()
        self.value, self.n = -1, 0
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2)

        def on_connect(client: Any, u: Any, f: Any, rc: Any, p: Any) -> None:
            if not rc.is_failure:
                client.subscribe(BYTES_SENT, 0)

        def on_message(client: Any, u: Any, msg: Any) -> None:
            with self._cv:
                self.value, self.n = int(msg.payload), self.n + 1
                self._cv.notify_all()

        self.c.on_connect, self.c.on_message = on_connect, on_message
        host, port = url.removeprefix("mqtt://").split(":")
        self.c.connect_async(host, int(port))
        self.c.loop_start()

    def next(self, timeout: float = 10.0) -> int:
        """The next value published after this call (at most ~1 s stale)."""
        with self._cv:
            n = self.n
            if not self._cv.wait_for(lambda: self.n > n, timeout):
                raise RuntimeError(f"no {BYTES_SENT} within {timeout}s")
            return self.value

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def settle(uplink: Uplink, quiet: float = 1.5, limit: float = 60.0) -> None:
    """Wait until the relay has carried nothing central -> site for ``quiet`` seconds."""
    deadline = time.monotonic() + limit
    last, since = uplink.bytes_down, time.monotonic()
    while time.monotonic() - since < quiet:
        if time.monotonic() > deadline:
            raise RuntimeError("the uplink never went quiet")
        time.sleep(0.1)
        if uplink.bytes_down != last:
            last, since = uplink.bytes_down, time.monotonic()


def reconnects(site: SiteBroker, uplink: Uplink, sysb: SysBytes, reps: int) -> dict[str, Any]:
    """Median bytes central sent per bridge reconnect ($SYS delta less idle rate; relay bytes)."""
    settle(uplink)
    a, ta = sysb.next(), time.monotonic()
    b, tb = sysb.next(), time.monotonic()
    time.sleep(2)
    c, tc = sysb.next(), time.monotonic()
    idle = max(0.0, (c - a) / (tc - ta))
    sys_deltas, relay_deltas, secs = [], [], []
    for _ in range(reps):
        s0, t0, r0 = sysb.next(), time.monotonic(), uplink.bytes_down
        uplink.cut()
        wait_for(lambda: not bridge_up(site), 15, "bridge down")
        uplink.restore()
        wait_for(lambda: bridge_up(site), 15, "bridge up again")
        settle(uplink)
        secs.append(time.monotonic() - t0)
        sysb.next()  # the sample in flight may predate the end of the transfer
        s1, t1 = sysb.next(), time.monotonic()
        sys_deltas.append(s1 - s0 - idle * (t1 - t0))
        relay_deltas.append(uplink.bytes_down - r0)
    del b, tb
    return {
        "sys_bytes": statistics.median(sys_deltas),
        "relay_bytes": statistics.median(relay_deltas),
        "idle_bytes_per_s": idle,
        "seconds": statistics.median(secs),
        "all_sys": [round(x) for x in sys_deltas],
    }


def prune_unreferenced(url: str) -> int:
    """`edgefleet artifacts prune --keep 0` on central: every artifact no deployment names goes
    (index entry, announcement, chunks: the clears cross the bridge). Returns how many."""
    from fleet.artifacts import plan, prune, scan

    with SyncClient(broker_config(url)) as c:
        p, _ = prune(c, plan(scan(c), keep=0))
    return len(p.remove)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--versions", type=int, default=4, help="versions published (newest deployed)")
    ap.add_argument("--size-mb", type=float, default=1.0, help="size of each artifact")
    ap.add_argument("--chunk-kb", type=int, default=1024, help="publish chunk size")
    ap.add_argument("--reps", type=int, default=3, help="reconnects measured per phase (median)")
    ap.add_argument(
        "--keep-session", action="store_true", help="bridge with cleansession false (default true)"
    )
    args = ap.parse_args()
    chunk = args.chunk_kb * 1024

    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bridge-bench-"))
    keys = make_keys(tmp)
    extra = int(args.size_mb * 1024 * 1024 / 4)
    arts = [
        make_artifact(tmp, keys, version=f"{v + 1}.0.0", seed=v, extra_params=extra)
        for v in range(args.versions)
    ]
    artifact_bytes = round(statistics.mean(a.stat().st_size for a in arts))
    central = Central(tmp / "central")
    uplink = Uplink(central.port)
    site = SiteBroker(
        tmp / "site",
        uplink.port,
        site_topics([GROUP], [DEVICE]),
        cleansession=not args.keep_session,
    )
    sysb: SysBytes | None = None
    try:
        central.start()
        uplink.start()
        site.start()
        wait_for(lambda: bridge_up(site), 15, "bridge connected")
        shas = [
            publish_artifact(a, broker_config(central.url), chunk_size=chunk, force=True).sha256
            for a in arts
        ]
        deploy(central.url, f"tiny@{args.versions}.0.0", group=GROUP)
        for sha in shas:
            wait_for(
                lambda sha=sha: retained(site.url, topics.artifact_manifest(sha), 0.5) is not None,
                60,
                f"artifact {sha[:12]} on the site",
            )
        sysb = SysBytes(central.url)
        print(
            f"{args.versions} artifacts of {artifact_bytes} bytes retained on central and site; "
            f"{args.reps} reconnects each; cleansession {not args.keep_session}"
        )
        before = reconnects(site, uplink, sysb, args.reps)
        print(f"before: {json.dumps(before)}")

        pruned = prune_unreferenced(central.url)
        assert pruned == len(shas) - 1, f"prune removed {pruned} artifacts"
        for sha in shas[:-1]:
            wait_for(
                lambda sha=sha: retained(site.url, topics.artifact_manifest(sha), 0.5) is None,
                30,
                f"artifact {sha[:12]} cleared on the site",
            )
        assert retained(site.url, topics.artifact_manifest(shas[-1])) is not None
        print(f"pruned {pruned} unreferenced artifacts on central (the clears crossed the bridge)")
        after = reconnects(site, uplink, sysb, args.reps)
        print(f"after: {json.dumps(after)}")

        b, a = before["sys_bytes"], after["sys_bytes"]
        print(
            f"per reconnect: {b / artifact_bytes:.2f} artifact copies before, "
            f"{a / artifact_bytes:.2f} after (relay: {before['relay_bytes']} -> "
            f"{after['relay_bytes']} bytes)"
        )
        print(
            json.dumps(
                {
                    "bytes_per_reconnect_before": round(b),
                    "bytes_per_reconnect_after": round(a),
                    "artifact_bytes": artifact_bytes,
                    "ratio": round(b / a, 2) if a > 0 else None,
                }
            )
        )
    finally:
        if sysb is not None:
            sysb.close()
        site.stop()
        uplink.cut()
        central.stop()


if __name__ == "__main__":
    main()
