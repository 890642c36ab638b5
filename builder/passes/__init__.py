"""Pass registry: pass name -> "module:Class", imported only when a recipe uses the pass.

A missing optional dependency therefore fails only the passes that need it, with a message
naming what to install.
"""

from __future__ import annotations

import importlib

from agent.errors import ConfigError, missing_dependency
from builder.passes.base import ModelHandle, ModelKind, Pass, PassConfig, PassContext

REGISTRY: dict[str, tuple[str, str]] = {
    # name: (module:Class, pip extra providing its dependencies)
    "load": ("builder.passes.load:LoadPass", "builder"),
    "export_onnx": ("builder.passes.export_onnx:ExportOnnxPass", "builder"),
    "simplify": ("builder.passes.simplify:SimplifyPass", "builder"),
    "quantize": ("builder.passes.quantize:QuantizePass", "builder"),
    "prune": ("builder.passes.prune:PrunePass", "builder"),
    "lowrank": ("builder.passes.lowrank:LowRankPass", "builder"),
    "distill": ("builder.passes.distill:DistillPass", "builder"),
    "export_tflite": ("builder.passes.export_tflite:ExportTflitePass", "builder"),
}


def get_pass(name: str) -> Pass:
    if name not in REGISTRY:
        raise ConfigError(f"unknown pass '{name}' (known: {', '.join(sorted(REGISTRY))})")
    target, extra = REGISTRY[name]
    module_name, cls_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise missing_dependency(exc.name or module_name, extra, f"pass '{name}'") from None
    cls: type[Pass] = getattr(module, cls_name)
    return cls()


__all__ = ["REGISTRY", "ModelHandle", "ModelKind", "Pass", "PassConfig", "PassContext", "get_pass"]
