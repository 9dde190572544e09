"""The root of splitserve's error hierarchy.

Every error splitserve raises on purpose derives from `SplitserveError` and carries
the data needed to act on it (request id, page ids, the offending field). Mapping
to gRPC status codes happens in `control/` only.
"""

from __future__ import annotations


class SplitserveError(Exception):
    """Base class for errors splitserve raises deliberately."""


class ConfigError(SplitserveError):
    """A configuration value is missing, malformed or out of range."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class ModelLoadError(SplitserveError):
    """A model file or directory cannot be read or is not a supported Llama model."""
