"""Talking to remote nodes: per-node throttles and the searcher/downloader interfaces with their DIMSE
implementations, used by the worker's jobs and by the API's node queries.

Imports core, dicom and index (docs/architecture.md)."""
