"""Many simulated devices in one process: the real Agent class, each over its own paho client.

What is real: the agent's whole protocol side (birth / Last Will, desired-state reconcile, the
announcement and signature check, windowed chunk fetching with per-chunk sha256 into a
``ChunkStore`` on disk, whole-file ``verify_artifact``, unpack, atomic activation, events and
state messages) over one MQTT connection per device. What is simulated: the runtime. Model
loading, the golden self-test and the on-device benchmark are replaced by a no-op session
(``stub_runtime``), so hundreds of devices fit on one small machine; the HTTP endpoint and
telemetry reporter are off (the ingest bench measures telemetry separately).

Run as a worker: ``python3 bench/fleetsim.py --broker URL --trust-dir DIR --dir D --prefix sim --start 0
--count 100 --group fleet --max-s 300``; it runs until SIGTERM/SIGINT or ``--max-s``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import numpy.typing as npt  # noqa: E402

from agent.config import AgentConfig  # noqa: E402
from agent.deploy import selftest  # noqa: E402
from agent.deploy.agent import Agent  # noqa: E402
from agent.deploy.policy import resolve_policy  # noqa: E402
from agent.runtime import InferenceSession  # noqa: E402
from agent.runtime.base import IOSpec  # noqa: E402
from agent.transport.mqtt import MqttTransport  # noqa: E402

PROFILE = "sim-cpu"


class NoopSession(InferenceSession):
    """Stands in for a loaded model: answers every request with zeros, instantly."""

    @property
    def inputs(self) -> list[IOSpec]:
        return []

    @property
    def outputs(self) -> list[IOSpec]:
        return []

    def infer(
        self, feeds: dict[str, npt.NDArray[np.generic]]
    ) -> dict[str, npt.NDArray[np.generic]]:
        return {"y": np.zeros((1, 1), np.float32)}


def stub_runtime() -> None:
    """Replace model loading, the self-test and the benchmark with no-ops (this process only)."""

    def load(inst: Any, threads: int, providers: Any = ()) -> InferenceSession:
        return NoopSession()

    def check(session: Any, inst: Any, *a: Any, **k: Any) -> selftest.CheckResult:
        return selftest.CheckResult(
            True,
            "",
            selftest.Latency(0.0, 0.0, 0),
            {"p50_ms": 0.0, "p95_ms": 0.0, "simulated": True},
        )

    selftest.load = load
    selftest.check_candidate = check
    selftest.golden_check = lambda *a, **k: None


def device_config(
    device: str, broker: str, trust: Path, state_dir: Path, group: str
) -> AgentConfig:
    doc: dict[str, Any] = {
        "device_id": device,
        "profile": PROFILE,
        "groups": [group],
        "state_dir": str(state_dir),
        "root_key": str(trust / "root.pub"),
        "trust_file": str(trust / "trust.json"),
        "keep_versions": 1,
        "runtimes": ["onnxruntime"],
        "log_level": "warning",
        "broker": {"url": broker, "reconnect_min_s": 1, "reconnect_max_s": 5},
        "transfer": {"window": 8, "stall_s": 20.0},
        "install": {
            "bench_runs": 5,
            "max_p95_ms": 1000.0,
            "probation_s": 0.5,
            "probation_interval_s": 0.5,
        },
        "telemetry": {"enabled": False},
        "serve": {"enabled": False},
    }
    return AgentConfig.model_validate(doc)


class SimFleet:
    """``count`` agents, each with its own paho client and worker thread."""

    def __init__(
        self, broker: str, key: Path, root: Path, prefix: str, start: int, count: int, group: str
    ) -> None:
        self.stop_ev = threading.Event()
        self.threads: list[threading.Thread] = []
        self.agents: list[Agent] = []
        for i in range(start, start + count):
            dev = f"{prefix}-{i:04d}"
            cfg = device_config(dev, broker, key, root / dev, group)
            self.agents.append(
                Agent(cfg, resolve_policy(cfg), MqttTransport(cfg.broker, cfg.client_id))
            )

    def start(self) -> None:
        for a in self.agents:
            th = threading.Thread(target=a.run, args=(self.stop_ev,), name=a.dev, daemon=True)
            th.start()
            self.threads.append(th)

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_ev.set()
        end = time.monotonic() + timeout
        for th in self.threads:
            th.join(max(0.0, end - time.monotonic()))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--broker", required=True)
    ap.add_argument(
        "--trust-dir",
        dest="key",
        required=True,
        type=Path,
        help="directory with root.pub and trust.json (fleet.trust.provision)",
    )
    ap.add_argument("--dir", required=True, type=Path, help="state directories go here")
    ap.add_argument("--prefix", default="sim")
    ap.add_argument("--start", type=int, default=0)
    ap.add_argument("--count", type=int, default=100)
    ap.add_argument("--group", default="fleet")
    ap.add_argument(
        "--max-s", type=float, default=600.0, help="stop after this long whatever happens"
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    stub_runtime()
    fleet = SimFleet(
        args.broker, args.key, args.dir, args.prefix, args.start, args.count, args.group
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    fleet.start()
    print(f"fleetsim: {args.count} devices started", file=sys.stderr, flush=True)
    stop.wait(args.max_s)
    fleet.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
