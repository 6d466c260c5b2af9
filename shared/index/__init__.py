"""The index and storage: Conquest's tables, records, atomic storage, import, export and the quarantine.

Imports :mod:`pacsbridge.shared.core` and :mod:`pacsbridge.shared.dicom` (docs/architecture.md)."""
