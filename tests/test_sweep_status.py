"""`sweep --status` on runs whose records and processes disagree: a killed run, and runs that
train.py ran outside the sweep (a --print-commands command on a TPU pod)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from etils import epath

from resnet_flax import metrics as metrics_lib
from resnet_flax import sweep, sweep_job, sweep_status, workdir_lock


def _run(tmp_path) -> sweep.Run:
    workdir = epath.Path(tmp_path) / 'narrow' / 'seed0'
    workdir.mkdir(parents=True)
    return sweep.Run(sweep.Variant('narrow', {}), 0, workdir)


def _log_steps(workdir: epath.Path, steps: int) -> None:
    writer = metrics_lib.MetricWriter(workdir)
    for step in range(1, steps + 1):
        writer.write(step, 'train', {'loss': 1.0 / step})
    writer.write(steps, 'eval', {'top1': 0.25, 'top5': 0.5, 'loss': 2.0})
    writer.close()


def test_a_run_whose_process_died_without_a_word_is_failed_not_running(tmp_path):
    run = _run(tmp_path)
    process = subprocess.Popen([sys.executable, '-c', 'pass'])
    started = workdir_lock._process_start_time(process.pid)
    process.wait()  # gone, as a SIGKILLed run is: its record still says running
    _log_steps(run.workdir, 3)
    (run.workdir / sweep_job.RUN_FILE).write_text(json.dumps(dict(
        state='running', host=socket.gethostname(), pid=process.pid, started=started,
        last_step=6, job_id='local-1')))
    status = sweep_status.run_status(run)
    assert (status.state, status.step, status.last_step, status.top1) == ('failed', 3, 6, 0.25)
    assert 'process is gone' in status.note

    # The same record from this live process: running.
    (run.workdir / sweep_job.RUN_FILE).write_text(json.dumps(dict(
        state='running', host=socket.gethostname(), pid=os.getpid(),
        started=time.time(), last_step=6, job_id='local-1')))
    assert sweep_status.run_status(run).state == 'running'


def test_a_run_started_outside_the_sweep_is_running_while_it_holds_its_lock(tmp_path):
    run = _run(tmp_path)
    assert sweep_status.run_status(run).state == 'not started'
    _log_steps(run.workdir, 2)
    with workdir_lock.WorkdirLock(run.workdir):
        status = sweep_status.run_status(run, last_step=6)
        assert (status.state, status.note, status.step) == ('running', 'its train.lock is held', 2)
    status = sweep_status.run_status(run, last_step=6)
    assert (status.state, status.note) == ('stopped', 'started outside the sweep')
    assert sweep_status.run_status(run, last_step=2).state == 'done'
