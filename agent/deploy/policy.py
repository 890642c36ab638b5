"""What this device accepts: what its trust document allows, its profile, runtimes, budgets, and
no downgrades below a model line's highest activated version or security floor."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.deploy.trust import DeviceTrust, Lines
from agent.device import DeviceFacts, arch_problem, facts
from agent.errors import ConfigError, IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.manifest import Manifest, parse_manifest
from agent.protocol.profile import DeviceProfile, default_profiles_dir, get_profile
from agent.protocol.signing import Signature, TrustedKey, read_trusted_key, verify

DEFAULT_REGRESSION_PCT = 20.0


@dataclass(frozen=True)
class Policy:
    profile: str
    runtimes: tuple[str, ...]
    # The trust document held (release and operator keys) and the anti-rollback lines: state the
    # worker updates, so the policy always judges by the newest trust (see agent.deploy.trust).
    trust: DeviceTrust
    lines: Lines
    max_p95_ms: float | None
    max_regression_pct: float
    # onnxruntime execution providers, first loadable wins (from the device profile).
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # What this device is (reported in the birth message) and what does not fit its profile.
    device: DeviceFacts = field(default_factory=facts)
    warnings: tuple[str, ...] = ()
    # The runtime the profile names (None without a profile file).
    profile_runtime: str | None = None

    @property
    def keys(self) -> tuple[TrustedKey, ...]:
        """The release keys valid now (raw bytes: cryptography loads on first use)."""
        return tuple(self.trust.release_keys())

    def check(self, m: Manifest) -> None:
        """Raise IntegrityError naming why ``m`` may not be installed here."""
        if m.profile != self.profile:
            raise IntegrityError(
                f"artifact is for profile '{m.profile}', this device is '{self.profile}'"
            )
        if m.runtime not in self.runtimes:
            raise IntegrityError(
                f"artifact needs runtime '{m.runtime}', this device runs {', '.join(self.runtimes) or 'none'}"
            )
        problem = self.lines.install_problem(m)
        if problem is not None:
            raise IntegrityError(problem)

    def verify_keys(self) -> list[TrustedKey]:
        """The release keys to verify with; IntegrityError when there are none to trust."""
        problem = self.trust.release_problem()
        if problem is not None:
            raise IntegrityError(problem)
        return list(self.keys)

    def check_signed(self, doc: dict[str, Any], signature: str) -> Manifest:
        """Verify a manifest sent with its signature (before fetching anything) and the policy."""
        sig = Signature.from_bytes(signature.encode("utf-8", "replace"))
        try:
            message = canonical_json(doc)
        except (ValueError, TypeError):
            raise IntegrityError(
                "manifest holds values that cannot be signed (non-finite numbers)"
            ) from None
        keys = self.verify_keys()
        problem = self.trust.key_problem(sig.key_id, "release")
        if problem is not None:
            raise IntegrityError(f"artifact refused: {problem}")
        verify(message, sig, keys)
        m = parse_manifest(doc, "announced manifest")
        self.check(m)
        return m


def _find_profile(cfg: AgentConfig) -> DeviceProfile | None:
    if cfg.profiles_dir is not None:
        return get_profile(cfg.profile, cfg.profiles_dir)
    directory = default_profiles_dir()
    if (directory / f"{cfg.profile}.toml").is_file():
        return get_profile(cfg.profile, directory)
    return None


def resolve_policy(cfg: AgentConfig, source: str = "config") -> Policy:
    """Combine the config, the device profile (when found) and the runtimes installed here."""
    from agent.runtime import available_runtimes

    profile = _find_profile(cfg)
    max_p95 = cfg.install.max_p95_ms
    pct = cfg.install.max_p95_regression_pct
    if profile is not None:
        max_p95 = max_p95 if max_p95 is not None else profile.budgets.max_p95_ms
        pct = pct if pct is not None else profile.budgets.max_p95_regression_pct
    if max_p95 is None:
        raise ConfigError(
            f"{source}: install.max_p95_ms: no latency budget (set it, or profiles_dir "
            f"to a directory holding {cfg.profile}.toml)"
        )
    runtimes: tuple[str, ...] = tuple(cfg.runtimes)
    if not runtimes:
        runtimes = (profile.runtime.name,) if profile is not None else tuple(available_runtimes())
        if (
            profile is not None
            and profile.llm is not None
            and "onnxruntime-genai" in available_runtimes()
        ):  # text generation beside the profile's runtime, where edgefleet[llm] is installed
            runtimes += ("onnxruntime-genai",)
    trust = DeviceTrust(cfg.state_dir, [read_trusted_key(cfg.root_key)], cfg.trust_file)
    providers = (
        profile.runtime.execution_providers if profile is not None else ("CPUExecutionProvider",)
    )
    device = facts()
    warnings: tuple[str, ...] = ()
    problem = (
        None
        if profile is None
        else arch_problem(profile.name, profile.hardware.arch, device.machine)
    )
    if problem is not None:
        if cfg.arch_check == "refuse":
            raise ConfigError(f'{source}: profile: {problem} (arch_check = "refuse")')
        warnings = (problem,)
    return Policy(
        cfg.profile,
        runtimes,
        trust,
        Lines(cfg.state_dir),
        max_p95,
        pct if pct is not None else DEFAULT_REGRESSION_PCT,
        tuple(providers),
        device,
        warnings,
        profile.runtime.name if profile is not None else None,
    )
