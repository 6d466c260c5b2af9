"""De-identification: research projects, PS3.15 Annex E's Basic Application Level Confidentiality
Profile with its options, keyed pseudonyms, UIDs and date offsets, the map and the audit.

Layer: imports ``shared/core`` and ``shared/dicom`` only; the jobs, the pusher and the services use it.

- :mod:`.options` - a project's configuration (:class:`~.options.ProjectConfig`, pydantic).
- :mod:`.keys` - the secret, each project's key and the keyed derivations (pseudonyms, UIDs, date offsets).
"""
