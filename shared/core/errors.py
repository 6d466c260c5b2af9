"""Exceptions raised by pacsbridge.

::

    PacsbridgeError
     +-- ConfigError            a setting is missing or malformed
     +-- DicomSqlError          a dicom.sql definition cannot be parsed
     +-- InvalidDataset         a file is not usable DICOM (carries .path and .reason)
     |    +-- MissingUID        a required UID (Study/Series/SOP Instance) is absent
     |    +-- TruncatedFile     the file ends before its last element does
     +-- StorageError           a file could not be written into storage
     |    +-- UnsafePath        a computed path would leave the storage root
     +-- IndexError_            the index database refused an operation
     +-- QueryError             a user query failed (bad SQL, unknown column ...)
     +-- InvalidRequest         a job, node or query description is malformed (carries .field)
     +-- NotFound               no such thing
     |    +-- UnknownNode       no node of that name
     |    +-- UnknownJob        no job with that id
     +-- Conflict               the request clashes with the current state (job already finished ...)
     +-- DimseError             a DICOM peer refused, failed or could not be reached (carries .status)
     |    +-- DicomWebError     a DICOMweb peer did, as seen by the searchers (carries .http_status): a DimseError,
     |                          so that every place that handles a failing peer handles it too
     +-- WebError               a DICOMweb peer refused, failed or could not be reached (carries .status, .url)
          +-- WebTimeout        no answer (connect or read) within the node's timeout
          +-- WebTruncated      a body ended before its own framing said it would
          +-- WebContentError   an answer of the wrong content type, or a malformed multipart/JSON body
          +-- WebRedirectRefused  a redirect or URL to another origin (never followed: credentials stay home)
          +-- WebCancelled      the caller's cancel event was set while we waited or read
"""

from __future__ import annotations

__all__ = [
    "PacsbridgeError",
    "ConfigError",
    "DicomSqlError",
    "InvalidDataset",
    "MissingUID",
    "TruncatedFile",
    "StorageError",
    "UnsafePath",
    "IndexError_",
    "QueryError",
    "InvalidRequest",
    "NotFound",
    "UnknownNode",
    "UnknownJob",
    "Conflict",
    "UnknownProject",
    "DeidSecretError",
    "DimseError",
    "WebError",
    "WebTimeout",
    "WebTruncated",
    "WebContentError",
    "WebRedirectRefused",
    "WebCancelled",
    "DicomWebError",
]


class PacsbridgeError(Exception):
    """Base class of every error pacsbridge raises on purpose."""


class ConfigError(PacsbridgeError):
    """A setting is missing or malformed."""


class DicomSqlError(PacsbridgeError):
    """A Conquest ``dicom.sql`` definition cannot be parsed."""

    def __init__(self, message: str, source: str = "", line: int = 0) -> None:
        where = f"{source}:{line}: " if source else ""
        super().__init__(f"{where}{message}")
        self.source = source
        self.line = line


class InvalidDataset(PacsbridgeError):
    """A file or received dataset cannot be stored or indexed.

    Parameters
    ----------
    path : str
        The file (or a description of the source) that was rejected.
    reason : str
        Why, in words an operator understands.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class MissingUID(InvalidDataset):
    """A required UID is absent or empty."""


class TruncatedFile(InvalidDataset):
    """The file is shorter than its own element lengths say."""


class StorageError(PacsbridgeError):
    """A file could not be written into storage."""


class UnsafePath(StorageError):
    """A computed path would land outside the storage root."""


class IndexError_(PacsbridgeError):
    """The index database refused an operation."""


class QueryError(PacsbridgeError):
    """A user-supplied query could not be run."""


class InvalidRequest(PacsbridgeError):
    """A job, node or query description is malformed.

    Parameters
    ----------
    message : str
        What is wrong, in words a user understands.
    field : str
        The offending field, if one is to blame.
    """

    def __init__(self, message: str, field: str = "") -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.field = field


class NotFound(PacsbridgeError):
    """No such thing."""


class UnknownNode(NotFound):
    """No node of that name."""


class UnknownJob(NotFound):
    """No job with that id."""


class Conflict(PacsbridgeError):
    """The request clashes with the current state (a finished job cancelled ...)."""


class UnknownProject(NotFound):
    """No de-identification project of that name."""


class DeidSecretError(ConfigError):
    """The de-identification secret is missing, or is not the one a project's key was made with."""


class DimseError(PacsbridgeError):
    """A DICOM peer refused, failed or could not be reached.

    ``status`` is the DIMSE status when the peer answered, else ``None``.
    """

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class WebError(PacsbridgeError):
    """A DICOMweb peer refused, failed or could not be reached.

    ``status`` is the HTTP status when the peer answered, else ``None``; ``url`` is what was asked.
    """

    def __init__(self, message: str, status: int | None = None, url: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.url = url


class WebTimeout(WebError):
    """No connection, or no bytes, within the node's timeout."""


class WebTruncated(WebError):
    """A body ended before its own framing (Content-Length, closing multipart boundary) said it would."""


class WebContentError(WebError):
    """An answer of the wrong content type, or a malformed multipart or JSON body."""


class WebRedirectRefused(WebError):
    """A redirect (or a URL) to an origin the node was not configured with, or too many redirects: nothing is
    sent there, so credentials stay home."""


class WebCancelled(WebError):
    """The caller's cancel event was set while a request waited to retry or read its body."""
class DicomWebError(DimseError):
    """A DICOMweb peer refused, failed, could not be reached, or answered what we cannot use.

    ``http_status`` is the HTTP status when the peer answered, else ``None``.
    """

    def __init__(self, message: str, http_status: int | None = None) -> None:
        super().__init__(message)
        self.http_status = http_status
