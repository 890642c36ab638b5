"""builder.data: build data matched to a model's named inputs, and feeds with each batch axis in place."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from agent.errors import DataError
from agent.runtime.base import IOSpec
from builder.data import Split, collect_outputs, load_split, single_input

STEP = [
    IOSpec("input", "float32", ("batch", 4)),
    IOSpec("state", "float32", (2, "batch", 3)),
    IOSpec("sr", "int64", ()),
]
AXES = {"state": 1, "sr": None}


def step_split(n: int = 5) -> Split:
    return Split(
        {
            "input": np.arange(n * 4, dtype=np.float32).reshape(n, 4),
            "state": np.arange(n * 6, dtype=np.float32).reshape(n, 2, 3),
            "sr": np.full(n, 16000, np.int64),
        },
        None,
        "mem",
        dict(AXES),
    )


def test_feeds_put_each_batch_axis_in_place() -> None:
    s = step_split()
    assert not s.batchable and s.n == 5
    f = s.feeds(2, 3)
    assert f["input"].shape == (1, 4) and f["state"].shape == (2, 1, 3) and f["sr"].shape == ()
    assert f["sr"].dtype == np.int64 and int(f["sr"]) == 16000
    np.testing.assert_array_equal(f["state"][:, 0], s.inputs["state"][2])
    assert all(v.flags["C_CONTIGUOUS"] for v in f.values())
    with pytest.raises(ValueError, match="input sr has no batch axis"):
        s.feeds(0, 2)
    # An unbatched input: one sample per batch, whatever size is asked for.
    assert [(a, b) for a, b, _ in s.batches(64)] == [(i, i + 1) for i in range(5)]


def test_batchable_feeds_and_subsets() -> None:
    s = Split(
        {
            "ids": np.arange(20, dtype=np.int64).reshape(10, 2),
            "state": np.zeros((10, 2, 3), np.float32),
        },
        np.arange(10),
        "mem",
        {"state": 1},
    )
    assert s.batchable
    assert [(a, b) for a, b, _ in s.batches(4)] == [(0, 4), (4, 8), (8, 10)]
    assert s.feeds(0, 4)["state"].shape == (2, 4, 3)
    t = s.take(np.array([7, 1]))
    assert (
        t.n == 2
        and list(t.y) == [7, 1]
        and t.batch_axes == {"state": 1}
        and t.inputs["ids"][0, 0] == 14
    )  # type: ignore[arg-type]
    assert s.head(3).n == 3


def test_collect_outputs_moves_samples_to_axis_0() -> None:
    parts = [
        {"out": np.ones((1, 1)), "stateN": np.full((2, 1, 3), i, np.float32), "n": np.array(i)}
        for i in range(3)
    ]
    got = collect_outputs(parts, {"stateN": 1, "n": None})
    assert (
        got["out"].shape == (3, 1)
        and got["stateN"].shape == (3, 2, 3)
        and list(got["n"]) == [0, 1, 2]
    )
    assert list(got["stateN"][:, 0, 0]) == [0, 1, 2]


def test_load_split_matches_names_shapes_and_dtypes(tmp_path: Path) -> None:
    s = step_split()
    np.savez(tmp_path / "d.npz", **s.inputs)  # type: ignore[arg-type]
    got = load_split(tmp_path / "d.npz", "eval", STEP, AXES, task="regression")
    assert (
        got.y is None
        and got.batch_axes == {"input": 0, **AXES}
        and got.inputs["sr"].dtype == np.int64
    )
    # int32 data for an int64 input is cast; the kind (integer) is what must match.
    np.savez(tmp_path / "i32.npz", **{**s.inputs, "sr": s.inputs["sr"].astype(np.int32)})  # type: ignore[arg-type]
    assert (
        load_split(tmp_path / "i32.npz", "eval", STEP, AXES, task="regression").inputs["sr"].dtype
        == np.int64
    )


def test_the_single_array_form_still_works(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", x=np.zeros((6, 1, 8, 8), np.float32), y=np.arange(6))
    s = load_split(tmp_path / "x.npz", "eval", single_input((1, 8, 8)), need_labels=True)
    assert (
        list(s.inputs) == ["input"] and s.inputs["input"].shape == (6, 1, 8, 8) and s.y is not None
    )


@pytest.mark.parametrize(
    ("arrays", "task", "message"),
    [
        (
            {"input": np.zeros((3, 4), np.float32), "state": np.zeros((3, 2, 3), np.float32)},
            "regression",
            r"no array for model input\(s\) sr \(found: input, state\)",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 3, 2), np.float32),
                "sr": np.zeros(3, np.int64),
            },
            "regression",
            r"state has shape \(3, 3, 2\), expected \(N, 2, 3\)",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((2, 2, 3), np.float32),
                "sr": np.zeros(3, np.int64),
            },
            "regression",
            "state has 2 samples, input has 3",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.full(3, 2.0**40),
            },
            "regression",
            "sr has dtype float64, the model takes int64",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.full(3, 2**40, np.int64),
            },
            "regression",
            None,
        ),
        (
            {
                "input": np.full((3, 4), np.inf, np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.zeros(3, np.int64),
            },
            "regression",
            "input contains NaN or infinite values",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.zeros(3, np.int64),
                "y": np.array([0.0, np.nan, 1.0]),
            },
            "regression",
            "y contains NaN or infinite values",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.zeros(3, np.int64),
                "y": np.array([0, -1, 1]),
            },
            "classification",
            "y holds negative labels",
        ),
        (
            {
                "input": np.zeros((3, 4), np.float32),
                "state": np.zeros((3, 2, 3), np.float32),
                "sr": np.zeros(3, np.int64),
                "y": np.zeros(4),
            },
            "regression",
            r"y has shape \(4,\), expected 3 samples",
        ),
    ],
)
def test_bad_data_is_one_data_error(
    arrays: dict[str, np.ndarray], task: str, message: str | None, tmp_path: Path
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)  # type: ignore[arg-type]
    if message is None:  # within int64: fine
        assert load_split(tmp_path / "bad.npz", "calibration", STEP, AXES, task=task).n == 3
        return
    with pytest.raises(DataError, match=message) as e:
        load_split(tmp_path / "bad.npz", "calibration", STEP, AXES, task=task)
    assert str(e.value).startswith(
        f"calibration data {tmp_path / 'bad.npz'}: "
    ) and "\n" not in str(e.value)


def test_unreadable_files_are_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="file not found"):
        load_split(tmp_path / "none.npz", "eval", STEP, AXES)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DataError, match=r"not a readable \.npz file"):
        load_split(tmp_path / "junk.npz", "eval", STEP, AXES)
