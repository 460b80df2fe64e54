"""When one process of a multi-process run dies, the others stop within seconds, in one line.

Without this, the survivors wait for the dead process wherever they are: in the next
collective (on GPUs and TPUs a collective with a dead peer hangs), then in JAX's shutdown
barrier, until JAX's coordination service misses its heartbeats (100 s by default) and aborts
them with a page of C++ log. Here every process writes a counter to the coordination service's
key-value store each `BEAT_SECONDS` (one small RPC) and reads everyone's (one more). A process
whose counter has not moved for `DEAD_AFTER_SECONDS` is dead: each survivor prints one line
naming it and exits 1 at once; the checkpoints committed before are intact, and the same
command on every host resumes. A process that ends, normally or with an error of its own,
says so first, so that ending is never taken for dying; the coordination service itself going
away (it lives in process 0) counts as process 0 dying, unless process 0 had said it ended.
A process that stopped on an error of its own (a storage outage that only it saw, ...) leaves
the others waiting for it in the next collective just the same: they too stop in one line
`DEAD_AFTER_SECONDS` later, naming it and its error, unless they are stopping on an error of
their own. Once the others have gone, that process exits at once after its line (`exit`):
library threads (orbax's, waiting for the others' part of a save) and JAX's shutdown barrier
would otherwise hold it for minutes. Process 0 hosts the coordination service, and a process
that loses it is aborted by JAX, so process 0 is the last to go.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable

import jax

BEAT_SECONDS = 1.0
# Well above a beat (a busy host's thread may be late by a second or two) and well below JAX's
# own heartbeat timeout (100 s), which would abort the survivors first.
DEAD_AFTER_SECONDS = 6.0
_KEY = 'resnet_flax/peer_watch/'
_REASON_KEY = 'resnet_flax/peer_watch_reason/'
# Said by a process as it ends, so not a death: finished, stopped on an error, exited.
_ENDED = ('done', 'stopped', 'gone')
_alone = threading.Event()  # this process stopped on an error, and the others have ended


class PeerWatch:
    """The beat of this process and the watch over the others (a daemon thread)."""

    def __init__(self, client, process_index: int, process_count: int,
                 before_exit: Callable[[], None] | None = None):
        self.client, self.index, self.count = client, process_index, process_count
        self.before_exit = before_exit
        self._stop = threading.Event()
        self.failing = threading.Event()  # this process is stopping on its own error
        self._beats = 0
        started = time.monotonic()
        self._seen = {i: ('', started) for i in range(process_count)}  # value, when it changed
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name='peer-watch', daemon=True)

    def start(self) -> None:
        self._thread.start()

    def end(self, how: str, reason: str = '') -> None:
        """Stops the watch and tells the others this process ended ('done' or 'stopped'), and
        on what error."""
        self._stop.set()
        self._thread.join()
        with contextlib.suppress(Exception):  # the service may already be gone
            if reason:
                self.client.key_value_set(f'{_REASON_KEY}{self.index}', reason,
                                          allow_overwrite=True)
            self.client.key_value_set(f'{_KEY}{self.index}', how, allow_overwrite=True)

    def wait_for_the_others(self, dead: list[int] = ()) -> bool:
        """Before exiting on an error: waits until every other process (but the dead) has
        ended; process 0, until they have gone, since they need its coordination service
        until then. True if they did."""
        wanted = ('gone',) if self.index == 0 else _ENDED
        others = [i for i in range(self.count) if i != self.index and i not in dead]
        deadline = time.monotonic() + DEAD_AFTER_SECONDS + 4 * BEAT_SECONDS
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                values = dict(self.client.key_value_dir_get(_KEY))
                if all(values.get(f'{_KEY}{i}') in wanted for i in others):
                    return True
            time.sleep(BEAT_SECONDS / 4)
        return False

    def dead(self) -> list[int]:
        """The processes whose beat stopped DEAD_AFTER_SECONDS ago or more (and did not end)."""
        now = time.monotonic()
        with self._lock:
            return [i for i, (value, since) in self._seen.items()
                    if i != self.index and value not in _ENDED + ('',)  # '': not started yet
                    and now - since >= DEAD_AFTER_SECONDS]

    def ended_or_dead(self) -> bool:
        with self._lock:
            ended = all(value in _ENDED for i, (value, _) in self._seen.items() if i != self.index)
        return ended or bool(self.dead())

    def stopped(self) -> list[int]:
        """The processes that stopped on an error DEAD_AFTER_SECONDS ago or more."""
        now = time.monotonic()
        with self._lock:
            return [i for i, (value, since) in self._seen.items()
                    if i != self.index and value == 'stopped'
                    and now - since >= DEAD_AFTER_SECONDS]

    def _run(self) -> None:
        while not self._stop.wait(BEAT_SECONDS):
            self._beats += 1
            try:
                self.client.key_value_set(f'{_KEY}{self.index}', str(self._beats),
                                          allow_overwrite=True)
                values = {int(key.rsplit('/', 1)[1]): value
                          for key, value in self.client.key_value_dir_get(_KEY)}
            except Exception:  # noqa: BLE001 - the coordination service (process 0) is gone
                if self._seen[0][0] == 'done':
                    continue
                # Only process 0 is known to be gone; the others count as beating meanwhile.
                values = {i: f'{value}+' for i, (value, _) in self._seen.items() if i != 0}
            now = time.monotonic()
            with self._lock:
                for i, value in values.items():
                    if i in self._seen and value != self._seen[i][0]:
                        self._seen[i] = (value, now)
            if self._stop.is_set():
                return
            dead = self.dead()
            if dead:
                self.exit_for(dead)
            stopped = self.stopped()
            if stopped and not self.failing.is_set():
                self.exit_for(stopped, died=False)

    def exit_for(self, dead: list[int], died: bool = True) -> None:
        """The one line, then exit 1 now: waiting for the dead would take minutes."""
        names = ', '.join(map(str, dead))
        reasons = '' if died else self._reasons(dead)
        what = ('stopped responding (it died, was killed or lost its host)' if died else
                'stopped on an error')
        tail = (f'. {reasons}' if reasons else
                "; the checkpoints committed before are intact. Find out why in that "
                "process's log, then run the same command on every host to resume.")
        # On a line of its own: a progress bar may be mid-line.
        print(f'\nError: process {names} of {self.count} {what} over {DEAD_AFTER_SECONDS:.0f} s '
              f'ago, so process {self.index} stopped too{tail}', file=sys.stderr, flush=True)
        if self.before_exit is not None:
            with contextlib.suppress(Exception):
                self.before_exit()
        if self.index == 0:  # the others may still be on their way out
            with contextlib.suppress(Exception):
                self.client.key_value_set(f'{_KEY}0', 'stopped', allow_overwrite=True)
            self.wait_for_the_others(dead if died else [])
        _say_gone(self.client, self.index)
        sys.stdout.flush()
        os._exit(1)

    def _reasons(self, stopped: list[int]) -> str:
        """"Process 0's error: <its line>" for each stopped process that said why."""
        reasons = []
        for i in stopped:
            with contextlib.suppress(Exception):
                reasons.append(f"Process {i}'s error: "
                               + self.client.key_value_try_get(f'{_REASON_KEY}{i}'))
        return ' '.join(reasons)


def _say_gone(client, index: int) -> None:
    with contextlib.suppress(Exception):
        client.key_value_set(f'{_KEY}{index}', 'gone', allow_overwrite=True)


def exit(code: int) -> None:  # noqa: A001 - the module's exit, as sys.exit
    """Ends the process after an error's one line: at once when it stopped on an error and
    the others have ended (see the module's docstring), else as sys.exit does."""
    if not _alone.is_set():
        sys.exit(code)
    from jax._src import distributed

    _say_gone(distributed.global_state.client, jax.process_index())
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def watching(before_exit: Callable[[], None] | None = None):
    """Watches the other processes for the duration (a no-op with one process).

    An error here may be the first sign of a dead peer (a collective whose peer is gone fails
    at once on CPU): the error then waits until every other process has ended or one is found
    dead, and in that case gives the one line about the dead process instead.
    """
    from jax._src import distributed

    client = distributed.global_state.client
    if jax.process_count() == 1 or client is None:
        yield
        return
    watch = PeerWatch(client, jax.process_index(), jax.process_count(), before_exit)
    watch.start()
    try:
        yield
    except BaseException:
        watch.failing.set()
        deadline = time.monotonic() + DEAD_AFTER_SECONDS + 2 * BEAT_SECONDS
        while not watch.ended_or_dead() and time.monotonic() < deadline:
            time.sleep(BEAT_SECONDS / 4)
        dead = watch.dead()
        if dead:
            watch.exit_for(dead)
        error = sys.exc_info()[1]
        watch.end('stopped', reason=(str(error).splitlines() or [''])[0][:1000])
        if watch.wait_for_the_others():
            _alone.set()
        raise
    watch.end('done')
