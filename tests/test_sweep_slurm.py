"""`sweep --launcher=slurm` without a cluster: submitit writes the real sbatch script and job
pickles, and only SLURM's own commands (sbatch, srun, sacct) are stand-ins on the PATH."""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_flax import sweep, sweep_launch, sweep_status
from tests.test_sweep import TINY_SWEEP
from tests.tiny import REPO, cpu_env

submitit = pytest.importorskip('submitit')  # a dependency (pyproject); absent in old venvs

SLURM_FLAGS = ['--slurm.partition=gpu-long', '--slurm.nodes=2', '--slurm.gpus_per_node=4',
               '--slurm.cpus_per_gpu=12', '--slurm.timeout_min=240', '--slurm.account=vision',
               '--slurm.constraint=a100&ib', '--slurm.additional=qos=high,exclusive']


def _fake_slurm(bin_dir: Path) -> dict[str, str]:
    """sbatch keeps each script it is given and answers as SLURM does; sacct prints the job
    states written in $FAKE_SACCT (sacct's --parsable2 format); srun only has to exist."""
    bin_dir.mkdir()
    scripts = {
        'sbatch': 'cp "$1" "$FAKE_SBATCH_DIR/"; echo "Submitted batch job 4242"',
        'sacct': 'printf "JobID|State|NodeList\\n"; cat "$FAKE_SACCT"',
        'srun': 'exit 0',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f'#!/bin/sh\n{body}\n')
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    (bin_dir / 'scripts').mkdir()
    (bin_dir / 'sacct.txt').write_text('')
    return {'PATH': f'{bin_dir}{os.pathsep}{os.environ["PATH"]}',
            'FAKE_SBATCH_DIR': str(bin_dir / 'scripts'), 'FAKE_SACCT': str(bin_dir / 'sacct.txt')}


def _sbatch_options(script: str) -> dict[str, str]:
    return dict((m.group(1), m.group(3) or '') for m in
                re.finditer(r'^#SBATCH --([\w-]+)(=(\S+))?$', script, re.M))


def test_slurm_launcher_submits_one_array_with_the_flags_and_status_reads_sacct(
        tmp_path, monkeypatch):
    sweep_file, workdir = tmp_path / 'tiny_sweep.py', tmp_path / 'sweep'
    sweep_file.write_text(TINY_SWEEP)
    fake = _fake_slurm(tmp_path / 'bin')
    result = subprocess.run(
        [sys.executable, '-m', 'resnet_flax.sweep', f'--sweep={sweep_file}',
         f'--workdir={workdir}', '--launcher=slurm', *SLURM_FLAGS], cwd=REPO,
        env=cpu_env(**fake), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]

    # One sbatch call: a job array of the 4 runs, with every --slurm.* flag in its options.
    scripts = list((tmp_path / 'bin' / 'scripts').iterdir())
    assert len(scripts) == 1
    script = scripts[0].read_text()
    options = _sbatch_options(script)
    assert {k: options[k] for k in ('partition', 'nodes', 'gpus-per-node', 'ntasks-per-node',
                                    'cpus-per-task', 'time', 'account', 'qos', 'exclusive',
                                    'array', 'signal', 'job-name')} == {
        'partition': 'gpu-long', 'nodes': '2', 'gpus-per-node': '4', 'ntasks-per-node': '4',
        'cpus-per-task': '12', 'time': '240', 'account': 'vision', 'qos': 'high',
        'exclusive': '', 'array': '0-3%4', 'signal': 'USR2@120', 'job-name': 'sweep-sweep'}
    assert "#SBATCH --constraint='a100&ib'" in script  # quoted for the shell
    assert re.search(r'^srun .* -u -m submitit\.core\._submit ', script, re.M)

    # Each array task's pickle trains its own run: the train.py command of that run.
    runs = sweep.discovered_runs(workdir)
    overrides = {}
    for index, run in enumerate(runs):
        job_record = sweep_launch.read_job_record(run.workdir)
        assert job_record['job_id'] == f'4242_{index}' and job_record['launcher'] == 'slurm'
        pickled = submitit.helpers.DelayedSubmission.load(
            workdir / 'submitit' / f'4242_{index}' / f'4242_{index}_submitted.pkl')
        job = pickled.function
        assert job.argv == sweep.command(str(sweep_file), run, overrides, python=sys.executable,
                                         script=str(sweep.TRAIN_SCRIPT))
        assert (job.workdir, job.last_step, job.retry) == (str(run.workdir), 6, True)
        assert pickled._timeout_countdown == 20  # --slurm.max_num_timeout's default
        assert f'{run.label}: submitted as job 4242_{index}' in result.stdout

    # --status asks sacct (through submitit) and believes it.
    monkeypatch.setenv('PATH', fake['PATH'])
    monkeypatch.setenv('FAKE_SACCT', fake['FAKE_SACCT'])
    sacct = tmp_path / 'bin' / 'sacct.txt'
    sacct.write_text('4242_[0-3]|PENDING|\n')
    rows = sweep_status.sweep_status(runs)
    assert [(r.state, r.job_id, r.step, r.last_step) for r in rows] == [
        ('queued', f'4242_{i}', None, 6) for i in range(4)]
    sacct.write_text('4242_0|RUNNING|node1\n4242_1|OUT_OF_MEMORY|node2\n'
                     '4242_2|CANCELLED by 1001|\n4242_3|PENDING|\n')
    rows = sweep_status.sweep_status(runs)
    assert [(r.state, r.note) for r in rows] == [
        ('running', 'starting'), ('failed', 'SLURM OUT_OF_MEMORY'),
        ('failed', 'SLURM CANCELLED'), ('queued', '')]
    table = sweep_status.format_status(rows)
    assert table.splitlines()[-1] == '1 queued, 1 running, 2 failed (of 4)'

    # Submitting again leaves the live jobs alone (and would resubmit the two that ended).
    jobs = [pickled_job(workdir, i) for i in range(4)]
    chosen, notes = sweep.triage(runs, jobs, max_failures=3)
    assert chosen == [1, 2]
    assert 'already running (job 4242_0)' in notes[0] and 'already queued (job 4242_3)' in notes[1]


def pickled_job(workdir: Path, index: int):
    return submitit.helpers.DelayedSubmission.load(
        workdir / 'submitit' / f'4242_{index}' / f'4242_{index}_submitted.pkl').function


@pytest.mark.parametrize('parallel, gpus, expected', [
    (2, ['0', '1', '2', '3', '4', '5', '6', '7'], ['0,1,2,3', '4,5,6,7']),
    (4, ['3', '5', '6', '7'], ['3', '5', '6', '7']),
    (3, [], [None, None, None]),
])
def test_parallel_slots_share_the_gpus_without_overlap(parallel, gpus, expected):
    slots = sweep_launch.device_groups(parallel, gpus)
    assert [s.get('CUDA_VISIBLE_DEVICES') for s in slots] == expected


def test_parallel_that_does_not_divide_the_gpus_is_a_one_line_error():
    with pytest.raises(ValueError) as error:
        sweep_launch.device_groups(3, ['0', '1', '2', '3'])
    assert '--parallel=3' in str(error.value) and '[1, 2, 4]' in str(error.value)
    assert '\n' not in str(error.value)


@pytest.mark.parametrize('text, message', [
    ('qos high', "'qos high' is not an sbatch option"),
    ('mail-type=', "'mail-type=' is not an sbatch option"),
])
def test_bad_additional_sbatch_options_are_one_line_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        sweep_launch.parse_additional(text)
