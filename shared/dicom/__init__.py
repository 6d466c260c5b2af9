"""The DICOM wire: header reading, file meta, the query model, the DIMSE client and the pynetdicom fast paths.

Imports only :mod:`pacsbridge.shared.core` (docs/architecture.md)."""
