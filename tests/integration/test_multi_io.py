"""A model with int64 ids (dynamic sequence axis), float16, bool, a scalar and a state tensor,
deployed through a real mosquitto to a real agent process: self-tested on the device, then called
with tritonclient (binary and JSON) and plain HTTP JSON, compared with onnxruntime run directly."""

from __future__ import annotations

import http.client
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.agent_helpers import (
    MULTI_OUTPUTS,
    Broker,
    Keys,
    Listener,
    deploy,
    free_port,
    make_multi_artifact,
    multi_feeds,
    publish,
    run_onnx,
)

pytestmark = pytest.mark.integration

V2 = {"float32": "FP32", "float16": "FP16", "int64": "INT64", "bool": "BOOL"}


def _wait_ready(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            try:
                c.request("GET", "/v2/health/ready")
                if c.getresponse().status == 200:
                    return
            finally:
                c.close()
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError("endpoint never became ready")


def _post(port: int, path: str, doc: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(
            "POST",
            path,
            body=json.dumps(doc).encode(),
            headers={"Content-Type": "application/json"},
        )
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def _check(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for k, w in want.items():
        g = got[k]
        assert g.dtype == w.dtype and g.shape == w.shape, (k, g.dtype, g.shape, w.dtype, w.shape)
        np.testing.assert_array_equal(g, w, err_msg=k)  # same runtime, same graph: bit-identical


def test_multi_input_model_deploys_and_serves_every_dtype(
    broker: Broker, listener: Listener, agents: Any, keys: Keys, tmp_path: Path
) -> None:
    import tritonclient.http as th

    port = free_port()
    art = make_multi_artifact(tmp_path / "art", keys)
    bad = make_multi_artifact(tmp_path / "art", keys, version="1.1.0", corrupt="total")
    sha = publish(broker.url, art)
    sha_bad = publish(broker.url, bad)
    agents.start("mio", serve={"port": port, "request_timeout_s": 5.0})
    deploy(broker.url, "multi@1.0.0", device="mio")
    listener.wait_state("mio", "HEALTHY", sha, timeout=60)  # golden self-test and benchmark passed
    _wait_ready(port)
    model = agents.state_dir("mio") / "active" / "model.onnx"

    client = th.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        meta = client.get_model_metadata("multi")
        assert [(t["name"], t["datatype"], t["shape"]) for t in meta["inputs"]] == [
            ("input_ids", "INT64", [-1, -1]),
            ("attention_mask", "INT64", [-1, -1]),
            ("scale", "FP16", [-1, 4]),
            ("flag", "BOOL", [-1]),
            ("sr", "INT64", []),
            ("state", "FP32", [2, -1, 8]),
        ]
        assert [t["name"] for t in meta["outputs"]] == [t.name for t in MULTI_OUTPUTS]
        rng = np.random.default_rng(11)
        for binary, (batch, seq) in (
            (True, (3, 7)),
            (False, (2, 4)),
            (True, (1, 2)),
            (False, (4, 12)),
        ):
            feeds = multi_feeds(rng, batch, seq)
            feeds["flag"][0] = True
            feeds["input_ids"][0] = feeds["attention_mask"][0] = (
                19  # total > 30: keep is true somewhere
            )
            feeds["attention_mask"][0] = 1
            inputs = []
            for name, v in feeds.items():
                inp = th.InferInput(name, list(v.shape), V2[v.dtype.name])
                inp.set_data_from_numpy(v, binary_data=binary)
                inputs.append(inp)
            outs = [th.InferRequestedOutput(t.name, binary_data=binary) for t in MULTI_OUTPUTS]
            res = client.infer("multi", inputs, outputs=outs)
            want = run_onnx(model, feeds)
            assert want["keep"].any()
            _check({t.name: res.as_numpy(t.name) for t in MULTI_OUTPUTS}, want)
    finally:
        client.close()

    # plain HTTP JSON (what curl sends): nested data, JSON booleans, a scalar, default outputs
    feeds = multi_feeds(rng, 2, 5)
    doc = {
        "id": "j1",
        "inputs": [
            {"name": k, "datatype": V2[v.dtype.name], "shape": list(v.shape), "data": v.tolist()}
            for k, v in feeds.items()
        ],
    }
    status, body = _post(port, "/v2/models/multi/infer", doc)
    assert status == 200, body
    want = run_onnx(model, feeds)
    got = {
        o["name"]: np.asarray(o["data"], dtype=want[o["name"]].dtype).reshape(o["shape"])
        for o in body["outputs"]
    }
    assert [(o["name"], o["datatype"]) for o in body["outputs"]] == [
        (t.name, V2[t.dtype]) for t in MULTI_OUTPUTS
    ]
    _check(got, want)
    # a float for an INT64 input or a number for a BOOL one is a 400, not a silent cast
    for name, data in (("input_ids", [0.5] * 10), ("flag", [3, 1])):
        wrong = {
            **doc,
            "inputs": [{**t, "data": data} if t["name"] == name else t for t in doc["inputs"]],
        }
        status, body = _post(port, "/v2/models/multi/infer", wrong)
        assert status == 400 and name in body["error"], body

    # a candidate whose golden integer output is off by one fails the device self-test
    deploy(broker.url, "multi@1.1.0", device="mio")
    ev = listener.wait_state("mio", "ROLLED_BACK", sha_bad, timeout=60)
    assert "self-test failed: total: 1 of 1 values differ (exact match needed)" in ev["reason"], ev[
        "reason"
    ]
    status, body = _post(port, "/v2/models/multi/infer", doc)  # the old model still answers
    assert status == 200 and body["model_version"] == "1.0.0", body
    agents.stop_all()
    assert agents.procs[0].proc.returncode == 0
