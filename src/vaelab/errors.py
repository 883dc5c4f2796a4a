"""Exceptions that carry a message for the user: what went wrong and how to fix it.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``; library users catch
``VaelabError``. Bad arguments (``UsageError`` and its subclasses) are also ``ValueError``s, so code that
calls the library with a wrong value can catch the standard exception.
"""

from __future__ import annotations


class VaelabError(Exception):
    """Base class: a problem the user can act on. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(VaelabError, ValueError):
    """Bad arguments, configuration or run directory (exit status 2, nothing written)."""

    exit_code = 2


class ResourceError(UsageError):
    """A size that cannot fit in the memory available, refused before anything is allocated."""


class RunLocked(UsageError):
    """Another live process writes to the run directory (it holds the run's lock)."""


class DataError(VaelabError):
    """A data file that is missing, malformed or fails its checksum."""

    exit_code = 1


class CheckpointError(UsageError):
    """A run directory whose files cannot be loaded (truncated, corrupted, mismatched)."""


class TrainingDiverged(VaelabError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched. ``what``: the value and where,
    "the ELBO became -2.66e+07 nats per example at epoch 2, step 2" (the message's start; RUN/diverged.json keeps
    it)."""

    exit_code = 1

    def __init__(self, message: str, what: str = ""):
        super().__init__(message)
        self.what = what or message
