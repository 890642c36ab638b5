"""The agent's TOML config: validated strictly, every error names the file and the key."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from agent.broker import BrokerConfig
from agent.errors import ConfigError
from agent.protocol.capture import CaptureConfig
from agent.protocol.topics import SEGMENT_RE
from agent.protocol.validation import load_toml, parse_model


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TransferConfig(_Strict):
    # Chunk topics subscribed at once: bounds memory to about window x chunk size.
    window: int = Field(default=8, ge=1, le=256)
    # No chunk for this long while fetching: subscribe the window again.
    stall_s: float = Field(default=20.0, gt=0)
    # Stalls in a row (no chunk for stall_s each, while connected) before the download is given
    # up: REJECTED with a reason (chunks pruned from the broker?), the partial file discarded.
    stall_tries: int = Field(default=6, ge=1, le=1000)
    # An announced artifact larger than this is refused before anything is written.
    max_artifact_mb: float = Field(default=4096.0, gt=0)
    # Free space kept on the state dir's filesystem beyond what a deployment needs (download +
    # unpacked files); short of it, the deployment waits for space instead of starting.
    free_space_margin_mb: float = Field(default=64.0, ge=0)
    # Waiting for disk space: checked again after this, doubling up to disk_retry_max_s.
    disk_retry_s: float = Field(default=10.0, gt=0)
    disk_retry_max_s: float = Field(default=300.0, gt=0)


class InstallConfig(_Strict):
    bench_runs: int = Field(default=50, ge=5, le=100_000)
    # Budgets: taken from the device profile when it is found, these override it.
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_p95_regression_pct: float | None = Field(default=None, ge=0)
    # Absolute slack on the regression check, so sub-millisecond models do not fail on jitter.
    p95_slack_ms: float = Field(default=0.5, ge=0)
    probation_s: float = Field(default=60.0, ge=0)
    probation_interval_s: float = Field(default=5.0, gt=0)


class CommandsConfig(_Strict):
    """[commands]: operator commands cannot starve the agent's worker.

    Commands wait in a queue of at most ``max_pending``; beyond it one is answered at once with
    ``ok: false`` ("busy: N commands pending"). A benchmark runs at most ``bench_max_s`` and
    ``bench_max_runs`` runs; benchmarks together use at most ``bench_budget_s`` of every minute (a
    token bucket: it refills at bench_budget_s/60 per second, up to bench_budget_s); one that the
    budget cannot cover is refused with the seconds until it can.
    """

    max_pending: int = Field(default=16, ge=1, le=10_000)
    bench_max_s: float = Field(default=2.0, gt=0, le=600)
    bench_max_runs: int = Field(default=1000, ge=1, le=1_000_000)
    # 0 turns the benchmark command off; else at least bench_max_s (one full benchmark fits).
    bench_budget_s: float = Field(default=6.0, ge=0, le=60)

    @model_validator(mode="after")
    def _budget_fits_one(self) -> CommandsConfig:
        if 0 < self.bench_budget_s < self.bench_max_s:
            raise ValueError(
                f"bench_budget_s ({self.bench_budget_s:g}) must be 0 or at least "
                f"bench_max_s ({self.bench_max_s:g})"
            )
        return self


class TelemetryConfig(_Strict):
    """[telemetry]: one message per interval; buffered on disk while the broker is unreachable."""

    enabled: bool = True
    interval_s: float = Field(default=10.0, ge=0.05, le=86_400)
    # Root under which sys/class/{thermal,powercap,hwmon} and sys/devices/system/cpu are read
    # ("/" on a device).
    sysfs_root: Path = Path("/")
    # Where undelivered messages wait (SQLite); default STATE_DIR/telemetry.
    buffer_dir: Path | None = None
    # At most this many undelivered messages are kept; beyond it the oldest are dropped (and counted).
    buffer_max_messages: int = Field(default=10_000, ge=1, le=10_000_000)


class MonitorConfig(_Strict):
    """[monitor]: drift of served inputs/outputs against the artifact's reference profile.

    Unset values come from the artifact's reference.json defaults (PSI threshold 0.25, 2
    windows, 50 observations). A window is one telemetry interval.
    """

    enabled: bool = True
    # A drift event when the largest score is over this for drift_windows windows in a row.
    drift_threshold: float | None = Field(default=None, gt=0)
    drift_windows: int | None = Field(default=None, ge=1, le=1000)
    # Windows with fewer observations count neither toward nor against an episode.
    min_count: int | None = Field(default=None, ge=1)
    # Observing costs at most this share of inference time (calls are sampled to fit).
    max_overhead: float = Field(default=0.05, gt=0, le=1)
    # Differential privacy of the released window: Laplace noise of scale 1/dp_epsilon on every
    # histogram bin and count (agent.monitor.privacy); unset: exact counts.
    dp_epsilon: float | None = Field(default=None, gt=0, le=100)


class ServeConfig(_Strict):
    """[serve]: the local inference endpoint (Open Inference Protocol v2 REST). No authentication: keep it on loopback."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)  # 8000: Triton's and tritonclient's default
    unix_socket: Path | None = None  # listen on this unix socket instead of host:port
    max_body_bytes: int = Field(default=16 * 1024 * 1024, ge=1024, le=2**31)
    request_timeout_s: float = Field(
        default=10.0, gt=0, le=3600
    )  # a whole request: wait, head and body
    # When every one is taken, a new connection evicts the oldest not running a request.
    max_connections: int = Field(default=64, ge=1, le=10_000)
    # Request bodies over 64 KiB being read and parsed at once hold at most this many bytes in
    # all (a JSON body costs several times its size to parse); beyond it 503 with Retry-After.
    # Default: 32 MiB, or max_body_bytes if larger; never below max_body_bytes.
    max_body_bytes_in_flight: int | None = Field(default=None, ge=1024, le=2**34)
    # Text generation (/generate, /v1/chat/completions): generations running at once (one keeps
    # a small device's cores on one request); beyond it requests wait in a queue of at most
    # max_queued_generations, and beyond that get 503 with Retry-After.
    max_generations: int = Field(default=1, ge=1, le=64)
    max_queued_generations: int = Field(default=8, ge=0, le=10_000)
    # A generation's whole time, waiting in the queue included; then it ends (504, or an error
    # event on a stream). request_timeout_s still bounds reading the request.
    generate_timeout_s: float = Field(default=300.0, gt=0, le=86_400)
    # The most tokens one request may ask for (max_tokens); more is a 400.
    max_tokens_limit: int = Field(default=4096, ge=1, le=1_000_000)

    @model_validator(mode="after")
    def _one_body_fits(self) -> ServeConfig:
        n = self.max_body_bytes_in_flight
        if n is not None and n < self.max_body_bytes:
            raise ValueError(
                f"max_body_bytes_in_flight ({n}) must be at least max_body_bytes "
                f"({self.max_body_bytes})"
            )
        return self

    @property
    def body_budget(self) -> int:
        n = self.max_body_bytes_in_flight
        return n if n is not None else max(32 * 1024 * 1024, self.max_body_bytes)


class AgentConfig(_Strict):
    device_id: str
    profile: str
    groups: list[str] = []
    state_dir: Path
    # The pinned root public key (PEM): it verifies the trust document, which names the release
    # keys (artifacts) and operator keys (deployments, commands). See docs/security.md.
    root_key: Path
    # The trust document this device is provisioned with; newer ones arrive on edgefleet/v1/trust.
    trust_file: Path | None = None
    keep_versions: int = Field(default=2, ge=0, le=100)
    threads: int = Field(default=1, ge=1, le=512)
    # Runtimes this device accepts; empty: the profile's runtime, else every runtime installed.
    runtimes: list[Literal["onnxruntime", "litert", "onnxruntime-genai"]] = []
    profiles_dir: Path | None = None
    # This machine's architecture differs from the profile's hardware.arch: "warn" (log it, say it
    # in check-config and in the birth message, keep running) or "refuse" (do not start).
    arch_check: Literal["warn", "refuse"] = "warn"
    broker: BrokerConfig = BrokerConfig()
    transfer: TransferConfig = TransferConfig()
    install: InstallConfig = InstallConfig()
    commands: CommandsConfig = CommandsConfig()
    telemetry: TelemetryConfig = TelemetryConfig()
    serve: ServeConfig = ServeConfig()
    monitor: MonitorConfig = MonitorConfig()
    capture: CaptureConfig = CaptureConfig()
    log_level: Literal["debug", "info", "warning", "error"] = "info"

    @field_validator("device_id", "profile")
    @classmethod
    def _ident(cls, v: str) -> str:
        if not SEGMENT_RE.match(v):
            raise ValueError("must be letters, digits, '.', '_' or '-' (max 64)")
        return v

    @field_validator("groups")
    @classmethod
    def _groups(cls, v: list[str]) -> list[str]:
        for g in v:
            if not SEGMENT_RE.match(g):
                raise ValueError(f"group {g!r} must be letters, digits, '.', '_' or '-'")
        return v

    @property
    def client_id(self) -> str:
        return f"edgefleet-agent-{self.device_id}"


def _resolve(base: Path, p: Path | None) -> Path | None:
    if p is None:
        return None
    p = Path(os.path.expanduser(str(p)))
    if p.is_absolute():
        return p
    found = base / p
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    if len(p.parts) > 1 and creds and base == Path(creds).resolve() and not found.exists():
        # systemd's LoadCredential=keys:/etc/edgefleet/keys loads keys/NAME as keys_NAME
        flat = base / "_".join(p.parts)
        if flat.exists():
            return flat
    return found


def _redact_path(base: Path, spec: str) -> str:
    """'file.py:function' with the file resolved against the config's directory."""
    f, fn = spec.rsplit(":", 1)
    return f"{_resolve(base, Path(f))}:{fn}"


def load_config(path: Path) -> AgentConfig:
    """Read and validate; relative paths are relative to the config file's directory."""
    raw = load_toml(path)
    if "trusted_keys" in raw:
        raise ConfigError(
            f"{path}: trusted_keys: replaced by root_key and trust_file (the root-signed trust "
            "document names the release and operator keys; see docs/security.md)"
        )
    cfg = parse_model(AgentConfig, raw, str(path))
    base = path.resolve().parent
    broker = cfg.broker.model_copy(
        update={
            "ca_file": _resolve(base, cfg.broker.ca_file),
            "cert_file": _resolve(base, cfg.broker.cert_file),
            "key_file": _resolve(base, cfg.broker.key_file),
        }
    )
    cfg = cfg.model_copy(
        update={
            "state_dir": _resolve(base, cfg.state_dir),
            "root_key": _resolve(base, cfg.root_key),
            "trust_file": _resolve(base, cfg.trust_file),
            "profiles_dir": _resolve(base, cfg.profiles_dir),
            "broker": broker,
            "serve": cfg.serve.model_copy(
                update={"unix_socket": _resolve(base, cfg.serve.unix_socket)}
            ),
            "capture": cfg.capture.model_copy(
                update={
                    "redact": None
                    if cfg.capture.redact is None
                    else _redact_path(base, cfg.capture.redact)
                }
            ),
            "telemetry": cfg.telemetry.model_copy(
                update={
                    "sysfs_root": _resolve(base, cfg.telemetry.sysfs_root),
                    "buffer_dir": _resolve(base, cfg.telemetry.buffer_dir),
                }
            ),
        }
    )
    for name in ("root_key", "trust_file"):
        f = getattr(cfg, name)
        if f is not None and not f.is_file():
            raise ConfigError(f"{path}: {name}: file not found ({f})")
    for name in ("ca_file", "cert_file", "key_file"):
        f = getattr(cfg.broker, name)
        if f is not None and not f.is_file():
            raise ConfigError(f"{path}: broker.{name}: file not found ({f})")
    if cfg.broker.tls is False and any(getattr(cfg.broker, n) for n in ("ca_file", "cert_file")):
        raise ConfigError(f"{path}: broker.url: certificates need an mqtts:// URL")
    return cfg
