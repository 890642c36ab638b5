"""bench/llm.py's agent side: a real agent process serving the chosen LLM artifact, measured
side by side with the same model in process.

The artifact is installed in a fresh state directory as a deployment would leave it, a real
mosquitto and `edgefleet-agent run` are started (the agent loads the model, warms it up and
serves it on its v2/OpenAI endpoint), then each round streams one greedy chat answer through the
endpoint and generates the same answer in this process (bench/llm_endpoint.py's measurements),
in turn, so both see the same load. Peak RSS is the agent process's VmHWM.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
# after the repository: bench/fleet.py must not hide the fleet package
sys.path.append(str(REPO / "bench"))

from llm_endpoint import compare, measure_endpoint, measure_inprocess  # noqa: E402

from tests.agent_helpers import Broker, free_port  # noqa: E402


def _config(path: Path, state: Path, pub: Path, broker: str, port: int, threads: int) -> None:
    from fleet.trust import provision

    trust = provision(path.parent / "trust", [pub])
    path.write_text(
        "\n".join(
            [
                'device_id = "bench-llm"',
                'profile = "x86-ipc"',
                f'profiles_dir = "{REPO / "device_profiles"}"',
                f'state_dir = "{state}"',
                f'root_key = "{trust.root_pub}"',
                f'trust_file = "{trust.trust}"',
                f"threads = {threads}",
                "[broker]",
                f'url = "{broker}"',
                "[install]",
                "probation_s = 0",
                "[serve]",
                f"port = {port}",
            ]
        )
        + "\n"
    )


def _start(config: Path, log: Path, timeout: float = 300.0) -> subprocess.Popen[bytes]:
    """The agent, once it told systemd's NOTIFY_SOCKET that it is ready (model loaded)."""
    notify = config.parent / "notify.sock"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(str(notify))
    s.settimeout(timeout)
    env = {**os.environ, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(notify)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "run", "--config", str(config)],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
    )
    try:
        while "READY=1" not in s.recv(4096).decode().split("\n"):
            pass
    except TimeoutError:
        proc.kill()
        raise SystemExit(f"the agent did not get ready in {timeout:g}s (see {log})") from None
    finally:
        s.close()
    return proc


def _wait_serving(url: str, timeout: float = 120.0) -> None:
    import http.client
    import json
    from urllib.parse import urlsplit

    u = urlsplit(url)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            c = http.client.HTTPConnection(u.hostname or "127.0.0.1", u.port or 80, timeout=5)
            c.request("GET", "/v1/models")
            if json.loads(c.getresponse().read()).get("data"):
                return
        except (OSError, ValueError):
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url}: no text-generation model served within {timeout:g}s")


def vm_hwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except (OSError, ValueError):
        return None
    return None


def side_by_side(
    artifact: Path,
    pub: Path,
    folder: Path,
    threads: int,
    prompt: str,
    tokens: int,
    rounds: int,
    log: Any = print,
) -> dict[str, Any]:
    """Interleaved rounds (a warm-up round first, not counted) of the endpoint of a real agent
    serving ``artifact`` and the same model (``folder``) generating in this process."""
    from agent.protocol.artifact import verify_artifact
    from agent.protocol.signing import load_public_key
    from agent.runtime.textgen import load_generator
    from agent.store.versions import VersionStore

    tmp = Path(tempfile.mkdtemp(prefix="ef-bench-llm-", dir="/tmp"))
    broker = Broker(tmp / "broker")
    proc: subprocess.Popen[bytes] | None = None
    gen = None
    try:
        broker.start()
        store = VersionStore(tmp / "state", keep=1)
        store.activate(store.unpack(verify_artifact(artifact, [load_public_key(pub)])))
        port = free_port()
        _config(tmp / "agent.toml", tmp / "state", pub, broker.url, port, threads)
        t0 = time.monotonic()
        proc = _start(tmp / "agent.toml", tmp / "agent.log")
        url = f"http://127.0.0.1:{port}"
        _wait_serving(url)
        log(f"agent serving {artifact.name} after {time.monotonic() - t0:.1f} s (pid {proc.pid})")
        gen = load_generator(folder, threads=threads)
        raw, ep = [], []
        for r in range(rounds + 1):
            if r % 2:  # which goes first alternates: neither always follows the other
                b = measure_endpoint(url, prompt, tokens)
                a = measure_inprocess(gen, prompt, tokens)
            else:
                a = measure_inprocess(gen, prompt, tokens)
                b = measure_endpoint(url, prompt, tokens)
            if r:
                raw.append(a)
                ep.append(b)
        out = compare(raw, ep)
        out["llm_agent_peak_rss_mb"] = vm_hwm_mb(proc.pid)
        out["rounds"] = rounds
        return out
    finally:
        if gen is not None:
            gen.close()
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        broker.stop()
