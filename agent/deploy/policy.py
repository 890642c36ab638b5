"""What this device accepts: trusted keys, its profile, runtimes, budgets, and no downgrades."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.config import AgentConfig
from agent.device import DeviceFacts, arch_problem, facts
from agent.errors import ConfigError, IntegrityError
from agent.protocol.canonical import canonical_json
from agent.protocol.manifest import Manifest, parse_manifest, version_key
from agent.protocol.profile import DeviceProfile, default_profiles_dir, get_profile
from agent.protocol.signing import Signature, TrustedKey, read_trusted_key, verify
from agent.store.versions import Installed

DEFAULT_REGRESSION_PCT = 20.0


@dataclass(frozen=True)
class Policy:
    profile: str
    runtimes: tuple[str, ...]
    # Raw key bytes: cryptography loads on the first verification, not at start (signing.py).
    keys: tuple[TrustedKey, ...]
    max_p95_ms: float | None
    max_regression_pct: float
    # onnxruntime execution providers, first loadable wins (from the device profile).
    providers: tuple[str, ...] = ("CPUExecutionProvider",)
    # What this device is (reported in the birth message) and what does not fit its profile.
    device: DeviceFacts = field(default_factory=facts)
    warnings: tuple[str, ...] = ()
    # The runtime the profile names (None without a profile file).
    profile_runtime: str | None = None

    def check(self, m: Manifest, active: Installed | None) -> None:
        """Raise IntegrityError naming why ``m`` may not be installed here."""
        if m.profile != self.profile:
            raise IntegrityError(
                f"artifact is for profile '{m.profile}', this device is '{self.profile}'"
            )
        if m.runtime not in self.runtimes:
            raise IntegrityError(
                f"artifact needs runtime '{m.runtime}', this device runs {', '.join(self.runtimes) or 'none'}"
            )
        if (
            active is not None
            and active.manifest.name == m.name
            and version_key(m.version) < version_key(active.manifest.version)
        ):
            raise IntegrityError(
                f"{m.name} {m.version} is older than the active {active.manifest.version} "
                "(anti-rollback; use the rollback command to go back)"
            )

    def check_signed(
        self, doc: dict[str, Any], signature: str, active: Installed | None
    ) -> Manifest:
        """Verify a manifest sent with its signature (before fetching anything) and the policy."""
        sig = Signature.from_bytes(signature.encode("utf-8", "replace"))
        try:
            message = canonical_json(doc)
        except (ValueError, TypeError):
            raise IntegrityError(
                "manifest holds values that cannot be signed (non-finite numbers)"
            ) from None
        verify(message, sig, list(self.keys))
        m = parse_manifest(doc, "announced manifest")
        self.check(m, active)
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
    keys = tuple(read_trusted_key(k) for k in cfg.trusted_keys)
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
        keys,
        max_p95,
        pct if pct is not None else DEFAULT_REGRESSION_PCT,
        tuple(providers),
        device,
        warnings,
        profile.runtime.name if profile is not None else None,
    )
