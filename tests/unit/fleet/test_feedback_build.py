"""A feedback export is build data: `edgefleet build` takes it as [data] calibration (checked
with --check, then a real int8_static build calibrated on it), and refuses one that does not
fit the model with its usual one-line data error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.clikit import main
from fleet.db import Batch, FleetDB
from fleet.ingest import add_message
from tests.fleet_helpers import dumps, sample
from tests.unit.builder.tiny import (
    assert_one_line_error,
    float_onnx,
    mlp_data,
    project,
    write_profile,
)

CFG = '[model]\nonnx = "m.onnx"\n[data]\neval = "eval.npz"\ncalibration = "feedback.npz"\n'


def export_from_fleet(tmp_path: Path, out: Path, width: int = 4) -> None:
    """Captured samples of the tiny model (x float32 (batch, 4)) from two devices, exported."""
    data = mlp_data(40, seed=3)
    x = data["x"] if width == 4 else np.zeros((40, width), np.float32)
    db = FleetDB(str(tmp_path / "fleet.db"))
    b = Batch.empty()
    for i in range(0, 40, 2):  # some single rows, some batches of two
        dev = f"d{i % 3}"
        rows = slice(i, i + 1) if i % 4 else slice(i, i + 2)
        doc = sample(dev, i, {"x": x[rows]}, label=data["y"][rows].tolist(), ts=float(i))
        assert add_message(b, f"edgefleet/v1/devices/{dev}/samples", dumps(doc), float(i))
    db.store(b)
    db.close()
    assert (
        main(
            [
                "feedback",
                "export",
                "--db",
                str(tmp_path / "fleet.db"),
                "--model",
                "tiny",
                "--labelled-only",
                "--out",
                str(out),
            ]
        )
        == 0
    )


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_an_export_calibrates_a_build(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = project(tmp_path / "p", CFG, data={"eval.npz": mlp_data(64)})
    float_onnx(p.dir / "m.onnx")
    export_from_fleet(tmp_path, p.dir / "feedback.npz")
    with np.load(p.dir / "feedback.npz") as npz:
        assert npz["x"].shape == (30, 4) and npz["y"].dtype == np.int64
    prof = write_profile(tmp_path, "tiny-cpu", ["fp32", "int8_static"])
    code, out, err = p.build(capsys, "-p", str(prof), "--check")
    assert code == 0, err
    code, out, err = p.build(capsys, "-p", str(prof))
    assert code == 0, err
    assert list((p.dir / "out").glob("*.efa")), out + err


def test_an_export_that_does_not_fit_the_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = project(tmp_path / "p", CFG, data={"eval.npz": mlp_data(64)})
    float_onnx(p.dir / "m.onnx")
    export_from_fleet(tmp_path, p.dir / "feedback.npz", width=5)
    prof = write_profile(tmp_path, "tiny-cpu", ["fp32"])
    code, _, err = p.build(capsys, "-p", str(prof), "--check")
    assert_one_line_error(code, err, 3, "calibration data", "feedback.npz")
