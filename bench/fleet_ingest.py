"""Ingest bench: N simulated devices publish a bounded telemetry stream through one mosquitto;
the collector (`fleet.collect.Collector`, SQLite, acks after commit) and mosquitto_sub
(QoS 1, the broker's raw delivery rate) consume the same stream side by side in one run.

Prints its figures; the last line is one JSON object:
  ingest_msgs_per_s   rows the collector committed per second, from its first message received
                      to its last commit
  ingest_lost         messages published (and acknowledged by the broker) minus rows stored (target 0)
  ingest_ratio        ingest_msgs_per_s / mosquitto_sub's rate on the same stream, measured from its
                      first to its last message (target >= 0.5)
  drain_*             capacity: a backlog queued on the broker for both consumers while they were
                      offline (persistent sessions), then drained side by side; drain_ratio is the
                      collector's rate over mosquitto_sub's (the live ratio is bounded by the publishers)

Publishers run in --procs worker processes, one paho client per device, QoS 1. The broker is
started here (on a free loopback port) unless --broker is given. Needs mosquitto and mosquitto_sub.
Usage: python3 bench/fleet_ingest.py [--devices 200] [--per-device 50 | --seconds 10]
"""

from __future__ import annotations

import argparse
import importlib
import json
import multiprocessing as mp
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# spawned publisher processes import this module by name, also when it was loaded from its path
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fleet.collect import Collector  # noqa: E402
from fleet.db import FleetDB  # noqa: E402
from fleet.mqtt import broker_config  # noqa: E402
from tests.agent_helpers import Broker  # noqa: E402

TOPIC = "edgefleet/v1/devices/{}/telemetry"
MAX_PER_DEVICE = 100_000  # a bound on --seconds runs too
# A realistic message (~480 bytes), as the agent's reporter sends it.
TEMPLATE = (
    '{{"device":"{d}","seq":{s},"ts":{ts:.3f},"interval_s":10.0,"uptime_s":{up:.1f},'
    '"active":{{"name":"digits","version":"1.2.0","sha256":"{sha}"}},'
    '"latency":{{"count":120,"errors":0,"throughput_per_s":12.0,"p50_ms":{p50:.3f},"p95_ms":{p95:.3f},'
    '"p99_ms":{p99:.3f},"max_ms":{mx:.3f},"thermal":{{"max_c":{t:.1f},"throttled":false}}}},'
    '"rss_mb":84.2,"cpu_percent":23.5,"mem_available_mb":2711.0,'
    '"temperatures_c":{{"cpu-thermal":{t:.1f},"gpu-thermal":{t2:.1f}}},"throttled":false,'
    '"cpu_freq_mhz":1500.0,"buffer":{{"pending":0,"dropped":0}}}}'
)


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def payload(device: str, seq: int) -> bytes:
    p50 = 3.0 + (seq % 7) * 0.1
    t = 55.0 + (seq % 5)
    return TEMPLATE.format(
        d=device,
        s=seq,
        ts=time.time(),
        up=seq * 10.0,
        sha="3f" * 32,
        p50=p50,
        p95=p50 * 1.6,
        p99=p50 * 2,
        mx=p50 * 3,
        t=t,
        t2=t - 4,
    ).encode()


def publisher(
    url: str, devices: list[str], per_device: int, seconds: float | None, start: Any, out: Any
) -> None:
    """One worker process: a paho client per device, round-robin QoS 1 publishes, then waits for acks."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    host, port = url.removeprefix("mqtt://").split(":")
    clients = []
    for d in devices:
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{d}")
        c.connect(host, int(port), keepalive=60)
        c.loop_start()
        clients.append(c)
    start.wait()
    t0 = time.monotonic()
    last: list[Any] = [None] * len(clients)
    sent = 0
    for k in range(per_device):
        if seconds is not None and time.monotonic() - t0 >= seconds:
            break
        for i, (d, c) in enumerate(zip(devices, clients, strict=True)):
            last[i] = c.publish(TOPIC.format(d), payload(d, k), qos=1)
        sent += len(clients)
    for (
        info
    ) in last:  # QoS 1 in order: a client's last message acked means all of its messages were
        if info is not None:
            info.wait_for_publish(60)
    for c in clients:
        c.disconnect()
        c.loop_stop()
    out.put({"sent": sent, "seconds": time.monotonic() - t0})


def _publish(
    url: str, names: list[str], per_device: int, seconds: float | None, procs: int, timeout: float
) -> tuple[int, float]:
    """Publish from ``procs`` worker processes; returns (messages acknowledged by the broker, seconds)."""
    ctx = mp.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    # the target by its importable name, whether this file runs as a script or was loaded by path
    target = importlib.import_module("fleet_ingest").publisher
    workers = [
        ctx.Process(target=target, args=(url, names[w::procs], per_device, seconds, start, out))
        for w in range(procs)
    ]
    try:
        for w in workers:
            w.start()
        time.sleep(1.0 + len(names) / 200)  # clients connected
        say(
            f"ingest: {len(names)} devices in {procs} processes publishing "
            + (f"for {seconds:g}s" if seconds is not None else f"{per_device} messages each")
        )
        start.set()
        results = [out.get(timeout=timeout + (seconds or 0)) for _ in workers]
        for w in workers:
            w.join(30)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
    published = sum(r["sent"] for r in results)
    pub_s = max(r["seconds"] for r in results)
    say(f"ingest: published {published} messages in {pub_s:.2f}s ({published / pub_s:.0f}/s)")
    return published, pub_s


def measure_drain(
    url: str, names: list[str], per_device: int, procs: int, tmp: Path, timeout: float
) -> dict[str, Any]:
    """A backlog queued on the broker for both (persistent sessions), then drained side by side."""
    host, port = url.removeprefix("mqtt://").split(":")
    sub_exe = shutil.which("mosquitto_sub") or "mosquitto_sub"
    sub_args = [
        sub_exe,
        "-h",
        host,
        "-p",
        port,
        "-q",
        "1",
        "-t",
        TOPIC.format("+"),
        "-c",
        "-i",
        f"drain-sub-{port}",
    ]
    db_path = tmp / "drain.db"
    cid = f"drain-collector-{port}"
    Collector(broker_config(url), str(db_path), client_id=cid).start().stop()  # the sessions exist
    subprocess.run([*sub_args, "-W", "1"], capture_output=True, timeout=30)
    published, _ = _publish(url, names, per_device, None, procs, timeout)
    sub_out = tmp / "drain-sub.txt"
    sub = subprocess.Popen(
        [*sub_args, "-F", "%U", "-C", str(published)],
        stdout=sub_out.open("wb"),
        stderr=subprocess.DEVNULL,
    )
    col = Collector(broker_config(url), str(db_path), client_id=cid).start()
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and (
            col.stats.received < published or sub.poll() is None
        ):
            time.sleep(0.1)
    finally:
        if sub.poll() is None:
            sub.terminate()
        sub.wait(10)
        col.stop()
    stored, col_rate, sub_n, sub_rate = _rates(col, db_path, sub_out)
    say(
        f"drain: {published} queued; collector stored {stored} at {col_rate:.0f} msg/s; "
        f"mosquitto_sub got {sub_n} at {sub_rate:.0f} msg/s"
    )
    return {
        "drain_published": published,
        "drain_lost": published - stored,
        "drain_collector_msgs_per_s": round(col_rate, 1),
        "drain_mosquitto_sub_msgs_per_s": round(sub_rate, 1),
        "drain_ratio": round(col_rate / sub_rate, 3) if sub_rate else None,
    }


def _rates(col: Collector, db_path: Path, sub_out: Path) -> tuple[int, float, int, float]:
    """(stored, collector msg/s, mosquitto_sub received, mosquitto_sub msg/s) after a run."""
    s = col.stats
    stored = FleetDB(str(db_path), readonly=True).count("telemetry")
    col_s = (s.last_commit or 0.0) - (s.first_received or 0.0)
    sub_n, sub_rate = _sub_rate(sub_out.read_text().splitlines())
    return stored, stored / col_s if col_s > 0 else 0.0, sub_n, sub_rate


def _sub_rate(lines: list[str]) -> tuple[int, float]:
    stamps = []
    for ln in lines:
        try:
            stamps.append(float(ln.split()[0]))
        except (ValueError, IndexError):
            continue
    if len(stamps) < 2:
        return len(stamps), 0.0
    return len(stamps), (len(stamps) - 1) / max(stamps[-1] - stamps[0], 1e-9)


def measure_ingest(
    n_devices: int = 200,
    msgs_per_device: int | None = 50,
    *,
    devices: int | None = None,
    seconds: float | None = None,
    broker_url: str | None = None,
    procs: int = 2,
    timeout: float = 120.0,
    drain_count: int = 20_000,
) -> dict[str, Any]:
    """Run the side-by-side measurement and return the figures (see the module docstring).

    ``devices`` is an alias of ``n_devices``; ``seconds`` bounds the stream by time instead of
    ``msgs_per_device`` (each device then publishes as fast as it can, at most MAX_PER_DEVICE).
    ``drain_count`` messages (0: skip) are then queued for both consumers while they are offline
    and drained side by side: their capacity, not the publishers' rate.
    """
    n = devices or n_devices
    per_device = MAX_PER_DEVICE if seconds is not None else (msgs_per_device or 50)
    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-ingest-"))
    broker = None
    if broker_url is None:
        # room for a backlog: a slow consumer is then measured as slow, not as lossy
        broker = Broker(tmp / "broker", max_queued=1_000_000)
        broker.start()
        broker_url = broker.url
    host, port = broker_url.removeprefix("mqtt://").split(":")
    sub_exe = shutil.which("mosquitto_sub")
    if sub_exe is None:
        raise SystemExit("mosquitto_sub is not installed (apt-get install mosquitto-clients)")
    db_path = tmp / "fleet.db"
    col = Collector(
        broker_config(broker_url), str(db_path), client_id=f"bench-collector-{port}"
    ).start()
    sub_out = tmp / "sub.txt"
    sub = subprocess.Popen(
        [
            sub_exe,
            "-h",
            host,
            "-p",
            port,
            "-q",
            "1",
            "-t",
            TOPIC.format("+"),
            "-F",
            "%U",
            "-i",
            f"bench-sub-{port}",
        ],
        stdout=sub_out.open("wb"),
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)  # both subscribed before the stream starts
    names = [f"sim-{i:04d}" for i in range(n)]
    try:
        published, pub_s = _publish(broker_url, names, per_device, seconds, procs, timeout)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got_sub = sum(1 for _ in sub_out.open("rb"))
            if col.stats.received >= published and got_sub >= published:
                break
            time.sleep(0.2)
        time.sleep(0.5)  # anything more (duplicates) shows up here
    finally:
        sub.terminate()
        sub.wait(10)
        col.stop()
    s = col.stats
    stored, col_rate, sub_n, sub_rate = _rates(col, db_path, sub_out)
    drain: dict[str, Any] = {}
    try:
        if drain_count:
            drain = measure_drain(broker_url, names, max(1, drain_count // n), procs, tmp, timeout)
    finally:
        if broker is not None:
            broker.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    res = {
        "ingest_msgs_per_s": round(col_rate, 1),
        "ingest_lost": published - stored,
        "ingest_ratio": round(col_rate / sub_rate, 3) if sub_rate else None,
        "ingest_devices": n,
        "ingest_published": published,
        "ingest_publish_msgs_per_s": round(published / pub_s, 1),
        "ingest_stored": stored,
        "ingest_duplicates_dropped": s.duplicates,
        "ingest_rejected": s.rejected,
        "ingest_batches": s.batches,
        "mosquitto_sub_msgs_per_s": round(sub_rate, 1),
        "mosquitto_sub_received": sub_n,
        **drain,
    }
    say(
        f"ingest: collector stored {stored}/{published} at {col_rate:.0f} msg/s in {s.batches} transactions; "
        f"mosquitto_sub got {sub_n} at {sub_rate:.0f} msg/s; ratio {res['ingest_ratio']}"
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=200)
    ap.add_argument(
        "--per-device", type=int, default=50, help="messages per device (a bounded stream)"
    )
    ap.add_argument(
        "--seconds", type=float, default=None, help="publish for this long instead of --per-device"
    )
    ap.add_argument("--procs", type=int, default=2, help="publisher processes")
    ap.add_argument(
        "--broker", default=None, help="use this broker (mqtt://HOST:PORT) instead of starting one"
    )
    args = ap.parse_args()
    res = measure_ingest(
        args.devices,
        args.per_device,
        seconds=args.seconds,
        broker_url=args.broker,
        procs=args.procs,
    )
    for k, v in res.items():
        print(f"{k:28} {v}")
    print(json.dumps(res))


if __name__ == "__main__":
    main()
