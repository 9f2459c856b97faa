"""The one exception hierarchy of pacs-ai.

Every error the program raises on purpose is a ``PacsAiError``; its message says what went wrong and,
where it helps, what to do about it.
"""

from __future__ import annotations


class PacsAiError(Exception):
    """Base class of every error raised on purpose by pacs-ai."""


class ConfigError(PacsAiError):
    """The configuration is invalid. The message names the offending key."""

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"config: {key}: {problem}")


class StorageError(PacsAiError):
    """The spool or a result folder could not be written (disk full, read-only, permissions)."""


class JobStoreError(PacsAiError):
    """The job database could not be read or written."""


class LeaseLostError(JobStoreError):
    """A worker tried to finish a job or delivery whose lease it no longer holds."""


class ResultFormatError(JobStoreError):
    """A job's stored result is in no shape this or an earlier version wrote (``pacs_ai.results``)."""


class InputError(PacsAiError):
    """An image cannot be processed. ``reason`` is a short machine-readable code."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class ModelError(PacsAiError):
    """A model folder is missing, malformed, or its weights do not match its card."""


class DicomWriteError(PacsAiError):
    """A result object (Secondary Capture or Structured Report) could not be built."""


class DeliveryError(PacsAiError):
    """A result could not be delivered to a destination."""

    def __init__(self, destination: str, detail: str, *, permanent: bool = False) -> None:
        self.destination = destination
        self.detail = detail
        self.permanent = permanent
        super().__init__(f"{destination}: {detail}")
