"""`sweep --status`: where each run of a sweep stands, from its workdir and its scheduler.

A run is one of
- done: its final step's eval is in its metrics;
- running: its train.py is running (or its job has started);
- queued: its job waits in the scheduler, or was requeued after a preemption or time-out;
- stopped: it stopped at a checkpoint (Ctrl-C, a preemption nothing requeued); the sweep
  command resumes it;
- failed: train.py failed (the reason: its log's last error line), or the scheduler ended the
  job (SLURM: CANCELLED, OUT_OF_MEMORY, NODE_FAIL, ...), or its process is gone;
- not started: nothing has run it yet.

The workdir says what the run did (`sweep_run.json`, written by the run; `metrics.jsonl`) and
who launched it (`sweep_job.json`). The scheduler says whether that job still lives: sacct
(through submitit) for SLURM jobs, the process table for jobs on this machine.
"""

from __future__ import annotations

import dataclasses
import shutil
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from etils import epath

from resnet_flax import metrics as metrics_lib
from resnet_flax import sweep_job, sweep_launch, workdir_lock

if TYPE_CHECKING:
    from resnet_flax.sweep import Run

STATES = ('not started', 'queued', 'running', 'stopped', 'done', 'failed')
LIVE = ('queued', 'running')

# SLURM job states (sacct), by what they mean for a run.
_SLURM_QUEUED = {'PENDING', 'REQUEUED', 'REQUEUE_HOLD', 'REQUEUE_FED', 'CONFIGURING',
                 'RESV_DEL_HOLD', 'SUSPENDED', 'STOPPED'}
_SLURM_RUNNING = {'RUNNING', 'COMPLETING', 'SIGNALING', 'STAGE_OUT', 'RESIZING'}
_SLURM_ENDED = {'COMPLETED', 'PREEMPTED'}


@dataclasses.dataclass(frozen=True)
class RunStatus:
    """One line of --status."""

    variant: str
    seed: int
    state: str
    step: int | None
    last_step: int | None
    top1: float | None
    job_id: str
    log: str
    note: str = ''


# ---------------------------------------------------------------------------------------------
# The scheduler


def slurm_states(job_ids: Sequence[str]) -> dict[str, str]:
    """SLURM's state of each job (one sacct call, through submitit); {} where sacct is absent."""
    if not job_ids or shutil.which('sacct') is None:
        return {}
    import submitit

    watcher = submitit.SlurmJob.watcher  # shared by all SlurmJobs: one sacct for them all
    watcher.clear()  # a fresh answer, also for the jobs it saw end before
    for job_id in job_ids:
        watcher.register_job(job_id)
    watcher.update()
    return {job_id: (watcher.get_state(job_id, mode='cache').split() or ['UNKNOWN'])[0].upper()
            for job_id in job_ids}


def scheduler_state(job: Mapping[str, Any], slurm: Mapping[str, str]) -> str | None:
    """'queued', 'running', 'live' (its process lives; the run record says which), 'ended',
    'failed:REASON', or None where nothing can tell."""
    if job.get('launcher') == 'slurm':
        state = slurm.get(job.get('job_id', ''), 'UNKNOWN')
        if state in _SLURM_QUEUED:
            return 'queued'
        if state in _SLURM_RUNNING:
            return 'running'
        if state in _SLURM_ENDED:
            return 'ended'
        return None if state == 'UNKNOWN' else f'failed:SLURM {state}'
    return _process_state(job.get('host'), job.get('pid'), job.get('pid_started'))


def _process_state(host: str | None, pid: int | None, started: float | None) -> str | None:
    """'live' or 'ended' for a process on this host; None for one elsewhere."""
    if not pid or host != socket.gethostname():
        return None
    alive = workdir_lock._process_alive(int(pid), float(started or 0) or float('inf'))
    return 'live' if alive else 'ended'


# ---------------------------------------------------------------------------------------------
# One run


def derive_state(finished: bool, run: Mapping[str, Any], job: Mapping[str, Any],
                 scheduler: str | None) -> tuple[str, str]:
    """(state, note) of a run from its record, its job's record and the scheduler's word."""
    if finished:
        return 'done', ''
    # The run's record speaks for the launched job only if that job wrote it.
    recorded = run.get('state') if not job or run.get('job_id') == job.get('job_id') else None
    reason = run.get('reason', '')
    if scheduler in ('queued', 'running', 'live') and recorded not in ('failed', 'stopped'):
        if recorded in ('running', 'retrying'):
            return 'running', reason if recorded == 'retrying' else ''
        if scheduler == 'running':
            return 'running', 'starting'
        return 'queued', reason if recorded == 'requeued' else ''
    if scheduler is not None and scheduler.startswith('failed:'):
        return 'failed', (reason if recorded == 'failed' else '') or scheduler[len('failed:'):]
    return _from_record(recorded, run, job, scheduler)


def _from_record(recorded: str | None, run: Mapping[str, Any], job: Mapping[str, Any],
                 scheduler: str | None) -> tuple[str, str]:
    """The state once no live job speaks for the run."""
    reason = run.get('reason', '')
    if recorded in ('running', 'retrying'):
        alive = _process_state(run.get('host'), run.get('pid'), run.get('started'))
        if alive == 'ended' or scheduler == 'ended':
            return 'failed', 'its process is gone without a word (killed?)'
        return 'running', '' if alive else 'per its record; its host cannot be asked'
    if recorded == 'requeued':
        return ('queued', reason) if scheduler is None else ('stopped', reason + ', not resumed')
    if recorded == 'failed':
        failures = run.get('failures')
        return 'failed', (f'{failures} failure(s): ' if failures else '') + reason
    if recorded == 'stopped':
        return 'stopped', reason
    if recorded == 'done':  # but not at this final step: the sweep's schedule grew since
        return 'stopped', f"finished at step {run.get('last_step')}; the schedule is longer now"
    if job:  # launched, and its job never began the run
        if scheduler is None and job.get('launcher') == 'slurm':
            return 'queued', 'per the submission; no sacct here'
        if scheduler == 'ended':
            return 'not started', 'its job ended before the run began'
        return 'queued', ''
    return 'not started', ''


def _unlaunched_state(workdir: epath.Path, has_metrics: bool) -> tuple[str, str] | None:
    """A run no sweep launched (e.g. a --print-commands command on a TPU pod): running while
    train.py holds its workdir lock (a live heartbeat), stopped if it logged and let go."""
    lock = workdir / workdir_lock.LOCK_FILE
    try:
        age = time.time() - lock.stat().mtime
    except OSError:
        age = None
    if age is not None and age < workdir_lock.STALE_AFTER_SECONDS:
        return 'running', 'its train.lock is held'
    return ('stopped', 'started outside the sweep') if has_metrics else None


def run_status(run: Run, slurm: Mapping[str, str] | None = None,
               last_step: int | None = None) -> RunStatus:
    """Where `run` stands (`slurm`: the SLURM states of its jobs, from slurm_states;
    `last_step`: its final step, by default the one it was launched with)."""
    record = sweep_job.read_json(run.workdir / sweep_job.RUN_FILE)
    job = sweep_launch.read_job_record(run.workdir)
    # The caller's (the sweep's current schedule) wins over what the records were launched with.
    last_step = last_step or job.get('last_step') or record.get('last_step')
    metrics = metrics_lib.read_metrics(run.workdir) if run.workdir.exists() else []
    evals = [r for r in metrics if r.get('split') == 'eval']
    finished = last_step is not None and any(r['step'] == last_step for r in evals)
    scheduler = scheduler_state(job, slurm or {}) if job else None
    state, note = derive_state(finished, record, job, scheduler)
    if state == 'not started' and not record and not job:
        state, note = _unlaunched_state(run.workdir, bool(metrics)) or (state, note)
    return RunStatus(
        variant=run.variant.name, seed=run.seed, state=state,
        step=max((r['step'] for r in metrics), default=None), last_step=last_step,
        top1=max(evals, key=lambda r: r['step'])['top1'] if evals else None,
        job_id=job.get('job_id') or record.get('job_id') or '',
        log=job.get('log') or record.get('log') or
        (str(run.workdir / sweep_job.LOG_FILE) if record else ''),
        note=note)


def sweep_status(runs: Sequence[Run],
                 last_step_of: Callable[[Run], int | None] | None = None) -> list[RunStatus]:
    """Every run's status; `last_step_of(run)` gives the final step of a run whose records do
    not (one trained by an older sweep), e.g. from its config.json."""
    jobs = [sweep_launch.read_job_record(run.workdir) for run in runs]
    slurm = slurm_states(sorted({j['job_id'] for j in jobs if j.get('launcher') == 'slurm'}))
    rows = []
    for run, job in zip(runs, jobs, strict=True):
        known = job.get('last_step') or sweep_job.read_json(
            run.workdir / sweep_job.RUN_FILE).get('last_step')
        rows.append(run_status(run, slurm, known or (last_step_of and last_step_of(run))))
    return rows


def format_status(rows: Sequence[RunStatus]) -> str:
    """An aligned table, one line per run, and a count per state."""
    header = ('variant', 'seed', 'state', 'step', 'top-1', 'job', 'log', 'note')
    lines = [header]
    for r in rows:
        step = f"{'-' if r.step is None else r.step}/{'?' if r.last_step is None else r.last_step}"
        top1 = '-' if r.top1 is None else f'{100 * r.top1:.2f}%'
        lines.append((r.variant, str(r.seed), r.state, step, top1, r.job_id or '-',
                      r.log or '-', r.note))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    text = ['  '.join(cell.ljust(w) for cell, w in zip(line, widths, strict=False)) + '  '
            + line[-1] for line in lines]
    counts = {s: sum(r.state == s for r in rows) for s in STATES}
    text.append(', '.join(f'{n} {s}' for s, n in counts.items() if n) + f' (of {len(rows)})')
    return '\n'.join(line.rstrip() for line in text)
