"""A background save that failed on this process is known at once, not at the next wait.

Orbax commits a checkpoint in a background thread. When that fails, it logs the error at once
but raises it only at the next wait, and on a multi-process run that wait first waits for the
other processes' part of the same save. If only this process failed (its host lost the
storage, its directory could not be made), the others wait for it in orbax's barriers and
signals for up to their timeouts (20 minutes), and this process waits for them: the whole run
hangs instead of stopping. Orbax's error log record is the early word, so it is watched here,
and the trainer checks it after every step; once a save has failed, nothing waits on the
manager again.
"""

from __future__ import annotations

import logging as std_logging
import threading

# What orbax's background save thread logs when it fails (async_checkpointer.py); a test
# saves to a real broken directory, so an orbax that words it otherwise is caught there.
_ORBAX_FAILURE_TEXT = 'in background save thread'


def is_failed_save(record: std_logging.LogRecord) -> bool:
    """Whether `record` is orbax reporting that a background save failed, with its error."""
    return (bool(record.exc_info) and record.exc_info[1] is not None
            and 'orbax' in record.pathname and _ORBAX_FAILURE_TEXT in record.getMessage())


class _FailedSaves(std_logging.Handler):
    """Keeps the errors of failed background saves, as orbax logs them."""

    def __init__(self):
        super().__init__(level=std_logging.ERROR)
        self._lock_errors = threading.Lock()
        self._errors: list[BaseException] = []

    def emit(self, record: std_logging.LogRecord) -> None:
        if is_failed_save(record):
            with self._lock_errors:
                self._errors.append(record.exc_info[1])

    def take(self) -> BaseException | None:
        """The first error since the last take, or None."""
        with self._lock_errors:
            errors, self._errors = self._errors, []
        return errors[0] if errors else None


_WATCH = _FailedSaves()


def start() -> None:
    """Watches orbax's log (idempotent). On the 'absl' logger itself, so that the record is
    seen before any handler's filter shortens it (cli.py drops storage tracebacks)."""
    logger = std_logging.getLogger('absl')
    if _WATCH not in logger.handlers:
        logger.addHandler(_WATCH)


def failure() -> BaseException | None:
    """The error of a background save that failed since the last call, or None."""
    return _WATCH.take()
