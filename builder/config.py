"""The build configuration (a TOML file beside the model): what to build and from what."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.protocol.manifest import Version
from agent.protocol.validation import load_toml, parse_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """Exactly one of: a factory (+ optional weights), a torch.export .pt2, or an .onnx file."""

    factory: str | None = None
    weights: str | None = None
    pt2: str | None = None
    onnx: str | None = None
    input_shape: list[int] = Field(min_length=1)
    input_name: str = "input"
    output_name: str = "output"

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("factory", "pt2", "onnx") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of factory, pt2 or onnx")
        if self.weights and not self.factory:
            raise ValueError("weights only go with factory")
        return self


class DataFiles(_Strict):
    eval: str
    calibration: str | None = None  # defaults to the eval data
    train: str | None = None  # enables fine-tuning after pruning


class StepSpec(_Strict):
    name: str = Field(alias="pass")
    config: dict[str, Any] = {}

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class BuildConfig(_Strict):
    name: str
    version: Version
    task: Literal["classification", "regression"] = "classification"
    model: ModelSource
    data: DataFiles
    signing_key: str | None = None
    # Extra recipes a profile's candidates may name: {recipe: [{pass = "...", config = {...}}]}.
    recipes: dict[str, list[StepSpec]] = {}
    # Config of the distill step in the built-in distilled_* recipes (student_kwargs or
    # student_factory, epochs, ...); without it those recipes are skipped.
    distill: dict[str, Any] = {}
    golden_count: int = Field(default=8, ge=1, le=256)
    seed: int = 0
    base_dir: Path = Path(".")

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.base_dir / p


def load_build_config(path: Path) -> BuildConfig:
    data = load_toml(path)
    data.pop("base_dir", None)
    cfg = parse_model(BuildConfig, data, str(path))
    cfg.base_dir = path.resolve().parent
    return cfg
