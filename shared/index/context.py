"""Build the index and storage of an installation from its settings."""

from __future__ import annotations

from typing import NamedTuple

from pacsbridge.shared.core.config import Settings
from pacsbridge.shared.core.db import make_engine
from pacsbridge.shared.core.dicomsql import load_schema
from pacsbridge.shared.index.conquest import Index
from pacsbridge.shared.index.storage import Storage

__all__ = ["Context", "open_context"]


class Context(NamedTuple):
    """What most commands need: the settings, the index and the storage."""

    settings: Settings
    index: Index  # type: ignore[assignment]  # (a field, where tuple has a method of that name)
    storage: Storage


def open_context(settings: Settings) -> Context:
    """Open the index (without creating tables) and the storage of ``settings``."""
    schema = load_schema(settings.dicom_sql, settings.special_columns)
    index = Index(make_engine(settings.database_url), schema)
    storage = Storage.for_settings(settings)
    return Context(settings, index, storage)
