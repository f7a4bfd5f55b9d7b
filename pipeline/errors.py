"""Error classes every layer raises; the CLI's one handler maps them to exit codes.

Library code raises these (never click exceptions, never ``sys.exit``); ``pipeline.cli``
prints ``error: <message>`` and exits with the class's ``exit_code``:

====  =========================================================================
code  meaning
====  =========================================================================
0     the command did what it was asked
1     it could not (the message says why and what to do)
2     a bad option or input the user gave (click's usage errors, `UsageError`)
3     the run finished but more images failed than ``--max-error-rate`` allows
4     another run holds OUTPUT's lease
130   Ctrl-C stopped it (128 + SIGINT); what it committed stays
143   SIGTERM stopped it (128 + SIGTERM; `drn-label stop`, Kubernetes); the same
====  =========================================================================
"""
from __future__ import annotations

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_ERROR_RATE, EXIT_LEASE = 0, 1, 2, 3, 4
EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143


class DrnLabelError(Exception):
    """Base class: a one-line message that names the input and the fix, and an exit code."""

    exit_code = EXIT_FAILED

    def __str__(self) -> str:
        return " ".join(str(self.args[0] if self.args else "").split()) or type(self).__name__


class UsageError(DrnLabelError, ValueError):
    """A value the user gave cannot be used (an option, a spec key, a file of theirs)."""

    exit_code = EXIT_USAGE


class JobError(DrnLabelError, RuntimeError):
    """A job that cannot start or finish; the message says why and what to do."""


class LeaseHeld(JobError):
    """Another run holds OUTPUT."""

    exit_code = EXIT_LEASE


class ErrorRateExceeded(JobError):
    """More images failed than ``--max-error-rate`` allows (every row was still written)."""

    exit_code = EXIT_ERROR_RATE


class StorageError(DrnLabelError, OSError):
    """A filesystem or object store refused a read or write (disk full, read-only, an I/O
    error, an object store failing past its retries); the message names the path, the
    cause and what was kept."""


class UnreadableData(DrnLabelError, OSError):
    """A data file of OUTPUT (by its name, one of ours) is not readable Parquet."""


class NoRows(DrnLabelError, LookupError):
    """OUTPUT holds no rows of what was asked for (no run yet, or another model's rows)."""


class Interrupted(DrnLabelError):
    """Ctrl-C (exit 130) or SIGTERM (exit 143) stopped the command; the message says what
    was kept and how to go on."""

    exit_code = EXIT_INTERRUPTED


def stop_exit_code(exc: BaseException) -> int | None:
    """130 for Ctrl-C (KeyboardInterrupt), 143 for SIGTERM (the SystemExit that the CLI's
    handler raises, or Ray's driver handler: ``sys.exit(15)``); None for anything else."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit) and exc.code in (EXIT_TERMINATED, EXIT_TERMINATED - 128):
        return EXIT_TERMINATED
    return None
