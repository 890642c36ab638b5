"""Transfer bench: a ~50 MB artifact through a local mosquitto into a real agent process, and the
same bytes with mosquitto_sub, in one run; then a broker restart at ~50% of a second transfer.

Prints its figures; the last line is one JSON object:
  transfer_ratio            agent MB/s / mosquitto_sub MB/s (target >= 0.8); medians of --reps runs;
                            mosquitto_sub's time has its process start-up (measured with one small
                            message) taken out, which makes the reference faster, not slower
  agent_peak_rss_growth_mb  agent peak RSS (VmHWM, reset before the deploy) from the deploy until the
                            artifact is verified, minus its RSS before (target <= 32)
  resume_refetched_chunks   chunks received again after the broker restart (target 0)

Needs mosquitto and mosquitto_sub on PATH, onnx (to make the model) and the agent's deps.
Usage: python3 bench/transfer.py [--size-mb 50] [--chunk-kb 1024] [--window 8]
"""

from __future__ import annotations

import argparse
import json
import math
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

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from agent.protocol import topics  # noqa: E402
from tests.agent_helpers import (  # noqa: E402
    AgentProcess,
    Broker,
    Listener,
    deploy,
    make_artifact,
    make_keys,
    write_config,
)


def _status_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS; False where not supported."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return _status_kb(pid, "VmHWM") <= _status_kb(pid, "VmRSS") + 64
    except OSError:
        return False


def sample_rss(pid: int, stop: threading.Event, out: list[int]) -> None:
    """Fallback when VmHWM cannot be reset: poll RSS (costs CPU the agent could use)."""
    proc = psutil.Process(pid)
    while not stop.is_set():
        try:
            out.append(proc.memory_info().rss)
        except psutil.Error:
            return
        time.sleep(0.005)


def run_agent_transfer(
    tmp: Path,
    broker: Broker,
    listener: Listener,
    keys,
    device: str,
    spec: str,
    sha: str,
    window: int,
    stop_at: float | None = None,
) -> dict:
    cfg = write_config(
        tmp / f"{device}.toml",
        device,
        broker.url,
        [keys.public],
        tmp / f"{device}-state",
        bench_runs=5,
        probation_s=0.5,
    )
    text = (
        cfg.read_text()
        .replace("window = 8", f"window = {window}")
        .replace('log_level = "debug"', 'log_level = "warning"')
    )
    cfg.write_text(text)
    agent = AgentProcess(cfg, tmp / f"{device}.log").start()
    try:
        # wait for its birth so the RSS baseline is the idle, connected agent
        listener.wait_message(
            f"edgefleet/v1/devices/{device}/state", lambda m: m.get("online") is True, 30
        )
        assert agent.proc is not None
        pid = agent.proc.pid
        time.sleep(0.3)
        base = psutil.Process(pid).memory_info().rss
        samples: list[int] = []
        stop = threading.Event()
        # the kernel's peak counter measures without polling; reset it so it covers only the transfer
        use_hwm = reset_peak_rss(pid)
        th = threading.Thread(target=sample_rss, args=(pid, stop, samples), daemon=True)
        if not use_hwm:
            th.start()
        t0 = time.monotonic()
        deploy(broker.url, spec, device=device)
        restart = {}
        if stop_at is not None:
            listener.wait_event(
                device,
                lambda e: (
                    e.get("state") == "FETCHING" and e["detail"].get("progress", 0) >= stop_at
                ),
                120,
            )
            # freeze the agent mid-transfer, restart the broker under it, let it go on
            os.kill(pid, signal.SIGSTOP)
            progress = tmp / f"{device}-state" / "downloads" / f"{sha}.progress"
            bits = progress.read_bytes() if progress.exists() else b""
            restart["done_at_restart"] = sum(bin(b).count("1") for b in bits)
            broker.restart()
            os.kill(pid, signal.SIGCONT)
        ev = listener.wait_state(device, "VERIFIED", sha, timeout=60)
        wall = time.monotonic() - t0
        stop.set()
        if use_hwm:
            samples.append(_status_kb(pid, "VmHWM") * 1024)
        else:
            th.join()
        listener.wait_state(device, "HEALTHY", sha, timeout=120)
        fetch = ev["detail"]["fetch"]
        return {
            "fetch": fetch,
            "wall_s": wall,
            "rss_base_mb": base / 2**20,
            "rss_peak_growth_mb": (max(samples, default=base) - base) / 2**20,
            **restart,
        }
    finally:
        agent.stop()


def run_mosquitto_sub(tmp: Path, broker: Broker, topic: str, count: int) -> float:
    """Seconds for mosquitto_sub to receive ``count`` retained messages into a file (process start included)."""
    out = tmp / "sub.bin"
    t0 = time.monotonic()
    with out.open("wb") as fh:
        subprocess.run(
            [
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                str(broker.port),
                "-q",
                "1",
                "-N",
                "-C",
                str(count),
                "-W",
                "300",
                "-t",
                topic,
            ],
            stdout=fh,
            check=True,
        )
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=50.0)
    ap.add_argument("--chunk-kb", type=int, default=1024)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument(
        "--reps", type=int, default=7, help="Repetitions of each transfer (medians reported)."
    )
    ap.add_argument("--keep", action="store_true", help="Keep the temp dir (logs) for inspection.")
    args = ap.parse_args()
    for tool in ("mosquitto", "mosquitto_sub"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            sys.exit(f"error: {tool} not found (apt-get install mosquitto mosquitto-clients)")
    from fleet.mqtt import broker_config
    from fleet.publish import publish_artifact

    tmp = Path(tempfile.mkdtemp(prefix="edgefleet-bench-"))
    broker = Broker(tmp / "broker")
    broker.start()
    listener = Listener(broker.url)
    try:
        keys = make_keys(tmp / "keys")
        params = int(args.size_mb * 1e6 / 4)
        t0 = time.monotonic()
        art = make_artifact(tmp / "art", keys, version="1.0.0", extra_params=params)
        art2 = make_artifact(tmp / "art", keys, version="1.0.1", seed=1, extra_params=params)
        size = art.stat().st_size
        print(f"artifact: {size / 1e6:.1f} MB (made in {time.monotonic() - t0:.1f}s)")
        chunk = args.chunk_kb * 1024
        n = math.ceil(size / chunk)
        cfg = broker_config(broker.url)
        r1 = publish_artifact(art, cfg, chunk_size=chunk, force=True)
        r2 = publish_artifact(art2, cfg, chunk_size=chunk, force=True)
        print(
            f"published: {n} chunks of {args.chunk_kb} KiB in {r1.seconds:.2f}s ({size / r1.seconds / 1e6:.1f} MB/s)"
        )

        # mosquitto_sub: the whole artifact, and (to take its process start + connect out) one small message
        sub_s = statistics.median(
            run_mosquitto_sub(tmp, broker, topics.artifact_chunks_all(r1.sha256), n)
            for _ in range(args.reps)
        )
        start_s = statistics.median(
            run_mosquitto_sub(tmp, broker, topics.artifact_manifest(r1.sha256), 1)
            for _ in range(args.reps)
        )
        sub_mbps_raw = size / sub_s / 1e6
        sub_mbps = size / max(sub_s - start_s, 1e-6) / 1e6
        print(
            f"mosquitto_sub: {size / 1e6:.1f} MB in {sub_s:.3f}s = {sub_mbps_raw:.1f} MB/s; without its "
            f"start-up ({start_s:.3f}s, one small message) {sub_mbps:.1f} MB/s (median of {args.reps})"
        )

        runs = []
        for rep in range(args.reps):
            a = run_agent_transfer(
                tmp, broker, listener, keys, f"bench-a{rep}", "tiny@1.0.0", r1.sha256, args.window
            )
            f = a["fetch"]
            a["mbps"] = f["fetched_bytes"] / f["seconds"] / 1e6
            runs.append(a)
            print(
                f"agent run {rep + 1}: {f['fetched_bytes'] / 1e6:.1f} MB in {f['seconds']:.3f}s = "
                f"{a['mbps']:.1f} MB/s; RSS {a['rss_base_mb']:.1f} MB before, peak growth "
                f"{a['rss_peak_growth_mb']:.1f} MB; deploy->VERIFIED (incl. hash + signature) {a['wall_s']:.2f}s"
            )
        agent_mbps = statistics.median(r["mbps"] for r in runs)
        rss_growth = max(r["rss_peak_growth_mb"] for r in runs)

        b = run_agent_transfer(
            tmp,
            broker,
            listener,
            keys,
            "bench-b",
            "tiny@1.0.1",
            r2.sha256,
            args.window,
            stop_at=0.5,
        )
        fb = b["fetch"]
        exercised = b["done_at_restart"] < n
        print(
            f"resume: broker restarted with {b['done_at_restart']}/{n} chunks on disk; afterwards the agent "
            f"fetched {fb['fetched_chunks']} chunks in total, refetched {fb['refetched_chunks']}"
            + ("" if exercised else " (WARNING: transfer had finished before the restart)")
        )
        ratio = agent_mbps / sub_mbps
        print(
            f"transfer ratio agent/mosquitto_sub: {ratio:.2f} (vs mosquitto_sub with its start-up: "
            f"{agent_mbps / sub_mbps_raw:.2f})"
        )
        print(
            json.dumps(
                {
                    "artifact_mb": round(size / 1e6, 2),
                    "chunk_kb": args.chunk_kb,
                    "window": args.window,
                    "reps": args.reps,
                    "agent_mb_per_s": round(agent_mbps, 2),
                    "mosquitto_sub_mb_per_s": round(sub_mbps, 2),
                    "mosquitto_sub_mb_per_s_with_startup": round(sub_mbps_raw, 2),
                    "transfer_ratio": round(ratio, 3),
                    "transfer_ratio_vs_sub_with_startup": round(agent_mbps / sub_mbps_raw, 3),
                    "agent_peak_rss_growth_mb": round(rss_growth, 2),
                    "resume_refetched_chunks": fb["refetched_chunks"],
                    "resume_chunks_done_at_restart": b["done_at_restart"],
                    "resume_exercised": exercised,
                }
            )
        )
    finally:
        listener.close()
        broker.stop()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}")


if __name__ == "__main__":
    main()
