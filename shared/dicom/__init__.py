"""The DICOM wire: header reading, file meta, the query model, the DIMSE client, and the pynetdicom
compatibility layer (:mod:`.compat`: every use of pynetdicom's internals, docs/pynetdicom.md).

Imports only :mod:`pacsbridge.shared.core` (docs/architecture.md)."""
