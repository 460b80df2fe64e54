"""Ablation sweeps: train a grid of config variants, then tabulate and plot their results.

    python -m resnet_flax.sweep --sweep=configs/ablations/depth.py --workdir=DIR
    python -m resnet_flax.sweep --sweep=configs/ablations/depth.py --workdir=DIR --parallel=8
    python -m resnet_flax.sweep --sweep=configs/ablations/depth.py --workdir=DIR \
        --launcher=slurm --slurm.partition=gpu --slurm.gpus_per_node=8
    python -m resnet_flax.sweep --sweep=configs/ablations/depth.py --workdir=DIR --print-commands
    python -m resnet_flax.sweep --status --workdir=DIR
    python -m resnet_flax.sweep --report --workdir=DIR

Run from the repository root (train.py lives there). A sweep file is an experiment config whose
`get_config()` carries two more fields:

- `axes`: the variants. Either a list of named variants, each a dict of dotted config overrides
  with a 'name' (`[{'name': 'resnet14', 'model.depth': 14}, ...]`), or a cartesian product, a
  list of (dotted key, values) pairs (`[('model.block', ['basic', 'bottleneck']),
  ('model.depth', [18, 34])]`, variants named like 'block=basic,depth=18').
- `seeds`: the seeds every variant trains with (default: the config's seed).

Each (variant, seed) trains in `DIR/VARIANT/seedS` with `train.py --config=SWEEP_FILE
--config.KEY=VALUE ...` (the commands that `--print-commands` prints): here, one after another
or `--parallel=N` at once (sweep_launch.run_local), or as SLURM jobs through submitit
(`--launcher=slurm`, one job array; sweep_launch.submit), each run by a sweep_job.TrainJob. A
run whose final step's eval is in its metrics.jsonl is skipped, and so is one already queued or
running, or one that failed `--max_failures` times; any other resumes from its newest
checkpoint (train.py does that). `--status` prints where each run stands (sweep_status).
`--config.KEY=VALUE` flags change every variant (e.g. `--config.data.dataset=cifar10`); they
may not touch a key the sweep varies. `--config.seeds=(0,1,2)` changes the seeds (finished runs
of the other seeds are kept). Each run's output goes to its `train.log`, its wall time
(start-up and compilation included, summed over attempts), state and failures to its
`sweep_run.json`, and its launcher and job id to its `sweep_job.json`.

`--report` reads every run's config.json and metrics.jsonl and writes, in DIR: `results.md`
(Markdown table: final eval top-1, top-5 and loss, the last train-loss window, params, MACs,
images/s as the median of the train records, wall time; mean and sample std over seeds),
`results.csv` (the same, one row per variant), `runs.csv` (one row per run), and the plots
`accuracy_vs_macs.png`, `accuracy_vs_params.png` and `curves.png` (train loss and eval top-1
error against step, all variants on one figure). Runs that logged per-block gradient norms
(`config.log_block_grad_norms`) also get `grad_norms.png`: each block's gradient norm against
its depth, in the first logged window and averaged over training.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import difflib
import io
import itertools
import json
import re
import shlex
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import ml_collections
from etils import epath

from resnet_flax import metrics as metrics_lib
from resnet_flax import sweep_job, sweep_launch, sweep_status

SWEEP_FIELDS = ('axes', 'seeds')  # a sweep file's fields that are not training config
SWEEP_FILE = 'sweep.json'  # in DIR: the variants and seeds, so --report needs no --sweep
RUN_FILE = sweep_job.RUN_FILE  # in each run's workdir: attempts, wall time, state, failures
LOG_FILE = sweep_job.LOG_FILE
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / 'train.py'
_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_.,=+-]*$')


@dataclasses.dataclass(frozen=True)
class Variant:
    """One point of the grid: a name and the config overrides (dotted keys) that make it."""

    name: str
    overrides: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Run:
    """One variant trained with one seed, in its own workdir."""

    variant: Variant
    seed: int
    workdir: epath.Path

    @property
    def label(self) -> str:
        return f'{self.variant.name}/seed{self.seed}'


# ---------------------------------------------------------------------------------------------
# The grid


def _flat_keys(config: ml_collections.ConfigDict, prefix: str = '') -> list[str]:
    keys = []
    for key, value in config.items():
        if not prefix and key in SWEEP_FIELDS:
            continue
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(_flat_keys(value, f'{prefix}{key}.'))
        else:
            keys.append(f'{prefix}{key}')
    return keys


def _check_keys(keys: Sequence[str], valid: Sequence[str], where: str) -> None:
    for key in keys:
        if key == 'seed':
            raise ValueError(f"{where} sets 'seed'; list the seeds in the sweep's `seeds` instead")
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            hint = f'did you mean {", ".join(near)}?' if near else 'see configs/base.py'
            raise ValueError(f'{where} sets unknown config field {key!r}; {hint}')


def _slug(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        return '-'.join(_slug(v) for v in value)
    return re.sub(r'[^A-Za-z0-9_.+-]', '-', str(value))


def variants(sweep: ml_collections.ConfigDict) -> list[Variant]:
    """The sweep's variants, in file order, checked against the config's fields."""
    axes = list(sweep.get('axes') or [])
    if not axes:
        raise ValueError("the sweep config has no `axes`; set config.axes to a list of variants "
                         "[{'name': 'deep', 'model.depth': 32}, ...] or of product axes "
                         "[('model.depth', [8, 14]), ...]")
    if all(hasattr(axis, 'items') for axis in axes):
        grid = []
        for i, axis in enumerate(axes):
            overrides = dict(axis.items())
            name = overrides.pop('name', None)
            if not name:
                raise ValueError(f"variant {i} of the sweep's axes {overrides} has no 'name'")
            grid.append(Variant(str(name), overrides))
    elif all(isinstance(a, (tuple, list)) and len(a) == 2 and isinstance(a[0], str)
             and isinstance(a[1], (tuple, list)) and a[1] for a in axes):
        keys = [key for key, _ in axes]
        grid = [Variant(','.join(f'{k.split(".")[-1]}={_slug(v)}' for k, v in zip(keys, values,
                                                                                     strict=True)),
                        dict(zip(keys, values, strict=True)))
                for values in itertools.product(*(values for _, values in axes))]
    else:
        raise ValueError(f'config.axes={axes!r} is neither a list of variant dicts (with a '
                         "'name') nor a list of (dotted key, [values]) pairs")
    valid = _flat_keys(sweep)
    names = [v.name for v in grid]
    for variant in grid:
        if not _NAME.match(variant.name):
            raise ValueError(f'variant name {variant.name!r} must be letters, digits and _.,=+- '
                             '(it names a directory)')
        _check_keys(list(variant.overrides), valid, f'variant {variant.name!r}')
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f'variant names {duplicates} appear more than once; names must be unique')
    return grid


def seeds(sweep: ml_collections.ConfigDict) -> list[int]:
    values = sweep.get('seeds')
    values = [sweep.seed] if values is None else list(values)
    if not values or not all(isinstance(s, int) and not isinstance(s, bool) for s in values):
        raise ValueError(f'config.seeds={values!r} must be a non-empty list of integers')
    return values


def check_overrides(sweep: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
    """Command-line overrides apply to every variant, so they may not set a swept field."""
    _check_keys(list(overrides), _flat_keys(sweep), 'the command line')
    swept = {key for variant in variants(sweep) for key in variant.overrides}
    clash = sorted(swept & set(overrides))
    if clash:
        raise ValueError(f'--config.{clash[0]} is varied by the sweep (its axes set '
                         f'{", ".join(clash)}); drop it or edit the sweep file')


def plan(sweep: ml_collections.ConfigDict, workdir: epath.PathLike,
         only: Sequence[str] | None = None) -> list[Run]:
    """Every (variant, seed) of the sweep, variant-major, each in DIR/VARIANT/seedS."""
    grid = variants(sweep)
    if only:
        unknown = sorted(set(only) - {v.name for v in grid})
        if unknown:
            raise ValueError(f'--variants names {unknown} not in the sweep; its variants: '
                             f'{", ".join(v.name for v in grid)}')
        grid = [v for v in grid if v.name in only]
    workdir = epath.Path(workdir)
    return [Run(v, s, workdir / v.name / f'seed{s}') for v in grid for s in seeds(sweep)]


def run_config(sweep: ml_collections.ConfigDict, run: Run,
               overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
    """The training config of one run: the sweep's, then command-line, variant and seed."""
    config = copy.deepcopy(sweep)
    config.unlock()
    config.update_from_flattened_dict({**(overrides or {}), **run.variant.overrides})
    config.seed = run.seed
    return config


# ---------------------------------------------------------------------------------------------
# Commands


def _literal(value: Any) -> str:
    if isinstance(value, (tuple, list)):
        inner = ','.join(_literal(v) for v in value)
        return f'({inner},)' if len(value) == 1 else f'({inner})'
    return repr(value)


def format_value(value: Any) -> str:
    """A config value as `--config.KEY=` text that ml_collections parses back to the value."""
    if isinstance(value, (tuple, list)):
        return _literal(value)
    if isinstance(value, str):
        return value
    return str(value) if isinstance(value, bool) else repr(value)


def command(sweep_file: str, run: Run, overrides: Mapping[str, Any] | None = None,
            python: str = 'python', script: str = 'train.py') -> list[str]:
    """The train.py command line of one run (command-line overrides first, then the variant)."""
    settings = {**(overrides or {}), **run.variant.overrides, 'seed': run.seed}
    return [python, script, f'--config={sweep_file}', f'--workdir={run.workdir}',
            *(f'--config.{key}={format_value(value)}' for key, value in settings.items())]


# ---------------------------------------------------------------------------------------------
# Running


def final_step(config: ml_collections.ConfigDict | Mapping[str, Any]) -> int:
    """The step a run of this config ends at (train.py's schedule)."""
    from resnet_flax import data, train

    if not isinstance(config, ml_collections.ConfigDict):
        config = ml_collections.ConfigDict(config)
    return train.make_schedule(config, data.get_info(config.data).num_train_examples).total_steps


def _latest_by_step(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per step, the last logged (a resumed run logs some steps twice)."""
    by_step = {r['step']: r for r in records}
    return [by_step[s] for s in sorted(by_step)]


def write_sweep_file(workdir: epath.PathLike, sweep_file: str, runs: Sequence[Run],
                     overrides: Mapping[str, Any]) -> None:
    """DIR/sweep.json: what --report gathers, in order (merged with earlier --variants runs)."""
    path = epath.Path(workdir) / SWEEP_FILE
    known = sweep_job.read_json(path)
    listed = {v['name']: v for v in known.get('variants', [])}
    for run in runs:
        listed[run.variant.name] = dict(name=run.variant.name, overrides=run.variant.overrides)
    seed_list = sorted(set(known.get('seeds', [])) | {run.seed for run in runs})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(sweep=sweep_file, overrides=dict(overrides),
                                    variants=list(listed.values()), seeds=seed_list),
                               indent=1, default=list) + '\n')


def make_job(sweep: ml_collections.ConfigDict, sweep_file: str, run: Run,
             overrides: Mapping[str, Any], launcher: str, max_failures: int,
             stop_timeout_s: float = 60.0) -> sweep_job.TrainJob:
    """The job that trains `run` (submitit jobs retry a failed train.py in place)."""
    return sweep_job.TrainJob(
        argv=command(sweep_file, run, overrides, python=sys.executable, script=str(TRAIN_SCRIPT)),
        workdir=str(run.workdir), last_step=final_step(run_config(sweep, run, overrides)),
        max_failures=max_failures, retry=launcher != 'local', stop_timeout_s=stop_timeout_s)


def triage(runs: Sequence[Run], jobs: Sequence[sweep_job.TrainJob],
           max_failures: int) -> tuple[list[int], list[str]]:
    """Which runs to launch (their indices), and a line for each one left alone: finished,
    already queued or running, or failed `max_failures` times."""
    slurm = sweep_status.slurm_states(sorted(
        {j['job_id'] for j in map(sweep_launch.read_job_record, (r.workdir for r in runs))
         if j.get('launcher') == 'slurm'}))
    launch, notes = [], []
    for i, (run, job) in enumerate(zip(runs, jobs, strict=True)):
        head = f'[{i + 1}/{len(runs)}] {run.label}'
        status = sweep_status.run_status(run, slurm, job.last_step)
        failures = sweep_job.read_json(run.workdir / RUN_FILE).get('failures', 0)
        if status.state == 'done':
            notes.append(f'{head}: finished (eval at step {job.last_step}), skipped')
        elif status.state in sweep_status.LIVE:
            notes.append(f'{head}: already {status.state} (job {status.job_id}), skipped')
        elif failures >= max_failures:
            notes.append(f'{head}: failed {failures} times, the limit (--max_failures='
                         f'{max_failures}), skipped; last: {status.note}. Fix the cause, then '
                         f'run again with --max_failures={failures + 1}')
        else:
            launch.append(i)
    return launch, notes


def _start_line(run: Run, job: sweep_job.TrainJob) -> str:
    logged = metrics_lib.read_metrics(run.workdir) if run.workdir.exists() else []
    resumed = f', resuming after step {logged[-1]["step"]}' if logged else ''
    return f'{run.label}: training to step {job.last_step}{resumed} (log: {job.log_path()})'


def run_sweep(sweep: ml_collections.ConfigDict, sweep_file: str, workdir: epath.PathLike,
              overrides: Mapping[str, Any] | None = None, only: Sequence[str] | None = None,
              launcher: str = 'local', parallel: int = 1,
              slurm: ml_collections.ConfigDict | None = None,
              max_failures: int = 3) -> list[Run]:
    """Launches every run that is not finished, queued, running or out of failures: here
    (`parallel` at once), or as submitit jobs. Returns the runs that failed here."""
    if launcher not in sweep_launch.LAUNCHERS:
        raise ValueError(f'--launcher={launcher!r}; choose one of '
                         f'{", ".join(sweep_launch.LAUNCHERS)}')
    if not TRAIN_SCRIPT.exists():
        raise FileNotFoundError(f'{TRAIN_SCRIPT} not found; run the sweep from a source checkout')
    overrides = dict(overrides or {})
    check_overrides(sweep, overrides)
    slurm = slurm if slurm is not None else sweep_launch.slurm_defaults()
    runs = plan(sweep, workdir, only)
    stop_timeout_s = max(10.0, 0.75 * slurm.signal_delay_s)
    jobs = [make_job(sweep, sweep_file, run, overrides, launcher, max_failures, stop_timeout_s)
            for run in runs]
    write_sweep_file(workdir, sweep_file, runs, overrides)
    chosen, notes = triage(runs, jobs, max_failures)
    for note in notes:
        print(note, flush=True)
    items = [(runs[i], jobs[i]) for i in chosen]
    if not items:
        return []
    if launcher == 'local':
        return sweep_launch.run_local(items, parallel, started=_start_line,
                                      report=lambda line: print(line, flush=True))
    executor = sweep_launch.make_executor(launcher, epath.Path(workdir), slurm,
                                          name=f'sweep-{epath.Path(workdir).name}')
    job_ids = sweep_launch.submit(executor, launcher, items)
    for (run, job), job_id in zip(items, job_ids, strict=True):
        print(f'{run.label}: submitted as job {job_id} (log: {job.log_path()})', flush=True)
    return []


# ---------------------------------------------------------------------------------------------
# Results


def _discover(workdir: epath.Path) -> tuple[list[Variant], list[int]]:
    """Variants and seeds from DIR/sweep.json, or from the run directories found in DIR."""
    known = sweep_job.read_json(workdir / SWEEP_FILE)
    if known:
        return ([Variant(v['name'], v['overrides']) for v in known['variants']],
                [int(s) for s in known['seeds']])
    run_dirs = sorted(p.parent for p in workdir.glob('*/seed*/config.json'))
    names = sorted({d.parent.name for d in run_dirs})
    seed_list = sorted({int(d.name[len('seed'):]) for d in run_dirs if d.name[4:].isdigit()})
    return [Variant(n, {}) for n in names], seed_list


def _last_step_of(run: Run) -> int | None:
    """The final step of a run, from the config.json it trained with (None before it starts)."""
    from resnet_flax import run_config as run_config_lib  # flax and jax: only when needed

    path = run.workdir / 'config.json'
    if not path.exists():
        return None
    return final_step(run_config_lib.with_defaults(json.loads(path.read_text())))


def discovered_runs(workdir: epath.PathLike) -> list[Run]:
    """The runs of the sweep in `workdir` (from its sweep.json, or its run directories)."""
    workdir = epath.Path(workdir)
    variant_list, seed_list = _discover(workdir)
    if not variant_list:
        raise FileNotFoundError(f'no sweep in {workdir} (no sweep.json, no run directories); '
                                'give --sweep=FILE, or the --workdir a sweep was started in')
    return [Run(v, s, workdir / v.name / f'seed{s}') for v in variant_list for s in seed_list]


def _model_cost(config: Mapping[str, Any]) -> tuple[int, int]:
    from resnet_flax import models, summary

    model = models.from_config(config['model'])
    cost = summary.summarize(model, image_size=int(config['data']['image_size']))
    return cost['params'], cost['macs']


def gather_run(run: Run) -> dict[str, Any] | None:
    """One run's final metrics and curves, or None if it has not written its config yet."""
    from resnet_flax import run_config as run_config_lib  # flax and jax: only when needed

    config_path = run.workdir / 'config.json'
    if not config_path.exists():
        return None
    config = json.loads(config_path.read_text())
    last_step = final_step(run_config_lib.with_defaults(config))
    train = _latest_by_step(metrics_lib.read_metrics(run.workdir, 'train'))
    evals = _latest_by_step(metrics_lib.read_metrics(run.workdir, 'eval'))
    final = next((r for r in evals if r['step'] == last_step), None)
    speeds = [r['images_per_sec'] for r in train if 'images_per_sec' in r]
    status = sweep_job.read_json(run.workdir / RUN_FILE)
    return dict(
        variant=run.variant.name, seed=run.seed, workdir=str(run.workdir), config=config,
        final_step=last_step, step=evals[-1]['step'] if evals else 0, finished=final is not None,
        top1=final['top1'] if final else None, top5=final['top5'] if final else None,
        loss=final['loss'] if final else None,
        num_examples=final.get('num_examples') if final else None,
        train_loss=train[-1]['loss'] if final and train else None,  # the last logged window
        train_top1=train[-1].get('top1') if final and train else None,
        grad_norms=block_grad_norms(train),
        images_per_sec=statistics.median(speeds) if speeds else None,
        wall_time_sec=status.get('wall_time_sec'),
        train_curve=[(r['step'], r['loss']) for r in train],
        eval_curve=[(r['step'], r['top1']) for r in evals],
    )


_BLOCK = re.compile(r'^grad_norm/stage(\d+)_block(\d+)$')


def block_grad_norms(train: Sequence[Mapping[str, Any]]) -> dict[str, list[float]]:
    """The gradient norm of each residual block, in depth order (input to output), in the
    first logged window ('first') and averaged over every logged window ('mean'); {} when the
    run did not log them."""
    keys = sorted((k for k in (train[0] if train else {}) if _BLOCK.match(k)),
                  key=lambda k: tuple(int(n) for n in _BLOCK.match(k).groups()))
    if not keys:
        return {}
    return dict(first=[float(train[0][k]) for k in keys],
                mean=[statistics.mean(float(r[k]) for r in train) for k in keys])


def _mean_profiles(profiles: Sequence[dict[str, list[float]]]) -> dict[str, list[float]]:
    """Per-block gradient norms averaged over seeds."""
    profiles = [p for p in profiles if p]
    if not profiles:
        return {}
    return {when: [statistics.mean(values) for values in zip(*(p[when] for p in profiles),
                                                              strict=True)]
            for when in ('first', 'mean')}


def _mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None


def _mean_curve(curves: Sequence[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """The mean over seeds at the steps every seed logged."""
    tables = [dict(c) for c in curves]
    shared = sorted(set.intersection(*(set(t) for t in tables))) if tables else []
    return [(s, statistics.mean(t[s] for t in tables)) for s in shared]


METRICS = ('top1', 'top5', 'loss', 'train_loss', 'train_top1', 'images_per_sec',
           'wall_time_sec')


def summarize_variants(variant_list: Sequence[Variant],
                       run_records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per variant with at least one finished run: mean and std of each metric."""
    rows = []
    for variant in variant_list:
        done = [r for r in run_records if r['variant'] == variant.name and r['finished']]
        if not done:
            continue
        params, macs = _model_cost(done[0]['config'])
        row = dict(variant=variant.name,
                   overrides='; '.join(f'{k}={format_value(v)}'
                                       for k, v in variant.overrides.items()),
                   seeds=len(done), steps=done[0]['final_step'], params=params, macs=macs)
        for name in METRICS:
            row[f'{name}_mean'], row[f'{name}_std'] = _mean_std([r[name] for r in done])
        row['train_curve'] = _mean_curve([r['train_curve'] for r in done])
        row['eval_curve'] = _mean_curve([r['eval_curve'] for r in done])
        row['grad_norms'] = _mean_profiles([r['grad_norms'] for r in done])
        rows.append(row)
    return rows


def _pm(mean: float | None, std: float | None, scale: float = 1.0, digits: int = 2) -> str:
    if mean is None:
        return ''
    text = f'{scale * mean:.{digits}f}'
    return text if std is None else f'{text} ± {scale * std:.{digits}f}'


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    header = ['variant', 'overrides', 'seeds', 'params', 'MACs', 'top-1 (%)', 'top-5 (%)',
              'eval loss', 'train loss', 'train top-1 (%)', 'images/s', 'wall time (s)']
    lines = ['| ' + ' | '.join(header) + ' |', '|' + '|'.join(['---'] * 3 + ['---:'] * 9) + '|']
    for r in rows:
        cells = [r['variant'], f"`{r['overrides']}`" if r['overrides'] else '', str(r['seeds']),
                 f"{r['params']:,}", f"{r['macs'] / 1e6:.2f}M",
                 _pm(r['top1_mean'], r['top1_std'], 100), _pm(r['top5_mean'], r['top5_std'], 100),
                 _pm(r['loss_mean'], r['loss_std'], digits=4),
                 _pm(r['train_loss_mean'], r['train_loss_std'], digits=4),
                 _pm(r['train_top1_mean'], r['train_top1_std'], 100),
                 _pm(r['images_per_sec_mean'], r['images_per_sec_std'], digits=0),
                 _pm(r['wall_time_sec_mean'], r['wall_time_sec_std'], digits=0)]
        lines.append('| ' + ' | '.join(cells) + ' |')
    return '\n'.join(lines)


VARIANT_COLUMNS = ['variant', 'overrides', 'seeds', 'steps', 'params', 'macs',
                   *(f'{m}_{s}' for m in METRICS for s in ('mean', 'std'))]
RUN_COLUMNS = ['variant', 'seed', 'finished', 'step', 'final_step', 'top1', 'top5', 'loss',
               'train_loss', 'train_top1', 'images_per_sec', 'wall_time_sec', 'workdir']


def _csv(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, extrasaction='ignore', lineterminator='\n')
    writer.writeheader()
    for row in rows:
        writer.writerow({k: '' if row.get(k) is None else row[k] for k in columns})
    return out.getvalue()


def _save(fig, path: epath.Path) -> None:
    with path.open('wb') as f:
        fig.savefig(f, format='png', dpi=100)


def plot_accuracy(rows: Sequence[dict[str, Any]], cost: str, path: epath.Path, title: str) -> None:
    """Final eval top-1 (mean, std as error bar) against `cost` ('macs' or 'params')."""
    from matplotlib.figure import Figure  # Agg canvas; no pyplot, no global backend
    from matplotlib.ticker import FormatStrFormatter

    fig = Figure(figsize=(6, 4), layout='constrained')
    ax = fig.add_subplot()
    scale, unit = (1e6, 'millions') if max(r[cost] for r in rows) >= 1e6 else (1e3, 'thousands')
    for i, row in enumerate(rows):
        x, y = row[cost] / scale, 100 * row['top1_mean']
        ax.errorbar(x, y, yerr=100 * (row['top1_std'] or 0), fmt='o', capsize=3, color=f'C{i}')
        ax.annotate(row['variant'], (x, y), textcoords='offset points', fontsize=8,
                    xytext=(5, 6 if i % 2 == 0 else -12))
    ax.xaxis.set_major_formatter(FormatStrFormatter('%g'))
    ax.set_xlabel(f'MACs per image ({unit})' if cost == 'macs' else f'parameters ({unit})')
    ax.set_ylabel('final eval top-1 (%), bars: std over seeds')
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which='both')
    ax.margins(x=0.15, y=0.2)
    _save(fig, path)


def plot_curves(rows: Sequence[dict[str, Any]], path: epath.Path, title: str) -> None:
    """Train loss and eval top-1 error against step for every variant (mean over seeds).

    Both on log scales, so the first epochs and the last fraction of a percent both show (an
    error of exactly 0 is left out).
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter

    fig = Figure(figsize=(10, 4), layout='constrained')
    loss_ax, error_ax = fig.subplots(1, 2)
    for i, row in enumerate(rows):
        if row['train_curve']:
            loss_ax.plot(*zip(*row['train_curve'], strict=True), color=f'C{i}',
                         label=row['variant'], linewidth=1.2)
        if row['eval_curve']:
            steps, top1 = zip(*row['eval_curve'], strict=True)
            error_ax.plot(steps, [100 * (1 - t) for t in top1], 'o-', color=f'C{i}',
                          label=row['variant'], linewidth=1.2, markersize=3)
    for ax in (loss_ax, error_ax):
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))  # 0.1, not 10^-1
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
        ax.grid(alpha=0.3, which='both')
    loss_ax.set(xlabel='step', ylabel='train loss', title='train loss (logged windows)')
    error_ax.set(xlabel='step', ylabel='eval top-1 error (%)', title='eval top-1 error')
    error_ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def plot_grad_norms(rows: Sequence[dict[str, Any]], path: epath.Path, title: str) -> None:
    """Gradient norm of each block against its depth (block 1 is next to the input), in the
    first logged window and averaged over training; mean over seeds, log scale."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import FuncFormatter, LogFormatter

    fig = Figure(figsize=(10, 4), layout='constrained')
    axes = fig.subplots(1, 2, sharey=True)
    rows = [r for r in rows if r['grad_norms']]
    # One colour per depth (the number of blocks); dashed lines for plain nets.
    depths = sorted({len(r['grad_norms']['first']) for r in rows})
    for row in rows:
        norms = row['grad_norms']
        style = '--' if 'plain' in row['variant'] or 'none' in row['overrides'] else '-'
        color = f"C{depths.index(len(norms['first']))}"
        for ax, when in zip(axes, ('first', 'mean'), strict=True):
            ax.plot(range(1, len(norms[when]) + 1), norms[when], style, marker='o',
                    markersize=3, color=color, label=row['variant'], linewidth=1.2)
    for ax, what in zip(axes, ('first logged window', 'mean over training'), strict=True):
        ax.set_yscale('log')
        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f'{v:g}'))
        ax.yaxis.set_minor_formatter(LogFormatter(minor_thresholds=(1, 0.4)))
        ax.set(xlabel='block (1 = next to the input)', title=f'gradient norm per block: {what}')
        ax.grid(alpha=0.3, which='both')
    axes[0].set_ylabel('L2 norm of the block\'s gradient')
    axes[1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)


def report(workdir: epath.PathLike, variant_list: Sequence[Variant] | None = None,
           seed_list: Sequence[int] | None = None) -> dict[str, Any]:
    """Writes results.md, results.csv, runs.csv and the plots into `workdir`.

    Returns {'rows': per-variant rows, 'runs': per-run records, 'files': {name: path}}.
    """
    workdir = epath.Path(workdir)
    found_variants, found_seeds = _discover(workdir)
    variant_list = list(variant_list or found_variants)
    seed_list = list(seed_list or found_seeds)
    records, missing = [], []
    for variant in variant_list:
        for seed in seed_list:
            run = Run(variant, seed, workdir / variant.name / f'seed{seed}')
            record = gather_run(run)
            if record is None:
                missing.append(f'{run.label} (no results yet)')
                continue
            records.append(record)
            if not record['finished']:
                missing.append(f"{run.label} (last eval at step {record['step']} of "
                               f"{record['final_step']})")
    rows = summarize_variants(variant_list, records)
    if not rows:
        raise FileNotFoundError(f'no finished runs under {workdir}; run the sweep first')

    sweep_file = sweep_job.read_json(workdir / SWEEP_FILE).get('sweep', str(workdir))
    seeds_note = (f"mean ± sample std over {max(r['seeds'] for r in rows)} seeds"
                  if max(r['seeds'] for r in rows) > 1 else 'one seed')
    text = [f'# Sweep results: {sweep_file}', '',
            f'Final eval at the last step ({seeds_note}). Params and MACs (per image) of the '
            "model as configured; train loss is the last logged window's; images/s is the "
            'median of the logged train windows; wall time per run includes start-up, '
            'compilation, evaluation and checkpoints.', '',
            markdown_table(rows), '']
    sizes = {r['num_examples'] for r in records if r['finished'] and r['num_examples']}
    if len(sizes) == 1:
        n, p = sizes.pop(), rows[0]['top1_mean']
        text += [f'The eval split has {n:,} examples: one example is {100 / n:.2f}% top-1, and '
                 f'the sampling error of a top-1 near {100 * p:.1f}% is '
                 f'±{100 * (p * (1 - p) / n) ** 0.5:.2f}% (binomial std).', '']
    if missing:
        text += ['Not included: ' + ', '.join(missing) + '.', '']
    files = {name: workdir / name for name in ('results.md', 'results.csv', 'runs.csv',
                                               'accuracy_vs_macs.png', 'accuracy_vs_params.png',
                                               'curves.png')}
    files['results.md'].write_text('\n'.join(text))
    files['results.csv'].write_text(_csv(rows, VARIANT_COLUMNS))
    files['runs.csv'].write_text(_csv(records, RUN_COLUMNS))
    plot_accuracy(rows, 'macs', files['accuracy_vs_macs.png'], f'top-1 vs MACs: {sweep_file}')
    plot_accuracy(rows, 'params', files['accuracy_vs_params.png'],
                  f'top-1 vs parameters: {sweep_file}')
    plot_curves(rows, files['curves.png'], f'training curves: {sweep_file}')
    if any(r['grad_norms'] for r in rows):
        files['grad_norms.png'] = workdir / 'grad_norms.png'
        plot_grad_norms(rows, files['grad_norms.png'], f'gradient flow: {sweep_file}')
    return dict(rows=rows, runs=records, files=files)


# ---------------------------------------------------------------------------------------------
# Command line


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file(
        'config', None, 'The sweep file (--sweep=... is the same flag); --config.KEY=VALUE '
        'overrides every variant.', lock_config=True)
    flags.DEFINE_string('workdir', None, 'Sweep directory: one sub-directory per variant.')
    flags.DEFINE_bool('print-commands', False, 'Print one train.py command per run and exit.')
    flags.DEFINE_bool('report', False, 'Gather results.md, results.csv and plots in --workdir.')
    flags.DEFINE_list('variants', None, 'Only these variants (names); default: all.')
    flags.DEFINE_bool('status', False, 'Print where each run stands (state, step, top-1, job, '
                      'log) and exit.')
    flags.DEFINE_enum('launcher', 'local', sweep_launch.LAUNCHERS,
                      'local: train here (see --parallel); slurm: one SLURM job per run through '
                      'submitit (see --slurm.*); submitit-local: the slurm path on this machine, '
                      'in submitit subprocesses (trials and tests).')
    flags.DEFINE_integer('parallel', 1, 'local: runs at once, each with its share of the GPUs.')
    flags.DEFINE_integer('max_failures', 3, 'A run whose train.py failed this many times is not '
                         'tried again (submitit jobs retry in place until then).')
    config_flags.DEFINE_config_dict('slurm', sweep_launch.slurm_defaults(),
                                    '--launcher=slurm: --slurm.partition=..., --slurm.nodes=..., '
                                    'see sweep_launch.slurm_defaults.')
    flags.mark_flag_as_required('workdir')


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """`--sweep=FILE` and `--sweep.KEY=VALUE` are `--config=FILE` and `--config.KEY=VALUE`."""
    return [('--config' + arg[len('--sweep'):]
             if arg == '--sweep' or arg.startswith(('--sweep=', '--sweep.')) else arg)
            for arg in argv]


def main(argv: Sequence[str]) -> None:
    from absl import flags, logging

    if not flags.FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)  # JAX and orbax are chatty at INFO
    if len(argv) > 1:
        raise ValueError(f'unexpected arguments {list(argv[1:])}; see --help')
    flag_values = flags.FLAGS
    sweep = flag_values.config
    if flag_values.status:
        runs = (plan(sweep, flag_values.workdir, flag_values.variants) if sweep is not None
                else discovered_runs(flag_values.workdir))
        print(sweep_status.format_status(sweep_status.sweep_status(runs, _last_step_of)))
        return
    if flag_values.report:
        result = report(flag_values.workdir, variants(sweep) if sweep is not None else None,
                        seeds(sweep) if sweep is not None else None)
        print(result['files']['results.md'].read_text())
        print('Wrote ' + ', '.join(str(p) for p in result['files'].values()))
        return
    if sweep is None:
        raise ValueError('give the sweep file: --sweep=configs/ablations/depth.py')
    sweep_file = flag_values['config'].config_filename
    # --config.seeds=(0,1,2) changes the sweep itself (already applied to it), not train.py.
    overrides = {k: v for k, v in flag_values['config'].override_values.items()
                 if k not in SWEEP_FIELDS}
    check_overrides(sweep, overrides)
    runs = plan(sweep, flag_values.workdir, flag_values.variants)
    if flag_values['print-commands'].value:
        write_sweep_file(flag_values.workdir, sweep_file, runs, overrides)
        for run in runs:
            print(shlex.join(command(sweep_file, run, overrides)))
        return
    launcher = flag_values.launcher
    failed = run_sweep(sweep, sweep_file, flag_values.workdir, overrides, flag_values.variants,
                       launcher=launcher, parallel=flag_values.parallel,
                       slurm=flag_values.slurm, max_failures=flag_values.max_failures)
    follow = f'--workdir={flag_values.workdir}'
    if failed:
        raise RuntimeError(f'{len(failed)} run(s) failed: {", ".join(r.label for r in failed)}; '
                           'see their train.log, then run the same command to resume')
    if launcher != 'local':
        print(f'Follow the runs with: python -m resnet_flax.sweep --status {follow}', flush=True)
        return
    print(f'All runs finished; gather them with: python -m resnet_flax.sweep --report {follow}',
          flush=True)


if __name__ == '__main__':
    from resnet_flax import cli

    sys.argv = normalize_argv(sys.argv)
    sweep_launch.check_slurm_flags(sys.argv)  # before the flag is defined: it parses sys.argv
    _define_flags()
    cli.run(main)
