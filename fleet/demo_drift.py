"""`edgefleet demo --drift`: the feedback loop, after the demo's rollouts, on the same fleet.

The world changes under a deployed model and the fleet closes the loop with its own tools:

1. the application's inputs shift on one group (a new camera: raised black level, lower
   contrast) and it starts sending each sample's label as the v2 ``label`` parameter;
2. the agents' monitors raise ``drift`` events; the HTML report charts them;
3. capture is turned on by a signed deployment of the running version (``deploy --capture``);
4. the captured samples are exported from the collector's database as build data
   (``edgefleet feedback export``), de-duplicated, and split: half to train, half held out;
5. the digits CNN is fine-tuned on its training data plus the captured half, and the next
   version is built with the held-out captured data as its eval data (so its accuracy gates
   and reference profile describe the world the devices now see);
6. a canary rollout of that version; the devices' drift scores go back under the threshold.

Every step uses what a user would: the collector's database, signed deployments, the builder.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.broker import BrokerConfig
from agent.errors import EdgefleetError
from fleet.appload import AppLoad
from fleet.trust import Operator

SHIFT = "a new camera (raised black level, lower contrast: x -> 0.35 + 0.5 x)"
# Capture for the loop: every labelled request, within caps that fit the demo's traffic.
CAPTURE = (
    "sample_rate=1.0",
    "triggers=label",
    "max_per_hour=5000",
    "max_bytes_per_hour=8000000",
)
WANT_SAMPLES = 500  # captured samples to export (the application cycles through 450 images)
NEXT_VERSION = "1.2.0"


def washed_out(x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    return np.asarray(0.35 + 0.5 * x, np.float32)


@dataclass
class Fleet:
    """What the drift stage needs of the running demo."""

    broker: BrokerConfig
    db: Path
    run: Path
    cache: Path
    work: Path
    group: str  # the group whose inputs shift (one profile)
    devices: list[str]
    signer: Operator
    app: AppLoad
    current: str  # NAME@VERSION the group runs
    say: Callable[[str], None]
    rollout: Callable[[str, str], None]  # (spec, profile): a canary rollout, raises unless done
    publish: Callable[[Path], None]


def _query(db: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    from fleet.db import open_db

    fdb = open_db(str(db), readonly=True)
    try:
        return fdb.query(sql, params) if fdb.has_table("events") else []
    finally:
        fdb.close()


def _wait(what: str, check: Callable[[], Any], timeout: float, every: float = 1.0) -> Any:
    end = time.monotonic() + timeout
    while True:
        with contextlib.suppress(Exception):  # the collector may be mid-write (sqlite busy)
            got = check()
            if got:
                return got
        if time.monotonic() > end:
            raise EdgefleetError(f"drift loop: {what} within {timeout:g}s")
        time.sleep(every)


def _drift_events(db: Path, devices: list[str], since: float) -> dict[str, dict[str, Any]]:
    rows = _query(
        db,
        "SELECT device, ts, version, reason, detail FROM events WHERE kind = 'drift' AND ts >= ?"
        " ORDER BY seq",
        (since,),
    )
    opened = {r["device"]: r for r in rows if not str(r["reason"]).startswith("drift ended")}
    return opened if all(d in opened for d in devices) else {}


def _settled(db: Path, devices: list[str], version: str, threshold: float) -> dict[str, float]:
    """Each device's last 3 monitor windows on ``version``: their max drift, when all are
    under ``threshold`` (else empty)."""
    out = {}
    for d in devices:
        rows = _query(
            db,
            "SELECT drift_max FROM monitor WHERE device = ? AND version = ? AND drift_max IS NOT"
            " NULL ORDER BY seq DESC LIMIT 3",
            (d, version),
        )
        if len(rows) < 3 or any(r["drift_max"] >= threshold for r in rows):
            return {}
        out[d] = max(r["drift_max"] for r in rows)
    return out


def _accuracy(app: AppLoad, devices: list[str]) -> tuple[int, int]:
    return (
        sum(app.stats[d].correct for d in devices),
        sum(app.stats[d].ok for d in devices),
    )


def _since(before: tuple[int, int], after: tuple[int, int]) -> float | None:
    ok = after[1] - before[1]
    return None if ok <= 0 else round((after[0] - before[0]) / ok, 4)


def _split(exported: Path, out: Path) -> tuple[Path, Path, int]:
    """Unique captured samples (the application repeats its images) split in two halves."""
    with np.load(exported) as d:
        x, y = np.asarray(d["input"], np.float32), np.asarray(d["y"], np.int64)
    _, first = np.unique(x.reshape(len(x), -1), axis=0, return_index=True)
    idx = np.random.default_rng(0).permutation(np.sort(first))
    half = len(idx) // 2
    train, held = out / "captured_train.npz", out / "captured_holdout.npz"
    np.savez(train, input=x[idx[:half]], y=y[idx[:half]])
    np.savez(held, input=x[idx[half:]], y=y[idx[half:]])
    return train, held, len(idx)


def run_drift_loop(f: Fleet) -> dict[str, Any]:
    """The loop (module docstring); returns what it measured. Raises EdgefleetError on a step
    that does not happen in time."""
    from fleet.deploy import capture_keys, deploy

    t0, say = time.time(), f.say
    acc0 = _accuracy(f.app, f.devices)
    time.sleep(3.0)  # a few seconds of the old world for the accuracy comparison
    acc1 = _accuracy(f.app, f.devices)
    f.app.shift(f.devices, washed_out)
    say(f"[drift 1/6] group {f.group}: the application's inputs change: {SHIFT}")
    events = _wait(
        "no drift event from every device", lambda: _drift_events(f.db, f.devices, t0), 90
    )
    acc2 = _accuracy(f.app, f.devices)
    first = min(e["ts"] for e in events.values())
    thresholds = []
    for e in events.values():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            thresholds.append(float(json.loads(e["detail"])["threshold"]))
    threshold = max(thresholds) if thresholds else 0.25
    say(
        f"[drift 2/6] drift events from {', '.join(sorted(events))} "
        f"{first - t0:.1f}s after the change: {next(iter(events.values()))['reason']}"
    )
    chart = _report(f.db, f.run / "report-drift.html")
    say(f"  report with the drift charts: {chart}")

    keys = capture_keys(CAPTURE)
    deploy(f.broker, f.current, f.signer, group=f.group, capture=keys)
    say(f"[drift 3/6] capture on for {f.current} on group {f.group} (signed deployment: {keys})")
    n = _wait(
        f"fewer than {WANT_SAMPLES} captured samples in the database",
        lambda: (
            (k := _query(f.db, "SELECT COUNT(*) AS n FROM samples")[0]["n"]) >= WANT_SAMPLES and k
        ),
        120,
    )
    say(f"  {n} labelled samples captured and stored by the collector")

    from fleet.db import open_db
    from fleet.feedback import export, write

    fdb = open_db(str(f.db), readonly=True)
    try:
        exp = export(fdb, f.current.split("@")[0], labelled_only=True)
    finally:
        fdb.close()
    exported = f.run / "captured.npz"
    write(exp, exported)
    train, held, unique = _split(exported, f.run)
    say(
        f"[drift 4/6] exported {exp.samples} samples ({unique} unique) to {exported}: "
        f"half to train, half held out as the next version's eval data"
    )

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from examples.digits.prepare import retrain
    from fleet.demo_artifacts import build_artifacts

    weights = f.run / "digits_cnn_next.pt"
    acc = retrain(f.work, train, weights, held)
    arts = build_artifacts(
        f.run / "artifacts",
        f.cache,
        f.work,
        lambda m: None,
        NEXT_VERSION,
        (f.group,),
        model_weights=weights,
        data={"eval": str(held), "calibration": str(train)},
    )
    say(
        f"[drift 5/6] retrained on the captured half: held-out top-1 "
        f"{acc['holdout_top1_before']:.3f} -> {acc['holdout_top1_after']:.3f}; "
        f"built {arts[f.group].name}"
    )
    f.publish(arts[f.group])
    name = f.current.split("@")[0]
    spec = f"{name}@{NEXT_VERSION}"
    f.rollout(spec, f.group)
    settled = _wait(
        f"drift of {spec} not under {threshold:g} on every device",
        lambda: _settled(f.db, f.devices, NEXT_VERSION, threshold),
        90,
    )
    acc3 = _accuracy(f.app, f.devices)
    time.sleep(3.0)  # a few seconds of answers from the new version
    acc4 = _accuracy(f.app, f.devices)
    say(
        f"[drift 6/6] {spec} rolled out: drift back under {threshold:g} "
        f"(last windows' max: {', '.join(f'{d} {v:.3f}' for d, v in sorted(settled.items()))})"
    )
    return {
        "group": f.group,
        "shift": SHIFT,
        "drift_events": {
            d: {"after_s": round(e["ts"] - t0, 1), "reason": e["reason"]}
            for d, e in sorted(events.items())
        },
        "threshold": threshold,
        "captured": {"samples": exp.samples, "unique": unique, "stored": n},
        "retrain": {k: round(v, 4) for k, v in acc.items()},
        "next_version": spec,
        "drift_after": {d: round(v, 4) for d, v in settled.items()},
        "app_top1": {
            "before_shift": _since(acc0, acc1),
            "shifted_old_model": _since(acc1, acc2),
            "shifted_next_version": _since(acc3, acc4),
        },
        "report": str(chart),
    }


def _report(db: Path, out: Path) -> Path:
    """`edgefleet fleet report --html` now; checks that it charts drift."""
    repo = Path(__file__).resolve().parents[1]
    rep = subprocess.run(
        [
            sys.executable,
            "-m",
            "agent.clikit",
            "fleet",
            "report",
            "--db",
            str(db),
            "--html",
            str(out),
        ],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    if rep.returncode != 0:
        raise EdgefleetError(f"fleet report failed: {rep.stderr.strip()[-300:]}")
    if "drift-episodes" not in out.read_text():
        raise EdgefleetError(f"{out}: the report has no drift episodes table")
    return out
