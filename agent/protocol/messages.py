"""Message schemas for every topic (JSON, UTF-8), strict: unknown fields are refused.

``decode`` turns any payload into a model or a MessageError with a reason fit for an event;
it never raises anything else, whatever the bytes.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.errors import IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.manifest import Sha256, Version
from agent.protocol.states import DeployState as DeployState
from agent.protocol.topics import SEGMENT_RE

M = TypeVar("M", bound=BaseModel)

MAX_CONTROL_BYTES = 64 * 1024  # deployments, commands, index entries
MAX_ANNOUNCEMENT_BYTES = 4 * 1024 * 1024  # manifest + chunk table
MAX_CHUNK_SIZE = 16 * 1024 * 1024
# DeployState is re-exported from agent.protocol.states, where its categories are defined.


class MessageError(IntegrityError):
    """A message that does not decode or validate; its text is the reason sent in an event."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _segment(v: str) -> str:
    if not SEGMENT_RE.match(v):
        raise ValueError("must be letters, digits, '.', '_' or '-' (max 64)")
    return v


class ChunkRef(_Strict):
    size: int = Field(ge=1, le=MAX_CHUNK_SIZE)
    sha256: Sha256


class ArtifactAnnouncement(_Strict):
    """Retained on artifacts/{sha256}/manifest: the signed manifest plus the chunk table."""

    format_version: Literal[1] = 1
    sha256: Sha256
    size: int = Field(ge=1)
    chunk_size: int = Field(ge=1, le=MAX_CHUNK_SIZE)
    chunks: list[ChunkRef] = Field(min_length=1)
    name: str
    version: str
    profile: str
    runtime: str
    manifest: dict[str, Any]
    signature: str
    published: str = ""

    def table_problem(self) -> str | None:
        """Why the chunk table does not add up, or None when it does."""
        expected = math.ceil(self.size / self.chunk_size)
        if len(self.chunks) != expected:
            return f"chunk table has {len(self.chunks)} chunks, size/chunk_size needs {expected}"
        if sum(c.size for c in self.chunks) != self.size:
            return "chunk sizes do not add up to the artifact size"
        if any(c.size != self.chunk_size for c in self.chunks[:-1]):
            return "every chunk but the last must be chunk_size bytes"
        return None

    def table_digest(self) -> str:
        """sha256 of the chunk table (chunk size, each chunk's size and sha256): a signed
        deployment carries it, so no byte is written for a table nobody signed."""
        return chunk_table_digest(self.chunk_size, [c.model_dump() for c in self.chunks])


def chunk_table_digest(chunk_size: int, chunks: list[dict[str, Any]]) -> str:
    table = {"chunk_size": chunk_size, "chunks": [[c["size"], c["sha256"]] for c in chunks]}
    return hashlib.sha256(canonical_json(table)).hexdigest()


class IndexEntry(_Strict):
    """Retained on artifacts/index/{name}/{version}/{profile}: lets `deploy NAME@VERSION` find the sha."""

    name: str
    version: str
    profile: str
    runtime: str
    sha256: Sha256
    size: int = Field(ge=1)
    published: str = ""
    # The chunk table's digest (ArtifactAnnouncement.table_digest), for signed deployments;
    # absent in entries published before 0.2 (deploy then reads the announcement).
    chunks_sha256: Sha256 | None = None


class Deployment(_Strict):
    """Desired state: the body of the signed envelope retained on devices/{id}/deployment or
    groups/{group}/deployment. ``size`` and ``chunks_sha256`` (the chunk table's digest) are
    signed here, so the device checks an announcement against them before writing a byte."""

    name: str
    version: Version
    sha256: Sha256
    size: int = Field(ge=1)
    chunks_sha256: Sha256
    profile: str | None = None
    deployed_at: str = ""
    # [capture] keys that override the device config's for this deployment's model (absent:
    # the config's); e.g. {"enabled": true, "sample_rate": 1.0}. A deployment that carries
    # capture keys turns capture on unless it says enabled = false. Checked against the config's
    # CaptureConfig by the agent (agent.monitor.capture.settings_for).
    capture: dict[str, Any] | None = None

    _n = field_validator("name")(_segment)


class ActiveModel(_Strict):
    name: str
    version: str
    sha256: str


class DeviceInfo(_Strict):
    """What the device is: architecture, Python, installed runtimes ('onnxruntime-gpu 1.19.0'), and
    what does not fit its profile (an architecture other than hardware.arch)."""

    machine: str
    python: str
    system: str = ""
    runtimes: dict[str, str] = {}
    warnings: list[str] = []


class PendingDeployment(_Strict):
    """A deployment the agent is fetching and has not installed yet (StateMessage.pending).

    ``waiting`` says what has not arrived: "manifest" (the announcement), "chunks", or "" (it
    flows); ``age_s`` is the seconds since the fetch started."""

    name: str
    version: str
    sha256: str
    age_s: float = Field(ge=0)
    waiting: str = ""


class StateMessage(_Strict):
    """Retained birth on devices/{id}/state; the Last Will carries online=false."""

    device: str
    online: bool
    agent_version: str
    profile: str
    groups: list[str] = []
    active: ActiveModel | None = None
    seq: int = Field(ge=0)
    ts: float
    device_info: DeviceInfo | None = None  # absent from agents before 0.1.0's device report
    # Absent (not null) when nothing is pending, so collectors before 0.3 still read it: see
    # encode_state.
    pending: PendingDeployment | None = None


class Event(_Strict):
    """devices/{id}/events: deployment progress, rollbacks, rejected messages and drift episodes
    (kind "drift": one when an episode starts, one when it ends), each with a reason."""

    device: str
    seq: int = Field(ge=0)
    ts: float
    kind: Literal["deployment", "bad_message", "command", "info", "drift"]
    state: DeployState | None = None
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    reason: str = ""
    detail: dict[str, Any] = {}


CommandOp = Literal["deploy", "rollback", "benchmark", "rebirth", "status"]
COMMAND_OPS: tuple[str, ...] = ("deploy", "rollback", "benchmark", "rebirth", "status")


class Command(_Strict):
    """The body of a signed envelope on devices/{id}/cmd (not retained).

    ``op`` is kept a plain string here so an unknown op still decodes and is answered on
    cmd/result with ``ok: false`` and a reason (the agent checks it against COMMAND_OPS).
    Arguments: deploy takes name, version, sha256, size, chunks_sha256; rollback takes an optional ``version``
    (a kept version to go back to; default the previous one); benchmark takes ``runs``.
    """

    id: str = Field(min_length=1, max_length=128)
    op: str = Field(min_length=1, max_length=64)
    name: str | None = None
    version: str | None = None
    sha256: str | None = None
    size: int | None = Field(default=None, ge=1)
    chunks_sha256: str | None = None
    runs: int | None = Field(default=None, ge=1, le=100_000)


class CommandResult(_Strict):
    id: str
    ok: bool
    reason: str = ""
    detail: dict[str, Any] = {}


class LatencyWindow(_Strict):
    """Inference latency since the previous telemetry message (a bounded reservoir, not a list).

    Percentiles are absent when ``count`` is 0. ``errors`` counts inferences the runtime failed
    on; a client's bad request or a call made while no model is active is not one. ``thermal`` is the thermal state the window was
    measured in (hottest zone, throttled or not), so a slow-down can be told from a hot device.
    """

    count: int = Field(ge=0)
    errors: int = Field(default=0, ge=0)
    throughput_per_s: float = Field(ge=0)
    p50_ms: float | None = None
    p95_ms: float | None = None
    p99_ms: float | None = None
    max_ms: float | None = None
    thermal: dict[str, Any] = {}


class GenerationWindow(_Strict):
    """Text generation on the endpoint since the previous message (agent.telemetry.generation).

    ``tok_s`` is decode speed (tokens after the first over the time from first to last token);
    TTFT is from a generation's start (its slot), so queueing shows only in ``queue_max``;
    ``rejected`` counts 503s (queue full, or waited too long); absent figures had no sample.
    """

    requests: int = Field(default=0, ge=0)
    tokens: int = Field(default=0, ge=0)
    tok_s: float | None = Field(default=None, ge=0)
    ttft_p50_ms: float | None = Field(default=None, ge=0)
    ttft_p95_ms: float | None = Field(default=None, ge=0)
    queue_max: int = Field(default=0, ge=0)
    rejected: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    cancelled: int = Field(default=0, ge=0)


class Telemetry(_Strict):
    """devices/{id}/telemetry, one per interval (QoS 1). A sensor the device lacks is absent.

    ``temperatures_c`` maps a thermal zone's type (or name) to degrees Celsius;
    ``buffer`` reports the on-disk backlog: {"pending": n, "dropped": n, "dropped_total": n}
    (dropped: oldest messages discarded, since the previous message, while the broker was
    unreachable and the buffer was full; dropped_total: since the buffer was created).
    ``power_w`` is the average power over the interval and ``energy_mj_per_inference`` its
    energy divided by the inferences served in it (absent when none were); ``power_source``
    names the sensor (agent.telemetry.power). All three are absent on a device without one.
    """

    device: str
    seq: int = Field(ge=0)
    ts: float
    interval_s: float = Field(ge=0)
    uptime_s: float = Field(ge=0)
    active: ActiveModel | None = None
    latency: LatencyWindow
    rss_mb: float | None = None
    cpu_percent: float | None = None
    mem_available_mb: float | None = None
    temperatures_c: dict[str, float] = {}
    throttled: bool | None = None
    throttle_detail: dict[str, Any] = {}
    cpu_freq_mhz: float | None = None
    power_w: float | None = None
    energy_mj_per_inference: float | None = None
    power_source: str | None = None
    buffer: dict[str, int] = {}
    # Drift of served inputs/outputs against the active model's reference profile, this window
    # (see docs/protocol.md); absent without a monitored model or with nothing observed.
    monitor: dict[str, Any] | None = None
    # Feedback capture this window: {"captured", "dropped", "redaction_errors", "queue_bytes"};
    # absent while capture is off.
    capture: dict[str, int] | None = None
    # Text generation this window; absent from older agents and from windows without any.
    generation: GenerationWindow | None = None


class SampleTensor(_Strict):
    """One captured tensor: ``data`` is base64 of its raw little-endian, C-order bytes."""

    dtype: str
    shape: list[int]
    data: str


Label = int | float | list[Any]
SampleTrigger = Literal["sample", "low_confidence", "drift", "label"]


class Sample(_Strict):
    """devices/{id}/samples (QoS 1, opt-in feedback capture): one served inference.

    ``inputs`` is absent when the capture is outputs_only; ``redacted`` says whether the
    device's redaction hook ran on it. ``seq`` increases across restarts (its own sequence).
    """

    device: str
    seq: int = Field(ge=0)
    ts: float
    model: ActiveModel
    trigger: SampleTrigger
    request_id: str | None = None
    inputs: dict[str, SampleTensor] | None = None
    outputs: dict[str, SampleTensor] | None = None
    label: Label | None = None
    redacted: bool = False


def decode(model: type[M], payload: bytes, max_bytes: int = MAX_CONTROL_BYTES) -> M:
    """Parse ``payload`` as JSON into ``model``; any problem is a MessageError with a short reason."""
    if len(payload) > max_bytes:
        raise MessageError(f"payload of {len(payload)} bytes exceeds the {max_bytes} allowed")
    try:
        doc = json.loads(payload.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise MessageError("payload is not UTF-8 JSON") from None
    return validate(model, doc)


def validate(model: type[M], doc: Any) -> M:
    """``doc`` (parsed JSON, e.g. a signed envelope's body) as ``model``; a MessageError naming
    the model, the field and what is wrong otherwise."""
    if not isinstance(doc, dict):
        raise MessageError(f"payload is a JSON {type(doc).__name__}, expected an object")
    try:
        return model.model_validate(doc)
    except ValidationError as exc:
        raise MessageError(f"{model.__name__}: {validation_reason(exc)}") from None
    except RecursionError:
        raise MessageError("payload is nested too deeply") from None


def validation_reason(exc: ValidationError) -> str:
    """A pydantic error in one short line: 'field: what is wrong (+N more)'."""
    first = exc.errors()[0]
    loc = ".".join(str(p) for p in first["loc"]) or "(top level)"
    msg = "unknown field" if first["type"] == "extra_forbidden" else first["msg"]
    more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return f"{loc}: {msg}{more}"


def encode(msg: BaseModel) -> bytes:
    return json.dumps(msg.model_dump(mode="json"), separators=(",", ":"), allow_nan=False).encode()


def encode_state(msg: StateMessage) -> bytes:
    """A StateMessage without ``pending`` when it is None: older (strict) readers refuse an
    unknown field, so an idle device's state stays readable by them."""
    doc = msg.model_dump(mode="json")
    if doc.get("pending") is None:
        doc.pop("pending", None)
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
