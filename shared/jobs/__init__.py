"""Jobs are rows: the job and node store, job specifications and webhooks.

Imports core, dicom and index; never a service (docs/architecture.md)."""
