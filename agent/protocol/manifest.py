"""The artifact manifest (manifest.json): what the model is, how it was made, what it measured.

Format changes bump FORMAT_VERSION; a reader refuses a format it does not know. Unknown keys
are refused too, so a typo or a tampered field never passes silently.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.validation import format_validation_error

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SIGNATURE_NAME = "manifest.sig"
VERSION_RE = re.compile(r"^\d+(\.\d+){0,3}$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
FILE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DTYPES = ("float32", "float16", "int8", "uint8", "int32", "int64", "bool")
# Runtimes whose model is a folder of files (model.file names the folder): text generation.
FOLDER_RUNTIMES = ("onnxruntime-genai",)
DEFAULT_PREFIX_TOKENS = 8


def file_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an artifact member, or None: a plain name, or ``folder/name`` one
    level deep (a text-generation model's folder); never the manifest or its signature."""
    parts = name.split("/")
    if len(parts) > 2 or not all(FILE_RE.match(p) for p in parts):
        return f"{name!r} is not a plain file name or folder/name"
    if name in (MANIFEST_NAME, SIGNATURE_NAME) or (
        len(parts) == 2 and parts[0] in (MANIFEST_NAME, SIGNATURE_NAME)
    ):
        return f"{name!r} is reserved"
    return None


def check_version(v: str) -> str:
    if not VERSION_RE.match(v):
        raise ValueError("must be dotted integers such as 1.2.0")
    return v


def check_sha256(v: str) -> str:
    if not SHA256_RE.match(v):
        raise ValueError("must be 64 lowercase hex digits")
    return v


# Field types that validate themselves; used by the manifest, the MQTT messages and configs.
Version = Annotated[str, AfterValidator(check_version)]
Sha256 = Annotated[str, AfterValidator(check_sha256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quantization(_Strict):
    scale: float
    zero_point: int


class TensorSpec(_Strict):
    name: str
    dtype: Literal["float32", "float16", "int8", "uint8", "int32", "int64", "bool"]
    # Static dims are ints; dynamic dims are named (e.g. "batch").
    shape: list[int | str]
    quantization: Quantization | None = None


class FileEntry(_Strict):
    sha256: Sha256
    size: int = Field(ge=0)


class ModelInfo(_Strict):
    file: str
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(min_length=1)


class Golden(_Strict):
    """Golden vectors for the on-device self-test, stored in an npz named in ``files``."""

    file: str
    count: int = Field(ge=1)
    atol: float = Field(ge=0)
    rtol: float = Field(ge=0)
    # For classifiers: fraction of golden samples whose argmax must match the fp32 reference.
    min_top1_agreement: float | None = Field(default=None, ge=0, le=1)
    # For text generation (a JSON file of prompts and their greedy tokens): how many leading
    # tokens of each prompt the device must reproduce exactly (later ones may flip between CPUs).
    # Left out of the JSON when unset, so older agents read tensor artifacts unchanged.
    prefix_tokens: int | None = Field(default=None, ge=1)


class MonitorRef(_Strict):
    """The reference profile (a JSON file named in ``files``) the agent's drift monitor reads."""

    file: str


class RecipeStep(_Strict):
    name: str = Field(alias="pass")
    config: dict[str, Any] = {}

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class Recipe(_Strict):
    name: str
    steps: list[RecipeStep]


class Manifest(_Strict):
    format_version: int
    name: str
    version: Version
    profile: str
    runtime: Literal["onnxruntime", "litert", "onnxruntime-genai"]
    precision: str
    task: Literal["classification", "regression", "embedding", "text-generation"]
    created: str
    builder_version: str
    model: ModelInfo
    files: dict[str, FileEntry]
    metrics: dict[str, Any]
    recipe: Recipe
    golden: Golden
    # The budgets the model was built against (a profile's, with the build config's overrides).
    # The agent's on-device latency check uses max_p95_ms from here unless its config sets one.
    budgets: dict[str, Any] | None = None
    # Anti-rollback: once this version is activated, no version of NAME below this one may run on
    # the device again (a security fix). Left out of the JSON when unset, so older agents read it.
    security_floor: Version | None = None
    # Drift monitoring: the reference profile of inputs/outputs (see docs/artifact.md). Left out
    # of the JSON when unset, so artifacts without one verify and older agents read it.
    monitor: MonitorRef | None = None

    @field_validator("name", "profile")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not re.match(r"^[a-z0-9][a-z0-9._-]{0,62}$", v):
            raise ValueError("must be lowercase letters, digits, '.', '_' or '-'")
        return v

    @field_validator("files")
    @classmethod
    def _files(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            problem = file_name_problem(name)
            if problem is not None:
                raise ValueError(f"invalid file name: {problem}")
        folders = {n.split("/")[0] for n in v if "/" in n}
        clash = folders & set(v)
        if clash:
            raise ValueError(f"{sorted(clash)[0]!r} is both a file and a folder")
        return v

    def to_dict(self) -> dict[str, Any]:
        doc = self.model_dump(mode="json", by_alias=True)
        for optional in ("security_floor", "monitor"):
            if doc.get(optional) is None:
                doc.pop(optional, None)
        if doc["golden"].get("prefix_tokens") is None:
            doc["golden"].pop("prefix_tokens", None)
        return doc

    @property
    def is_text_generation(self) -> bool:
        return self.task == "text-generation"

    def folder_files(self) -> list[str]:
        """The files inside model.file when it names a folder (text generation), else []."""
        prefix = self.model.file + "/"
        return sorted(n for n in self.files if n.startswith(prefix))

    def canonical_bytes(self) -> bytes:
        return canonical_json(self.to_dict())

    @property
    def artifact_name(self) -> str:
        return f"{self.name}-{self.version}-{self.profile}.efa"


def version_key(version: str) -> tuple[int, ...]:
    """Comparable key for a dotted version; missing parts count as 0 ("1.2" == "1.2.0")."""
    parts = [int(p) for p in version.split(".")]
    while len(parts) < 4:
        parts.append(0)
    return tuple(parts)


def parse_manifest(data: Any, source: str = "manifest.json") -> Manifest:
    if isinstance(data, dict) and data.get("format_version") not in (None, FORMAT_VERSION):
        raise IntegrityError(
            f"{source}: format_version {data.get('format_version')!r} is not supported "
            f"(this edgefleet reads {FORMAT_VERSION})"
        )
    try:
        m = Manifest.model_validate(data)
    except ValidationError as exc:
        raise IntegrityError(format_validation_error(source, exc)) from None
    refs = [m.golden.file] + ([m.monitor.file] if m.monitor else [])
    if (m.runtime in FOLDER_RUNTIMES) != m.is_text_generation:
        raise IntegrityError(
            f"{source}: task 'text-generation' goes with runtime 'onnxruntime-genai' "
            f"(got task {m.task!r}, runtime {m.runtime!r})"
        )
    if m.is_text_generation:
        if f"{m.model.file}/genai_config.json" not in m.files:
            raise IntegrityError(
                f"{source}: model folder '{m.model.file}' has no genai_config.json in files"
            )
    else:
        refs.append(m.model.file)
    for ref in refs:
        if ref not in m.files:
            raise IntegrityError(f"{source}: '{ref}' is referenced but not listed in files")
    return m
