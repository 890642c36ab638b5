"""Named recipes: the candidate pass chains a profile can ask for (after the shared load step)."""

from __future__ import annotations

from typing import Any

from agent.errors import ConfigError
from agent.protocol.profile import DeviceProfile

Step = tuple[str, dict[str, Any]]

EXPORT: Step = ("export_onnx", {})
SIMPLIFY: Step = ("simplify", {})
LOWRANK: Step = ("lowrank", {"method": "energy", "energy": 0.9})
# The student comes from the build config's [distill] table (merged in by the search).
DISTILL: Step = ("distill", {})
TFLITE_FP32: Step = ("export_tflite", {})
TFLITE_DYNAMIC: Step = ("export_tflite", {"quantization": "dynamic"})
TFLITE_INT8: Step = ("export_tflite", {"quantization": "int8"})


def _static(profile: DeviceProfile) -> Step:
    return ("quantize", {"mode": "static", "method": profile.build.calibration_method})


def _pruned(profile: DeviceProfile) -> Step:
    return ("prune", {"method": "structured", "ratio": profile.build.prune_ratio})


RECIPES: dict[str, Any] = {
    "fp32": lambda p: [EXPORT, SIMPLIFY],
    "fp16": lambda p: [EXPORT, SIMPLIFY, ("quantize", {"mode": "fp16"})],
    # onnxruntime's default: one weight scale per tensor (MiniLM min cosine 0.91).
    "int8_dynamic": lambda p: [
        EXPORT,
        SIMPLIFY,
        ("quantize", {"mode": "dynamic", "per_channel": False}),
    ],
    "int8_static": lambda p: [EXPORT, SIMPLIFY, _static(p)],
    # Per-channel weight scales: what transformers need (MiniLM min cosine 0.91 -> 0.98).
    "int8_dynamic_pc": lambda p: [
        EXPORT,
        SIMPLIFY,
        ("quantize", {"mode": "dynamic", "per_channel": True}),
    ],
    "pruned_fp32": lambda p: [_pruned(p), EXPORT, SIMPLIFY],
    "pruned_int8_static": lambda p: [_pruned(p), EXPORT, SIMPLIFY, _static(p)],
    "lowrank_fp32": lambda p: [LOWRANK, EXPORT, SIMPLIFY],
    "lowrank_int8_static": lambda p: [LOWRANK, EXPORT, SIMPLIFY, _static(p)],
    "distilled_fp32": lambda p: [DISTILL, EXPORT, SIMPLIFY],
    "distilled_int8_static": lambda p: [DISTILL, EXPORT, SIMPLIFY, _static(p)],
    # LiteRT (.tflite) through litert-torch; quantized by ai-edge-quantizer on the converted model.
    "tflite_fp32": lambda p: [TFLITE_FP32],
    "tflite_int8_dynamic": lambda p: [TFLITE_DYNAMIC],
    "tflite_int8": lambda p: [TFLITE_INT8],
    "pruned_tflite_int8": lambda p: [_pruned(p), TFLITE_INT8],
    "distilled_tflite_int8": lambda p: [DISTILL, TFLITE_INT8],
    "lowrank_tflite_int8": lambda p: [LOWRANK, TFLITE_INT8],
}

# Recipes that need the model as a torch module (not available from an .onnx input).
TORCH_ONLY = {
    "pruned_fp32",
    "pruned_int8_static",
    "lowrank_fp32",
    "lowrank_int8_static",
    "distilled_fp32",
    "distilled_int8_static",
    "tflite_fp32",
    "tflite_int8_dynamic",
    "tflite_int8",
    "pruned_tflite_int8",
    "distilled_tflite_int8",
    "lowrank_tflite_int8",
}
# Recipes with a distill step: built-in ones need a [distill] table in the build config.
NEEDS_STUDENT = {r for r in RECIPES if r.startswith("distilled_")}


def recipe_steps(
    name: str, profile: DeviceProfile, from_onnx: bool, custom: dict[str, list[Step]] | None = None
) -> list[Step]:
    """The steps of recipe ``name``: a recipe from the build config wins over a built-in one."""
    if custom and name in custom:
        return [s for s in custom[name] if not (from_onnx and s[0] == "export_onnx")]
    if name not in RECIPES:
        raise ConfigError(
            f"profile '{profile.name}': unknown candidate recipe '{name}' (known: {', '.join([*RECIPES, *(custom or {})])})"
        )
    steps: list[Step] = RECIPES[name](profile)
    if from_onnx:
        steps = [s for s in steps if s[0] != "export_onnx"]
    return steps
