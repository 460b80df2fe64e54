"""Sweeps through submitit without SLURM: submitit's LocalExecutor runs the same pickled job
(sweep_job.TrainJob) in real subprocesses, with the same signals, checkpoint and requeue path
as a SLURM job; and `--launcher=local --parallel=N` for comparison."""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from etils import epath

from resnet_flax import metrics as metrics_lib
from resnet_flax import sweep, sweep_job, sweep_launch, sweep_status, workdir_lock
from tests.test_sweep import TINY_SWEEP
from tests.tiny import REPO, cpu_env

pytest.importorskip('submitit')  # a dependency (pyproject); absent in old venvs

LONG_SWEEP = '''
from tests.tiny import tiny_config


def get_config():
    config = tiny_config(num_train_steps=300, eval_every_steps=300, checkpoint_every_steps=300)
    config.axes = [{'name': 'long', 'model.stage_widths': (8, 8)}]
    config.seeds = (0,)
    return config
'''


def _load_sweep(path: Path):
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _wait(predicate, timeout: float, what: str, poll: float = 0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f'timed out after {timeout:.0f} s waiting for {what}')


def _record(run) -> dict:
    return sweep_job.read_json(run.workdir / sweep_job.RUN_FILE)


@contextlib.contextmanager
def _reaped(workdir: Path):
    """If the test fails, kills what its jobs left running (controllers, tasks, train.py): the
    processes named in the records that started after the test did."""
    began = time.time()
    try:
        yield
    except BaseException:
        for path in Path(workdir).glob('*/seed*/sweep_*.json'):
            record = json.loads(path.read_text())
            for pid in (record.get('child_pid'), record.get('pid')):
                started = pid and workdir_lock._process_start_time(int(pid))
                if started and started >= began - 1:
                    with contextlib.suppress(OSError):
                        os.kill(int(pid), signal.SIGKILL)
        raise


def _sweep_cli(args: list[str], log: Path, **env: str) -> subprocess.Popen:
    """The sweep command, its output to a file: submitit's job controllers outlive it and hold
    its stdout, so a pipe would not close."""
    with log.open('w') as out:
        return subprocess.Popen([sys.executable, '-m', 'resnet_flax.sweep', *args], cwd=REPO,
                                env=cpu_env(**env), stdout=out, stderr=subprocess.STDOUT)


def _results(workdir: Path) -> tuple[list[dict], list[str]]:
    """runs.csv (the metrics that depend only on the training) and results.md's table rows
    without the speed and wall-time columns, from `sweep --report`'s own code."""
    sweep.report(workdir)
    keep = ('variant', 'seed', 'finished', 'step', 'final_step', 'top1', 'top5', 'loss',
            'train_loss', 'train_top1')
    runs = [{k: row[k] for k in keep} for row in csv.DictReader((workdir / 'runs.csv').open())]
    table = [line.split('|')[1:-3] for line in (workdir / 'results.md').read_text().splitlines()
             if line.startswith('| ') and 'variant' not in line]
    return runs, table


def _gpus_of_running_children(runs) -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES of each run's live train.py, read from /proc (Linux)."""
    seen = {}
    for run in runs:
        pid = _record(run).get('child_pid')
        with contextlib.suppress(OSError):
            environ = Path(f'/proc/{pid}/environ').read_bytes().split(b'\0')
            values = [e.split(b'=', 1)[1].decode() for e in environ
                      if e.startswith(b'CUDA_VISIBLE_DEVICES=')]
            seen[run.label] = values[0] if values else None
    return seen


@pytest.mark.slow
def test_submitit_grid_matches_local_parallel_and_status_follows_it(tmp_path):
    sweep_file = tmp_path / 'tiny_sweep.py'
    sweep_file.write_text(TINY_SWEEP)
    config = _load_sweep(sweep_file)
    local_dir, submitit_dir = tmp_path / 'local', tmp_path / 'submitit'
    assert [r.state for r in sweep_status.sweep_status(sweep.plan(config, submitit_dir))] == \
        ['not started'] * 4

    # Two at once on "GPUs" 0 and 1 (CPU runs here: each child still gets its own share).
    local_runs = sweep.plan(config, local_dir)
    local = _sweep_cli([f'--sweep={sweep_file}', f'--workdir={local_dir}', '--parallel=2'],
                       tmp_path / 'local.log', CUDA_VISIBLE_DEVICES='0,1')
    pairs = []
    while local.poll() is None:
        seen = _gpus_of_running_children(local_runs)
        if len(seen) == 2:
            pairs.append(sorted(seen.values()))
            # --status agrees: those two run (or just finished), the others wait or are done.
            states = {r.label: s.state for r, s in
                      zip(local_runs, sweep_status.sweep_status(local_runs), strict=True)}
            assert all(states[label] in ('running', 'done') for label in seen), states
            assert all(state in ('queued', 'done', 'running') for state in states.values())
        time.sleep(0.2)
    assert local.returncode == 0, (tmp_path / 'local.log').read_text()[-3000:]
    assert pairs and all(pair == ['0', '1'] for pair in pairs), pairs

    with _reaped(submitit_dir):
        submitted = _sweep_cli([f'--sweep={sweep_file}', f'--workdir={submitit_dir}',
                                '--launcher=submitit-local'], tmp_path / 'submitit.log')
        assert submitted.wait(timeout=300) == 0, (tmp_path / 'submitit.log').read_text()[-3000:]
        runs = sweep.discovered_runs(submitit_dir)
        states = [r.state for r in sweep_status.sweep_status(runs)]
        assert set(states) <= {'queued', 'running', 'done'}, states
        _wait(lambda: all(r.state == 'done' for r in sweep_status.sweep_status(runs)), 900,
              'the submitit jobs to finish', poll=2)

    assert _results(submitit_dir) == _results(local_dir)
    rows = sweep_status.sweep_status(runs)
    for row, run in zip(rows, runs, strict=True):
        final = metrics_lib.read_metrics(run.workdir, 'eval')[-1]
        job = sweep_launch.read_job_record(run.workdir)
        assert (row.step, row.last_step, row.top1) == (6, 6, final['top1'])
        assert row.job_id == job['job_id'] == _record(run)['job_id'] and row.job_id.isdigit()
        assert row.log == str(run.workdir / 'train.log')
        assert _record(run)['attempts'] == 1


@pytest.mark.slow
def test_a_preempted_job_is_requeued_and_resumes_and_status_tells_each_stage(
        tmp_path, monkeypatch):
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    sweep_file = tmp_path / 'long_sweep.py'
    sweep_file.write_text(LONG_SWEEP)
    config, workdir = _load_sweep(sweep_file), tmp_path / 'sweep'
    [run] = sweep.plan(config, workdir)
    options = sweep_launch.slurm_defaults()
    job = sweep.make_job(config, str(sweep_file), run, {}, 'submitit-local', max_failures=3)
    sweep.write_sweep_file(workdir, str(sweep_file), [run], {})

    with _reaped(workdir):
        executor = sweep_launch.make_executor('submitit-local', epath.Path(workdir), options,
                                              name='test')
        [job_id] = sweep_launch.submit(executor, 'submitit-local', [(run, job)])
        controller = int(job_id)
        record = _wait(lambda: _record(run).get('child_pid') and
                       len(metrics_lib.read_metrics(run.workdir, 'train')) >= 2 and _record(run),
                       600, 'train.py to log two steps')
        child, task = record['child_pid'], record['pid']
        os.kill(child, signal.SIGSTOP)  # hold the run mid-way, and the controller's restart
        os.kill(controller, signal.SIGSTOP)
        status = sweep_status.run_status(run)
        assert (status.state, status.last_step, status.job_id) == ('running', 300, job_id)
        assert 2 <= status.step < 300

        # SLURM's warning signal reaches every process of the job: train.py ignores it, the
        # submitit task checkpoints (SIGTERM to train.py, which saves) and requeues.
        os.kill(child, signal.SIGUSR2)
        os.kill(task, signal.SIGUSR2)
        time.sleep(1)
        os.kill(child, signal.SIGCONT)
        _wait(lambda: _record(run).get('state') == 'requeued', 300, 'the requeue')
        status = sweep_status.run_status(run)
        assert (status.state, status.note) == ('queued', 'requeued after SIGUSR2')

        os.kill(controller, signal.SIGCONT)  # submitit's controller starts the job again
        _wait(lambda: sweep_status.run_status(run).state == 'done', 600, 'the resumed run',
              poll=1)
        _wait(lambda: _record(run).get('state') == 'done', 60, 'the job to record its end')

    log = (run.workdir / 'train.log').read_text()
    saved = [line for line in log.splitlines() if 'Preempted: saved a checkpoint at step' in line]
    assert len(saved) == 1, log[-3000:]
    step = int(saved[0].split('at step ')[1].split(';')[0])
    assert status.step <= step < 300 and f'Resumed from step {step}' in log
    # Resumed, not restarted: every step logged once.
    assert [r['step'] for r in metrics_lib.read_metrics(run.workdir, 'train')] == \
        list(range(1, 301))
    record = _record(run)
    assert (record['state'], record['attempts'], record['preemptions'], record['job_id']) == \
        ('done', 2, 1, job_id)
    status = sweep_status.run_status(run)
    final = metrics_lib.read_metrics(run.workdir, 'eval')[-1]
    assert (status.step, status.top1) == (300, final['top1'])


@pytest.mark.slow
def test_a_failing_run_is_retried_to_the_limit_then_reported_and_left_alone(tmp_path,
                                                                            monkeypatch):
    for key, value in cpu_env().items():
        monkeypatch.setenv(key, value)
    monkeypatch.chdir(REPO)
    sweep_file = tmp_path / 'tiny_sweep.py'
    sweep_file.write_text(TINY_SWEEP)
    config = _load_sweep(sweep_file)
    overrides = {'grad_accum_steps': 3}  # 32 images do not split in 3: train.py refuses
    run = sweep.plan(config, tmp_path / 'sweep', only=['narrow'])[0]
    job = sweep.make_job(config, str(sweep_file), run, overrides, 'submitit-local',
                         max_failures=2)
    with pytest.raises(sweep_job.RunFailedError, match='failed 2 times'):
        job.run()
    record = _record(run)
    assert (record['state'], record['failures'], record['attempts']) == ('failed', 2, 2)
    assert 'exit status 1: Error:' in record['reason'] and 'grad_accum_steps=3' in record['reason']
    status = sweep_status.run_status(run)
    assert status.state == 'failed' and status.note == f'2 failure(s): {record["reason"]}'

    chosen, notes = sweep.triage([run], [job], max_failures=2)
    assert chosen == [] and 'failed 2 times, the limit (--max_failures=2)' in notes[0]
    assert sweep.triage([run], [job], max_failures=3)[0] == [0]
