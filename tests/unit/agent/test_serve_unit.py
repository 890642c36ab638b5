"""The holder's refcounting, the in-process API and the v2 tensor codec, on real onnxruntime sessions."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest

from agent.runtime import InferenceSession, IOSpec, load_session
from agent.serve import InferenceError, Loaded, LocalModel, NoModelError, SessionHolder
from agent.serve.tensors import InferRequest, RequestError, encode_response, parse_infer
from agent.telemetry.latency import LatencyRecorder
from tests.agent_helpers import make_onnx


class Tracked(InferenceSession):
    """Wraps a real session and records when it is closed."""

    def __init__(self, inner: InferenceSession) -> None:
        self.inner, self.closed = inner, False

    @property
    def inputs(self) -> list[IOSpec]:
        return self.inner.inputs

    @property
    def outputs(self) -> list[IOSpec]:
        return self.inner.outputs

    def infer(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:  # type: ignore[override]
        assert not self.closed, "inference on a closed session"
        return self.inner.infer(feeds)

    def close(self) -> None:
        self.closed = True
        self.inner.close()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    d = tmp_path_factory.mktemp("m")
    paths = [d / "a.onnx", d / "b.onnx"]
    for i, p in enumerate(paths):
        make_onnx(p, seed=i)
    return paths


def _loaded(path: Path, version: str) -> Loaded:
    return Loaded(
        "tiny", version, "0" * 64, "onnxruntime", Tracked(load_session("onnxruntime", path))
    )


def test_swap_closes_the_old_session_only_after_its_last_request(models: list[Path]) -> None:
    holder = SessionHolder()
    a, b = _loaded(models[0], "1"), _loaded(models[1], "2")
    assert holder.acquire() is None
    holder.swap(a)
    r1, r2 = holder.acquire(), holder.acquire()
    assert r1 is a and r2 is a
    holder.swap(b)
    assert holder.acquire() is b  # new requests get the new model at once
    sa = a.session
    assert isinstance(sa, Tracked) and not sa.closed
    a.session.infer({"x": np.zeros((1, 64), np.float32)})  # in-flight work still runs on it
    holder.release(r1)
    assert not sa.closed
    holder.release(r2)
    assert sa.closed
    sb = b.session
    assert isinstance(sb, Tracked)
    holder.close()
    assert not sb.closed  # one request still holds b
    holder.release(b)
    assert sb.closed and holder.acquire() is None


def test_local_model_records_every_call_and_survives_swaps_under_threads(
    models: list[Path],
) -> None:
    holder, rec = SessionHolder(), LatencyRecorder(seed=0)
    local = LocalModel(holder, rec)
    with pytest.raises(NoModelError):
        local.infer({"x": np.zeros((1, 64), np.float32)})
    holder.swap(_loaded(models[0], "1"))
    errors: list[BaseException] = []
    stop = threading.Event()
    calls = [0] * 4

    def worker(i: int) -> None:
        x = np.ones((2, 64), np.float32)
        while not stop.is_set() and calls[i] < 2000:
            try:
                assert local.infer({"x": x})["y"].shape == (2, 10)
            except BaseException as exc:
                errors.append(exc)
                return
            calls[i] += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    olds = []
    for n in range(20):  # swap back and forth while the workers run
        old = holder.swap(_loaded(models[n % 2], str(n)))
        assert old is not None
        olds.append(old)
    stop.set()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert all(isinstance(o.session, Tracked) and o.session.closed for o in olds)
    with pytest.raises(InferenceError, match="inference failed"):
        local.infer({"x": np.zeros((1, 3), np.float32)})
    w = rec.window()
    # the runtime failure counts; the call made while no model was active does not
    assert w.count == sum(calls) and w.errors == 1 and w.p50_ms is not None and w.p50_ms > 0


SPECS_IN = [IOSpec("x", "float32", ("batch", 4))]
SPECS_OUT = [IOSpec("y", "float32", ("batch", 2)), IOSpec("z", "int64", ("batch",))]


def _req(doc: object, binary: bytes = b"") -> InferRequest:
    head = json.dumps(doc).encode()
    return parse_infer(head + binary, len(head) if binary else None, SPECS_IN, SPECS_OUT)


def test_parse_json_and_binary_tensors() -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    r = _req({"inputs": [{"name": "x", "datatype": "FP32", "shape": [2, 4], "data": x.tolist()}]})
    np.testing.assert_array_equal(r.feeds["x"], x)
    assert r.outputs is None and not r.binary_default
    r = _req(
        {
            "inputs": [
                {
                    "name": "x",
                    "datatype": "FP32",
                    "shape": [2, 4],
                    "parameters": {"binary_data_size": 32},
                }
            ],
            "outputs": [{"name": "z", "parameters": {"binary_data": True}}, {"name": "y"}],
        },
        x.tobytes(),
    )
    np.testing.assert_array_equal(r.feeds["x"], x)
    assert r.outputs == [("z", True), ("y", False)]
    body, hlen = encode_response(
        "m", "1", r, {"y": np.ones((2, 2), np.float32), "z": np.array([3, 4])}
    )
    assert hlen is not None
    head = json.loads(body[:hlen])
    assert head["outputs"][0] == {
        "name": "z",
        "datatype": "INT64",
        "shape": [2],
        "parameters": {"binary_data_size": 16},
    }
    assert head["outputs"][1]["data"] == [1.0, 1.0, 1.0, 1.0]
    np.testing.assert_array_equal(np.frombuffer(body[hlen:], np.int64), [3, 4])


@pytest.mark.parametrize(
    ("doc", "binary", "needle"),
    [
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3]}]},
            b"",
            "3 values",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 5], "data": [1] * 5}]},
            b"",
            "expects [-1, 4]",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "INT8", "shape": [1, 4], "data": [1] * 4}]},
            b"",
            "expects FP32",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, -4], "data": [1] * 4}]},
            b"",
            "non-negative",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [[1, 2], [3]]}]},
            b"",
            "numbers",
        ),
        ({"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4]}]}, b"", "no data"),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": 16},
                    }
                ]
            },
            b"\0" * 8,
            "shorter",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "x",
                        "datatype": "FP32",
                        "shape": [1, 4],
                        "parameters": {"binary_data_size": 12},
                    }
                ]
            },
            b"\0" * 12,
            "needs 16",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}]},
            b"\0" * 4,
            "no input claims",
        ),
        (
            {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}] * 2},
            b"",
            "twice",
        ),
        (
            {
                "inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1] * 4}],
                "outputs": "y",
            },
            b"",
            "list",
        ),
        ({"id": 5, "inputs": []}, b"", "id must be"),
    ],
)
def test_bad_requests_are_4xx_with_a_reason(doc: object, binary: bytes, needle: str) -> None:
    with pytest.raises(RequestError) as ei:
        _req(doc, binary)
    assert ei.value.status == 400 and needle in ei.value.message


def test_binary_data_output_makes_every_output_binary_unless_one_says_otherwise() -> None:
    x = {"name": "x", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}
    res = {"y": np.ones((1, 2), np.float32), "z": np.array([7])}
    r = _req({"inputs": [x], "parameters": {"binary_data_output": True}})
    body, hlen = encode_response("m", "1", r, res)
    assert hlen is not None
    head = json.loads(body[:hlen])
    assert [o["parameters"]["binary_data_size"] for o in head["outputs"]] == [8, 8]
    assert len(body) == hlen + 16
    r = _req(
        {
            "inputs": [x],
            "parameters": {"binary_data_output": True},
            "outputs": [{"name": "y", "parameters": {"binary_data": False}}],
        }
    )
    body, hlen = encode_response("m", "1", r, res)
    assert hlen is None and json.loads(body)["outputs"] == [
        {"name": "y", "datatype": "FP32", "shape": [1, 2], "data": [1.0, 1.0]}
    ]


def test_endpoint_counts_only_runtime_failures_as_inference_errors(models: list[Path]) -> None:
    """A 503 before any model is active and a client's 400 are not model errors in telemetry
    (a rollout's canary gate reads ``errors`` as faults of the new model); successes are timed."""
    import http.client

    from agent.config import ServeConfig
    from agent.serve.http import Endpoint

    holder, rec = SessionHolder(), LatencyRecorder(seed=0)
    ep = Endpoint(ServeConfig(port=0), holder, rec)
    ep.start()
    try:
        host, port = ep.address.removeprefix("http://").rsplit(":", 1)

        def post(doc: object) -> int:
            c = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                c.request("POST", "/v2/models/tiny/infer", body=json.dumps(doc))
                r = c.getresponse()
                r.read()
                return r.status
            finally:
                c.close()

        good = {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 64], "data": [0.1] * 64}]}
        assert post(good) == 503  # no model yet
        holder.swap(_loaded(models[0], "1.0.0"))
        assert (
            post(
                {"inputs": [{"name": "x", "datatype": "FP32", "shape": [1, 3], "data": [1, 2, 3]}]}
            )
            == 400
        )
        assert post(good) == 200
        w = rec.window()
        assert (w.count, w.errors) == (1, 0)
    finally:
        ep.stop()
        holder.close()
