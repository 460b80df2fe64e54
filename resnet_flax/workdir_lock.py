"""A lock on the workdir, so that two runs never train into the same checkpoints.

`<workdir>/train.lock` holds JSON naming its holder: host, pid, process start time. A run
creates it atomically (`O_CREAT | O_EXCL`), refreshes its mtime every `heartbeat_seconds` from a
background thread, and deletes it when it ends. A lock is stale, and is taken over with a
warning, when
- its holder ran on this host (same pid namespace) and that process is gone (or its pid now
  belongs to a newer process), which is what a SIGKILLed or crashed run leaves: the next run
  starts at once;
- or its heartbeat is older than `stale_after_seconds` (a holder on another host that died).
A lock that is neither refuses the run with one line naming the holder.

Each heartbeat first reads the lock back. If it no longer names this run (another run took it
over, or it was deleted), the heartbeat stops touching it and the run stops with one line
(`WorkdirLockLostError`, raised in the main thread), so two runs never keep writing the same
checkpoints. The main thread is told through `_thread.interrupt_main(LOST_SIGNAL)`: a Python
handler for that signal is installed while the lock is held; it raises only when the lock was
lost, and passes a real signal on to whatever handled it before.

On gs:// (and other object stores) there is no exclusive create: the lock is check-then-write,
so two runs started within the same second on a stale lock could both proceed. It still stops
the common mistake (starting a second run on a live workdir), and heartbeats use the object's
update time, so the timeout rule applies unchanged.
"""

from __future__ import annotations

import _thread
import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging
from etils import epath

LOCK_FILE = 'train.lock'
HEARTBEAT_SECONDS = 30.0
STALE_AFTER_SECONDS = 300.0
# A lock file that holds no readable JSON for this long was left by a run killed between
# creating and writing it (microseconds apart), not by one still writing it.
UNWRITTEN_GRACE_SECONDS = 10.0


# Not SIGUSR1: SLURM's --signal and some profilers send that one.
LOST_SIGNAL = signal.SIGUSR2


class WorkdirLockedError(RuntimeError):
    """Another live run holds the workdir."""


class WorkdirLockLostError(RuntimeError):
    """The lock this run held was taken over by another run, or deleted."""


def _proc_stat(pid: int) -> list[str]:
    """Fields 3.. of /proc/<pid>/stat (Linux): state, ppid, ..., start time at index 19."""
    with open(f'/proc/{pid}/stat') as f:
        return f.read().rsplit(')', 1)[1].split()


def _process_start_time(pid: int) -> float | None:
    """Unix time a local process started (Linux /proc), or None where that is unknown."""
    try:
        with open('/proc/stat') as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith('btime'))
        return boot + int(_proc_stat(pid)[19]) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def _pid_namespace() -> str:
    """Containers on one host can share a hostname but not their pids."""
    try:
        return os.readlink('/proc/self/ns/pid')
    except OSError:
        return ''


def _process_alive(pid: int, started: float) -> bool:
    """Whether `pid` on this host is still the process that wrote the lock at `started`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    try:
        if _proc_stat(pid)[0] == 'Z':
            return False  # a zombie: dead, waiting for its parent to reap it
    except (OSError, IndexError):
        pass
    begun = _process_start_time(pid)
    # /proc's start time has clock-tick resolution; 2 s also absorbs clock adjustments.
    return begun is None or begun <= started + 2.0


def _is_local(path: epath.Path) -> bool:
    return '://' not in str(path)


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the workdir for the duration of a run."""

    def __init__(self, workdir: epath.PathLike, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_after_seconds: float = STALE_AFTER_SECONDS):
        if stale_after_seconds <= 2 * heartbeat_seconds:
            raise ValueError(
                f'stale_after_seconds={stale_after_seconds} must exceed two heartbeats '
                f'(heartbeat_seconds={heartbeat_seconds}), or live runs would look stale.'
            )
        self.path = epath.Path(workdir) / LOCK_FILE
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_after_seconds = stale_after_seconds
        self.host = socket.gethostname()
        self.pid = os.getpid()
        started = _process_start_time(self.pid)
        # The token tells this lock from a later one of the same process (a takeover there).
        self.record = {'host': self.host, 'pid_namespace': _pid_namespace(), 'pid': self.pid,
                       'started': started if started is not None else time.time(),
                       'token': uuid.uuid4().hex}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.held = False
        self.lost = ''  # why, once the lock no longer names this run
        self._previous_handler = None

    # ---- Taking and giving back.

    def acquire(self) -> None:
        """Takes the lock, taking over a stale one; raises WorkdirLockedError if it is live."""
        for _ in range(3):  # a retry only when another run changed the lock meanwhile
            if self._create():
                self.held = True
                self._watch_for_loss()
                self._thread = threading.Thread(target=self._beat, name='workdir-lock',
                                                daemon=True)
                self._thread.start()
                return
            holder, age = self._read()
            if holder is None and age is None:
                continue  # released just now
            why_stale = self._stale_reason(holder, age)
            if why_stale is None:
                raise WorkdirLockedError(self._describe_live(holder, age))
            if self._remove_if_unchanged(holder):
                logging.warning('Took over the stale lock %s (%s).', self.path, why_stale)
        raise WorkdirLockedError(f'Could not lock {self.path}: other runs keep changing it; '
                                 'check that only one run uses this workdir.')

    def release(self) -> None:
        """Stops the heartbeat and deletes the lock, if it is still ours."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        self._stop_watching()
        if self.held:
            self.held = False
            holder, _ = self._read()
            if holder == self.record:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()

    # ---- The lock file.

    def _create(self) -> bool:
        text = json.dumps(self.record)
        if _is_local(self.path):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, 'w') as f:
                f.write(text)
            return True
        if self.path.exists():  # object stores: check, then write (see the module docstring)
            return False
        self.path.write_text(text)
        return True

    def _read(self) -> tuple[dict[str, Any] | None, float | None]:
        """(holder or None if unreadable, age of the heartbeat in s); (None, None) if absent."""
        try:
            age = time.time() - self.path.stat().mtime
            text = self.path.read_text()
        except FileNotFoundError:
            return None, None
        try:
            holder = json.loads(text)
        except ValueError:
            return None, age
        return (holder if isinstance(holder, dict) else None), age

    def _stale_reason(self, holder: dict[str, Any] | None, age: float) -> str | None:
        if holder is None:
            return (f'unreadable for {age:.0f} s' if age > UNWRITTEN_GRACE_SECONDS else None)
        same_pids = (holder.get('host'), holder.get('pid_namespace')) == (
            self.host, self.record['pid_namespace'])
        if same_pids:
            pid = int(holder.get('pid', -1))
            if pid == self.pid:
                return f'left by an earlier process with this pid ({pid})'
            if not _process_alive(pid, float(holder.get('started', 0.0))):
                return f'process {pid} on {self.host} is gone'
        if age > self.stale_after_seconds:
            return f'no heartbeat for {age:.0f} s (limit {self.stale_after_seconds:.0f} s)'
        return None

    def _remove_if_unchanged(self, holder: dict[str, Any] | None) -> bool:
        """Deletes the lock if it still names `holder`; False if another run replaced it."""
        if not _is_local(self.path):
            if self._read()[0] != holder:
                return False
            self.path.unlink(missing_ok=True)
            return True
        # Rename first (atomic), then check what was moved: never delete a fresh lock.
        aside = self.path.parent / f'{LOCK_FILE}.stale-{self.pid}'
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return False
        try:
            moved = json.loads(aside.read_text())
        except ValueError:
            moved = None
        if moved != holder:
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)  # put it back, unless a new lock is there already
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    @staticmethod
    def _describe_holder(holder: dict[str, Any] | None) -> str:
        if holder is None:
            return 'a run that is still writing the lock'
        started = time.strftime('%Y-%m-%d %H:%M:%S',
                                time.localtime(float(holder.get('started', 0))))
        return f"pid {holder.get('pid')} on host {holder.get('host')}, started {started}"

    def _describe_live(self, holder: dict[str, Any] | None, age: float) -> str:
        who = self._describe_holder(holder)
        return (f'Workdir {self.path.parent} is in use by another run ({who}; heartbeat '
                f'{age:.0f} s ago); stop that run, use another --workdir, or delete {self.path} '
                'if that run is gone.')

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_seconds):
            try:
                holder, age = self._read()
                if holder != self.record:
                    self._lose(holder, age)
                    return
                if _is_local(self.path):
                    os.utime(self.path)
                else:
                    self.path.write_text(json.dumps(self.record))
            except OSError as error:  # a missed beat is not worth crashing the run for
                logging.warning('Could not refresh %s: %s', self.path, error)

    # ---- Losing the lock: stop the run, never touch the new holder's lock.

    def _lose(self, holder: dict[str, Any] | None, age: float | None) -> None:
        self.held = False  # it is not ours to refresh or delete any more
        if holder is None and age is None:
            what = f'{self.path} was deleted'
        else:
            what = f'another run took it over ({self._describe_holder(holder)})'
        self.lost = (f'Lost the lock on workdir {self.path.parent}: {what}; stopped, so that two '
                     'runs never write the same checkpoints. If that run should not be there, '
                     'stop it and run the same command to resume.')
        logging.error('%s', self.lost)
        if self._previous_handler is not None:
            _thread.interrupt_main(LOST_SIGNAL)

    def _watch_for_loss(self) -> None:
        """Installs the handler that stops the main thread (only the main thread can)."""
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(LOST_SIGNAL, self._on_signal)

    def _stop_watching(self) -> None:
        # Only the main thread may set handlers; a release from another thread (a process
        # about to exit) leaves ours, which raises nothing once the lock is not held.
        if (self._previous_handler is not None
                and threading.current_thread() is threading.main_thread()):
            signal.signal(LOST_SIGNAL, self._previous_handler)
            self._previous_handler = None

    def _on_signal(self, signum, frame) -> None:
        if self.lost:
            raise WorkdirLockLostError(self.lost)
        previous = self._previous_handler  # a real signal from outside: as before
        if callable(previous):
            previous(signum, frame)
        elif previous == signal.SIG_DFL:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
