"""The demo application's shift: transformed inputs and labels for the devices named only."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from fleet.appload import AppLoad
from fleet.demo_drift import washed_out


def test_shift_changes_inputs_and_sends_labels_for_the_named_devices(tmp_path: Path) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "eval.npz", x=x, y=np.arange(5))
    app = AppLoad({"a": 1, "b": 2}, tmp_path / "eval.npz")
    before = json.loads(app._body("a", 3))
    assert "parameters" not in before
    app.shift(["a"], washed_out)
    a, b = json.loads(app._body("a", 3)), json.loads(app._body("b", 3))
    assert a["parameters"] == {"label": 3} and "parameters" not in b
    assert b == before  # the other device's world did not change
    want = np.round(0.35 + 0.5 * x[3].ravel(), 4)
    assert np.allclose(a["inputs"][0]["data"], want, atol=1e-4)
