"""A model with many named inputs and outputs of every dtype (int64 ids with a dynamic sequence
axis, float16, bool, a scalar, a state tensor batched on axis 1): golden vectors, self-test,
benchmark, LocalModel and the v2 tensor codec, on real onnxruntime sessions."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest

from agent.deploy import selftest
from agent.protocol.golden import GoldenCase, GoldenSet, self_test
from agent.protocol.manifest import Golden
from agent.runtime import InferenceSession, IOSpec, load_session
from agent.serve import Loaded, LocalModel, SessionHolder
from agent.serve.tensors import RequestError, encode_response, parse_infer, spec_json
from agent.telemetry.latency import LatencyRecorder
from tests.agent_helpers import (
    MULTI_INPUTS,
    MULTI_OUTPUTS,
    make_multi_onnx,
    multi_feeds,
    multi_golden,
    multi_reference,
    run_onnx,
)

SPEC = Golden(file="golden.npz", count=3, atol=1e-3, rtol=1e-3)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("multi") / "model.onnx"
    make_multi_onnx(path)
    return path


@pytest.fixture
def session(model: Path) -> InferenceSession:
    return load_session("onnxruntime", model)


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_the_fixture_model_computes_what_it_says(model: Path) -> None:
    feeds = multi_feeds(np.random.default_rng(3), 4, 7)
    got, want = run_onnx(model, feeds), multi_reference(feeds)
    assert {k: v.dtype.name for k, v in got.items()} == {t.name: t.dtype for t in MULTI_OUTPUTS}
    for k in ("total", "best", "keep", "embedding"):
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    for k in ("score", "stateN"):  # fp16 sums: onnxruntime may accumulate in another order
        np.testing.assert_allclose(got[k], want[k], atol=0.05, err_msg=k)
    assert got["keep"].any() or not (feeds["flag"] & (got["total"] > 30)).any()


# ------------------------------------------------------------------------------ golden.npz


def test_golden_cases_round_trip_compressed_and_deterministic(model: Path, tmp_path: Path) -> None:
    g = multi_golden(model, cases=3)
    assert not g.batched and len(g.cases) == 3
    assert [c.inputs["input_ids"].shape for c in g.cases] == [(1, 2), (1, 5), (1, 8)]
    g.save(tmp_path / "a.npz")
    g.save(tmp_path / "b.npz")
    raw = (tmp_path / "a.npz").read_bytes()
    assert raw == (tmp_path / "b.npz").read_bytes()  # no timestamps: same arrays, same bytes
    with zipfile.ZipFile(io.BytesIO(raw)) as zf:
        assert {i.compress_type for i in zf.infolist()} == {zipfile.ZIP_DEFLATED}
        assert "in.1:sr.npy" in zf.namelist() and "exp.2:stateN.npy" in zf.namelist()
    back = GoldenSet.load(tmp_path / "a.npz")
    assert not back.batched and len(back.cases) == 3
    for c0, c1 in zip(g.cases, back.cases, strict=True):
        _same(c0.inputs, c1.inputs)
        _same(c0.reference, c1.reference)
        _same(c0.expected, c1.expected)
    assert back.inputs["sr"].shape == () and back.inputs["flag"].dtype == np.bool_
    assert back.inputs["scale"].dtype == np.float16
    _same(back.bench_feed(), g.cases[0].inputs)  # each case is fed as it is


@pytest.mark.parametrize("compressed", [False, True])
def test_first_format_golden_files_still_load(tmp_path: Path, compressed: bool) -> None:
    """golden.npz as earlier builders wrote it: in:/ref:/exp: keys, samples stacked on axis 0."""
    x = np.arange(24, dtype=np.float32).reshape(3, 8)
    y = x[:, :2] * 2
    save = np.savez_compressed if compressed else np.savez
    save(tmp_path / "old.npz", **{"in:x": x, "ref:y": y, "exp:y": y})
    g = GoldenSet.load(tmp_path / "old.npz")
    assert g.batched and g.more == []
    _same(g.inputs, {"x": x})
    _same(g.expected, {"y": y})
    _same(g.bench_feed(), {"x": x[:1]})
    # and written again in that layout, so agents that read only it still can
    g.save(tmp_path / "again.npz")
    with zipfile.ZipFile(tmp_path / "again.npz") as zf:
        assert sorted(zf.namelist()) == ["exp:y.npy", "in:x.npy", "ref:y.npy"]
    _same(GoldenSet.load(tmp_path / "again.npz").inputs, {"x": x})


def test_golden_files_with_a_missing_part_are_refused(tmp_path: Path) -> None:
    a = np.zeros((1, 2), np.float32)
    for doc in (
        {"in:x": a, "ref:y": a},
        {"in.0:x": a, "ref.0:y": a, "exp.0:y": a, "in.2:x": a},
        {"in:x": a, "ref:y": a, "exp:y": a, "in.1:x": a, "ref.1:y": a, "exp.1:y": a},
        {"other": a},
    ):
        np.savez(tmp_path / "g.npz", **doc)  # type: ignore[arg-type]
        with pytest.raises(ValueError, match=r"golden\.npz"):
            GoldenSet.load(tmp_path / "g.npz")


# ------------------------------------------------------------------------------ self-test, benchmark


def test_self_test_passes_on_the_right_outputs(model: Path, session: InferenceSession) -> None:
    res = self_test(session, multi_golden(model), SPEC, classification=False)
    assert res.ok, res.reason
    assert set(res.max_abs_diff) == {t.name for t in MULTI_OUTPUTS}
    assert res.max_abs_diff["total"] == 0.0 and res.max_abs_diff["keep"] == 0.0


def _corrupt(g: GoldenSet, output: str, case: int = 1) -> GoldenSet:
    cases = g.cases
    exp = dict(cases[case].expected)
    v = exp[output]
    if v.dtype == np.bool_:
        exp[output] = ~v
    elif v.dtype.kind in "iu":
        exp[output] = v + np.ones((), v.dtype)
    else:
        exp[output] = (v.astype(np.float32) + 0.5).astype(v.dtype)
    cases[case] = GoldenCase(cases[case].inputs, cases[case].reference, exp)
    return GoldenSet.of_cases(cases)


@pytest.mark.parametrize(
    ("output", "needle"),
    [
        ("total", "total: 1 of 1 values differ (exact match needed) (golden case 1)"),
        ("best", "best: 1 of 1 values differ"),
        ("keep", "keep: 1 of 1 values differ"),
        ("embedding", "embedding: max |diff| 0.5"),
        ("stateN", "stateN: max |diff| 0.5"),
    ],
)
def test_self_test_fails_on_a_wrong_output_of_any_dtype(
    model: Path, session: InferenceSession, output: str, needle: str
) -> None:
    res = self_test(session, _corrupt(multi_golden(model), output), SPEC, classification=False)
    assert not res.ok and needle in res.reason, res.reason


def test_an_integer_output_must_match_exactly_whatever_the_tolerance(
    model: Path, session: InferenceSession
) -> None:
    loose = Golden(file="golden.npz", count=3, atol=10.0, rtol=1.0)
    assert self_test(session, _corrupt(multi_golden(model), "embedding"), loose, False).ok
    res = self_test(session, _corrupt(multi_golden(model), "total"), loose, False)
    assert not res.ok and "exact match" in res.reason


def test_self_test_reports_a_wrong_shape_or_dtype(model: Path, session: InferenceSession) -> None:
    g = multi_golden(model)
    g.expected["total"] = np.zeros((2,), np.int64)
    res = self_test(session, g, SPEC, False)
    assert not res.ok and "output total: wrong shape [1], expected [2]" in res.reason
    g = multi_golden(model)
    g.expected["keep"] = g.expected["keep"].astype(
        np.float32
    )  # a float golden for a bool output is compared as float
    assert self_test(session, g, SPEC, False).ok
    g.expected["total"] = g.expected["total"].astype(
        np.int32
    )  # an int of another width: same values
    assert self_test(session, g, SPEC, False).ok


def test_benchmark_feeds_a_batch_one_case_with_its_scalar_and_state(
    model: Path, session: InferenceSession
) -> None:
    seen: list[dict[str, tuple[int, ...]]] = []

    class Spy(InferenceSession):
        inputs = property(lambda self: session.inputs)  # type: ignore[assignment]
        outputs = property(lambda self: session.outputs)  # type: ignore[assignment]

        def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
            seen.append({k: v.shape for k, v in feeds.items()})
            return session.infer(feeds)

    times: list[float] = []
    lat = selftest.benchmark(Spy(), multi_golden(model), 5, times.append)
    assert lat.runs == 5 and len(times) == 5 and lat.p50_ms > 0
    assert seen[-1] == {
        "input_ids": (1, 2),
        "attention_mask": (1, 2),
        "scale": (1, 4),
        "flag": (1,),
        "sr": (),
        "state": (2, 1, 8),
    }


def test_a_batched_golden_set_keeps_scalar_inputs_whole() -> None:
    g = GoldenSet({"x": np.zeros((4, 3), np.float32), "t": np.array(2, np.int64)}, {}, {})
    assert {k: v.shape for k, v in g.bench_feed().items()} == {"x": (1, 3), "t": ()}


# ------------------------------------------------------------------------------ LocalModel


def test_local_model_takes_multi_input_feeds(model: Path) -> None:
    holder, rec = SessionHolder(), LatencyRecorder(seed=0)
    holder.swap(
        Loaded("multi", "1.0.0", "0" * 64, "onnxruntime", load_session("onnxruntime", model))
    )
    lm = LocalModel(holder, rec)
    rng = np.random.default_rng(5)
    for batch, seq in ((1, 1), (3, 9), (2, 4)):
        feeds = multi_feeds(rng, batch, seq)
        _same(lm.infer(feeds), run_onnx(model, feeds))
    assert rec.window().count == 3
    holder.close()


# ------------------------------------------------------------------------------ v2 tensors


def test_metadata_lists_every_input_and_output_with_minus_one_for_dynamic_dims(model: Path) -> None:
    m = Loaded("multi", "1.0.0", "0" * 64, "onnxruntime", load_session("onnxruntime", model))
    assert [s.name for s in m.inputs] == [t.name for t in MULTI_INPUTS]
    assert [spec_json(s) for s in m.inputs] == [
        {"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
        {"name": "scale", "datatype": "FP16", "shape": [-1, 4]},
        {"name": "flag", "datatype": "BOOL", "shape": [-1]},
        {"name": "sr", "datatype": "INT64", "shape": []},
        {"name": "state", "datatype": "FP32", "shape": [2, -1, 8]},
    ]
    assert [spec_json(s) for s in m.outputs] == [
        {"name": "score", "datatype": "FP32", "shape": [-1]},
        {"name": "embedding", "datatype": "FP16", "shape": [-1, 4]},
        {"name": "total", "datatype": "INT64", "shape": [-1]},
        {"name": "best", "datatype": "INT64", "shape": [-1]},
        {"name": "keep", "datatype": "BOOL", "shape": [-1]},
        {"name": "stateN", "datatype": "FP32", "shape": [2, -1, 8]},
    ]


ALL = {  # one input per datatype the runtimes take, each with values that show a wrong decoding
    "f32": np.array([[1.5, -2.25]], np.float32),
    "f16": np.array([[0.5, -65504.0], [1e-3, 3.0]], np.float16),
    "i64": np.array([[2**40 + 1, -(2**62)]], np.int64),
    "i32": np.array([[-(2**31), 2**31 - 1]], np.int32),
    "i8": np.array([[-128, 127, 0]], np.int8),
    "u8": np.array([[0, 255, 7]], np.uint8),
    "b": np.array([[True, False, True]], np.bool_),
    "s": np.array(7, np.int64),
}
ALL_SPECS = [
    IOSpec(k, v.dtype.name, ("batch", *v.shape[1:]) if v.ndim else ()) for k, v in ALL.items()
]
V2 = {
    "float32": "FP32",
    "float16": "FP16",
    "int64": "INT64",
    "int32": "INT32",
    "int8": "INT8",
    "uint8": "UINT8",
    "bool": "BOOL",
}


def _body(binary: bool) -> tuple[bytes, int | None]:
    inputs, blobs = [], []
    for k, v in ALL.items():
        t: dict[str, object] = {"name": k, "datatype": V2[v.dtype.name], "shape": list(v.shape)}
        if binary:
            blob = v.astype(v.dtype.newbyteorder("<")).tobytes()
            t["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            t["data"] = v.ravel().tolist()
        inputs.append(t)
    head = json.dumps({"inputs": inputs, "parameters": {"binary_data_output": binary}}).encode()
    return head + b"".join(blobs), len(head) if binary else None


@pytest.mark.parametrize("binary", [False, True])
def test_every_dtype_decodes_and_encodes_in_json_and_binary(binary: bool) -> None:
    body, hlen = _body(binary)
    req = parse_infer(body, hlen, ALL_SPECS, ALL_SPECS)
    _same(req.feeds, ALL)
    out, out_hlen = encode_response("m", "1", req, ALL)
    assert (out_hlen is not None) == binary
    head = json.loads(out[:out_hlen] if binary else out)
    assert [(o["name"], o["datatype"], o["shape"]) for o in head["outputs"]] == [
        (k, V2[v.dtype.name], list(v.shape)) for k, v in ALL.items()
    ]
    if not binary:
        got = {
            o["name"]: np.asarray(o["data"], ALL[o["name"]].dtype).reshape(o["shape"])
            for o in head["outputs"]
        }
        assert head["outputs"][6]["data"] == [True, False, True]  # JSON booleans, not 0/1
        _same(got, ALL)
        return
    # the v2 binary extension: little-endian, row-major, back to back in output order; BOOL one byte
    blob = out[out_hlen:]
    sizes = [o["parameters"]["binary_data_size"] for o in head["outputs"]]
    assert sizes == [v.size * v.dtype.itemsize for v in ALL.values()] and sum(sizes) == len(blob)
    assert blob[sum(sizes[:6]) : sum(sizes[:7])] == b"\x01\x00\x01"
    assert blob[sizes[0] : sizes[0] + 2] == b"\x00\x38"  # fp16 0.5 = 0x3800, low byte first


def test_tritonclient_encodes_and_decodes_every_dtype_with_this_codec() -> None:
    """tritonclient's own request body and response parser against parse_infer/encode_response."""
    import tritonclient.http as th

    for binary in (True, False):
        inputs = []
        for k, v in ALL.items():
            i = th.InferInput(k, list(v.shape), V2[v.dtype.name])
            i.set_data_from_numpy(v, binary_data=binary)
            inputs.append(i)
        outputs = [th.InferRequestedOutput(k, binary_data=binary) for k in ALL]
        body, json_size = th.InferenceServerClient.generate_request_body(inputs, outputs)
        req = parse_infer(body, json_size, ALL_SPECS, ALL_SPECS)
        _same(req.feeds, ALL)
        out, hlen = encode_response("m", "1", req, req.feeds)
        res = th.InferResult.from_response_body(out, header_length=hlen)
        _same({k: res.as_numpy(k) for k in ALL}, ALL)


@pytest.mark.parametrize(
    ("name", "data", "binary", "needle"),
    [
        ("i64", [1.5, 2], None, "not a list of INT64 numbers"),
        ("i64", [True, False], None, "not a list of INT64 numbers"),
        ("i8", [1, 200, 3], None, "out of the INT8 range"),
        ("u8", [1, -1, 3], None, "out of the UINT8 range"),
        ("b", [1, 2, 0], None, "not a list of BOOL values"),
        ("b", ["x", "y", "z"], None, "not a list of BOOL values"),
        ("f16", [[True, False], [True, True]], None, "not a list of FP16 numbers"),
        ("b", None, b"\x01\x02\x00", "bytes other than 0 and 1"),
    ],
)
def test_bad_values_for_a_dtype_are_refused(
    name: str, data: object, binary: bytes | None, needle: str
) -> None:
    v = ALL[name]
    t: dict[str, object] = {"name": name, "datatype": V2[v.dtype.name], "shape": list(v.shape)}
    if binary is None:
        t["data"] = data
    else:
        t["parameters"] = {"binary_data_size": len(binary)}
    others = [
        {
            "name": k,
            "datatype": V2[a.dtype.name],
            "shape": list(a.shape),
            "data": a.ravel().tolist(),
        }
        for k, a in ALL.items()
        if k != name
    ]
    head = json.dumps({"inputs": [t, *others]}).encode()
    with pytest.raises(RequestError) as ei:
        parse_infer(head + (binary or b""), len(head) if binary else None, ALL_SPECS, ALL_SPECS)
    assert ei.value.status == 400 and needle in ei.value.message, ei.value.message


def test_json_bool_accepts_zero_and_one_and_scalars_take_one_value() -> None:
    head = json.dumps(
        {
            "inputs": [
                {
                    "name": k,
                    "datatype": V2[a.dtype.name],
                    "shape": list(a.shape),
                    "data": a.astype(np.int64).ravel().tolist() if k == "b" else a.ravel().tolist(),
                }
                for k, a in ALL.items()
            ]
        }
    )
    req = parse_infer(head.encode(), None, ALL_SPECS, ALL_SPECS)
    _same(req.feeds, ALL)
    assert req.feeds["s"].shape == ()
