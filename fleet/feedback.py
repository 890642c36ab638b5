"""Feedback export: captured samples of one model from the fleet database, as build data.

The builder's data format (builder/data.py): one array per model input name, samples on axis 0,
labels in ``y``. Each captured sample contributes its batch rows (a 0-d input counts as one
row). Samples that cannot join the first one's arrays are skipped and counted by reason:
``outputs_only`` (no inputs captured), ``mismatch`` (other input names, dtypes or shapes beyond
axis 0, or inputs disagreeing on the row count), ``bad`` (data that does not decode) and
``unlabelled`` (with ``labelled_only``).
"""

from __future__ import annotations

import base64
import binascii
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.errors import DataError, UsageError
from fleet.db import FleetDB
from fleet.samples_store import DTYPES

Arrays = dict[str, npt.NDArray[Any]]


@dataclass
class Export:
    """What an export holds and what it left out; ``summary()`` is the sidecar JSON."""

    model: str
    arrays: Arrays = field(default_factory=dict)
    samples: int = 0
    rows: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    devices: Counter[str] = field(default_factory=Counter)
    triggers: Counter[str] = field(default_factory=Counter)
    skipped: Counter[str] = field(default_factory=Counter)
    labels: str = "none"  # "all", "none", or "omitted: N of M unlabelled"

    def summary(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "versions": dict(self.versions),
            "samples": self.samples,
            "rows": self.rows,
            "arrays": {
                k: {"dtype": str(v.dtype), "shape": list(v.shape)} for k, v in self.arrays.items()
            },
            "labels": self.labels,
            "devices": dict(self.devices),
            "triggers": dict(self.triggers),
            "skipped": dict(self.skipped),
        }


def _tensor(doc: Any) -> npt.NDArray[Any]:
    """One stored tensor as an array (a 0-d one as one row); ValueError when it does not decode."""
    if not isinstance(doc, dict) or doc.get("dtype") not in DTYPES:
        raise ValueError("not a tensor")
    try:
        raw = base64.b64decode(doc["data"], validate=True)
    except (binascii.Error, TypeError, KeyError):
        raise ValueError("not base64") from None
    arr = np.frombuffer(raw, dtype=np.dtype(doc["dtype"]).newbyteorder("<"))
    arr = arr.reshape([int(d) for d in doc["shape"]]).astype(np.dtype(doc["dtype"]))
    return arr.reshape(1) if arr.ndim == 0 else arr


def _labels(label: Any, rows: int) -> npt.NDArray[Any] | None:
    """A sample's label as ``rows`` rows, or None when it does not fit them."""
    y = np.asarray(label)
    if y.dtype.kind not in "iuf" or y.size == 0:
        return None
    if y.ndim == 0 or (rows == 1 and y.shape[0] != 1):
        y = y[None]
    return y if y.shape[0] == rows else None


def _query(
    db: FleetDB, model: str, version: str | None, triggers: tuple[str, ...]
) -> list[dict[str, Any]]:
    if not db.has_table("samples"):
        raise UsageError(
            f"--db {db.label}: no samples table (schema {db.schema_version()}; a collector of "
            "this version upgrades it)"
        )
    known = [r["model"] for r in db.query("SELECT DISTINCT model FROM samples ORDER BY model")]
    if model not in known:
        have = ", ".join(known) if known else "none"
        raise UsageError(
            f"--model {model}: no samples of this model in {db.label} (models: {have})"
        )
    sql, params = "SELECT * FROM samples WHERE model = ?", [model]
    if version is not None:
        sql += " AND version = ?"
        params.append(version)
    if triggers:
        sql += f" AND trigger IN ({', '.join('?' * len(triggers))})"
        params += list(triggers)
    rows = db.query(sql + " ORDER BY ts, device, seq", params)
    if not rows:
        what = " and ".join(
            ([f"version {version}"] if version else [])
            + ([f"trigger {'/'.join(triggers)}"] if triggers else [])
        )
        raise DataError(f"--model {model}: no samples with {what}")
    return rows


def export(
    db: FleetDB,
    model: str,
    version: str | None = None,
    triggers: tuple[str, ...] = (),
    labelled_only: bool = False,
) -> Export:
    """The captured samples of ``model`` as build arrays (see the module docstring)."""
    out = Export(model)
    parts: dict[str, list[npt.NDArray[Any]]] = {}
    ys: list[npt.NDArray[Any] | None] = []
    first: dict[str, tuple[str, tuple[int, ...]]] | None = None
    for r in _query(db, model, version, triggers):
        if r["inputs"] is None:
            out.skipped["outputs_only"] += 1
            continue
        try:
            tensors = {k: _tensor(v) for k, v in json.loads(r["inputs"]).items()}
        except (ValueError, TypeError, KeyError):
            out.skipped["bad"] += 1
            continue
        sig = {k: (str(a.dtype), a.shape[1:]) for k, a in tensors.items()}
        n_rows = {a.shape[0] for a in tensors.values()}
        if not tensors or len(n_rows) != 1 or (first is not None and sig != first):
            out.skipped["mismatch"] += 1
            continue
        rows = n_rows.pop()
        y = None if r["label"] is None else _labels(json.loads(r["label"]), rows)
        if labelled_only and y is None:
            out.skipped["unlabelled"] += 1
            continue
        first = first or sig
        for k, a in tensors.items():
            parts.setdefault(k, []).append(a)
        ys.append(y)
        out.samples += 1
        out.rows += rows
        out.versions[r["version"]] += 1
        out.devices[r["device"]] += 1
        out.triggers[r["trigger"]] += 1
    if not out.samples:
        left = ", ".join(f"{n} {why}" for why, n in sorted(out.skipped.items()))
        raise DataError(f"--model {model}: no sample can be exported ({left})")
    out.arrays = {k: np.concatenate(v) for k, v in parts.items()}
    out.labels = _join_labels(out, ys)
    return out


def _join_labels(out: Export, ys: list[npt.NDArray[Any] | None]) -> str:
    """Put ``y`` in ``out.arrays`` when every exported sample has a label of one shape."""
    have = [y for y in ys if y is not None]
    if not have:
        return "none"
    if "y" in out.arrays:
        return "omitted: an input is named y"
    if len(have) < len(ys):
        return f"omitted: {len(ys) - len(have)} of {len(ys)} samples unlabelled (--labelled-only)"
    if len({y.shape[1:] for y in have}) != 1:
        return "omitted: labels of different shapes"
    y = np.concatenate(have)
    out.arrays["y"] = y.astype(np.int64) if y.dtype.kind in "iu" else y.astype(np.float32)
    return "all"


def write(exp: Export, path: Path) -> Path:
    """The .npz at ``path`` and its summary beside it (PATH.json); returns the summary's path."""
    try:
        with path.open("wb") as f:
            np.savez(f, **exp.arrays)  # type: ignore[arg-type]
        side = path.with_name(path.name + ".json")
        side.write_text(json.dumps(exp.summary(), indent=2) + "\n")
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot write ({exc.strerror or exc})") from None
    return side


def prune(
    db: FleetDB,
    model: str,
    version: str | None = None,
    older_than_s: float | None = None,
    dry_run: bool = False,
    now: float | None = None,
) -> int:
    """Delete ``model``'s captured samples (of ``version``; received over ``older_than_s`` ago)
    from the database once they are exported; with ``dry_run`` only count them."""
    if not db.has_table("samples"):
        return 0
    where, params = "model = ?", list[Any]([model])
    if version is not None:
        where += " AND version = ?"
        params.append(version)
    if older_than_s is not None:
        where += " AND received < ?"
        params.append((time.time() if now is None else now) - older_than_s)
    if dry_run:
        return int(db.query(f"SELECT COUNT(*) AS n FROM samples WHERE {where}", params)[0]["n"])
    return db.delete("samples", where, params)
