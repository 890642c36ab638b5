"""One candidate: measure it against the fp32 reference, gate it on the budgets, pack it.

``measure`` runs the candidate's model on the eval data (accuracy for its task, latency
interleaved with the reference, peak RSS, size); ``gate`` lists every budget it breaks;
``pack`` writes the golden vectors, the report and the signed artifact. Each reads on its own.
"""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.protocol.golden import GoldenCase, GoldenSet
from agent.protocol.manifest import (
    FORMAT_VERSION,
    Golden,
    Manifest,
    ModelInfo,
    MonitorRef,
    Quantization,
    Recipe,
    RecipeStep,
    TensorSpec,
)
from agent.protocol.profile import DeviceProfile
from agent.runtime import InferenceSession, load_session
from builder.compression_report import build_report
from builder.data import Feeds, Split
from builder.evaluate.accuracy import UserMetric, compare, run_batched
from builder.evaluate.latency import measure_latency
from builder.evaluate.memory import measure_peak_rss
from builder.package import file_entry, write_artifact
from builder.passes import ModelHandle
from builder.reference import REFERENCE_FILE, build_reference, encode_reference

# Tolerance of the on-device self-test against this candidate's host outputs, relative to
# the largest output magnitude: runtimes on other CPUs round differently, int8 most of all.
_SELF_TEST_RTOL = {"fp32": 1e-3, "fp16": 1e-2}
_SELF_TEST_RTOL_INT8 = 5e-2
# Golden vectors: at most this many bytes (uncompressed), or 10% of the model if larger.
GOLDEN_MAX_BYTES = 1 << 20


@dataclass
class Candidate:
    recipe: str
    profile: str
    precision: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    violations: list[str] = field(default_factory=list)
    error: str | None = None
    artifact: Path | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    notes: dict[str, Any] = field(default_factory=dict)
    runtime: str = (
        ""  # runtime that serves its model file (onnxruntime for .onnx, litert for .tflite)
    )
    skipped: bool = False  # not built at all (error says why); not a failure of the recipe
    report: dict[str, Any] = field(default_factory=dict)  # report.json as packed into its artifact

    @property
    def fits(self) -> bool:
        return self.error is None and not self.violations

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe,
            "runtime": self.runtime,
            "precision": self.precision,
            "fits": self.fits,
            "skipped": self.skipped,
            "error": self.error,
            "violations": self.violations,
            "metrics": self.metrics,
            "steps": self.steps,
        }


@dataclass
class Reference:
    """What every candidate of a build is compared with."""

    outputs: Feeds  # fp32 outputs on the eval data, samples on axis 0
    task: str
    metric: UserMetric | None = None
    metric_value: float | None = None
    latency_model: Path | None = None  # fp32 ONNX timed side by side with each candidate


def gate(metrics: dict[str, Any], profile: DeviceProfile, task: str) -> list[str]:
    """Every budget the metrics break, each with the figure and the budget.

    The size budget is on the model file's bytes (not the tar's padding or golden vectors).
    Accuracy is gated for every task; a missing accuracy figure is itself a violation.
    """
    b = profile.budgets
    v = []
    size_kb = metrics["model_bytes"] / 1024
    if size_kb > b.max_artifact_kb:
        v.append(f"model size {size_kb:.1f} KB > {b.max_artifact_kb:g} KB")
    if task == "classification":
        drop = metrics.get("top1_drop_pt")
        if drop is None:
            agree = metrics.get("top1_agreement")
            # No labels: the drop is bounded by the share of samples whose class changed.
            drop = None if agree is None else round((1 - agree) * 100, 3)
        if drop is None:
            v.append("no top-1 figure to gate on")
        elif drop > b.max_accuracy_drop_pt:
            v.append(f"accuracy drop {drop:.2f} pt > {b.max_accuracy_drop_pt:g} pt")
    else:
        cos = metrics.get("cosine_min")
        if cos is None and "exact_match" not in metrics:
            v.append("no output error figure to gate on")
        if cos is not None and cos < b.min_cosine:
            v.append(f"min cosine {cos:.4f} < {b.min_cosine:g}")
        if b.max_abs_err is not None and metrics.get("max_abs_err", 0.0) > b.max_abs_err:
            v.append(f"max abs error {metrics['max_abs_err']:.4g} > {b.max_abs_err:g}")
        if b.max_rel_err is not None and metrics.get("max_rel_err", 0.0) > b.max_rel_err:
            v.append(f"max rel error {metrics['max_rel_err']:.4g} > {b.max_rel_err:g}")
    if metrics.get("exact_match", 1.0) < 1.0:
        v.append(
            f"integer outputs differ from fp32 on {(1 - metrics['exact_match']) * 100:.1f}% of samples"
        )
    if "metric_drop" in metrics and metrics["metric_drop"] > b.max_metric_drop:
        v.append(f"metric drop {metrics['metric_drop']:.4g} > {b.max_metric_drop:g}")
    p95 = metrics["latency_b1"]["p95_ms"]
    if p95 > b.max_p95_ms:
        v.append(f"p95 {p95:.3f} ms > {b.max_p95_ms:g} ms")
    ram = metrics["peak_rss_mb"]
    if ram > b.max_ram_mb:
        v.append(f"peak RSS {ram:.1f} MB > {b.max_ram_mb:g} MB")
    return v


def _specs(
    session: InferenceSession, model_path: Path
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    quant = _tflite_io_quantization(model_path) if model_path.suffix == ".tflite" else {}

    def conv(s: Any) -> TensorSpec:
        q = quant.get(s.name)
        return TensorSpec(
            name=s.name,
            dtype=s.dtype,
            shape=list(s.shape),
            quantization=Quantization(scale=q[0], zero_point=q[1]) if q else None,
        )

    return [conv(s) for s in session.inputs], [conv(s) for s in session.outputs]


def _tflite_io_quantization(path: Path) -> dict[str, tuple[float, int]]:
    """Scale and zero point of each int8/uint8 input and output tensor of a .tflite model."""
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path))
    out = {}
    for d in [*it.get_input_details(), *it.get_output_details()]:
        scale, zp = d["quantization"]
        if np.dtype(d["dtype"]) in (np.int8, np.uint8) and scale:
            out[d["name"]] = (float(scale), int(zp))
    return out


def _providers(cand: Candidate, profile: DeviceProfile) -> tuple[str, ...]:
    # A fallback runtime (ONNX on a LiteRT device) runs on the CPU provider.
    if (cand.runtime or profile.runtime.name) == profile.runtime.name:
        return profile.runtime.execution_providers
    return ("CPUExecutionProvider",)


def measure(
    cand: Candidate, model: ModelHandle, profile: DeviceProfile, data: Split, ref: Reference
) -> dict[str, Any]:
    """Accuracy on ``data`` against ``ref``, latency beside the reference, peak RSS, size."""
    assert model.path is not None
    threads = profile.runtime.threads
    runtime = cand.runtime or profile.runtime.name
    one = data.feeds(0, 1)
    with load_session(
        runtime, model.path, threads=threads, providers=_providers(cand, profile)
    ) as sess:
        outputs = run_batched(sess, data, model.batch_axes)
        metrics = compare(ref.outputs, outputs, data.y, ref.task, ref.metric, ref.metric_value)
        # The fp32 ONNX is the side-by-side reference for ONNX candidates (a .tflite candidate
        # against an onnxruntime model would compare runtimes, not the compression).
        if (
            runtime == "onnxruntime"
            and ref.latency_model is not None
            and ref.latency_model != model.path
        ):
            with load_session(
                "onnxruntime",
                ref.latency_model,
                threads=threads,
                providers=_providers(cand, profile),
            ) as base:
                metrics["latency_b1"] = measure_latency(sess, one, reference=base)
        else:
            metrics["latency_b1"] = measure_latency(sess, one)
        metrics["execution_providers"] = list(getattr(sess, "providers", []))
    metrics.update(measure_peak_rss(runtime, model.path, threads, one))
    metrics["model_bytes"] = model.path.stat().st_size
    if "params" in model.notes:
        metrics["params"] = model.notes["params"]
    return metrics


def golden_count(data: Split, ref: Reference, model_bytes: int, wanted: int) -> int:
    """How many golden samples to ship: ``wanted``, fewer when samples are large (so the
    vectors stay under 1 MB or 10% of the model, whichever is larger)."""
    per_sample = sum(v[:1].nbytes for v in data.inputs.values()) + 2 * sum(
        v[:1].nbytes for v in ref.outputs.values()
    )
    limit = max(GOLDEN_MAX_BYTES, model_bytes // 10)
    return max(1, min(wanted, data.n, limit // max(1, per_sample)))


def _device_layout(arrays: Feeds, model: ModelHandle) -> Feeds:
    """Samples-on-axis-0 arrays back in the runtime's layout (batch axis in place)."""
    out: Feeds = {}
    for k, v in arrays.items():
        ax = model.batch_axis(k)
        out[k] = v[0] if ax is None else (np.moveaxis(v, 0, ax) if ax else v)
    return out


def pack(
    cand: Candidate,
    model: ModelHandle,
    profile: DeviceProfile,
    metrics: dict[str, Any],
    *,
    name: str,
    version: str,
    task: str,
    data: Split,
    ref: Reference,
    golden_wanted: int,
    recipe_steps: list[tuple[str, dict[str, Any]]],
    key: Any,
    workdir: Path,
    security_floor: str | None = None,
) -> Path:
    """Golden vectors, report.json and the signed artifact for a measured candidate."""
    assert model.path is not None
    runtime = cand.runtime or profile.runtime.name
    count = golden_count(data, ref, metrics["model_bytes"], golden_wanted)
    # One batched case when every input stacks samples on axis 0; otherwise (a scalar input,
    # a state batched on axis 1) one case per sample, each fed as the model takes it.
    batched = all(model.batch_axis(k) == 0 for k in data.inputs)
    spans = [(0, count)] if batched else [(i, i + 1) for i in range(count)]
    cases = []
    with load_session(runtime, model.path, threads=profile.runtime.threads) as sess:
        for a, b in spans:
            feed = data.feeds(a, b)
            expected = {k: np.asarray(v) for k, v in sess.infer(feed).items()}
            cases.append(
                GoldenCase(
                    feed,
                    _device_layout({k: v[a:b] for k, v in ref.outputs.items()}, model),
                    expected,
                )
            )
        inputs, outs = _specs(sess, model.path)
        # The drift monitor's reference: this candidate's own outputs on the eval data (what the
        # device will see when traffic looks like the eval data).
        reference = build_reference(data.inputs, run_batched(sess, data, model.batch_axes), task)
    golden = (
        GoldenSet(cases[0].inputs, cases[0].reference, cases[0].expected)
        if batched
        else GoldenSet.of_cases(cases)
    )
    rel = _SELF_TEST_RTOL.get(model.precision, _SELF_TEST_RTOL_INT8)
    floats = [
        np.abs(v.astype(np.float64))
        for c in cases
        for v in c.expected.values()
        if v.dtype.kind == "f" and v.size
    ]
    scale = max((float(np.max(f)) for f in floats), default=0.0)
    min_agree = None
    if task == "classification":
        first = outs[0].name
        agree = sum(
            int(np.sum(np.argmax(c.expected[first], -1) == np.argmax(c.reference[first], -1)))
            for c in cases
        )
        min_agree = max(0, agree - 1) / count  # the device may flip one borderline sample
    workdir.mkdir(parents=True, exist_ok=True)
    golden_path = workdir / "golden.npz"
    golden.save(golden_path)
    model_file = "model.onnx" if runtime == "onnxruntime" else "model.tflite"
    model_copy = workdir / model_file
    shutil.copyfile(model.path, model_copy)
    report_path = workdir / "report.json"
    cand.report = build_report(
        cand.recipe,
        runtime,
        model.precision,
        model.path,
        data.feeds(0, 1),
        metrics,
        model.notes,
        cand.steps,
        profile.runtime.threads,
    )
    report_path.write_text(json.dumps(cand.report, indent=2, default=str))
    reference_path = workdir / REFERENCE_FILE
    reference_path.write_bytes(encode_reference(reference))
    files = {
        model_file: model_copy,
        "golden.npz": golden_path,
        "report.json": report_path,
        REFERENCE_FILE: reference_path,
    }
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        name=name,
        version=version,
        profile=profile.name,
        runtime=runtime,  # type: ignore[arg-type]
        precision=model.precision,
        task=task,  # type: ignore[arg-type]
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        builder_version=__version__,
        model=ModelInfo(file=model_file, inputs=inputs, outputs=outs),
        files={k: file_entry(p) for k, p in files.items()},
        metrics=metrics,
        recipe=Recipe(
            name=cand.recipe,
            steps=[RecipeStep.model_validate({"pass": s, "config": c}) for s, c in recipe_steps],
        ),
        golden=Golden(
            file="golden.npz",
            count=count,
            atol=rel * scale + 1e-6,
            rtol=0.0,
            min_top1_agreement=min_agree,
        ),
        budgets=profile.budgets.model_dump(),
        security_floor=security_floor,
        monitor=MonitorRef(file=REFERENCE_FILE),
    )
    out = workdir / manifest.artifact_name
    write_artifact(out, manifest, files, key)
    return out


def evaluate_and_pack(
    cand: Candidate,
    model: ModelHandle,
    profile: DeviceProfile,
    *,
    name: str,
    version: str,
    task: str,
    data: Split,
    ref: Reference,
    golden_wanted: int,
    recipe_steps: list[tuple[str, dict[str, Any]]],
    key: Any,
    workdir: Path,
    security_floor: str | None = None,
) -> None:
    """Measure, gate and (only when it fits) pack ``cand``: nothing over a budget is signed."""
    metrics = measure(cand, model, profile, data, ref)
    cand.precision = model.precision
    cand.notes = model.notes
    cand.metrics = metrics
    cand.violations = gate(metrics, profile, task)
    if cand.violations:
        return
    cand.artifact = pack(
        cand,
        model,
        profile,
        metrics,
        name=name,
        version=version,
        task=task,
        data=data,
        ref=ref,
        golden_wanted=golden_wanted,
        recipe_steps=recipe_steps,
        key=key,
        workdir=workdir,
        security_floor=security_floor,
    )
    metrics["artifact_bytes"] = cand.artifact.stat().st_size
