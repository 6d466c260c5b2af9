"""Jobs are rows: the job and node store, job specifications and webhooks.

Imports core, dicom, index and deid; never a service (docs/architecture.md)."""
