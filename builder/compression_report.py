"""The compression report packed into every artifact as report.json.

What the candidate is (recipe, runtime, precision), what it measured, and where its weight and
time go: parameters, bytes and latency by layer (operator) type. ONNX latency comes from
onnxruntime's profiler at batch 1; LiteRT's Python API has no per-operator profiler, so a
.tflite model's is estimated by timing the model cut after each operator. The passes' own
findings (per-layer quantization sensitivity, layers kept in float, distillation, low-rank,
pruning, TFLite conversion) are carried over from the model's notes.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

REPORT_VERSION = 1
# TFLite ops whose constant inputs are shapes, permutations or axes, not parameters.
_SHAPE_OPS = {
    "RESHAPE",
    "TRANSPOSE",
    "PAD",
    "PADV2",
    "MEAN",
    "SUM",
    "SLICE",
    "STRIDED_SLICE",
    "GATHER",
    "CONCATENATION",
    "BROADCAST_TO",
    "TILE",
    "SQUEEZE",
    "EXPAND_DIMS",
    "REDUCE_MAX",
}
_PROFILE_RUNS = 50


# ONNX ops whose initializer inputs are shapes, axes or indices, not parameters.
_ONNX_SHAPE_OPS = {
    "Reshape",
    "Transpose",
    "Unsqueeze",
    "Squeeze",
    "Slice",
    "Pad",
    "Concat",
    "Expand",
    "Tile",
    "ReduceMean",
    "ReduceSum",
    "Gather",
    "Resize",
    "ConstantOfShape",
    "Split",
}


def _add(
    table: dict[str, dict[str, Any]], op: str, params: int = 0, nbytes: int = 0, count: int = 0
) -> None:
    row = table.setdefault(op, {"op": op, "count": 0, "params": 0, "bytes": 0})
    row["count"] += count
    row["params"] += params
    row["bytes"] += nbytes


def onnx_layers(path: Path) -> dict[str, dict[str, Any]]:
    """Op type -> node count, and the parameters/bytes of the initializers it consumes.

    A weight behind a DequantizeLinear (QDQ int8) counts for the layer that uses it.
    """
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    consumers: dict[str, list[Any]] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    table: dict[str, dict[str, Any]] = {}
    for n in g.node:
        _add(table, n.op_type, count=1)
    for name, arr in inits.items():
        users = consumers.get(name, [])
        if not users:
            continue
        user = users[0]
        if user.op_type == "DequantizeLinear" and consumers.get(user.output[0]):
            if name != user.input[0]:
                continue  # scale / zero point: bookkeeping, not a parameter
            user = consumers[user.output[0]][0]
        elif user.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        if user.op_type in _ONNX_SHAPE_OPS:
            continue
        _add(table, user.op_type, int(arr.size), int(arr.nbytes))
    return table


def onnx_op_latency(path: Path, feeds: Mapping[str, np.ndarray], threads: int) -> dict[str, float]:
    """Mean ms per run spent in each executed op type (after onnxruntime's fusions, so QDQ
    Conv shows as QLinearConv), from its profiler at batch 1."""
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        so = ort.SessionOptions()
        so.enable_profiling = True
        so.profile_file_prefix = str(Path(tmp) / "prof")
        so.intra_op_num_threads = threads
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feeds = {k: np.asarray(v, order="C") for k, v in feeds.items()}  # a scalar stays 0-d
        for _ in range(5):
            sess.run(None, feeds)
        for _ in range(_PROFILE_RUNS):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and str(e.get("name", "")).endswith("_kernel_time"):
            op = e.get("args", {}).get("op_name", "?")
            totals[op] = totals.get(op, 0.0) + float(e.get("dur", 0)) / 1000.0
    n = 5 + _PROFILE_RUNS
    return {op: round(t / n, 5) for op, t in totals.items()}


def tflite_layers(path: Path) -> dict[str, dict[str, Any]]:
    """Op type -> operator count, and the parameters/bytes of the constant tensors it reads."""
    from builder.tflite_edit import _load, op_name

    model = _load(path.read_bytes())
    table: dict[str, dict[str, Any]] = {}
    seen: set[int] = set()
    for sub in model.subgraphs:
        for op in sub.operators:
            name = op_name(model, op)
            _add(table, name, count=1)
            for i in op.inputs:
                if i < 0:
                    continue
                t = sub.tensors[i]
                data = model.buffers[t.buffer].data if t.buffer else None
                if data is None or t.buffer in seen or name in _SHAPE_OPS:
                    continue
                seen.add(t.buffer)
                _add(table, name, int(np.prod(t.shape)) if t.shape is not None else 0, len(data))
    return table


def tflite_op_latency(
    path: Path, feeds: Mapping[str, np.ndarray], threads: int, rounds: int = 7, calls: int = 30
) -> dict[str, float]:
    """Ms per run spent in each op type of a .tflite model, estimated by prefix timing.

    The model cut after each of its operators is timed (all prefixes loaded at once, in
    interleaved rounds); an operator's time is the increase of the lower-quartile time over the
    prefix before it, never below zero. LiteRT's builtin kernels run here, without the XNNPack
    delegate, so every prefix runs the same kernels (the delegate partitions each prefix
    differently and its fixed cost lands on whichever op it first takes).
    """
    import time

    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    from builder.tflite_edit import prefix_models

    with tempfile.TemporaryDirectory() as tmp:
        runs = []
        for i, (op, data) in enumerate(prefix_models(path.read_bytes())):
            p = Path(tmp) / f"prefix{i}.tflite"
            p.write_bytes(data)
            it = Interpreter(
                model_path=str(p),
                num_threads=threads,
                experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES,
            )
            details = it.get_input_details()
            values = [
                feeds.get(d["name"], v) for d, v in zip(details, feeds.values(), strict=False)
            ]
            for d, v in zip(details, values, strict=False):
                it.resize_tensor_input(d["index"], list(v.shape))
            it.allocate_tensors()
            for d, v in zip(details, values, strict=False):
                x = v
                scale, zp = d["quantization"]
                if np.dtype(d["dtype"]) in (np.int8, np.uint8) and scale:
                    info = np.iinfo(d["dtype"])
                    x = np.clip(np.round(v / scale + zp), info.min, info.max)
                it.set_tensor(d["index"], np.ascontiguousarray(x.astype(d["dtype"])))
            it.invoke()
            runs.append((op, it))
        samples: list[list[float]] = [[] for _ in runs]
        for r in range(rounds):
            order = range(len(runs)) if r % 2 == 0 else reversed(range(len(runs)))
            for i in order:
                invoke = runs[i][1].invoke
                for _ in range(calls):
                    t0 = time.perf_counter()
                    invoke()
                    samples[i].append(time.perf_counter() - t0)
    # Lower quartile: interference from other work only ever adds time, so it is the steadier figure.
    q = [float(np.percentile(v, 25)) * 1000 for v in samples]
    totals: dict[str, float] = {"(per-call overhead)": q[0]}
    for k in range(1, len(q)):
        op = runs[k][0]
        totals[op] = totals.get(op, 0.0) + max(0.0, q[k] - q[k - 1])
    return {op: round(ms, 5) for op, ms in totals.items()}


def accuracy_cells(m: dict[str, Any]) -> tuple[str, str]:
    """The gated accuracy figures of a candidate's metrics: (value, versus fp32)."""
    if not m:
        return "-", "-"
    if "token_agreement" in m:  # text generation: against the float model
        return (
            f"agree {m['token_agreement'] * 100:.1f}%",
            f"greedy {m['greedy_agreement'] * 100:.0f}%, ppl {m['perplexity_increase_pct']:+.1f}%",
        )
    if "top1" in m:
        return f"{m['top1'] * 100:.2f}%", f"{0.0 - m['top1_drop_pt'] + 0.0:+.2f} pt"
    if "metric" in m:
        return f"metric {m['metric']:.4g}", f"{-m['metric_drop']:+.4g}"
    if "cosine_min" in m:
        return (
            f"cos {m['cosine_min']:.4f}",
            f"mean {m['cosine_mean']:.4f}, err {m['max_abs_err']:.3g}",
        )
    if "top1_agreement" in m:
        return f"agree {m['top1_agreement'] * 100:.1f}%", "-"
    return "-", "-"


def size_cell(m: dict[str, Any]) -> str:
    """A model's size in KB, or MB from 10 MB up (an LLM)."""
    if not m:
        return "-"
    n = m["model_bytes"]
    return f"{n / 1e6:.1f} MB" if n >= 10e6 else f"{n / 1024:.1f} KB"


def speed_cell(m: dict[str, Any]) -> str:
    """p50/p95 at batch 1 (with the ratio to fp32), or TTFT and decode speed (an LLM)."""
    if "ttft_ms" in m:
        return f"TTFT {m['ttft_ms']:.0f} ms, {m['decode_tok_s']:.0f} tok/s"
    lat = m.get("latency_b1") or {}
    if not lat:
        return "-"
    text = f"{lat['p50_ms']:.3f} / {lat['p95_ms']:.3f} ms"
    ratio = lat.get("p95_ratio")
    if ratio is not None:
        text += f" (x{ratio:.2f} fp32{', size only' if ratio > 1.05 else ''})"
    return text


def build_report(
    recipe: str,
    runtime: str,
    precision: str,
    model_path: Path,
    feeds: Mapping[str, np.ndarray],
    metrics: dict[str, Any],
    notes: dict[str, Any],
    steps: list[dict[str, Any]],
    threads: int,
) -> dict[str, Any]:
    """The report.json document of one candidate."""
    if model_path.suffix == ".tflite":
        table = tflite_layers(model_path)
        lat = tflite_op_latency(model_path, feeds, threads)
        latency_source = (
            "LiteRT builtin kernels (XNNPack off), batch 1, estimated by timing the model cut after each "
            "operator (LiteRT's Python API has no per-op profiler); compare shares, not the absolute "
            "times, which differ from the XNNPack run measured for the budget"
        )
    else:
        table = onnx_layers(model_path)
        lat = onnx_op_latency(model_path, feeds, threads)
        latency_source = (
            f"onnxruntime profiler, batch 1, mean of {5 + _PROFILE_RUNS} runs; op types as executed "
            "after graph fusions; profiling adds overhead, so compare shares"
        )
    total = sum(lat.values()) or 1.0
    latency = [
        {"op": op, "ms": ms, "share": round(ms / total, 4)}
        for op, ms in sorted(lat.items(), key=lambda t: -t[1])
    ]
    layers = sorted(table.values(), key=lambda r: (-r["params"], -r["count"], r["op"]))
    summary = {
        "model_bytes": metrics.get("model_bytes"),
        "params": notes.get("params"),
        "top1": metrics.get("top1"),
        "top1_ref": metrics.get("top1_ref"),
        "top1_drop_pt": metrics.get("top1_drop_pt"),
        "cosine_min": metrics.get("cosine_min"),
        "cosine_mean": metrics.get("cosine_mean"),
        "max_abs_err": metrics.get("max_abs_err"),
        "metric": metrics.get("metric"),
        "metric_drop": metrics.get("metric_drop"),
        "p95_ms": metrics.get("latency_b1", {}).get("p95_ms"),
        "peak_rss_mb": metrics.get("peak_rss_mb"),
    }
    return {
        "report_version": REPORT_VERSION,
        "recipe": recipe,
        "runtime": runtime,
        "precision": precision,
        "summary": summary,
        "layers": layers,
        "latency_by_op": latency,
        "latency_source": latency_source,
        "sensitivity": notes.get("sensitivity"),
        "kept_float": notes.get("kept_float"),
        "distill": notes.get("distill"),
        "lowrank_layers": notes.get("lowrank_layers"),
        "tflite": notes.get("tflite"),
        "notes": notes,
        "steps": steps,
    }


def summary_lines(report: dict[str, Any]) -> list[str]:
    """A few lines for `edgefleet inspect`: the biggest layer types, sensitivity, distillation."""
    lines = []
    total_p = sum(r["params"] for r in report.get("layers", [])) or 1
    for r in [x for x in report.get("layers", []) if x["params"]][:6]:
        lines.append(
            f"layers     {r['op']:<18} x{r['count']:<3} {r['params']:>9} params ({100 * r['params'] / total_p:4.1f}%), "
            f"{r['bytes']:>9} bytes"
        )
    lat = report.get("latency_by_op")
    if lat:
        lines.append(
            "time       "
            + ", ".join(f"{e['op']} {100 * e['share']:.0f}%" for e in lat[:5])
            + " (share of time at batch 1 by op type; report.json says how it was measured)"
        )
    sens = report.get("sensitivity") or []
    if sens:
        worst = ", ".join(f"{e['node']} {e['sqnr_db']:.1f} dB" for e in sens[:3])
        lines.append(f"sensitive  {worst} (SQNR with only that layer int8)")
    if report.get("kept_float") is not None:
        lines.append(f"kept float {', '.join(report['kept_float']) or 'none'}")
    d = report.get("distill")
    if d:
        acc = (
            f"top-1 {d['student_top1'] * 100:.2f}% vs teacher {d['teacher_top1'] * 100:.2f}%, "
            if "student_top1" in d
            else ""
        )
        lines.append(
            f"distilled  {acc}params {d['student_params']} vs {d['teacher_params']} "
            f"(x{d['param_ratio']:.2f}), torch p50 {d['student_p50_ms_torch']:.3f} vs {d['teacher_p50_ms_torch']:.3f} ms"
        )
    return lines


def read_report(artifact: Path, manifest: Any) -> dict[str, Any] | None:
    """report.json of a (verified) artifact, checked against the manifest's sha256; None if absent."""
    import hashlib
    import tarfile

    entry = manifest.files.get("report.json")
    if entry is None:
        return None
    with tarfile.open(artifact, "r:") as tar:
        member = tar.extractfile("report.json")
        data = member.read() if member is not None else b""
    if hashlib.sha256(data).hexdigest() != entry.sha256:
        return None
    doc: dict[str, Any] = json.loads(data)
    return doc
