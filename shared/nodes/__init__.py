"""Talking to remote nodes: per-node throttles, the searcher/downloader interfaces with their DIMSE
implementations, and the DIMSE pusher; used by the worker's jobs and by the API's node queries.

Imports core, dicom, index and deid (docs/architecture.md)."""
