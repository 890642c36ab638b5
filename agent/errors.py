"""One exception hierarchy for both halves; each error carries the exit code of the CLI.

A user error is printed as one line and the command exits with its code; anything else that
escapes is a bug and keeps its traceback.
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


def missing_dependency(package: str, extra: str, what: str) -> DependencyError:
    """Build the error for an optional import that failed, naming what to install."""
    return DependencyError(
        f"{what} needs the Python package '{package}': pip install 'edgefleet[{extra}]'"
    )
