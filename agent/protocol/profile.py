"""Device profiles (device_profiles/NAME.toml): hardware, runtime, candidates and budgets.

Shared by the builder (which candidates to try, which budgets to gate on) and the agent
(which profile it serves, the on-device latency budget).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from agent.errors import ConfigError
from agent.protocol.validation import load_toml, parse_model

RUNTIMES = ("onnxruntime", "litert")
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Hardware(_Strict):
    arch: Literal["x86_64", "aarch64", "armv7l"]
    cores: int = Field(ge=1, le=512)
    ram_mb: int = Field(ge=64)
    cpu: str = ""
    accelerator: Literal["none", "cuda", "npu"] = "none"
    cpu_features: tuple[str, ...] = ()


class Runtime(_Strict):
    name: Literal["onnxruntime", "litert"]
    threads: int = Field(ge=1, le=512)
    # onnxruntime execution providers in priority order; the first one available is used.
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)


class Build(_Strict):
    # Recipe names (see builder.recipes); tried in order, gated on the budgets.
    candidates: tuple[str, ...] = Field(min_length=1)
    select: Literal["smallest", "fastest", "most_accurate"] = "smallest"
    calibration_method: Literal["minmax", "entropy", "percentile"] = "minmax"
    prune_ratio: float = Field(default=0.5, gt=0.0, lt=1.0)


class Budgets(_Strict):
    """What a candidate must meet. Size is the model file's bytes; p95 is at batch 1.

    The accuracy budgets apply by task: classifiers on the top-1 drop against the labels;
    regression and embedding models on their outputs against the fp32 reference (every
    output, every sample); a user metric on its drop from the fp32 model's value.
    """

    max_artifact_kb: float = Field(gt=0)
    max_accuracy_drop_pt: float = Field(ge=0)
    max_p95_ms: float = Field(gt=0)
    max_ram_mb: float = Field(gt=0)
    # Regression/embedding: the worst sample's cosine to fp32 (0.28 is garbage; 0.99 is close).
    min_cosine: float = Field(default=0.99, ge=-1, le=1)
    max_abs_err: float | None = Field(default=None, gt=0)
    # max |candidate - fp32| / max |fp32|, per output.
    max_rel_err: float | None = Field(default=None, gt=0)
    # User metric: largest allowed drop (fp32 value minus candidate value, in the metric's units).
    max_metric_drop: float = Field(default=0.01, ge=0)
    # On-device check: a new model's p95 may be at most this much worse than the current one.
    max_p95_regression_pct: float = Field(default=20.0, ge=0)


class LlmBudgets(_Strict):
    """What a text-generation candidate must meet (measured on the build host at the profile's
    threads; the agent checks TTFT and decode speed again on the device)."""

    max_artifact_mb: float = Field(gt=0)
    max_ttft_ms: float = Field(gt=0)  # time to the first token of a short chat prompt
    min_decode_tok_s: float = Field(gt=0)  # tokens per second after the first
    max_ram_mb: float = Field(gt=0)  # peak RSS of a process that loads and generates
    # next-token top-1 agreement with the float model over the prompt set's positions
    min_token_agreement: float = Field(default=0.9, ge=0, le=1)
    # mean share of the first 32 greedy tokens equal to the float model's
    min_greedy_agreement: float = Field(default=0.5, ge=0, le=1)
    max_perplexity_increase_pct: float = Field(default=15.0, ge=0)
    # On-device check against the model being replaced (when it is a text-generation model too).
    max_ttft_regression_pct: float = Field(default=25.0, ge=0)
    max_decode_regression_pct: float = Field(default=20.0, ge=0)


class Llm(_Strict):
    """Text generation on this device kind (onnxruntime-genai): candidates and budgets."""

    # builder.llm candidate names: int4 (symmetric), int4_asym32 (asymmetric, block 32), int8,
    # fp16 (where the runtime wants half precision: a GPU), fp32
    candidates: tuple[str, ...] = Field(default=("int4_asym32", "int4", "int8"), min_length=1)
    select: Literal["smallest", "fastest", "most_accurate"] = "smallest"
    threads: int | None = Field(default=None, ge=1, le=512)  # default: runtime.threads
    execution_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    budgets: LlmBudgets


class DeviceProfile(_Strict):
    name: str
    description: str = ""
    hardware: Hardware
    runtime: Runtime
    build: Build
    budgets: Budgets
    # Text generation: absent where the device kind does not run LLMs.
    llm: Llm | None = None

    @property
    def llm_threads(self) -> int:
        return (self.llm.threads if self.llm else None) or self.runtime.threads

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not NAME_RE.match(v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return v


def load_profile(path: Path) -> DeviceProfile:
    """Load and strictly validate one profile; the file stem must equal its name."""
    data = load_toml(path)
    profile = parse_model(DeviceProfile, data, str(path))
    if profile.name != path.stem:
        raise ConfigError(
            f"{path}: name: '{profile.name}' does not match the file name '{path.stem}'"
        )
    return profile


SHIPPED_PROFILES_DIR = Path(__file__).resolve().parent / "device_profiles"
"""The profiles that ship in the package (wheel package data; a checkout links ./device_profiles here)."""


def default_profiles_dir() -> Path:
    """$EDGEFLEET_PROFILES, else ./device_profiles, else the profiles shipped in the package."""
    env = os.environ.get("EDGEFLEET_PROFILES")
    if env:
        return Path(env)
    cwd = Path.cwd() / "device_profiles"
    if cwd.is_dir():
        return cwd
    return SHIPPED_PROFILES_DIR


def load_profiles(directory: Path | None = None) -> dict[str, DeviceProfile]:
    """All profiles in ``directory`` keyed by name; any invalid file is an error."""
    directory = directory or default_profiles_dir()
    if not directory.is_dir():
        raise ConfigError(f"{directory}: profiles directory not found (set EDGEFLEET_PROFILES)")
    profiles = {}
    for path in sorted(directory.glob("*.toml")):
        p = load_profile(path)
        profiles[p.name] = p
    if not profiles:
        raise ConfigError(f"{directory}: no *.toml device profiles found")
    return profiles


def get_profile(name_or_path: str, directory: Path | None = None) -> DeviceProfile:
    """Resolve a profile by name (in the profiles dir) or by path to a .toml file."""
    if name_or_path.endswith(".toml") or os.sep in name_or_path:
        return load_profile(Path(name_or_path))
    directory = directory or default_profiles_dir()
    path = directory / f"{name_or_path}.toml"
    if not path.is_file():
        known = sorted(p.stem for p in directory.glob("*.toml")) if directory.is_dir() else []
        raise ConfigError(
            f"unknown profile '{name_or_path}' (known: {', '.join(known) or 'none'}; dir {directory})"
        )
    return load_profile(path)
