"""Object storage: which route the project takes, and retries for calls that may meet an outage.

Paths are etils.epath everywhere. For gs:// (and s3://) epath goes through fsspec: gcsfs for
gs://, with Application Default Credentials (a TPU VM's service account needs nothing else).
The package sets EPATH_USE_TF=false at import (an environment value set before wins), so
processes with and without TensorFlow take the same route. Orbax writes checkpoints through
tensorstore's own GCS client; TFDS reads its TFRecord files through TensorFlow's.

Object stores have no append: a file that grows is rewritten whole (see metrics.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from absl import logging
from etils import epath

T = TypeVar('T')


def is_local(path: epath.PathLike) -> bool:
    return '://' not in str(path)


def retry(call: Callable[[], T], what: str, *, deadline_seconds: float,
          first_wait: float = 1.0, max_wait: float = 30.0) -> T:
    """`call()`, retried with doubling waits on OSError until `deadline_seconds` have passed.

    Connection errors from gcsfs (aiohttp) and from the local file system are OSErrors; the
    last one is raised once the deadline is spent.
    """
    start, wait, attempt = time.monotonic(), first_wait, 1
    while True:
        try:
            return call()
        except OSError as error:
            if time.monotonic() - start + wait > deadline_seconds:
                raise
            logging.warning('%s failed (attempt %d: %s); retrying in %.0f s.',
                            what, attempt, str(error).splitlines()[0][:200] if str(error)
                            else type(error).__name__, wait)
            time.sleep(wait)
            wait, attempt = min(2 * wait, max_wait), attempt + 1


# Status codes (tensorstore, gRPC, absl) of a store that did not answer, as opposed to one
# that answered that something is wrong with the files.
_UNAVAILABLE_CODES = ('UNAVAILABLE', 'DEADLINE_EXCEEDED', 'ABORTED', 'RESOURCE_EXHAUSTED')


def is_storage_error(error: BaseException) -> bool:
    """Whether `error` (or what caused it) is the storage failing to answer: a connection
    refused, reset or timed out (OSError: gcsfs's aiohttp errors are OSErrors), an HTTP error
    of gcsfs or google-cloud-storage, or a tensorstore status such as UNAVAILABLE."""
    seen: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and len(seen) < 8:
        seen.append(current)
        current = current.__cause__ or current.__context__
    for e in seen:
        if isinstance(e, OSError):
            return True
        module = type(e).__module__
        if module.startswith(('gcsfs', 'google.api_core', 'google.cloud.storage')):
            return True
    text = ' '.join(str(e) for e in seen)
    return any(code in text for code in _UNAVAILABLE_CODES)
