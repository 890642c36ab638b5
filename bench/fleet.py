"""Fleet bench: one 5 MB deployment fanned out to N simulated devices, then a telemetry stream
into the collector, in one run on this machine.

The devices are real Agent objects over one paho client each (bench/fleetsim.py, several worker
processes); only the runtime is a no-op (see fleetsim's docstring for what is simulated).
Prints its figures; the last line is one JSON object:
  devices               devices that came online (target 200)
  fanout_all_active_s   from the start of `edgefleet publish` of the artifact to the last device's
                        ACTIVE event (publish + group deploy + every device fetching, verifying,
                        unpacking and switching)
  ingest_msgs_per_s, ingest_lost, ingest_ratio   from bench/fleet_ingest.py:measure_ingest
                        (telemetry into `edgefleet collect`; ingest_ratio target >= 0.5)
Usage: python3 bench/fleet.py [--devices 200] [--procs 2] [--size-mb 5]
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402

from bench.fleetsim import PROFILE  # noqa: E402
from fleet.trust import Operator, provision  # noqa: E402
from tests.agent_helpers import Broker, make_artifact, make_keys  # noqa: E402


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Monitor:
    """Counts births and the first time each device reports a deployment state for one sha."""

    def __init__(self, url: str) -> None:
        host, port = url.removeprefix("mqtt://").split(":")
        self.online: set[str] = set()
        self.sha = ""
        self.first: dict[str, dict[str, float]] = {}
        self.failures: dict[str, str] = {}
        self.lock = threading.Lock()
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2)
        self.c.on_connect = lambda c, u, f, rc, p: c.subscribe(
            [("edgefleet/v1/devices/+/state", 1), ("edgefleet/v1/devices/+/events", 1)]
        )
        self.c.on_message = self._msg
        self.c.connect(host, int(port))
        self.c.loop_start()

    def _msg(self, client: Any, userdata: Any, msg: Any) -> None:
        now = time.monotonic()
        try:
            doc = json.loads(msg.payload)
        except ValueError:
            return
        dev = msg.topic.split("/")[3]
        with self.lock:
            if msg.topic.endswith("/state"):
                (self.online.add if doc.get("online") else self.online.discard)(dev)
            elif doc.get("kind") == "deployment" and doc.get("sha256") == self.sha:
                self.first.setdefault(dev, {}).setdefault(doc["state"], now)
                if doc["state"] in ("REJECTED", "ROLLED_BACK"):
                    self.failures[dev] = doc.get("reason", "")

    def count(self, state: str) -> int:
        with self.lock:
            return sum(1 for s in self.first.values() if state in s)

    def wait(self, pred: Any, timeout: float, label: str) -> bool:
        end = time.monotonic() + timeout
        last = 0.0
        while time.monotonic() < end:
            if pred():
                return True
            if time.monotonic() - last > 5:
                last = time.monotonic()
                say(f"  waiting for {label}...")
            time.sleep(0.05)
        return bool(pred())

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def start_workers(
    n: int, procs: int, url: str, key: Path, root: Path, max_s: float
) -> list[subprocess.Popen[bytes]]:
    out = []
    per = -(-n // procs)
    for p in range(procs):
        start, count = p * per, min(per, n - p * per)
        if count <= 0:
            break
        log = (root / f"worker-{p}.log").open("wb")
        out.append(
            subprocess.Popen(
                [
                    sys.executable,
                    str(REPO / "bench" / "fleetsim.py"),
                    "--broker",
                    url,
                    "--trust-dir",
                    str(key),
                    "--dir",
                    str(root / "devices"),
                    "--start",
                    str(start),
                    "--count",
                    str(count),
                    "--group",
                    "fleet",
                    "--max-s",
                    str(max_s),
                ],
                cwd=REPO,
                stdout=log,
                stderr=log,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                start_new_session=True,
            )
        )
    return out


def stop_workers(workers: list[subprocess.Popen[bytes]]) -> None:
    for w in workers:
        if w.poll() is None:
            w.send_signal(signal.SIGTERM)
    for w in workers:
        try:
            w.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(w.pid, signal.SIGKILL)
            w.wait(5)


def run_ingest(args: argparse.Namespace) -> dict[str, Any]:
    """The collector's telemetry ingest, measured by the collector engineer's bench module."""
    # a regular import (not from a file spec): its worker processes unpickle functions by module name
    mod = importlib.import_module("bench.fleet_ingest")
    say(
        f"ingest: {args.devices} devices x {args.ingest_per_device} telemetry messages into the collector "
        "(bench/fleet_ingest.py)"
    )
    res: dict[str, Any] = mod.measure_ingest(
        devices=args.devices, msgs_per_device=args.ingest_per_device
    )
    return {k if k.startswith("ingest_") else f"ingest_{k}": v for k, v in res.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument("--procs", type=int, default=2, help="worker processes hosting the devices")
    ap.add_argument("--size-mb", type=float, default=5.0)
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--timeout", type=float, default=300.0, help="bound on each wait")
    ap.add_argument(
        "--ingest-per-device",
        type=int,
        default=50,
        help="telemetry messages per device (ingest part)",
    )
    ap.add_argument("--skip-ingest", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = ap.parse_args()
    from fleet.deploy import deploy
    from fleet.mqtt import broker_config
    from fleet.publish import publish_artifact

    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-fleet-"))
    broker = Broker(tmp / "broker")
    broker.conf.write_text(broker.conf.read_text() + "max_inflight_messages 64\n")
    broker.start()
    workers: list[subprocess.Popen[bytes]] = []
    mon = Monitor(broker.url)
    result: dict[str, Any] = {}
    try:
        keys = make_keys(tmp / "keys")
        trust_dir = tmp / "trust"
        signer = Operator(provision(trust_dir, [keys.public]).operator_key or Path())
        art = make_artifact(
            tmp / "art",
            keys,
            name="fleetbench",
            version="1.0.0",
            profile=PROFILE,
            extra_params=int(args.size_mb * 1e6 / 4),
        )
        size = art.stat().st_size
        say(
            f"artifact: {size / 1e6:.2f} MB; starting {args.devices} simulated devices in {args.procs} processes"
        )
        t_start = time.monotonic()
        workers = start_workers(
            args.devices, args.procs, broker.url, trust_dir, tmp, args.timeout * 3
        )
        ok = mon.wait(lambda: len(mon.online) >= args.devices, args.timeout, "device births")
        online = len(mon.online)
        say(f"{online}/{args.devices} devices online after {time.monotonic() - t_start:.1f}s")
        if not ok:
            say("WARNING: not every device came online; measuring with those that did")
        cfg = broker_config(broker.url)
        t0 = time.monotonic()
        pub = publish_artifact(art, cfg, chunk_size=args.chunk_kb * 1024, force=True)
        mon.sha = pub.sha256
        deploy(cfg, "fleetbench@1.0.0", signer, group="fleet")
        t_deploy = time.monotonic()
        done = mon.wait(
            lambda: mon.count("ACTIVE") + len(mon.failures) >= online, args.timeout, "ACTIVE events"
        )
        active = mon.count("ACTIVE")
        with mon.lock:
            act_times = sorted(s["ACTIVE"] - t0 for s in mon.first.values() if "ACTIVE" in s)
        fanout = act_times[-1] if act_times and active >= online else None
        say(
            f"publish {pub.seconds:.2f}s ({size / max(pub.seconds, 1e-9) / 1e6:.0f} MB/s); deploy set after "
            f"{t_deploy - t0:.2f}s"
        )
        if act_times:
            say(
                f"ACTIVE on {active}/{online} devices: first {act_times[0]:.2f}s, median "
                f"{statistics.median(act_times):.2f}s, last {act_times[-1]:.2f}s after the publish started; "
                f"{len(mon.failures)} failed" + ("" if done else " (TIMED OUT)")
            )
        if mon.failures:
            say(f"  e.g. {next(iter(mon.failures.items()))}")
        say(
            f"fan-out: {online} x {size / 1e6:.1f} MB = {online * size / 1e9:.2f} GB delivered"
            + (f", {online * size / 1e6 / fanout:.0f} MB/s aggregate" if fanout else "")
        )
        result = {
            "devices": online,
            "devices_target": args.devices,
            "artifact_mb": round(size / 1e6, 2),
            "devices_active": active,
            "devices_failed": len(mon.failures),
            "fanout_all_active_s": round(fanout, 2) if fanout else None,
            "fanout_median_active_s": round(statistics.median(act_times), 2) if act_times else None,
            "publish_s": round(pub.seconds, 3),
        }
    finally:
        stop_workers(workers)
        mon.close()
        broker.stop()
    ingest = (
        {
            "ingest_msgs_per_s": None,
            "ingest_lost": None,
            "ingest_ratio": None,
            "ingest_note": "skipped",
        }
        if args.skip_ingest
        else run_ingest(args)
    )
    result.update(ingest)
    result["loadavg_1m"] = round(os.getloadavg()[0], 2)
    if args.keep:
        say(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
