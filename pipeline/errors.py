"""User-facing errors.

Every error a user can cause (a bad config, a missing file, bad credentials, a locked run) is a
:class:`VitpipeError`. The command line prints its message as one line and exits non-zero, with
no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

__all__ = ["VitpipeError", "ConfigError", "StorageError", "DeterministicError", "RunLockedError", "RunLockLostError",
           "StageFailedError"]


class VitpipeError(Exception):
    """An error whose message alone tells the user what went wrong and what to do."""

    exit_code = 2


class ConfigError(VitpipeError):
    """A run config is malformed: names the file, the field and what was expected."""


class StorageError(VitpipeError):
    """A storage operation failed for a reason the user can act on (missing object, credentials)."""


class DeterministicError(VitpipeError):
    """An error that a retry would meet again (a diverged update, a damaged or untrusted checkpoint, a
    world size the batch cannot be split over): it ends a stage at once instead of using up its
    retry budget."""


class RunLockedError(VitpipeError):
    """Another live process is running the same run directory."""

    exit_code = 3


class RunLockLostError(RunLockedError):
    """This driver's run lock was taken or could not be renewed: it stopped writing to the run."""


class StageFailedError(VitpipeError):
    """One or more stages failed; their errors are in the run's status and event log."""

    exit_code = 1
