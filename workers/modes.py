"""The engine's verification-budget modes, listed once (no torch here: the ingress and the
CLI read them too)."""

from __future__ import annotations

from enum import StrEnum


class BudgetMode(StrEnum):
    """How many drafts of each request the target verifies in a step (ℓ_r)."""

    FIXED = "fixed"
    """γ per request."""
    THRESHOLD = "threshold"
    """Up to the first calibrated per-position confidence below θ."""
    ALGORITHM1 = "algorithm1"
    """Paper Algorithm 1 against the profiled step cost SPS(B), this replica's load."""
    TOPK = "topk"
    """§5.2: a capacity from the confidences of two steps earlier, the most confident
    drafts up to it."""
    CLUSTER = "cluster"
    """Algorithm 1 with SPS evaluated at this replica's tokens plus what the rest of its
    expert-parallel group schedules (from the load board)."""

    @property
    def needs_confidence(self) -> bool:
        """Needs a drafter with a confidence head (DSpark)."""
        return self is not BudgetMode.FIXED

    @classmethod
    def parse(cls, value: str | BudgetMode, field: str = "budget") -> BudgetMode:
        """The mode named ``value``; a ValueError naming ``field`` and the modes otherwise."""
        try:
            return cls(value)
        except ValueError:
            names = ", ".join(m.value for m in cls)
            raise ValueError(f"{field} must be one of {names}; got {value!r}") from None
