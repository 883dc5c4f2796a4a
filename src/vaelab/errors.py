"""Exceptions that carry a message for the user: what went wrong and how to fix it.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; library users catch
``VaelabError``.
"""

from __future__ import annotations


class VaelabError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(VaelabError):
    """Bad arguments, configuration or run directory (exit status 2, nothing written)."""

    exit_code = 2


class DataError(VaelabError):
    """A data file that is missing, malformed or fails its checksum."""

    exit_code = 1


class CheckpointError(UsageError):
    """A run directory whose files cannot be loaded (truncated, corrupted, mismatched)."""


class TrainingDiverged(VaelabError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""

    exit_code = 1
