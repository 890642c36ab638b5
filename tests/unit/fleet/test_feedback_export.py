"""`edgefleet feedback export`: captured samples as build data (shapes, labels, what is skipped
and why) and its one-line errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.clikit import main
from fleet.db import Batch, FleetDB
from fleet.ingest import add_message
from tests.fleet_helpers import dumps, sample

T = "edgefleet/v1/devices/{}/samples"


def store(path: Path, docs: list[dict[str, Any]]) -> str:
    db = FleetDB(str(path))
    b = Batch.empty()
    for d in docs:
        assert add_message(b, T.format(d["device"]), dumps(d), d["ts"]), d
    db.store(b)
    db.close()
    return str(path)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main(["feedback", "export", *args])
    out, err = capsys.readouterr()
    return code, out, err


def rows(n: int, seed: int, width: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, width)).astype(np.float32)


@pytest.fixture
def db(tmp_path: Path) -> str:
    ids = np.arange(16, dtype=np.int64).reshape(2, 8)
    docs = [
        sample("d1", 1, {"x": rows(1, 1)}, label=2, ts=1.0),
        sample("d1", 2, {"x": rows(3, 2)}, label=[0, 1, 2], trigger="low_confidence", ts=2.0),
        sample("d2", 1, {"x": rows(1, 3)}, trigger="drift", ts=3.0),  # unlabelled
        sample("d2", 2, None, {"y": rows(1, 4, 3)}, ts=4.0),  # outputs only
        sample("d2", 3, {"x": rows(1, 5, 5)}, label=1, ts=5.0),  # other width
        sample("d3", 1, {"ids": ids}, label=[0, 1], ts=6.0),  # other input names
        sample("d3", 2, {"x": rows(2, 6)}, label=1, ts=7.0),  # 1 label for 2 rows
        sample("d3", 3, {"x": rows(1, 7)}, label=0, model=("other", "2.0.0"), ts=8.0),
        sample("d3", 4, {"x": rows(1, 8)}, label=1, model=("tiny", "1.1.0"), ts=9.0),
    ]
    return store(tmp_path / "fleet.db", docs)


def test_export_concatenates_rows_and_counts_what_it_skips(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "data.npz"
    code, stdout, err = run(capsys, "--db", db, "--model", "tiny", "--out", str(out), "--json")
    assert code == 0, err
    s = json.loads(stdout)
    with np.load(out) as npz:
        assert sorted(npz.files) == ["x"]  # some samples have no label: y is left out
        x = npz["x"]
    assert x.dtype == np.float32 and x.shape == (1 + 3 + 1 + 2 + 1, 4)
    np.testing.assert_array_equal(x[:4], np.concatenate([rows(1, 1), rows(3, 2)]))
    assert s["samples"] == 5 and s["rows"] == 8
    assert s["skipped"] == {"outputs_only": 1, "mismatch": 2}
    assert s["labels"].startswith("omitted: 2 of 5 samples unlabelled")
    assert s["devices"] == {"d1": 2, "d2": 1, "d3": 2}
    assert s["triggers"] == {"sample": 3, "low_confidence": 1, "drift": 1}
    assert s["versions"] == {"1.0.0": 4, "1.1.0": 1}
    assert json.loads((tmp_path / "data.npz.json").read_text()) == s


def test_labelled_only_writes_int64_class_ids(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "l.npz"
    code, stdout, err = run(
        capsys,
        "--db",
        db,
        "--model",
        "tiny",
        "--version",
        "1.0.0",
        "--labelled-only",
        "--out",
        str(out),
    )
    assert code == 0, err
    with np.load(out) as npz:
        assert npz["x"].shape == (4, 4) and npz["y"].dtype == np.int64
        assert npz["y"].tolist() == [2, 0, 1, 2]
    assert "labels: all" in stdout and "2 unlabelled" in stdout and "1 outputs_only" in stdout


def test_trigger_filter_and_float_targets(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = store(
        tmp_path / "f.db",
        [
            sample("d1", 1, {"x": rows(1, 1)}, label=[0.5, 1.5, 2.5], trigger="label", ts=1.0),
            sample(
                "d1", 2, {"x": rows(2, 2)}, label=[[1, 2, 3], [4, 5, 6]], trigger="label", ts=2.0
            ),
            sample("d1", 3, {"x": rows(1, 3)}, trigger="sample", ts=3.0),
        ],
    )
    out = tmp_path / "t.npz"
    code, _, err = run(
        capsys, "--db", db, "--model", "tiny", "--trigger", "label", "--out", str(out)
    )
    assert code == 0, err
    with np.load(out) as npz:
        assert npz["x"].shape == (3, 4) and npz["y"].shape == (3, 3)
        assert npz["y"].dtype == np.float32


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--model", "nope"], 2, "--model nope: no samples of this model in"),
        (["--model", "tiny", "--version", "9.9.9"], 3, "no samples with version 9.9.9"),
        (
            ["--model", "tiny", "--trigger", "drift", "--labelled-only"],
            3,
            "no sample can be exported (1 unlabelled)",
        ),
    ],
)
def test_one_line_errors(
    db: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    needle: str,
) -> None:
    got, _, err = run(capsys, "--db", db, "--out", str(tmp_path / "o.npz"), *args)
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert got == code and len(lines) == 1 and needle in lines[0], err
    assert not (tmp_path / "o.npz").exists()


def test_a_database_without_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    FleetDB(str(tmp_path / "empty.db")).close()
    code, _, err = run(
        capsys, "--db", str(tmp_path / "empty.db"), "--model", "m", "--out", str(tmp_path / "o.npz")
    )
    assert code == 2 and "models: none" in err
    code, _, err = run(
        capsys, "--db", str(tmp_path / "missing.db"), "--model", "m", "--out", "o.npz"
    )
    assert code == 2 and "no such database" in err


def test_help_has_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "edgefleet feedback export --db fleet.db" in out


def test_prune_deletes_what_was_exported(
    db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fleet.feedback import prune

    fdb = FleetDB(db)
    try:
        # received at 1.0 .. 9.0: tiny 1.0.0's samples received before 3.5
        assert prune(fdb, "tiny", "1.0.0", older_than_s=2.0, now=5.5, dry_run=True) == 3
        assert fdb.count("samples") == 9  # a dry run deletes nothing
        assert prune(fdb, "tiny", "1.0.0", older_than_s=2.0, now=5.5) == 3
        assert fdb.count("samples") == 6
    finally:
        fdb.close()
    capsys.readouterr()
    assert main(["feedback", "prune", "--db", db, "--model", "tiny", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["deleted"] == 5  # 4 of 1.0.0 left, 1 of 1.1.0
    # the other model's sample is kept, and nothing of tiny is left to export
    code, _, err = run(capsys, "--db", db, "--model", "tiny", "--out", str(tmp_path / "x.npz"))
    assert code != 0 and "--model tiny: no samples of this model" in err, err
    assert main(["feedback", "prune", "--db", db, "--model", "other", "--dry-run"]) == 0
    assert "would delete 1 captured samples of other" in capsys.readouterr().out
