"""Errors that end a command with one readable line instead of a traceback."""

from __future__ import annotations


class InspectdError(Exception):
    """A user-facing error: printed as one line, exits with `exit_code`."""

    exit_code = 1


class ConfigError(InspectdError):
    """Bad configuration or command-line input (exit code 2)."""

    exit_code = 2


class BundleError(InspectdError):
    """A model bundle that is missing, malformed, tampered or truncated."""


class DataError(InspectdError):
    """Input images or folders that cannot be used."""


class BackendUnavailable(InspectdError):
    """A runtime backend whose library, device or engine is missing."""
