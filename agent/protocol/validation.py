"""Turn pydantic validation errors into lines a person can act on: file, key, value, message."""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from agent.compat import tomllib
from agent.errors import ConfigError

M = TypeVar("M", bound=BaseModel)


def format_validation_error(source: str, err: ValidationError) -> str:
    """One line per problem: ``source: key.path: message (got value)``."""
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        got = e.get("input")
        got_txt = "" if isinstance(got, dict) or got is None else f" (got {got!r})"
        lines.append(f"{source}: {loc}: {msg}{got_txt}")
    return "; ".join(lines)


def load_toml(path: Path) -> dict[str, Any]:
    """Read a TOML file, mapping every failure to a one-line ConfigError."""
    try:
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
            return data
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None


def parse_model(model: type[M], data: Any, source: str) -> M:
    """Validate ``data`` against ``model``; errors name the source and the key."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(source, exc)) from None
