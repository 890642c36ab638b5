"""The builder's own digits artifacts (ONNX and LiteRT) on an agent-only install: deployed through
mosquitto, served over HTTP, reporting telemetry, and the agent's idle RSS with the model loaded.

The artifacts are built once on the workstation (torch) and handed over in EDGEFLEET_DIGITS_DIR
(digits-*.efa and the public key edgefleet.pub); `.ci/run` does this for the dependency-floor,
Python 3.10 and aarch64 jobs, which have no builder. EDGEFLEET_FIGURES names a JSON file the
measured figures are added to.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.device import machine
from agent.protocol.artifact import verify_artifact
from agent.protocol.profile import default_profiles_dir, get_profile
from agent.protocol.signing import load_public_key
from agent.runtime import available_runtimes
from tests.agent_helpers import (
    TIME_SCALE,
    Broker,
    Listener,
    deploy,
    free_port,
    publish,
)

pytestmark = pytest.mark.integration

DIGITS_DIR = os.environ.get("EDGEFLEET_DIGITS_DIR", "")


def _artifacts() -> dict[str, Path]:
    """runtime -> the artifact to deploy: the profile matching this machine's arch first."""
    if not DIGITS_DIR:
        return {}
    key = [load_public_key(Path(DIGITS_DIR) / "edgefleet.pub")]
    best: dict[str, tuple[int, Path]] = {}
    for path in sorted(Path(DIGITS_DIR).glob("digits-*.efa")):
        m = verify_artifact(path, key).manifest
        arch = get_profile(m.profile, default_profiles_dir()).hardware.arch
        rank = 0 if arch == machine() else 1
        if m.runtime not in best or rank < best[m.runtime][0]:
            best[m.runtime] = (rank, path)
    return {rt: p for rt, (_, p) in best.items()}


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("runtime", ["onnxruntime", "litert"])
def test_builder_digits_artifact_deploys_serves_and_reports(
    runtime: str, tmp_path: Path, broker: Broker, listener: Listener, agents: Any
) -> None:
    if not DIGITS_DIR:
        pytest.skip(
            "EDGEFLEET_DIGITS_DIR is not set (.ci/run builds the digits artifacts for this job)"
        )
    if runtime not in available_runtimes():
        pytest.skip(f"runtime {runtime} is not installed here")
    art = _artifacts().get(runtime)
    if art is None:
        pytest.skip(f"no {runtime} digits artifact in {DIGITS_DIR}")
    m = verify_artifact(art, [load_public_key(Path(DIGITS_DIR) / "edgefleet.pub")]).manifest
    sha = publish(broker.url, art, chunk_size=64 * 1024)
    port = free_port()
    dev = f"digits-{runtime}"
    proc = agents.start(
        dev,
        keys=[Path(DIGITS_DIR) / "edgefleet.pub"],
        profile=m.profile,
        runtimes=(runtime,),
        serve={"port": port},
        telemetry={"interval_s": 1.0},
        max_p95_ms=1000.0 * TIME_SCALE,
        p95_slack_ms=50.0 * TIME_SCALE,
    )
    deploy(broker.url, f"digits@{m.version}", device=dev)
    listener.wait_state(dev, "HEALTHY", sha, timeout=120)
    # serve: one sample through the Open Inference Protocol v2 endpoint, shaped as its metadata says
    base = f"http://127.0.0.1:{port}/v2/models/{m.name}"
    with urllib.request.urlopen(base, timeout=30 * TIME_SCALE) as r:
        meta = json.loads(r.read())["inputs"][0]
    shape = [1, *[d if isinstance(d, int) and d > 0 else 1 for d in meta["shape"][1:]]]
    body = json.dumps(
        {
            "inputs": [
                {
                    "name": meta["name"],
                    "datatype": meta["datatype"],
                    "shape": shape,
                    "data": [0] * int(np.prod(shape)),
                }
            ]
        }
    ).encode()
    req = urllib.request.Request(
        f"{base}/infer", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=30 * TIME_SCALE) as r:
            out = json.loads(r.read())
    except urllib.error.HTTPError as exc:
        raise AssertionError(
            f"infer answered {exc.code}: {exc.read()[:500]!r} (metadata {meta})"
        ) from None
    assert len(out["outputs"][0]["data"]) == 10
    # telemetry: a message that names the active model and counts the request
    from agent.protocol import topics

    tel = listener.wait_message(
        topics.device_topic(dev, "telemetry"),
        lambda d: (
            (d.get("model") or d.get("active") or {}).get("sha256") == sha or sha in json.dumps(d)
        ),
        timeout=60,
    )
    assert tel
    # idle RSS with the model loaded: let the agent settle, then read the process's VmRSS
    assert proc.proc is not None
    time.sleep(3.0)
    rss = _rss_mb(proc.proc.pid)
    print(f"\nidle RSS {machine()} {runtime} ({art.name}): {rss:.1f} MB")
    figures = os.environ.get("EDGEFLEET_FIGURES")
    if figures:
        p = Path(figures)
        doc = json.loads(p.read_text()) if p.exists() else {}
        doc[f"idle_rss_mb_{runtime}"] = round(rss, 1)
        doc["machine"] = machine()
        p.write_text(json.dumps(doc))
