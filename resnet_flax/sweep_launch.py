"""Launchers for a sweep's runs: on this machine (one after another, or N at once, each with
its own GPUs), or as SLURM jobs through submitit (a job array, one task per GPU, requeued on
preemption and time-out).

Each launched run gets `sweep_job.json` in its workdir (the launcher, the job id, when), which
`sweep --status` reads beside the run's own `sweep_run.json` (see sweep_job.TrainJob).
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import ml_collections
from etils import epath

from resnet_flax import sweep_job, workdir_lock

if TYPE_CHECKING:
    from resnet_flax.sweep import Run

JOB_FILE = 'sweep_job.json'  # in each run's workdir, written by the launcher
LAUNCHERS = ('local', 'slurm', 'submitit-local')
SUBMITIT_FOLDER = 'submitit'  # in DIR: submitit's job scripts, pickles and logs


def slurm_defaults() -> ml_collections.ConfigDict:
    """The --slurm.* flags: each (variant, seed) is one job of `nodes` x `gpus_per_node` GPUs,
    one task (train.py process) per GPU."""
    placeholder = ml_collections.config_dict.placeholder
    return ml_collections.ConfigDict(dict(
        partition=placeholder(str),
        account=placeholder(str),
        constraint=placeholder(str),
        nodes=1,
        gpus_per_node=8,
        cpus_per_gpu=placeholder(int),  # CPUs for each task (= GPU): data loading
        timeout_min=24 * 60,  # per job; a job that reaches it is requeued and resumes
        signal_delay_s=120,  # the warning before the time limit: time to save a checkpoint
        max_num_timeout=20,  # requeues after time-outs before a run is given up
        array_parallelism=256,  # runs of the array that may run at once
        additional='',  # more sbatch options: 'qos=high,mail-type=END,exclusive'
    ))


def check_slurm_flags(argv: Sequence[str]) -> None:
    """A misspelt --slurm.NAME is a one-line error naming the options, not a traceback."""
    names = list(slurm_defaults())
    for arg in argv:
        if arg.startswith('--slurm.'):
            name = arg[len('--slurm.'):].split('=', 1)[0]
            if name not in names:
                raise SystemExit(f'Error: --slurm.{name} is not a SLURM option; the options: '
                                 f'{", ".join("--slurm." + n for n in names)}')


# ---------------------------------------------------------------------------------------------
# Records


def write_job_record(run: Run, **fields: Any) -> None:
    record = dict(submitted=time.time(), host=socket.gethostname(), **fields)
    run.workdir.mkdir(parents=True, exist_ok=True)
    (run.workdir / JOB_FILE).write_text(json.dumps(record, indent=1) + '\n')


def read_job_record(workdir: epath.Path) -> dict[str, Any]:
    return sweep_job.read_json(workdir / JOB_FILE)


# ---------------------------------------------------------------------------------------------
# On this machine


def visible_gpus() -> list[str]:
    """This machine's GPUs as CUDA_VISIBLE_DEVICES names (its own setting first); [] without."""
    listed = os.environ.get('CUDA_VISIBLE_DEVICES')
    if listed is not None:
        return [d for d in listed.split(',') if d.strip() and d.strip() != '-1']
    if shutil.which('nvidia-smi') is None:
        return []
    try:
        out = subprocess.run(['nvidia-smi', '--query-gpu=index', '--format=csv,noheader'],
                             capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def device_groups(parallel: int, gpus: Sequence[str]) -> list[dict[str, str]]:
    """The environment of each of the `parallel` slots: its share of the GPUs, or nothing (CPU:
    the runs share the cores)."""
    if parallel < 1:
        raise ValueError(f'--parallel={parallel} must be at least 1')
    if not gpus:
        return [{} for _ in range(parallel)]
    if len(gpus) % parallel:
        divisors = [n for n in range(1, len(gpus) + 1) if len(gpus) % n == 0]
        raise ValueError(f'--parallel={parallel} cannot split the {len(gpus)} GPUs '
                         f'({",".join(gpus)}) evenly; use one of {divisors}')
    share = len(gpus) // parallel
    return [{'CUDA_VISIBLE_DEVICES': ','.join(gpus[i * share:(i + 1) * share])}
            for i in range(parallel)]


def run_local(items: Sequence[tuple[Run, sweep_job.TrainJob]], parallel: int = 1,
              gpus: Sequence[str] | None = None,
              started: Callable[[Run, sweep_job.TrainJob], str] | None = None,
              report: Callable[[str], None] = print) -> list[Run]:
    """Trains the runs here, `parallel` at once (each with its own GPUs); returns the failed."""
    slots: queue.Queue[dict[str, str]] = queue.Queue()
    for env in device_groups(parallel, visible_gpus() if gpus is None else gpus):
        slots.put(env)
    job_id = f'local-{os.getpid()}'
    pid_started = workdir_lock._process_start_time(os.getpid()) or time.time()
    for run, job in items:
        job.job_id = job_id
        write_job_record(run, launcher='local', job_id=job_id, pid=os.getpid(),
                         pid_started=pid_started, last_step=job.last_step,
                         log=str(job.log_path()))
    lock = threading.Lock()

    def train(run: Run, job: sweep_job.TrainJob) -> bool:
        env = slots.get()
        try:
            job.env = {**job.env, **env}
            if started is not None:
                with lock:
                    devices = f' on GPUs {env["CUDA_VISIBLE_DEVICES"]}' if env else ''
                    report(started(run, job) + devices)
            start = time.time()
            try:
                record = job.run()
            except sweep_job.RunFailedError as error:
                record = {'state': 'failed', 'reason': str(error)}
            with lock:
                report(_outcome(run, job, record, time.time() - start))
            return record.get('state') == 'done'
        finally:
            slots.put(env)

    with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
        done = list(pool.map(lambda item: train(*item), items))
    return [run for (run, _), ok in zip(items, done, strict=True) if not ok]


def _outcome(run: Run, job: sweep_job.TrainJob, record: Mapping[str, Any],
             seconds: float) -> str:
    state = record.get('state')
    if state == 'done':
        evals = [r for r in sweep_job.metrics_lib.read_metrics(run.workdir, 'eval')
                 if r['step'] == job.last_step]
        top1 = f', eval top-1 {100 * evals[-1]["top1"]:.2f}%' if evals else ''
        return f'{run.label}: done in {seconds:.0f} s{top1}'
    if state == 'stopped':
        return f'{run.label}: stopped ({record.get("reason", "")}); run the sweep again to resume'
    return (f'{run.label}: FAILED ({record.get("reason", "")}); see {job.log_path()}')


# ---------------------------------------------------------------------------------------------
# Through submitit


def parse_additional(text: str) -> dict[str, Any]:
    """--slurm.additional='qos=high,mail-type=END,exclusive' as sbatch options."""
    options = {}
    for item in filter(None, (part.strip() for part in text.split(','))):
        key, has_value, value = item.partition('=')
        if not re.fullmatch(r'[A-Za-z][A-Za-z0-9_-]*', key) or (has_value and not value):
            raise ValueError(f'--slurm.additional={text!r}: {item!r} is not an sbatch option '
                             "NAME or NAME=VALUE; write e.g. 'qos=high,mail-type=END'")
        options[key] = value if has_value else True
    return options


def executor_parameters(options: ml_collections.ConfigDict, name: str) -> dict[str, Any]:
    """submitit's SlurmExecutor parameters for the --slurm.* options: one task per GPU (each
    task's CPUs are the GPU's: cpus_per_gpu becomes cpus_per_task)."""
    if options.nodes < 1 or options.gpus_per_node < 1:
        raise ValueError(f'--slurm.nodes={options.nodes} and --slurm.gpus_per_node='
                         f'{options.gpus_per_node} must both be at least 1')
    params: dict[str, Any] = dict(
        name=name, nodes=options.nodes, gpus_per_node=options.gpus_per_node,
        tasks_per_node=options.gpus_per_node, timeout_min=options.timeout_min,
        signal_delay_s=options.signal_delay_s, array_parallelism=options.array_parallelism)
    for key in ('partition', 'account', 'constraint'):
        if options[key]:
            params[key] = options[key]
    if options.cpus_per_gpu:
        params['cpus_per_task'] = options.cpus_per_gpu
    additional = parse_additional(options.additional)
    if additional:
        params['additional_parameters'] = additional
    return params


def make_executor(launcher: str, workdir: epath.Path, options: ml_collections.ConfigDict,
                  name: str):
    """A submitit executor writing its job files under DIR/submitit/JOB_ID/."""
    import submitit

    folder = str(epath.Path(workdir) / SUBMITIT_FOLDER / "%j")
    if launcher == 'slurm':
        if shutil.which('sbatch') is None:
            raise ValueError('--launcher=slurm needs SLURM (no sbatch on this machine); submit '
                             'from a login node of the cluster, or use --launcher=local')
        executor = submitit.SlurmExecutor(folder, max_num_timeout=options.max_num_timeout)
        params = executor_parameters(options, name)
        executor.update_parameters(**_slurm_names(params))
        return executor
    executor = submitit.LocalExecutor(folder, max_num_timeout=options.max_num_timeout)
    # One task on this machine; the runs see no GPU (submitit's local default): tests, trials.
    executor.update_parameters(timeout_min=options.timeout_min,
                               signal_delay_s=options.signal_delay_s)
    return executor


def _slurm_names(params: Mapping[str, Any]) -> dict[str, Any]:
    """SlurmExecutor takes sbatch's own names for a few generic ones."""
    renames = {'name': 'job_name', 'timeout_min': 'time', 'tasks_per_node': 'ntasks_per_node'}
    return {renames.get(k, k): v for k, v in params.items()}


def submit(executor, launcher: str, items: Sequence[tuple[Run, sweep_job.TrainJob]]) -> list[str]:
    """Submits every run as one job (an array on SLURM when there are several); returns the
    job ids, recorded in each run's sweep_job.json."""
    with executor.batch():
        jobs = [executor.submit(job) for _, job in items]
    folder = str(epath.Path(str(executor.folder)))
    for (run, job), handle in zip(items, jobs, strict=True):
        fields = dict(launcher=launcher, job_id=handle.job_id, folder=folder,
                      last_step=job.last_step, log=str(job.log_path()))
        if launcher == 'submitit-local':  # the job id is its controller's pid
            fields.update(pid=int(handle.job_id), pid_started=time.time())
        write_job_record(run, **fields)
    return [handle.job_id for handle in jobs]

