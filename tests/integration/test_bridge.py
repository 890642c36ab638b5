"""A site broker bridged to central (docs/fleet.md, "Bridged sites"): an agent that knows only
the site broker gets its deployment through the bridge, reports to central through it, keeps
serving while the uplink is down and catches up by itself when the uplink comes back."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.protocol import topics
from tests.agent_helpers import (
    AgentProcess,
    Keys,
    Listener,
    active_sha,
    deploy,
    publish,
    write_config,
)
from tests.bridge_helpers import (
    Central,
    SiteBroker,
    Uplink,
    bridge_up,
    retained,
    site_topics,
    wait_for,
)

pytestmark = pytest.mark.integration

GROUP, DEVICE = "north-lab", "north-01"


def seen_since(
    lst: Listener, start: int, topic: str, pred: Callable[[dict[str, Any]], bool]
) -> bool:
    return any(t == topic and pred(json.loads(p)) for t, p in lst.messages[start:])


def test_site_agent_through_bridge_survives_uplink_cut(
    tmp_path: Path, keys: Keys, artifacts: Callable[..., Path]
) -> None:
    t0 = time.monotonic()
    central = Central(tmp_path / "central")
    uplink = Uplink(central.port)
    site = SiteBroker(tmp_path / "site", uplink.port, site_topics([GROUP], [DEVICE]))
    lst: Listener | None = None
    site_lst: Listener | None = None
    agent: AgentProcess | None = None
    try:
        central.start()
        uplink.start()
        site.start()
        wait_for(lambda: bridge_up(site), 15, "bridge connected")

        sha_a = publish(central.url, artifacts(version="1.0.0"))
        sha_other = publish(central.url, artifacts(name="other", version="1.0.0", seed=3))
        deploy(central.url, "tiny@1.0.0", group=GROUP)
        lst = Listener(central.url)
        site_lst = Listener(site.url)

        d = tmp_path / DEVICE
        d.mkdir()
        cfg = write_config(
            d / "agent.toml",
            DEVICE,
            site.url,  # the agent knows only the site broker
            [keys.public],
            d / "state",
            groups=(GROUP,),
            telemetry={"interval_s": 0.5},
        )
        agent = AgentProcess(cfg, d / "agent.log").start()
        lst.wait_state(DEVICE, "HEALTHY", sha_a, timeout=60)  # seen on central
        lst.wait_message(f"edgefleet/v1/devices/{DEVICE}/telemetry", lambda m: True, 20)
        t_healthy = time.monotonic() - t0
        # the artifact store came down whole: the undeployed artifact is on the site too
        assert retained(site.url, topics.artifact_manifest(sha_other)) is not None

        uplink.cut()
        t_cut = time.time()
        wait_for(lambda: not bridge_up(site), 15, "site sees the bridge down")
        n_central = len(lst.messages)
        # the site holds its deployment; a restarted agent comes back with its model
        assert retained(site.url, topics.group_deployment(GROUP)) is not None
        agent.stop()
        n_site = len(site_lst.messages)
        agent.start()
        state_topic = topics.device_topic(DEVICE, "state")
        wait_for(
            lambda: seen_since(
                site_lst,
                n_site,
                state_topic,
                lambda m: m["online"] and (m.get("active") or {}).get("sha256") == sha_a,
            ),
            30,
            "restarted site agent online with its model",
        )
        assert active_sha(d / "state") == sha_a

        # while cut: a new version is published and deployed on central only
        sha_b = publish(central.url, artifacts(version="2.0.0", seed=7))
        deploy(central.url, "tiny@2.0.0", group=GROUP)
        assert retained(site.url, topics.artifact_manifest(sha_b), 0.5) is None
        assert len(lst.messages) == n_central, "nothing crossed the cut uplink"

        tel_topic = topics.device_topic(DEVICE, "telemetry")
        wait_for(
            lambda: seen_since(site_lst, n_site, tel_topic, lambda m: m["ts"] > t_cut),
            20,
            "telemetry on the site during the cut",
        )
        t_restore = time.time()
        uplink.restore()
        lst.wait_state(DEVICE, "HEALTHY", sha_b, timeout=60)
        t_catch_up = time.time() - t_restore
        assert active_sha(d / "state") == sha_b
        # telemetry the agent sent during the cut was queued on the site (local_cleansession
        # false) and reached central after the uplink came back
        assert any(
            t.endswith("/telemetry") and t_cut < json.loads(p)["ts"] < t_restore
            for t, p in lst.messages[n_central:]
        ), "telemetry from the cut reached central"
        print(
            f"HEALTHY via bridge {t_healthy:.1f}s; new version HEALTHY {t_catch_up:.1f}s after "
            f"the uplink came back; total {time.monotonic() - t0:.1f}s; "
            f"uplink connections {uplink.connections}, bytes down {uplink.bytes_down}"
        )
    finally:
        if agent is not None:
            agent.stop()
        for li in (lst, site_lst):
            if li is not None:
                li.close()
        site.stop()
        uplink.cut()
        t_cut = time.time()
        central.stop()
