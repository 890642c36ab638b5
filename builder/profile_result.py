"""What building one profile produced, and the error when no candidate fits. Both builds make
it (the search, builder/search.py, and the LLM build, builder/llm/build.py), and the build
command, the HTML report and the demo read it, so it lives apart from either build."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.errors import BudgetError
from agent.protocol.profile import DeviceProfile
from builder.candidate import Candidate


@dataclass
class ProfileResult:
    """One profile's build: every candidate, the one chosen and where its artifact went."""

    profile: DeviceProfile
    candidates: list[Candidate]
    chosen: Candidate | None
    artifact: Path | None
    report: Path | None = None  # the HTML compression report beside the artifact
    error: str | None = None  # the profile could not be built at all (not a candidate's failure)
    # The budgets it was gated on when not the profile's tensor budgets (a text-generation build)
    budgets: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        c = self.chosen
        return {
            "profile": self.profile.name,
            "runtime": self.profile.runtime.name,
            "chosen": c.recipe if c else None,
            "precision": c.precision if c else None,
            "artifact": str(self.artifact) if self.artifact else None,
            "report": str(self.report) if self.report else None,
            "metrics": c.metrics if c else None,
            "error": self.error,
            "budgets": self.budgets or self.profile.budgets.model_dump(),
            "candidates": [x.summary() for x in self.candidates],
        }


def no_fit_error(result: ProfileResult) -> BudgetError:
    """The error for a profile where nothing fits, saying how far each candidate was."""
    if result.error:
        return BudgetError(f"profile '{result.profile.name}': not built: {result.error}")
    built = [c for c in result.candidates if not c.skipped]
    what = (
        "no candidate meets the budgets"
        if any(not c.error for c in built)
        else "no candidate could be built"
    )
    return BudgetError(
        f"profile '{result.profile.name}': {what}: "
        + "; ".join(f"{c.recipe}: {c.error or ', '.join(c.violations)}" for c in result.candidates)
    )
