"""load: a PyTorch factory (+ state_dict), a torch.export .pt2, or an existing .onnx file."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Any

from pydantic import Field

from agent.errors import ModelError
from agent.runtime.base import IOSpec
from builder.passes.base import (
    ModelHandle,
    ModelKind,
    Pass,
    PassConfig,
    PassContext,
    digest_file,
    digest_module,
)


class InputConfig(PassConfig):
    name: str
    dtype: str = "float32"
    shape: tuple[int | str, ...]


class LoadConfig(PassConfig):
    factory: str | None = None
    weights: Path | None = None
    pt2: Path | None = None
    onnx: Path | None = None
    # A torch model's inputs (positional order) as the build data gives them; an ONNX model
    # names its own.
    inputs: tuple[InputConfig, ...] = ()
    output_names: tuple[str, ...] = ("output",)
    batch_axes: dict[str, int | None] = Field(default_factory=dict)
    # Directory that a relative factory file ("model.py:fn") is resolved against.
    base_dir: Path = Path(".")


_ONNX_DTYPES = {
    1: "float32",
    10: "float16",
    2: "uint8",
    3: "int8",
    6: "int32",
    7: "int64",
    9: "bool",
    11: "float64",
}


def onnx_io(path: Path) -> tuple[list[IOSpec], list[IOSpec]]:
    """The inputs (initializers excluded) and outputs an ONNX file declares, or a ModelError."""
    import onnx

    try:
        m = onnx.load(str(path), load_external_data=False)
    except FileNotFoundError:
        raise ModelError(f"{path}: file not found") from None
    except Exception as exc:
        raise ModelError(f"{path}: not a readable ONNX model: {exc}") from None
    inits = {i.name for i in m.graph.initializer}

    def spec(v: Any) -> IOSpec:
        t = v.type.tensor_type
        dims = tuple(
            d.dim_value if d.HasField("dim_value") else (d.dim_param or f"{v.name}_d{i}")
            for i, d in enumerate(t.shape.dim)
        )
        return IOSpec(v.name, _ONNX_DTYPES.get(t.elem_type, f"onnx-type-{t.elem_type}"), dims)

    return [spec(v) for v in m.graph.input if v.name not in inits], [
        spec(v) for v in m.graph.output
    ]


def resolve_factory(spec: str, base_dir: Path) -> Any:
    """``pkg.module:function`` or ``path/to/file.py:function`` (relative to ``base_dir``)."""
    if ":" not in spec:
        raise ModelError(f"factory '{spec}' must look like module:function or file.py:function")
    mod_name, fn_name = spec.rsplit(":", 1)
    try:
        if mod_name.endswith(".py"):
            path = Path(mod_name)
            path = path if path.is_absolute() else base_dir / path
            if not path.is_file():
                raise ModelError(f"factory file {path} not found")
            unique = f"_edgefleet_factory_{abs(hash(str(path.resolve())))}"
            mod_spec = importlib.util.spec_from_file_location(unique, path)
            assert mod_spec is not None and mod_spec.loader is not None
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[unique] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(mod_name)
    except ModelError:
        raise
    except Exception as exc:
        raise ModelError(
            f"factory '{spec}': cannot import {mod_name}: {type(exc).__name__}: {exc}"
        ) from None
    fn = getattr(module, fn_name, None)
    if fn is None or not callable(fn):
        raise ModelError(f"factory '{spec}': {mod_name} has no callable '{fn_name}'")
    return fn


class LoadPass(Pass):
    name = "load"
    description = "Load a PyTorch factory + state_dict, a torch.export .pt2, or an .onnx file"
    config_class = LoadConfig
    accepts = ()

    def produces(self, config: PassConfig, input_kind: ModelKind | None) -> ModelKind:
        assert isinstance(config, LoadConfig)
        return ModelKind.ONNX if config.onnx else ModelKind.TORCH

    def run(self, model: ModelHandle | None, config: PassConfig, ctx: PassContext) -> ModelHandle:
        assert isinstance(config, LoadConfig)
        common: dict[str, Any] = {
            "inputs": tuple(IOSpec(i.name, i.dtype, i.shape) for i in config.inputs),
            "output_names": config.output_names,
            "batch_axes": dict(config.batch_axes),
        }
        if config.onnx:
            return self._load_onnx(config.onnx, common)
        import torch

        if config.pt2:
            try:
                module = torch.export.load(str(config.pt2)).module()
            except FileNotFoundError:
                raise ModelError(f"{config.pt2}: file not found") from None
            except Exception as exc:
                raise ModelError(f"{config.pt2}: not a torch.export program: {exc}") from None
        else:
            assert config.factory is not None
            fn = resolve_factory(config.factory, config.base_dir)
            try:
                module = fn()
            except Exception as exc:
                raise ModelError(
                    f"factory '{config.factory}' failed: {type(exc).__name__}: {exc}"
                ) from None
            if not isinstance(module, torch.nn.Module):
                raise ModelError(
                    f"factory '{config.factory}' returned {type(module).__name__}, not a torch.nn.Module"
                )
            if config.weights:
                self._load_weights(module, config.weights)
        if not config.pt2:  # a torch.export module is already in inference form; eval() raises
            module.eval()
        self._smoke_test(module, config, ctx)
        params = sum(p.numel() for p in module.parameters())
        return ModelHandle(
            kind=ModelKind.TORCH,
            digest=digest_module(module),
            module=module,
            notes={"params": params},
            **common,
        )

    @staticmethod
    def _load_weights(module: Any, path: Path) -> None:
        import torch

        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise ModelError(f"weights {path}: file not found") from None
        except Exception as exc:
            raise ModelError(f"weights {path}: not a loadable state_dict: {exc}") from None
        try:
            module.load_state_dict(state)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0:2]
            raise ModelError(f"weights {path} do not fit the model: {' '.join(first)}") from None

    @staticmethod
    def _smoke_test(module: Any, config: LoadConfig, ctx: PassContext) -> None:
        """Run two real eval samples through the module: inputs and outputs must line up."""
        from builder.torchio import call_module

        names = [i.name for i in config.inputs]
        split = ctx.data.eval
        feeds = next(split.batches(2))[2]
        try:
            call_module(module, feeds, names, config.output_names)
        except Exception as exc:
            given = ", ".join(f"{k} {v.dtype}{list(v.shape)}" for k, v in feeds.items())
            raise ModelError(
                f"model does not run on the build data ({given}): "
                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            ) from None

    @staticmethod
    def _load_onnx(path: Path, common: dict[str, Any]) -> ModelHandle:
        import onnx

        try:
            m = onnx.load(str(path))
            onnx.checker.check_model(m)
        except FileNotFoundError:
            raise ModelError(f"{path}: file not found") from None
        except Exception as exc:
            raise ModelError(f"{path}: not a valid ONNX model: {exc}") from None
        inputs, outputs = onnx_io(path)
        common["inputs"] = tuple(inputs)
        common["output_names"] = tuple(o.name for o in outputs)
        return ModelHandle(kind=ModelKind.ONNX, digest=digest_file(path), path=path, **common)
