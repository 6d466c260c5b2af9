"""The ground floor: settings, errors, the database, the schema (dicom.sql and pacsbridge's own tables).

Imports nothing else of pacsbridge (docs/architecture.md)."""
