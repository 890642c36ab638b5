"""Local inference: the refcounted active-model holder, the in-process API and the v2 HTTP endpoint."""

from agent.serve.holder import Loaded, SessionHolder
from agent.serve.local import InferenceError, LocalModel, NoModelError

__all__ = ["InferenceError", "Loaded", "LocalModel", "NoModelError", "SessionHolder"]
