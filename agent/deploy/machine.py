"""The deploy state machine: every phase a device can be in, its transitions, and what is on disk.

"What happens if power fails here?" is answered by the ``on_restart`` column of ``TABLE``.
Two things survive a restart: the download (``downloads/SHA.part`` plus its chunk bitmap, each
chunk re-hashed on open) and ``install.json`` (the phase of the install past the download, with
the candidate's directory and the one it replaces). ``versions/active`` is a symlink replaced by
rename, so it names the old or the new version, never neither.

One attempt runs at a time, on the agent's one worker thread:

    IDLE -> FETCHING -> VERIFIED -> UNPACKED -> SELF_TEST -> ACTIVATING -> PROBATION -> HEALTHY
    any failure before ACTIVATING: REJECTED (the artifact is refused) or ROLLED_BACK (it failed
    on this device); during PROBATION: ROLLED_BACK (switched back). HEALTHY, ROLLED_BACK and
    REJECTED end the attempt and behave like IDLE. A full disk before ACTIVATING (too little
    free space announced, or ENOSPC while writing) is WAITING_SPACE: the download is discarded,
    not refused, and fetched again once the space is there (reported as FETCHING with a reason).

The events carry the public names of ``agent.protocol.states`` (PROBATION is reported as
ACTIVE; IDLE and ACTIVATING are not reported). A rollback command acts on the active model:
it is a ROLLED_BACK from any resting phase or PROBATION, and a download in flight goes on.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from agent.protocol.states import DeployState
from agent.store.fsutil import read_json, remove, write_json
from agent.store.space import is_disk_full

log = logging.getLogger("agent.deploy.agent")

# Test hook (documented in docs/protocol.md): sleep at this deployment state so a test can
# SIGKILL the process there. FETCHING pauses once half the chunks are on disk.
PAUSE_ENV = "EDGEFLEET_TEST_PAUSE_AT"


class Phase(str, Enum):
    IDLE = "IDLE"
    FETCHING = "FETCHING"
    WAITING_SPACE = "WAITING_SPACE"
    VERIFIED = "VERIFIED"
    UNPACKED = "UNPACKED"
    SELF_TEST = "SELF_TEST"
    ACTIVATING = "ACTIVATING"
    PROBATION = "PROBATION"
    HEALTHY = "HEALTHY"
    ROLLED_BACK = "ROLLED_BACK"
    REJECTED = "REJECTED"


@dataclass(frozen=True)
class Spec:
    event: DeployState | None  # the state the fleet sees on entry (None: not reported)
    persisted: bool  # install.json names this phase
    on_restart: str  # what a restart (kill, power loss) in this phase finds and does
    to: tuple[Phase, ...]  # the phases it may move to


P = Phase
# From a resting phase: a download starts, waits for disk space, its signed announcement is
# refused, or a rollback command.
_REST = (P.FETCHING, P.WAITING_SPACE, P.REJECTED, P.ROLLED_BACK)
TABLE: dict[Phase, Spec] = {
    P.IDLE: Spec(
        None, False, "nothing in flight; the desired deployment is reconciled again", _REST
    ),
    P.FETCHING: Spec(
        "FETCHING",
        False,
        "the download resumes from its bitmap; chunks on disk are re-hashed, not fetched",
        (P.FETCHING, P.VERIFIED, P.WAITING_SPACE, P.REJECTED, P.IDLE, P.ROLLED_BACK),
    ),
    P.WAITING_SPACE: Spec(
        "FETCHING",
        False,
        "nothing of the download is on disk; it is fetched again once there is room",
        (P.FETCHING, P.WAITING_SPACE, P.REJECTED, P.IDLE, P.ROLLED_BACK),
    ),
    P.VERIFIED: Spec(
        "VERIFIED",
        True,
        "the old model serves; the install restarts from the download",
        (P.UNPACKED, P.WAITING_SPACE, P.REJECTED),
    ),
    P.UNPACKED: Spec(
        "UNPACKED",
        True,
        "the old model serves; the install restarts from the download",
        (P.SELF_TEST, P.WAITING_SPACE, P.REJECTED),
    ),
    P.SELF_TEST: Spec(
        "SELF_TEST",
        True,
        "the old model serves; the install restarts from the download",
        (P.ACTIVATING, P.WAITING_SPACE, P.ROLLED_BACK, P.REJECTED),
    ),
    P.ACTIVATING: Spec(
        None,
        True,
        "if `active` names the candidate, probation starts again; "
        "otherwise the old model serves and the install restarts from the download",
        (P.PROBATION,),
    ),
    P.PROBATION: Spec(
        "ACTIVE", True, "the new model serves; probation starts again", (P.HEALTHY, P.ROLLED_BACK)
    ),
    P.HEALTHY: Spec("HEALTHY", False, "the new model serves; nothing in flight", _REST),
    P.ROLLED_BACK: Spec("ROLLED_BACK", False, "the model switched back to serves", _REST),
    P.REJECTED: Spec(
        "REJECTED",
        False,
        "the old model serves; the artifact stays refused (agent.json), except one given up "
        "because its chunks stopped coming: that one is fetched again",
        _REST,
    ),
}
TRANSITIONS: dict[Phase, tuple[Phase, ...]] = {p: s.to for p, s in TABLE.items()}
# A rollback command during a download switches the active model and leaves the download going.
KEEPS_PHASE = frozenset({(P.FETCHING, P.ROLLED_BACK), (P.WAITING_SPACE, P.ROLLED_BACK)})
# The install.json phases after which a restart finds the candidate active (when `active` says so).
ACTIVATED = (P.ACTIVATING, P.PROBATION)


@dataclass(frozen=True)
class InstallRecord:
    """install.json: ``{"sha256", "dir", "state", "previous"}`` (the format agents before the
    machine wrote for ACTIVATING and PROBATION; they drop a record in any other phase)."""

    sha256: str
    phase: Phase
    dir: str | None = None
    previous: str | None = None

    @classmethod
    def read(cls, path: Path) -> InstallRecord | None:
        doc = read_json(path)
        if not isinstance(doc, dict):
            return None
        try:
            phase = Phase(doc.get("state"))
        except ValueError:
            return None
        d, prev, sha = doc.get("dir"), doc.get("previous"), doc.get("sha256")
        return cls(
            sha if isinstance(sha, str) else "",
            phase,
            d if isinstance(d, str) else None,
            prev if isinstance(prev, str) else None,
        )

    def write(self, path: Path) -> None:
        write_json(
            path,
            {
                "sha256": self.sha256,
                "dir": self.dir,
                "state": self.phase.value,
                "previous": self.previous,
            },
        )


class AgentFile:
    """agent.json: the last saved message seq and the refused artifacts (sha -> reason, deployed_at)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        doc = read_json(path)
        doc = doc if isinstance(doc, dict) else {}
        seq, rej = doc.get("seq", 0), doc.get("rejected", {})
        self.seq: int = seq if isinstance(seq, int) else 0
        self.rejected: dict[str, dict[str, str]] = rej if isinstance(rej, dict) else {}
        self.unsaved = False  # the last save failed (a full disk): the next message tries again

    def save(self) -> bool:
        """Write it; False (logged, the old file intact) when the disk is full.

        Not fsync'd: seq is saved ahead of use (see Outbox) and a lost rejection is tried again.
        A full disk must not stop an event or a refusal: what was not saved is saved with the
        next save that succeeds (while it fails, a restart may repeat up to SEQ_SAVE_EVERY seqs).
        """
        try:
            write_json(self.path, {"seq": self.seq, "rejected": self.rejected}, durable=False)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            log.warning("cannot save %s: %s", self.path, exc)
            self.unsaved = True
            return False
        self.unsaved = False
        return True


Report = Callable[[DeployState, str, Any, "dict[str, Any] | None"], None]


class Machine:
    """The current phase, checked against ``TABLE``, persisted before it is reported."""

    def __init__(self, state_dir: Path, report: Report) -> None:
        self.path = state_dir / "install.json"
        self.report = report
        self.phase = Phase.IDLE
        self.record: InstallRecord | None = None
        self.illegal: list[
            tuple[Phase, Phase]
        ] = []  # transitions outside TABLE (bugs; tests assert none)

    def enter(
        self,
        to: Phase,
        subject: Any = None,
        reason: str = "",
        detail: dict[str, Any] | None = None,
        *,
        sha256: str = "",
        dir: str | None = None,
        previous: str | None = None,
    ) -> None:
        """Move to ``to``: write or clear install.json first, then report the event.

        ``subject`` is the Deployment or Installed the event names; ``sha256``/``dir``/``previous``
        fill install.json for a persisted phase (kept from the previous record when not given).
        """
        frm = self.phase
        if to not in TRANSITIONS[frm]:
            # Never stops a deployment: the table is the documentation, the agent keeps serving.
            log.error(
                "deploy machine: %s -> %s is not in the transition table", frm.value, to.value
            )
            self.illegal.append((frm, to))
        spec = TABLE[to]
        if spec.persisted:
            old = self.record
            self.record = InstallRecord(
                sha256 or (old.sha256 if old else ""),
                to,
                dir if dir is not None else (old.dir if old else None),
                previous if previous is not None else (old.previous if old else None),
            )
            try:
                self.record.write(self.path)
            except OSError as exc:
                # PROBATION on a full disk: install.json keeps ACTIVATING (the write is atomic),
                # which a restart reads the same way. Any other phase is not entered.
                if not (to is Phase.PROBATION and is_disk_full(exc)):
                    self.record = old
                    raise
                log.warning("cannot save %s (%s); it still says ACTIVATING", self.path, exc)
        elif (frm, to) not in KEEPS_PHASE:
            self.clear()
        if (frm, to) not in KEEPS_PHASE:
            self.phase = to
        if spec.event is not None:
            self.report(spec.event, reason, subject, detail)

    def idle(self) -> None:
        """A download given up without a verdict (the desired deployment changed or was cleared)."""
        if self.phase in (Phase.FETCHING, Phase.WAITING_SPACE):
            self.enter(Phase.IDLE)

    def clear(self) -> None:
        if self.record is not None or self.path.exists():
            remove(self.path)
        self.record = None

    # -- restart ------------------------------------------------------------------------------------
    def restore(self, active_dir: str | None) -> Phase:
        """The phase a restart resumes in, from install.json and the ``active`` symlink's target.

        PROBATION when the candidate was activated (it serves; probation starts again); IDLE
        otherwise, with install.json removed: an install cut short before activation restarts
        from the download, and the old model serves meanwhile.
        """
        rec = InstallRecord.read(self.path)
        if (
            rec is not None
            and rec.phase in ACTIVATED
            and active_dir is not None
            and rec.dir == active_dir
        ):
            self.record = InstallRecord(rec.sha256, Phase.PROBATION, rec.dir, rec.previous)
            try:
                self.record.write(self.path)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                # ACTIVATING or PROBATION stays on disk: a restart reads either the same way
                log.warning("cannot save %s: %s", self.path, exc)
            self.phase = Phase.PROBATION
        else:
            self.clear()
            self.phase = Phase.IDLE
        return self.phase

    @staticmethod
    def pause(state: str) -> None:
        if os.environ.get(PAUSE_ENV) == state:
            log.warning("%s=%s: pausing (test hook)", PAUSE_ENV, state)
            time.sleep(600)
