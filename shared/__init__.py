"""Code the pacsbridge services share, in layers (docs/architecture.md); each imports only those
below it, and none imports a service:

- :mod:`~pacsbridge.shared.core`: settings, errors, the database, ``dicom.sql`` and the schema;
- :mod:`~pacsbridge.shared.dicom`: header reader, file meta, query model, DIMSE client, nodes;
- :mod:`~pacsbridge.shared.index`: the Conquest index, storage, import, export, quarantine;
- :mod:`~pacsbridge.shared.deid`: de-identification projects, the PS3.15 profile, keyed derivations;
- :mod:`~pacsbridge.shared.jobs`: the job store, job specifications, webhooks;
- :mod:`~pacsbridge.shared.nodes`: per-node throttles, searchers, downloaders and pushers (DIMSE, DICOMweb);
- :mod:`~pacsbridge.shared.cohorts`: cohorts' rows, sheets and mass-transfer chunks.
"""
import logging

logging.getLogger(__name__).addHandler(logging.NullHandler())
