"""The build configuration (a TOML file beside the model): what to build and from what."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import ConfigError
from agent.protocol.manifest import Version, version_key
from agent.protocol.profile import Budgets, DeviceProfile
from agent.protocol.validation import load_toml, parse_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Strict):
    """Exactly one of: a factory (+ optional weights), a torch.export .pt2, or an .onnx file.

    An ONNX model names its own inputs and outputs. A torch model takes ``inputs`` positionally
    in that order (default: the data's arrays in file order, or ``input_name`` for a one-input
    model); their dtypes and shapes come from the build data.
    """

    factory: str | None = None
    weights: str | None = None
    pt2: str | None = None
    onnx: str | None = None
    # One-input form (kept for existing configs): the sample shape without the batch dimension.
    input_shape: list[int] | None = Field(default=None, min_length=1)
    input_name: str = "input"
    output_name: str = "output"
    inputs: list[str] | None = Field(default=None, min_length=1)
    outputs: list[str] | None = Field(default=None, min_length=1)
    # Axes beyond the batch that vary (sequence length, image size): {input = {axis = "name"}}.
    dynamic_axes: dict[str, dict[int, str]] = {}
    # Where the batch goes when it is not axis 0: {state = 1, sr = "none"} (inputs or outputs).
    batch_axes: dict[str, int | Literal["none"]] = {}

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        given = [k for k in ("factory", "pt2", "onnx") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of factory, pt2 or onnx")
        if self.weights and not self.factory:
            raise ValueError("weights only go with factory")
        return self

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(self.outputs) if self.outputs else (self.output_name,)

    def batch_axis(self, name: str) -> int | None:
        ax = self.batch_axes.get(name, 0)
        return None if ax == "none" else int(ax)


class DataFiles(_Strict):
    eval: str
    calibration: str | None = None  # defaults to the eval data
    train: str | None = None  # enables fine-tuning after pruning


class StepSpec(_Strict):
    name: str = Field(alias="pass")
    config: dict[str, Any] = {}

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ProfileOverride(_Strict):
    """A build config's changes to one device profile: budgets and candidates for this model."""

    budgets: dict[str, Any] = {}
    candidates: list[str] | None = Field(default=None, min_length=1)  # replaces the profile's list
    add_candidates: list[str] = []  # tried after the profile's own
    select: Literal["smallest", "fastest", "most_accurate"] | None = None


class BuildConfig(_Strict):
    name: str
    version: Version
    # Anti-rollback (docs/security.md): devices that activate this version never run a version
    # of NAME below this one again. For a release that fixes a vulnerability.
    security_floor: Version | None = None
    # classification: top-1 against labels; regression/embedding: cosine and error against fp32.
    task: Literal["classification", "regression", "embedding"] = "classification"
    # A user metric, "file.py:function" or "module:function":
    # fn(outputs, reference, labels) -> float, higher is better; gated on its drop from fp32.
    metric: str | None = None
    model: ModelSource
    data: DataFiles
    signing_key: str | None = None
    # Budgets for every profile (overriding the profile's), then per profile under [profiles.NAME].
    budgets: dict[str, Any] = {}
    profiles: dict[str, ProfileOverride] = {}
    # Extra recipes a profile's candidates may name: {recipe: [{pass = "...", config = {...}}]}.
    recipes: dict[str, list[StepSpec]] = {}
    # Config of the distill step in the built-in distilled_* recipes (student_kwargs or
    # student_factory, epochs, ...); without it those recipes are skipped.
    distill: dict[str, Any] = {}
    golden_count: int = Field(default=8, ge=1, le=256)

    @model_validator(mode="after")
    def _floor(self) -> BuildConfig:
        if self.security_floor is not None and version_key(self.security_floor) > version_key(
            self.version
        ):
            raise ValueError(
                f"security_floor {self.security_floor} is above version {self.version}"
            )
        return self

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
    check_overrides(cfg, str(path))
    return cfg


def effective_profile(profile: DeviceProfile, cfg: BuildConfig) -> DeviceProfile:
    """``profile`` with the build config's budgets and candidates applied (validated strictly)."""
    over = cfg.profiles.get(profile.name)
    budgets = {**profile.budgets.model_dump(), **cfg.budgets, **(over.budgets if over else {})}
    build = profile.build.model_dump()
    if over is not None:
        if over.candidates is not None:
            build["candidates"] = list(over.candidates)
        build["candidates"] = [
            *build["candidates"],
            *(c for c in over.add_candidates if c not in build["candidates"]),
        ]
        if over.select:
            build["select"] = over.select
    doc = {**profile.model_dump(), "budgets": budgets, "build": build}
    where = f"{cfg.base_dir / 'build config'} (budgets for profile {profile.name})"
    return parse_model(DeviceProfile, doc, where)


def check_overrides(cfg: BuildConfig, source: str) -> None:
    """Budget keys in [budgets] and [profiles.*] must be budgets a profile knows."""
    known = set(Budgets.model_fields)
    for where, keys in [
        ("budgets", cfg.budgets),
        *((f"profiles.{n}.budgets", o.budgets) for n, o in cfg.profiles.items()),
    ]:
        bad = sorted(set(keys) - known)
        if bad:
            raise ConfigError(
                f"{source}: {where}: unknown budget {', '.join(bad)} (known: {', '.join(sorted(known))})"
            )
