"""Build one candidate: run its recipe, measure it against the reference, pack it, gate it."""

from __future__ import annotations

import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from agent import __version__
from agent.protocol.golden import GoldenSet
from agent.protocol.manifest import (
    FORMAT_VERSION,
    Golden,
    Manifest,
    ModelInfo,
    Quantization,
    Recipe,
    RecipeStep,
    TensorSpec,
)
from agent.protocol.profile import DeviceProfile
from agent.runtime import load_session
from builder.evaluate.accuracy import compare, run_batched
from builder.evaluate.latency import measure_latency
from builder.evaluate.memory import measure_peak_rss
from builder.package import file_entry, write_artifact
from builder.passes import ModelHandle
from builder.report import build_report

# Tolerance of the on-device self-test against this candidate's host outputs, relative to
# the largest output magnitude: runtimes on other CPUs round differently, int8 most of all.
_SELF_TEST_RTOL = {"fp32": 1e-3, "fp16": 1e-2}
_SELF_TEST_RTOL_INT8 = 5e-2


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
    runtime: str = ""  # runtime that serves its model file (onnxruntime for .onnx, litert for .tflite)
    skipped: bool = False  # not built at all (error says why); not a failure of the recipe
    report: dict[str, Any] = field(default_factory=dict)  # report.json as packed into its artifact

    @property
    def fits(self) -> bool:
        return self.error is None and not self.violations

    def summary(self) -> dict[str, Any]:
        return {
            "recipe": self.recipe, "runtime": self.runtime, "precision": self.precision, "fits": self.fits,
            "skipped": self.skipped, "error": self.error,
            "violations": self.violations, "metrics": self.metrics, "steps": self.steps,
        }


def gate(metrics: dict[str, Any], profile: DeviceProfile) -> list[str]:
    """Every budget the metrics break, each with the figure and the budget."""
    b = profile.budgets
    v = []
    size_kb = metrics["artifact_bytes"] / 1024
    if size_kb > b.max_artifact_kb:
        v.append(f"size {size_kb:.1f} KB > {b.max_artifact_kb:g} KB")
    drop = metrics.get("top1_drop_pt")
    if drop is not None and drop > b.max_accuracy_drop_pt:
        v.append(f"accuracy drop {drop:.2f} pt > {b.max_accuracy_drop_pt:g} pt")
    p95 = metrics["latency_b1"]["p95_ms"]
    if p95 > b.max_p95_ms:
        v.append(f"p95 {p95:.3f} ms > {b.max_p95_ms:g} ms")
    ram = metrics["peak_rss_mb"]
    if ram > b.max_ram_mb:
        v.append(f"peak RSS {ram:.1f} MB > {b.max_ram_mb:g} MB")
    return v


def _specs(session: Any, model_path: Path) -> tuple[list[TensorSpec], list[TensorSpec]]:
    quant = _tflite_io_quantization(model_path) if model_path.suffix == ".tflite" else {}

    def conv(s: Any) -> TensorSpec:
        q = quant.get(s.name)
        return TensorSpec(name=s.name, dtype=s.dtype, shape=list(s.shape),
                          quantization=Quantization(scale=q[0], zero_point=q[1]) if q else None)

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


def evaluate_and_pack(
    cand: Candidate, model: ModelHandle, profile: DeviceProfile, *, name: str, version: str, task: str,
    eval_x: np.ndarray, eval_y: np.ndarray | None, reference: dict[str, np.ndarray], golden_count: int,
    recipe_steps: list[tuple[str, dict[str, Any]]], key: Any, workdir: Path,
) -> None:
    """Fill ``cand`` with metrics and a signed artifact in ``workdir`` (not yet published)."""
    assert model.path is not None
    threads = profile.runtime.threads
    runtime = cand.runtime or profile.runtime.name
    # A fallback runtime (ONNX on a LiteRT device) runs on the CPU provider.
    providers = profile.runtime.execution_providers if runtime == profile.runtime.name else ("CPUExecutionProvider",)
    with load_session(runtime, model.path, threads=threads, providers=providers) as sess:
        outputs = run_batched(sess, model.input_name, eval_x)
        metrics = compare(reference, outputs, eval_y, task)
        metrics["latency_b1"] = measure_latency(sess, model.input_name, eval_x[:1])
        inputs, outs = _specs(sess, model.path)
        g_in = eval_x[:golden_count]
        expected = sess.infer({model.input_name: g_in})
        metrics["execution_providers"] = list(getattr(sess, "providers", []))
    metrics.update(measure_peak_rss(runtime, model.path, threads, model.input_shape))
    metrics["model_bytes"] = model.path.stat().st_size
    if "params" in model.notes:
        metrics["params"] = model.notes["params"]

    golden_ref = {k: v[:golden_count] for k, v in reference.items()}
    expected = {k: np.asarray(v, dtype=np.float32) for k, v in expected.items()}
    rel = _SELF_TEST_RTOL.get(model.precision, _SELF_TEST_RTOL_INT8)
    scale = max(float(np.max(np.abs(v))) for v in expected.values())
    min_agree = None
    if task == "classification":
        n = len(g_in)
        agree = int(np.sum(np.argmax(expected[outs[0].name], -1) == np.argmax(golden_ref[outs[0].name], -1)))
        min_agree = max(0, agree - 1) / n  # the device may flip one borderline sample
    workdir.mkdir(parents=True, exist_ok=True)
    golden_path = workdir / "golden.npz"
    GoldenSet({model.input_name: g_in}, golden_ref, expected).save(golden_path)
    model_file = "model.onnx" if runtime == "onnxruntime" else "model.tflite"
    model_copy = workdir / model_file
    shutil.copyfile(model.path, model_copy)
    report_path = workdir / "report.json"
    cand.report = build_report(cand.recipe, runtime, model.precision, model.path, model.input_name, eval_x[:1],
                               metrics, model.notes, cand.steps, threads)
    report_path.write_text(json.dumps(cand.report, indent=2, default=str))
    files = {model_file: model_copy, "golden.npz": golden_path, "report.json": report_path}
    manifest = Manifest(
        format_version=FORMAT_VERSION, name=name, version=version, profile=profile.name,
        runtime=runtime, precision=model.precision, task=task,  # type: ignore[arg-type]
        created=dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        builder_version=__version__,
        model=ModelInfo(file=model_file, inputs=inputs, outputs=outs),
        files={k: file_entry(p) for k, p in files.items()},
        metrics=metrics,
        recipe=Recipe(name=cand.recipe, steps=[RecipeStep.model_validate({"pass": s, "config": c}) for s, c in recipe_steps]),
        golden=Golden(file="golden.npz", count=len(g_in), atol=rel * scale + 1e-6, rtol=0.0, min_top1_agreement=min_agree),
    )
    out = workdir / manifest.artifact_name
    write_artifact(out, manifest, files, key)
    metrics["artifact_bytes"] = out.stat().st_size
    cand.precision = model.precision
    cand.metrics = metrics
    cand.artifact = out
    cand.notes = model.notes
    cand.violations = gate(metrics, profile)
