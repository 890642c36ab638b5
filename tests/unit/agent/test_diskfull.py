"""A full disk (ENOSPC injected where the agent writes) and oversized announcements: the download
is discarded first, state files stay consistent, the active model keeps serving, the deployment
waits for space (not rejected) and completes by itself once writes succeed again."""

from __future__ import annotations

import errno
import json
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import load_config
from agent.deploy.agent import Agent
from agent.deploy.machine import AgentFile, InstallRecord, Phase
from agent.deploy.outbox import SEQ_SAVE_EVERY
from agent.deploy.policy import resolve_policy
from agent.protocol import topics
from agent.protocol.messages import encode
from agent.store import chunks, fsutil, space, versions
from agent.telemetry.buffer import TelemetryBuffer
from agent.telemetry.latency import LatencyRecorder
from agent.telemetry.reporter import TelemetryReporter
from agent.telemetry.thermal import ThermalReader
from agent.transport.fake import FakeTransport
from fleet.publish import announcement
from tests.agent_helpers import TIME_SCALE, Keys, make_artifact, make_keys, sealed_for, write_config

CHUNK = 1024


def enospc(*_: Any, **__: Any) -> Any:
    raise OSError(errno.ENOSPC, "No space left on device")


def failing(times: int, real: Callable[..., Any]) -> Callable[..., Any]:
    """``real``, except that its first ``times`` calls raise ENOSPC."""
    left = [times]

    def call(*a: Any, **kw: Any) -> Any:
        if left[0] > 0:
            left[0] -= 1
            enospc()
        return real(*a, **kw)

    return call


@pytest.fixture(scope="module")
def arts(tmp_path_factory: pytest.TempPathFactory) -> tuple[Keys, Path, Path]:
    tmp = tmp_path_factory.mktemp("arts")
    keys = make_keys(tmp / "keys")
    return (
        keys,
        make_artifact(tmp, keys, version="1.0.0"),
        make_artifact(tmp, keys, version="2.0.0", seed=1),
    )


class Rig:
    """An agent on the fake transport serving v1, with v2 published and not yet deployed."""

    def __init__(self, tmp: Path, arts: tuple[Keys, Path, Path], **transfer: Any) -> None:
        keys, a1, a2 = arts
        cfg = load_config(
            write_config(
                tmp / "agent.toml",
                "dev",
                "mqtt://127.0.0.1:1",
                [keys.public],
                tmp / "state",
                probation_s=0.0,
                transfer={"disk_retry_s": 0.05, "disk_retry_max_s": 0.2, **transfer},
            )
        )
        self.state = cfg.state_dir
        self.fake = FakeTransport()
        self.agent = Agent(cfg, resolve_policy(cfg), self.fake)
        self.agent.start()
        self.sha1, self.sha2 = self.publish(a1), self.publish(a2)
        self.deploy("1.0.0", self.sha1)
        self.until(lambda: self.state_of(self.sha1) == "HEALTHY")

    def publish(self, art: Path) -> str:
        ann = announcement(art, CHUNK)
        data = art.read_bytes()
        for i in range(len(ann.chunks)):
            self.fake.retained[topics.artifact_chunk(ann.sha256, i)] = data[
                i * CHUNK : (i + 1) * CHUNK
            ]
        self.fake.retained[topics.artifact_manifest(ann.sha256)] = encode(ann)
        return ann.sha256

    def deploy(self, version: str, sha: str) -> None:
        payload = sealed_for(
            self.fake.retained[topics.artifact_manifest(sha)],
            "tiny",
            version,
            device="dev",
            deployed_at=str(time.time_ns()),
        )
        self.fake.inject(topics.device_topic("dev", "deployment"), payload, retain=True)

    def events(self, sha: str | None = None) -> list[dict[str, Any]]:
        evs = [json.loads(p) for t, p, _ in self.fake.published if t.endswith("/events")]
        return [e for e in evs if sha is None or e.get("sha256") == sha]

    def state_of(self, sha: str) -> str | None:
        evs = [e for e in self.events(sha) if e["kind"] == "deployment"]
        return evs[-1]["state"] if evs else None

    def waiting(self) -> list[dict[str, Any]]:
        return [e for e in self.events(self.sha2) if "waiting for disk space" in e["reason"]]

    def until(self, cond: Callable[[], bool], timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout * TIME_SCALE
        while not cond():
            assert time.monotonic() < deadline, [
                (e["kind"], e["state"], e["reason"]) for e in self.events()
            ][-12:]
            self.agent.step(0.01)

    def downloads(self) -> list[str]:
        return sorted(p.name for p in (self.state / "downloads").iterdir())

    def serving_v1(self) -> None:
        a = self.agent
        assert a.active is not None and a.active.sha256 == self.sha1
        out = a.infer({"x": np.zeros((1, 64), np.float32)})
        assert out["y"].shape == (1, 10)
        assert self.sha2 not in a.rejected
        assert not a.machine.illegal

    def recovers(self) -> None:
        """Writes succeed again: v2 is fetched and installed without anything else happening."""
        self.until(lambda: self.state_of(self.sha2) == "HEALTHY")
        assert self.agent.active is not None and self.agent.active.sha256 == self.sha2
        assert not self.agent.machine.illegal


# -- before anything is written ------------------------------------------------------------------


def test_artifact_over_the_size_limit_is_rejected_before_a_part_file(
    tmp_path: Path, arts: tuple[Keys, Path, Path]
) -> None:
    big = make_artifact(tmp_path, arts[0], version="3.0.0", seed=3, extra_params=200_000)
    rig = Rig(tmp_path, arts, max_artifact_mb=0.5)  # v1 and v2 are a few KB, this 800 KB
    sha = rig.publish(big)
    rig.deploy("3.0.0", sha)
    rig.until(lambda: rig.state_of(sha) == "REJECTED")
    ev = rig.events(sha)[-1]
    assert "this device allows 0.5 MB" in ev["reason"]
    assert ev["reason"].startswith("artifact is ") and "this device allows" in ev["reason"]
    assert rig.downloads() == []
    assert rig.agent.active is not None and rig.agent.active.sha256 == rig.sha1


def test_size_reason_reads_like_the_config() -> None:
    with pytest.raises(
        space.TooLargeError, match=r"artifact is 100\.0 GB, this device allows 4096 MB"
    ):
        space.check_size(100 * 1024**3, 4096)
    space.check_size(4096 * space.MB, 4096)  # at the limit: fine


def test_too_little_free_space_waits_then_fetches_by_itself(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts, free_space_margin_mb=1)
    monkeypatch.setattr(space, "free_bytes", lambda p: 40 * space.MB // 100)
    rig.deploy("2.0.0", rig.sha2)
    rig.until(lambda: len(rig.waiting()) >= 2)  # checked again on the timer, still short
    ev = rig.waiting()[0]
    assert ev["state"] == "FETCHING"
    assert f"free on {rig.state}" in ev["reason"] and "410 KB free" in ev["reason"]
    assert ev["detail"]["needs_bytes"] > space.MB and ev["detail"]["free_bytes"] < space.MB
    # backoff: each wait at least as long as the one before, capped at disk_retry_max_s
    delays = [e["detail"]["retry_in_s"] for e in rig.waiting()]
    assert delays == sorted(delays) and max(delays) <= 0.2
    assert rig.downloads() == []  # no .part preallocated
    rig.serving_v1()
    monkeypatch.undo()
    rig.recovers()


# -- ENOSPC while writing --------------------------------------------------------------------------


def test_enospc_writing_a_chunk_discards_and_resumes(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts)
    real = chunks.os.pwrite
    left = [1]

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        if len(data) > 1 and left[0]:  # a chunk into the .part, not a bitmap byte
            left[0] -= 1
            enospc()
        return real(fd, data, offset)

    monkeypatch.setattr(chunks.os, "pwrite", pwrite)
    rig.deploy("2.0.0", rig.sha2)
    rig.until(lambda: bool(rig.waiting()))
    ev = rig.waiting()[0]
    assert "cannot write the download" in ev["reason"] and "No space left" in ev["reason"]
    assert rig.downloads() == []  # discarded: .part, .progress and .json
    assert rig.agent.machine.phase is Phase.WAITING_SPACE
    assert not (rig.state / "install.json").exists()
    rig.serving_v1()
    rig.recovers()


def test_enospc_writing_the_progress_file(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts)
    monkeypatch.setattr(chunks, "atomic_write", failing(1, chunks.atomic_write))
    rig.deploy("2.0.0", rig.sha2)
    rig.until(lambda: bool(rig.waiting()))
    assert "cannot create the download" in rig.waiting()[0]["reason"]
    assert rig.downloads() == []
    rig.serving_v1()
    rig.recovers()


def test_enospc_unpacking_cleans_the_partial_unpack(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts)
    real = versions.extract_verified
    left = [1]

    def extract(va: Any, dest: Path) -> None:
        if left[0]:
            left[0] -= 1
            dest.mkdir(parents=True)
            (dest / "model.onnx").write_bytes(b"half")
            enospc()
        real(va, dest)

    monkeypatch.setattr(versions, "extract_verified", extract)
    rig.deploy("2.0.0", rig.sha2)
    rig.until(lambda: bool(rig.waiting()))
    assert "disk full while installing" in rig.waiting()[0]["reason"]
    assert [p.name for p in (rig.state / "versions").iterdir() if p.name.startswith(".")] == []
    assert rig.downloads() == []
    assert not (rig.state / "install.json").exists()  # VERIFIED's record cleared
    rig.serving_v1()
    rig.recovers()


@pytest.mark.parametrize("phase", [Phase.VERIFIED, Phase.SELF_TEST, Phase.ACTIVATING])
def test_enospc_writing_install_json(
    phase: Phase,
    tmp_path: Path,
    arts: tuple[Keys, Path, Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rig = Rig(tmp_path, arts)
    real = InstallRecord.write
    left = [1]

    def write(self: InstallRecord, path: Path) -> None:
        if self.phase is phase and left[0]:
            left[0] -= 1
            enospc()
        real(self, path)

    monkeypatch.setattr(InstallRecord, "write", write)
    rig.deploy("2.0.0", rig.sha2)
    rig.until(lambda: bool(rig.waiting()))
    assert rig.downloads() == []
    assert not (rig.state / "install.json").exists()
    # an unpacked candidate is removed; the active link never moved
    names = {p.name for p in (rig.state / "versions").iterdir()}
    assert rig.agent.active is not None and names == {rig.agent.active.dir.name}
    rig.serving_v1()
    rig.recovers()


def test_enospc_writing_install_json_for_probation_keeps_the_new_model(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts)
    real = InstallRecord.write

    def write(self: InstallRecord, path: Path) -> None:
        if self.phase is Phase.PROBATION:
            enospc()
        real(self, path)

    monkeypatch.setattr(InstallRecord, "write", write)
    rig.deploy("2.0.0", rig.sha2)
    rig.recovers()  # still says ACTIVATING meanwhile, which a restart reads like PROBATION


def test_enospc_saving_agent_json_on_a_rejection_still_discards(
    tmp_path: Path, arts: tuple[Keys, Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    rig = Rig(tmp_path, arts)
    bad = make_artifact(tmp_path, arts[0], version="3.0.0", seed=2, bad_golden=True)
    sha3 = rig.publish(bad)
    before = (rig.state / "agent.json").read_bytes()
    real = fsutil.write_json

    def write_json(path: Path, doc: Any, durable: bool = True) -> None:
        if path.name == "agent.json":
            enospc()
        real(path, doc, durable)

    monkeypatch.setattr("agent.deploy.machine.write_json", write_json)
    rig.deploy("3.0.0", sha3)
    rig.until(lambda: rig.state_of(sha3) == "ROLLED_BACK")
    assert [n for n in rig.downloads() if n.startswith(sha3)] == []
    assert (rig.state / "agent.json").read_bytes() == before  # old file intact
    assert rig.agent.file.unsaved and sha3 in rig.agent.rejected  # kept in memory
    assert rig.agent.active is not None and rig.agent.active.sha256 == rig.sha1
    monkeypatch.undo()
    rig.agent.publish_state()  # the next message saves it
    assert not rig.agent.file.unsaved
    assert sha3 in json.loads((rig.state / "agent.json").read_bytes())["rejected"]


def test_events_go_out_while_agent_json_cannot_be_saved(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    f = AgentFile(tmp_path / "agent.json")
    f.seq = 5
    assert f.save()
    monkeypatch.setattr("agent.deploy.machine.write_json", enospc)
    f.seq = 9
    assert f.save() is False and f.unsaved
    assert json.loads((tmp_path / "agent.json").read_bytes())["seq"] == 5
    assert [p.name for p in tmp_path.iterdir()] == ["agent.json"]
    assert SEQ_SAVE_EVERY > 1


# -- the atomic write itself -------------------------------------------------------------------------


@pytest.mark.parametrize("durable", [True, False])
def test_failed_atomic_write_keeps_the_old_file_and_no_temp(
    durable: bool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "state.json"
    fsutil.write_json(target, {"v": 1})
    real_open = Path.open

    class Full:
        def __init__(self, fh: Any) -> None:
            self.fh = fh

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.fh.close()

        def write(self, data: bytes) -> int:
            self.fh.write(data[: len(data) // 2])
            enospc()
            return 0

    def open_(self: Path, mode: str = "r", *a: Any, **kw: Any) -> Any:
        fh = real_open(self, mode, *a, **kw)
        return Full(fh) if "w" in mode else fh

    monkeypatch.setattr(Path, "open", open_)
    with pytest.raises(OSError) as err:
        fsutil.write_json(target, {"v": 2}, durable=durable)
    assert err.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert json.loads(target.read_bytes()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


# -- telemetry -------------------------------------------------------------------------------------


def _reporter(tmp: Path) -> tuple[TelemetryReporter, FakeTransport]:
    from agent.config import AgentConfig

    cfg = AgentConfig.model_validate(
        {
            "device_id": "dev1",
            "profile": "test-cpu",
            "state_dir": str(tmp / "state"),
            "root_key": str(tmp / "root.pub"),
            "telemetry": {"interval_s": 0.05, "sysfs_root": str(tmp)},
        }
    )
    fake = FakeTransport()
    fake.start(lambda *a: None, lambda: None)
    rep = TelemetryReporter(
        cfg, fake, LatencyRecorder(), lambda: None, ThermalReader(tmp, vcgencmd=None)
    )
    return rep, fake


def _sent(fake: FakeTransport) -> list[dict[str, Any]]:
    return [json.loads(p) for t, p, _ in fake.published if t.endswith("/telemetry")]


def _full(*_: Any, **__: Any) -> Any:
    raise sqlite3.OperationalError("database or disk is full")


def test_telemetry_that_cannot_be_buffered_is_counted_as_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rep, fake = _reporter(tmp_path)
    rep.report()
    rep.pump()
    with monkeypatch.context() as m:
        m.setattr(TelemetryBuffer, "append", _full)  # the seq is taken, the message not stored
        assert rep.report() is None
        assert rep.report() is None
        m.setattr(TelemetryBuffer, "reserve", _full)  # nothing can be written at all
        assert rep.report() is None
        m.setattr(TelemetryBuffer, "delete", _full)
        rep.pump()  # acknowledged messages stay in flight until they can be deleted
    msg = rep.report()
    assert msg is not None and msg.buffer["dropped"] == 3 and msg.buffer["dropped_total"] == 3
    while rep.pump():
        pass
    sent = _sent(fake)
    assert sum(d["buffer"]["dropped"] for d in sent) == 3
    assert [d["seq"] for d in sent] == [1, 4]  # 2 and 3 were taken by messages not stored
    msg = rep.report()
    assert msg is not None and msg.buffer["dropped"] == 0 and msg.buffer["dropped_total"] == 3
    rep.buffer.close()


def test_failing_buffer_does_not_stop_the_reporter_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rep, fake = _reporter(tmp_path)
    monkeypatch.setattr(TelemetryBuffer, "reserve", _full)
    rep.start()
    try:
        deadline = time.monotonic() + 20 * TIME_SCALE
        while rep.unbuffered < 3:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert rep._thread is not None and rep._thread.is_alive()
        monkeypatch.undo()
        while not _sent(fake):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert _sent(fake)[0]["buffer"]["dropped"] >= 3
    finally:
        rep.stop()


def test_disk_full_is_told_from_other_errors() -> None:
    assert space.is_disk_full(OSError(errno.ENOSPC, "x"))
    assert space.is_disk_full(OSError(errno.EDQUOT, "x"))
    assert not space.is_disk_full(OSError(errno.EACCES, "x"))
    assert space.is_disk_full(sqlite3.OperationalError("database or disk is full"))
    assert not space.is_disk_full(sqlite3.OperationalError("database is locked"))


def test_buffer_that_cannot_be_opened_at_start_counts_and_opens_later(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = TelemetryBuffer._open
    left = [2]  # the open in __init__ and the first report's

    def open_(self: TelemetryBuffer) -> sqlite3.Connection:
        if left[0]:
            left[0] -= 1
            _full()
        return real(self)

    monkeypatch.setattr(TelemetryBuffer, "_open", open_)
    rep, _ = _reporter(tmp_path)  # starts all the same
    assert rep.buffer.pending() == 0 and rep.pump() == 0
    assert rep.report() is None
    msg = rep.report()
    assert msg is not None and msg.buffer["dropped"] == 1
    rep.buffer.close()


def test_drop_counts_in_memory_are_saved_when_the_reporter_stops(tmp_path: Path) -> None:
    rep, _ = _reporter(tmp_path)
    rep.unbuffered, rep.unreported = 2, 1
    rep.stop()
    buf = TelemetryBuffer(tmp_path / "state" / "telemetry", 100)
    res = buf.reserve()
    assert (res.dropped, res.dropped_total) == (3, 2)
    buf.close()
