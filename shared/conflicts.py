"""UID conflicts: one Study, Series or SOP Instance UID under two PatientIDs (issue 14, item 5)."""

from __future__ import annotations

from typing import Any

from .errors import Conflict

__all__ = ["resolve_conflict"]


def resolve_conflict(ctx: Any, store: Any, entry: dict[str, Any], decision: str, by: str) -> dict[str, Any]:
    raise Conflict("uid conflicts cannot be resolved yet")
