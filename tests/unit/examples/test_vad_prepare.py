"""examples/vad: the packaged Silero VAD on the synthesised streams its prepare step writes (slow)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("silero_vad") is None,
        reason="Silero VAD wheel not installed: pip install --no-deps silero-vad",
    ),
]


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from examples.vad.prepare import prepare

    d = tmp_path_factory.mktemp("vad")
    prepare(d, quiet=True)
    return d


def test_streams_have_the_model_input_layout(work: Path) -> None:
    from examples.vad.prepare import SPLITS, Streamer

    for name in SPLITS:
        d = np.load(work / f"{name}.npz")
        n = len(d["sr"])
        assert d["input"].shape == (n, 576) and d["input"].dtype == np.float32
        assert d["state"].shape == (n, 2, 128) and d["state"].dtype == np.float32
        assert d["sr"].dtype == np.int64 and (d["sr"] == 16000).all()
        assert d["y"].shape == (n, 1) and d["y"].dtype == np.float32
    # Every clip starts from a zero state, and later steps carry the state the model produced.
    d = np.load(work / "eval.npz")
    starts = np.arange(0, len(d["sr"]), 62)
    assert not d["state"][starts].any()
    assert np.abs(d["state"][1:62]).max() > 0.1
    # y is the model's own output for each stored (input, state) step.
    s = Streamer(work / "silero_vad.onnx").session
    for i in (0, 1, 40, 500):
        feeds = {
            "input": d["input"][i : i + 1],
            "state": np.ascontiguousarray(d["state"][i : i + 1].transpose(1, 0, 2)),
            "sr": np.asarray(d["sr"][i]),
        }
        prob, _ = s.run(None, feeds)
        np.testing.assert_allclose(prob, d["y"][i : i + 1], atol=1e-6)


def test_speech_like_clips_score_high_and_noise_low(work: Path) -> None:
    clips = [
        c
        for split in json.loads((work / "clips.json").read_text())["clips"].values()
        for c in split
    ]
    for c in clips:
        if c["kind"].startswith("non_speech"):
            assert c["mean_prob"] < 0.05 and c["max_prob"] < 0.3, c
        else:  # pauses between words score low, so a clip's mean is well under its peak
            assert c["max_prob"] > 0.9 and c["mean_prob"] > 0.3, c
