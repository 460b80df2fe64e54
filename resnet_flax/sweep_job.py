"""One run of a sweep as a job: train.py as a subprocess, its attempts recorded in the run's
`sweep_run.json`, and checkpoint-then-requeue when a scheduler signals it.

Every launcher runs a run through `TrainJob`: --launcher=local calls `TrainJob.run()` in the
sweep's own process (a thread per run with --parallel), --launcher=slurm pickles the object
and submitit calls it (`TrainJob()`) in each task of a SLURM job, one task per GPU.

Under submitit, SLURM's warning signal (`--signal=USR2@90`: 90 s before the time limit, or a
preemption) reaches submitit's handler in the task, which calls `TrainJob.checkpoint()`: that
sends SIGTERM to train.py, which saves a checkpoint at the end of its step and exits (with
several processes JAX tells them all, and they stop at one step), and returns the same job
for submitit to requeue; the requeued job's train.py resumes from the workdir. train.py itself
ignores the warning signal (it would kill it: SLURM signals every process of the job step).

A train.py that fails for any other reason (a non-zero exit without a stop request) is a
failure: the job retries it in place (it resumes from its last checkpoint) until the run has
failed `max_failures` times, then gives up with the reason, which `sweep --status` shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shlex
import signal
import socket
import subprocess
import time
from typing import Any

from etils import epath

from resnet_flax import metrics as metrics_lib

RUN_FILE = 'sweep_run.json'  # in each run's workdir, written by the run (rank 0): attempts
LOG_FILE = 'train.log'
# train.py's exit status after a SIGTERM (saved) and after a Ctrl-C (saved, or stopped at once).
_STOPPED = (0, 130)
# Environment variables naming this task's rank in a job (SLURM, then submitit's local one).
_RANK_VARIABLES = ('SLURM_PROCID', 'SUBMITIT_LOCAL_GLOBALID')


class RunFailedError(RuntimeError):
    """train.py failed `max_failures` times; the job stops retrying it."""


def is_finished(workdir: epath.PathLike, last_step: int) -> bool:
    """Whether the run's final step was evaluated (train.py's last act)."""
    return any(r['step'] == last_step for r in metrics_lib.read_metrics(workdir, 'eval'))


def read_json(path: epath.Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:  # a record cut short (disk full); treated as absent
        return {}


def task_rank() -> int:
    """This process's rank in its job (0 outside a job)."""
    return next((int(os.environ[v]) for v in _RANK_VARIABLES if os.environ.get(v)), 0)


def log_reason(log_path: epath.Path, since: int) -> str:
    """Why an attempt failed: its log's last error line (written after byte `since`)."""
    try:
        with log_path.open('rb') as f:
            f.seek(max(since, log_path.stat().length - 8192))
            lines = f.read().decode(errors='replace').splitlines()
    except OSError:
        return ''
    lines = [line.strip() for line in lines if line.strip()]
    errors = [line for line in lines if line.startswith('Error:') or 'Error' in line.split(':')[0]]
    return ((errors or lines or [''])[-1])[:300]


def _preemption_signal() -> signal.Signals:
    """The signal submitit checkpoints and requeues on (its SUBMITIT_PREEMPT_SIGNAL, USR2)."""
    return signal.Signals['SIG' + os.environ.get('SUBMITIT_PREEMPT_SIGNAL', 'USR2')]


@dataclasses.dataclass
class TrainJob:
    """Trains one run of a sweep to its final step (pickled into a submitit job).

    argv: the train.py command line; workdir: the run's; last_step: the step whose eval
    finishes it; max_failures: failures of the run (over all attempts and jobs) after which it
    is not tried again; retry: whether a failed train.py is retried in place (submitit jobs)
    or left to the next `sweep` command (local); env: extra environment (CUDA_VISIBLE_DEVICES);
    stop_timeout_s: how long a signalled train.py may take to save before the job is requeued
    regardless; job_id: the scheduler's id, for the record.
    """

    argv: list[str]
    workdir: str
    last_step: int
    max_failures: int = 3
    retry: bool = False
    env: dict[str, str] = dataclasses.field(default_factory=dict)
    stop_timeout_s: float = 60.0
    job_id: str = ''
    # Set while running; never pickled (see __getstate__).
    _child: subprocess.Popen | None = dataclasses.field(default=None, init=False, repr=False)
    _stop_signal: str = dataclasses.field(default='', init=False, repr=False)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, '_child': None, '_stop_signal': ''}

    @property
    def path(self) -> epath.Path:
        return epath.Path(self.workdir)

    def log_path(self, rank: int = 0) -> epath.Path:
        return self.path / (LOG_FILE if rank == 0 else f'train.rank{rank}.log')

    # ---- The run: attempts until it is finished, stopped, or out of failures.

    def run(self) -> dict[str, Any]:
        """Trains the run to its end; returns its record. Raises RunFailedError at the limit."""
        self.path.mkdir(parents=True, exist_ok=True)
        rank = task_rank()
        # Counted here, not re-read: the other ranks must take the same decisions as rank 0.
        failures = self._read().get('failures', 0)
        while True:
            if is_finished(self.path, self.last_step):
                return self._update(rank, state='done', finished=True)
            returncode, reason = self._attempt(rank)
            if is_finished(self.path, self.last_step):
                return self._update(rank, state='done', finished=True)
            if not reason:  # stopped by a signal (a checkpoint to resume from): no failure
                return self._read()
            failures += 1
            exhausted = failures >= self.max_failures
            self._update(rank, state='failed' if exhausted or not self.retry else 'retrying',
                         failures=failures, reason=reason)
            if exhausted:
                raise RunFailedError(f'{self.workdir}: train.py failed {failures} times '
                                     f'(the limit, max_failures={self.max_failures}); last: '
                                     f'{reason}')
            if not self.retry:
                return self._read()
            print(f'train.py failed ({reason}); retrying ({failures} of {self.max_failures} '
                  'failures)', flush=True)

    def _attempt(self, rank: int) -> tuple[int | None, str]:
        """One train.py process, to its exit; its time and status go to the record."""
        log_path = self.log_path(rank)
        start, returncode, reason, requeued = time.time(), None, '', False
        self._begin(rank, start)
        try:
            with log_path.open('a') as log:
                log.write(f'$ {shlex.join(self.argv)}\n')
                log.flush()
                since = log.tell()
                self._child = subprocess.Popen(
                    self.argv, stdout=log, stderr=subprocess.STDOUT,
                    env={**os.environ, **self.env}, preexec_fn=self._child_signals())
                self._update(rank, child_pid=self._child.pid)
                returncode = self._wait()
            if returncode not in _STOPPED and not self._stop_signal:
                reason = f'exit status {returncode}: {log_reason(log_path, since)}'
        except BaseException as error:  # submitit's requeue (SystemExit), or its give-up
            requeued = isinstance(error, SystemExit)
            reason = (str(error).strip().splitlines() or [type(error).__name__])[-1][:300]
            raise
        finally:
            if self._child is not None and returncode is None:
                returncode = self._child.poll()
            self._end(rank, start, returncode, reason, requeued)
            self._child = None
        return returncode, reason

    def _child_signals(self):
        """train.py must not die of the scheduler's warning signal (SLURM sends it to every
        process of the step); only submitit's handler in this process acts on it. An ignored
        signal stays ignored across exec."""
        if not self._under_submitit():
            return None
        sig = _preemption_signal()
        return lambda: signal.signal(sig, signal.SIG_IGN)

    @staticmethod
    def _under_submitit() -> bool:
        return bool(os.environ.get('SUBMITIT_EXECUTOR'))

    def _scheduler_job_id(self) -> str:
        """The job's id as submitit names it (ARRAYID_INDEX in an array), '' outside one."""
        if not self._under_submitit():
            return ''
        import submitit

        return submitit.JobEnvironment().job_id

    def _wait(self) -> int:
        # Polling, not Popen.wait(): a signal handler (checkpoint) must be able to poll too,
        # and Popen.wait holds a lock while it blocks.
        while (returncode := self._child.poll()) is None:
            time.sleep(0.5)
        return returncode

    # ---- Signals (inside a submitit job).

    def __call__(self) -> dict[str, Any]:
        """The submitit entry point: run(), with SIGTERM (SLURM's preemption) noted and passed
        on to train.py, and the warning signal handled by submitit (checkpoint())."""
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        try:
            return self.run()
        finally:
            signal.signal(signal.SIGTERM, previous)

    def _on_sigterm(self, signum, frame) -> None:
        del frame
        self._stop_signal = signal.Signals(signum).name
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGTERM)

    def checkpoint(self, *args: Any, **kwargs: Any):
        """submitit calls this on the warning signal: train.py saves and exits, and the same
        job (with the run's state on disk) is requeued."""
        from submitit.helpers import DelayedSubmission

        self._stop_signal = _preemption_signal().name
        child = self._child
        if child is not None and child.poll() is None:
            child.send_signal(signal.SIGTERM)
            deadline = time.time() + self.stop_timeout_s
            while child.poll() is None and time.time() < deadline:
                time.sleep(0.5)
            if child.poll() is None:  # it would hold the workdir lock against the requeued job
                child.kill()  # (no blocking wait: the interrupted main thread may hold its lock)
        return DelayedSubmission(self, *args, **kwargs)

    # ---- The record (sweep_run.json), written by rank 0 only.

    def _read(self) -> dict[str, Any]:
        return read_json(self.path / RUN_FILE)

    def _update(self, rank: int, **fields: Any) -> dict[str, Any]:
        record = {**self._read(), **fields, 'updated': time.time()}
        if rank == 0:
            (self.path / RUN_FILE).write_text(json.dumps(record, indent=1) + '\n')
        return record

    def _begin(self, rank: int, start: float) -> None:
        self._update(rank, state='running', started=start, command=shlex.join(self.argv),
                     job_id=self.job_id or self._scheduler_job_id(),
                     host=socket.gethostname(), pid=os.getpid(), log=str(self.log_path()),
                     last_step=self.last_step, returncode=None)

    def _end(self, rank: int, start: float, returncode: int | None, reason: str,
             requeued: bool) -> None:
        """How the attempt ended: done, requeued (by submitit, after the warning signal),
        stopped (a signal; a checkpoint to resume from), or failed (with the reason)."""
        record = self._read()
        finished = is_finished(self.path, self.last_step)
        if finished:
            state, reason = 'done', ''
        elif requeued:
            state, reason = 'requeued', f'requeued after {self._stop_signal or "a signal"}'
        elif not reason:
            state, reason = 'stopped', f'stopped by {self._stop_signal or "a signal"}'
        else:
            state = 'failed'
        self._update(rank, state=state, returncode=returncode, finished=finished, reason=reason,
                     attempts=record.get('attempts', 0) + 1,
                     wall_time_sec=record.get('wall_time_sec', 0.0) + time.time() - start,
                     preemptions=record.get('preemptions', 0) + requeued)
