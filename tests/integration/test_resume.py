"""Resume a transfer across a broker restart and an agent restart; SIGKILL at every install step."""

from __future__ import annotations

import math
import time
from typing import Any

import pytest

from tests.agent_helpers import (
    Broker,
    Listener,
    active_sha,
    check_loadable,
    deploy,
    publish,
    publish_partial,
)

pytestmark = pytest.mark.integration
CHUNK = 1024


def test_resume_after_broker_restart(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    art = artifacts(version="1.0.0")
    n = math.ceil(art.stat().st_size / CHUNK)
    half = list(range(n // 2))
    sha = publish_partial(broker.url, art, CHUNK, half)
    agents.start("r1")
    from tests.agent_helpers import set_deployment

    set_deployment(broker.url, "r1", "tiny", "1.0.0", sha)
    listener.wait_event(
        "r1",
        lambda e: e.get("state") == "FETCHING" and e["detail"].get("progress", 0) >= 0.4,
        timeout=30,
    )
    broker.restart()  # retained chunks persist; the agent reconnects and renews its window
    publish_partial(broker.url, art, CHUNK, list(range(n // 2, n)))
    ev = listener.wait_state("r1", "VERIFIED", sha, timeout=40)
    fetch = ev["detail"]["fetch"]
    assert fetch["refetched_chunks"] == 0
    assert fetch["fetched_chunks"] == n
    listener.wait_state("r1", "HEALTHY", sha, timeout=30)


def test_resume_after_agent_kill_mid_fetch(
    broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    art = artifacts(version="1.0.0")
    n = math.ceil(art.stat().st_size / CHUNK)
    sha = publish(broker.url, art, CHUNK)
    p = agents.start("r2", env={"EDGEFLEET_TEST_PAUSE_AT": "FETCHING"})
    deploy(broker.url, "tiny@1.0.0", device="r2")
    listener.wait_event(
        "r2",
        lambda e: e.get("state") == "FETCHING" and e["detail"].get("progress", 0) >= 0.5,
        timeout=30,
    )
    time.sleep(0.2)
    p.kill()
    assert active_sha(agents.state_dir("r2")) is None
    agents.start("r2", env={"EDGEFLEET_TEST_PAUSE_AT": ""})
    ev = listener.wait_state("r2", "VERIFIED", sha, timeout=40)
    fetch = ev["detail"]["fetch"]
    assert fetch["resumed_chunks"] >= n // 2
    assert fetch["resumed_chunks"] + fetch["fetched_chunks"] == n
    assert fetch["refetched_chunks"] == 0
    listener.wait_state("r2", "HEALTHY", sha, timeout=30)


@pytest.mark.parametrize("step", ["FETCHING", "VERIFIED", "UNPACKED", "SELF_TEST", "ACTIVE"])
def test_sigkill_at_each_step(
    step: str, broker: Broker, listener: Listener, agents: Any, artifacts: Any
) -> None:
    dev = f"k-{step.lower()}"
    sha1 = publish(broker.url, artifacts(version="1.0.0"))
    sha2 = publish(broker.url, artifacts(version="1.1.0", seed=1))
    p = agents.start(dev)
    deploy(broker.url, "tiny@1.0.0", device=dev)
    listener.wait_state(dev, "HEALTHY", sha1, timeout=30)
    p.stop()
    p = agents.start(dev, env={"EDGEFLEET_TEST_PAUSE_AT": step})
    deploy(broker.url, "tiny@1.1.0", device=dev)
    listener.wait_state(dev, step, sha2, timeout=30)
    time.sleep(0.3)
    p.kill()
    sd = agents.state_dir(dev)
    assert check_loadable(sd) in (sha1, sha2)  # old or new, never neither, and it runs
    if step != "ACTIVE":
        assert active_sha(sd) == sha1
    agents.start(dev, env={"EDGEFLEET_TEST_PAUSE_AT": ""})
    listener.wait_state(dev, "HEALTHY", sha2, timeout=40)
    assert check_loadable(sd) == sha2
