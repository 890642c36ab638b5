"""One exception hierarchy for every command (agent, builder, fleet): each error carries the
exit code of the CLI, and every exit code is defined here.

A user error is printed as one line and the command exits with its code; anything else that
escapes is a bug and keeps its traceback. Part of the shared core (docs/architecture.md).

    0 ok                      6 integrity (signature, hash, tampering)
    1 other user error        7 missing optional dependency (names the extra to install)
    2 usage / config          8 broker unreachable or refusing
    3 data                    9 database error, or a device that did not answer in time
    4 model                  10 a device refused a command
    5 no candidate in budget 11 a rollout halted or failed
                             12 the broker lacks something the fleet needs
  130 interrupted (Ctrl-C)
"""

from __future__ import annotations


class EdgefleetError(Exception):
    """Base class: something the user can act on, reported as one line."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class ConfigError(EdgefleetError):
    """A configuration or profile file is missing or invalid."""

    exit_code = 2


class UsageError(EdgefleetError):
    """Bad arguments or inputs given on the command line."""

    exit_code = 2


class DataError(EdgefleetError):
    """Calibration/eval/training data is missing or of the wrong shape or dtype."""

    exit_code = 3


class ModelError(EdgefleetError):
    """A model could not be loaded, built, exported or run."""

    exit_code = 4


class ParityError(ModelError):
    """Outputs of two models differ by more than the named tolerance."""

    def __init__(self, message: str, diffs: dict[str, float]) -> None:
        super().__init__(message)
        self.diffs = diffs


class RuntimeTooOldError(ModelError):
    """The installed runtime is older than the model's format (ONNX IR / opset): refused, not retried."""


class BudgetError(EdgefleetError):
    """No candidate met the profile's budgets."""

    exit_code = 5


class IntegrityError(EdgefleetError):
    """An artifact is corrupted, tampered with, or signed by an untrusted key."""

    exit_code = 6


class DependencyError(EdgefleetError):
    """An optional dependency needed by the requested step is not installed."""

    exit_code = 7


class BrokerError(EdgefleetError):
    """The MQTT broker cannot be reached or refused us."""

    exit_code = 8


class BrokerUnfitError(EdgefleetError):
    """The broker answers, but breaks something the fleet relies on (`edgefleet broker check`)."""

    exit_code = 12


class DatabaseError(EdgefleetError):
    """The fleet database cannot be opened, written or read."""

    exit_code = 9


class NoAnswerError(EdgefleetError):
    """A device did not answer a command in time."""

    exit_code = 9


class CommandFailed(EdgefleetError):
    """A device answered a command with ``ok: false``."""

    exit_code = 10


class RolloutHalted(EdgefleetError):
    """A staged rollout stopped: a canary failed, or no device could act as one."""

    exit_code = 11


def missing_dependency(
    package: str, extra: str, what: str, alternative: str = ""
) -> DependencyError:
    """The one wording of "install this": ``what`` needs ``package``, from ``edgefleet[extra]``.

    ``alternative`` is appended in parentheses (another way to get it, such as a system package).
    """
    also = f" (or {alternative})" if alternative else ""
    return DependencyError(
        f"{what} needs the Python package '{package}': pip install 'edgefleet[{extra}]'{also}"
    )
