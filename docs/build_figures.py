"""The measured figures that README.md, the configs' docstrings and docs/ablations.md quote:
measured by this script, stored in docs/figures.json, and written into the docs from there.

    python docs/build_figures.py --measure=quickstart        # train the quick start, store it
    python docs/build_figures.py --measure=shortcut --workdir=DIR   # run a sweep in DIR/NAME
    python docs/build_figures.py --store=shortcut --workdir=DIR     # store a sweep already run
    python docs/build_figures.py                   # write the figures into the docs
    python docs/build_figures.py --check           # exit 1 where a doc differs from figures.json

Each measurement is stored with what produced it: the commit (and the files that differed from
it), the package versions, the machine (CPU count, load average before and after) and the date.
The quick start and the sweeps are deterministic on a given CPU (same seed, same bits), so
tests/test_figures.py retrains the quick start and one run of the shortcut sweep and compares
them with figures.json (slow tests), and checks on every run that the docs quote figures.json.
A change to the trainer that moves a number fails there: re-measure, rebuild, commit.

The docs mark what this script writes: in Markdown, between `<!-- figures:KEY -->` and
`<!-- /figures:KEY -->`; in a docstring, the paragraph that starts with `Measured (`.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FIGURES = REPO / 'docs' / 'figures.json'
IMAGES = REPO / 'docs' / 'img' / 'ablations'
QUICKSTART_CONFIG = 'configs/digits.py'
# The sweeps this page re-measures, cheapest first; their files' own seeds unless --seeds.
SWEEPS = ('shortcut', 'block_type', 'depth')
VERSIONED = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'numpy', 'ml-collections',
             'tensorflow-cpu', 'tensorflow-datasets', 'grain')


# ---------------------------------------------------------------------------------------------
# Provenance


def _git(*args: str) -> str:
    try:
        return subprocess.run(['git', *args], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.rstrip('\n')
    except (OSError, subprocess.CalledProcessError):
        return ''


def _cpu_model() -> str:
    try:
        for line in Path('/proc/cpuinfo').read_text().splitlines():
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(load_start: tuple[float, ...], load_end: tuple[float, ...] | None = None
               ) -> dict[str, Any]:
    """What produced a measurement: commit, changed files, versions, machine, load, date."""
    import jax

    changed = [line[3:] for line in _git('status', '--porcelain').splitlines()
               if not line[3:].startswith('docs/')]
    versions = {}
    for name in VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return dict(
        commit=_git('rev-parse', 'HEAD'), changed_files=sorted(changed),
        date=datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC'),
        python=platform.python_version(), versions=versions,
        machine=dict(backend=jax.default_backend(), cpus=os.cpu_count(),
                     cpu=_cpu_model(),
                     load_average_start=[round(x, 2) for x in load_start],
                     load_average_end=[round(x, 2) for x in load_end or os.getloadavg()]))


# ---------------------------------------------------------------------------------------------
# Measuring


def _cpu_env() -> dict[str, str]:
    return dict(os.environ, JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')


def final_eval(workdir: Path) -> dict[str, Any]:
    """The eval record of a finished run's last step (metrics.jsonl)."""
    from resnet_flax import metrics

    evals = metrics.read_metrics(workdir, 'eval')
    if not evals:
        raise FileNotFoundError(f'{workdir} has no eval record; did the run finish?')
    return evals[-1]


def quickstart_record(workdir: Path, wall_time_sec: float, load_start,
                      load_end=None) -> dict[str, Any]:
    final = final_eval(workdir)
    config = json.loads((workdir / 'config.json').read_text())
    return dict(
        command=f'python train.py --config={QUICKSTART_CONFIG} --workdir=DIR',
        seed=config['seed'], step=final['step'], num_examples=final['num_examples'],
        top1=final['top1'], ema_top1=final['ema_top1'], top5=final['top5'],
        loss=final['loss'], wall_time_sec=round(wall_time_sec, 1),
        **provenance(load_start, load_end))


def measure_quickstart(workdir: Path | None) -> dict[str, Any]:
    """The README's command, as a user runs it, timed from start to exit."""
    with tempfile.TemporaryDirectory() as scratch:
        run_dir = workdir or Path(scratch) / 'digits'
        load_start, start = os.getloadavg(), time.time()
        subprocess.run([sys.executable, 'train.py', f'--config={QUICKSTART_CONFIG}',
                        f'--workdir={run_dir}'], cwd=REPO, env=_cpu_env(), check=True)
        return quickstart_record(run_dir, time.time() - start, load_start)


def sweep_record(name: str, sweep_dir: Path, wall_time_sec: float | None,
                 load_start, load_end=None) -> dict[str, Any]:
    """A sweep's finished runs, as `resnet_flax.sweep --report` gathers them."""
    from resnet_flax import sweep

    runs = []
    for r in sweep.report(sweep_dir)['runs']:
        if not r['finished']:
            continue
        params, macs = sweep._model_cost(r['config'])  # noqa: SLF001 - the report's own cost
        runs.append(dict(variant=r['variant'], seed=r['seed'], top1=r['top1'], top5=r['top5'],
                         loss=r['loss'], train_loss=r['train_loss'], params=params, macs=macs,
                         layers=_layers(r['config']), wall_time_sec=r['wall_time_sec'],
                         num_examples=r['num_examples'], step=r['final_step']))
    return dict(sweep=f'configs/ablations/{name}.py', seeds=sorted({r['seed'] for r in runs}),
                variants=list(dict.fromkeys(r['variant'] for r in runs)), runs=runs,
                wall_time_sec=None if wall_time_sec is None else round(wall_time_sec, 1),
                **provenance(load_start, load_end))


def _layers(config: dict[str, Any]) -> int:
    from resnet_flax import models, summary

    model = models.from_config(config['model'])
    return summary.summarize(model, config['data']['image_size'])['layers']


def measure_sweep(name: str, workdir: Path, seeds: str | None) -> dict[str, Any]:
    command = [sys.executable, '-m', 'resnet_flax.sweep', f'--sweep=configs/ablations/{name}.py',
               f'--workdir={workdir / name}']
    if seeds:
        command.append(f'--config.seeds=({seeds},)')
    load_start, start = os.getloadavg(), time.time()
    subprocess.run(command, cwd=REPO, env=_cpu_env(), check=True)
    return sweep_record(name, workdir / name, time.time() - start, load_start)


def load() -> dict[str, Any]:
    return json.loads(FIGURES.read_text()) if FIGURES.exists() else {}


def save(figures: dict[str, Any]) -> None:
    FIGURES.write_text(json.dumps(figures, indent=1, sort_keys=True) + '\n')


def store(name: str, record: dict[str, Any]) -> None:
    """Adds one measurement to figures.json as it is now (another may have been stored since)."""
    figures = load()
    if name == 'quickstart':
        figures['quickstart'] = record
    else:
        figures.setdefault('sweeps', {})[name] = record
    save(figures)


# ---------------------------------------------------------------------------------------------
# Statistics


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def welch(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """(mean(a) - mean(b), its standard error, Welch's two-sided p) in the values' units."""
    from scipy import stats

    diff = statistics.mean(a) - statistics.mean(b)
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    with warnings.catch_warnings():  # a variant whose seeds agree exactly: still a valid test
        warnings.simplefilter('ignore', RuntimeWarning)
        p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if se > 0 else 1.0
    return diff, se, p


def by_variant(sweep: dict[str, Any], key: str = 'top1', scale: float = 100.0
               ) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {v: [] for v in sweep['variants']}
    for run in sorted(sweep['runs'], key=lambda r: r['seed']):
        out[run['variant']].append(run[key] * scale)
    return out


# ---------------------------------------------------------------------------------------------
# What the docs say


def _short_commit(record: dict[str, Any]) -> str:
    edited = ' with local changes' if record['changed_files'] else ''
    return f"commit {record['commit'][:8]}{edited}"


def _jax(record: dict[str, Any]) -> str:
    return f"jax {record['versions'].get('jax', '?')}"


def _load(record: dict[str, Any]) -> str:
    start, end = record['machine']['load_average_start'][0], record['machine'][
        'load_average_end'][0]
    low, high = f'{min(start, end):.0f}', f'{max(start, end):.0f}'
    return f'load average {low}' if low == high else f'load average {low} to {high}'


def _time(seconds: float) -> str:
    return f'{seconds:.0f} s' if seconds < 120 else f'{seconds / 60:.0f} minutes'


def _pct(value: float) -> str:
    return f'{100 * value:.2f}%'


def readme_quickstart(q: dict[str, Any]) -> str:
    return (
        f"The second command trains a small ResNet (the CIFAR ResNet-8) on the handwritten "
        f"digits that ship with scikit-learn (no download) and reaches {_pct(q['top1'])} test "
        f"top-1 ({_pct(q['ema_top1'])} with the moving average of the weights) with seed "
        f"{q['seed']}. On a given CPU the run is deterministic: the same code gives these "
        f"numbers to the last bit, and `tests/test_figures.py` retrains it to check that they "
        f"are still what the code produces. It took {_time(q['wall_time_sec'])} from start to "
        f"exit on a {q['machine']['cpus']}-core CPU machine at {_load(q)}{_shared(q)}. Measured "
        f"on {q['date'][:10]} at {_short_commit(q)}, {_jax(q)}: "
        f"[docs/figures.json](docs/figures.json), written by "
        f"`python docs/build_figures.py --measure=quickstart`.")


def _shared(record: dict[str, Any]) -> str:
    """Timings taken while other jobs ran say so: free cores are several times faster."""
    busy = max(record['machine']['load_average_start'][0],
               record['machine']['load_average_end'][0]) > record['machine']['cpus']
    return ' (shared with other jobs, so slower than on free cores)' if busy else ''



def digits_docstring(q: dict[str, Any]) -> str:
    return (f"Measured (docs/figures.json, by docs/build_figures.py): {_pct(q['top1'])} test "
            f"top-1, {_pct(q['ema_top1'])} with the moving average, seed {q['seed']}, the same "
            f"bits on every run on one CPU; {_time(q['wall_time_sec'])} on "
            f"{q['machine']['cpus']} CPU cores at {_load(q)}{_shared(q)}.")


def _seeds_time(sweep: dict[str, Any], seeds: list[int]) -> float:
    return sum(r['wall_time_sec'] or 0 for r in sweep['runs'] if r['seed'] in seeds)


def sweep_docstring(sweep: dict[str, Any], file_seeds: list[int]) -> str:
    runs = [r for r in sweep['runs'] if r['seed'] in file_seeds]
    return (f"Measured (docs/figures.json, by docs/build_figures.py): the file's {len(runs)} "
            f"runs (seeds {', '.join(map(str, file_seeds))}) took "
            f"{_time(_seeds_time(sweep, file_seeds))} one after another on "
            f"{sweep['machine']['cpus']} CPU cores at {_load(sweep)}{_shared(sweep)}.")


def small_digits_docstring(shortcut: dict[str, Any]) -> str:
    runs = [r for r in shortcut['runs'] if r['variant'] == 'shortcut=A']
    mean, sd = mean_sd([100 * r['top1'] for r in runs])
    times = [r['wall_time_sec'] for r in runs if r['wall_time_sec']]
    return (f"Measured (docs/figures.json, by docs/build_figures.py): its ResNet-20 "
            f"(shortcut=A of configs/ablations/shortcut.py) reaches {mean:.1f} +- {sd:.1f}% "
            f"top-1 on the 360 test digits ({len(runs)} seeds) and took {min(times):.0f} to "
            f"{max(times):.0f} s per run (start-up and compilation included) on "
            f"{shortcut['machine']['cpus']} CPU cores at {_load(shortcut)}{_shared(shortcut)}.")


def _cell(values: list[float], digits: int = 2) -> str:
    mean, sd = mean_sd(values)
    return f'{mean:.{digits}f} ± {sd:.{digits}f}' if len(values) > 1 else f'{mean:.{digits}f}'


def sweep_table(sweep: dict[str, Any]) -> str:
    """Variant rows: cost, final eval (mean ± sample std over seeds), and every seed's top-1."""
    top1, top5 = by_variant(sweep), by_variant(sweep, 'top5')
    loss, train = by_variant(sweep, 'loss', 1.0), by_variant(sweep, 'train_loss', 1.0)
    rows = ['| variant | layers | params | MACs | top-1 (%) | top-5 (%) | eval loss | final train '
            'loss | top-1 per seed (%) |', '|---|---:|---:|---:|---:|---:|---:|---:|---|']
    for v in sweep['variants']:
        run = next(r for r in sweep['runs'] if r['variant'] == v)
        rows.append(f"| {v} | {run['layers']} | {run['params']:,} | {run['macs'] / 1e6:.2f}M | "
                    f"{_cell(top1[v])} | {_cell(top5[v])} | {_cell(loss[v], 3)} | "
                    f"{_cell(train[v], 4)} | {' / '.join(f'{x:.2f}' for x in top1[v])} |")
    return '\n'.join(rows)


def sweep_provenance(sweep: dict[str, Any]) -> str:
    n = len(sweep['seeds'])
    return (f"{n} seeds ({', '.join(map(str, sweep['seeds']))}) per variant, "
            f"{len(sweep['runs'])} runs, {_time(_seeds_time(sweep, sweep['seeds']))} of wall "
            f"time one after another on {sweep['machine']['cpus']} CPU cores at "
            f"{_load(sweep)}{_shared(sweep)}. Measured on {sweep['date'][:10]} at "
            f"{_short_commit(sweep)}, {_jax(sweep)} (docs/figures.json).")


def _verdict(name: str, a: list[float], b_name: str, b: list[float]) -> str:
    diff, se, p = welch(a, b)
    return (f'{name} against {b_name}: {diff:+.2f} points (standard error {se:.2f}, Welch '
            f'p = {p:.2f})')


def block_type_pooled(sweep: dict[str, Any]) -> tuple[float, float, float, int]:
    """Bottleneck minus basic top-1 over both budgets, each budget centred on its own mean
    (so the budget itself is no effect): (difference, standard error, Welch p, runs each)."""
    top1 = by_variant(sweep)
    basic, bottleneck = [], []
    for b_name, n_name in (('basic-8', 'bottleneck-29-w4'), ('basic-14', 'bottleneck-29-w6')):
        centre = statistics.mean(top1[b_name] + top1[n_name])
        basic += [x - centre for x in top1[b_name]]
        bottleneck += [x - centre for x in top1[n_name]]
    diff, se, p = welch(bottleneck, basic)
    return diff, se, p, len(basic)


def sweep_findings(key: str, sweep: dict[str, Any]) -> str:
    """The comparisons the page draws, computed from the stored runs."""
    top1 = by_variant(sweep)
    if key == 'shortcut':
        pairs = [('shortcut=B', 'shortcut=A'), ('shortcut=C', 'shortcut=A'),
                 ('shortcut=C', 'shortcut=B')]
    elif key == 'depth':
        pairs = [(v, 'resnet8') for v in sweep['variants'] if v != 'resnet8']
    else:
        pairs = [('bottleneck-29-w4', 'basic-8'), ('bottleneck-29-w6', 'basic-14')]
    lines = [f'- {_verdict(a, top1[a], b, top1[b])}.' for a, b in pairs
             if a in top1 and b in top1 and len(top1[a]) > 1 and len(top1[b]) > 1]
    if key == 'block_type' and all(v in top1 for v in
                                   ('basic-8', 'basic-14', 'bottleneck-29-w4',
                                    'bottleneck-29-w6')):
        diff, se, p, n = block_type_pooled(sweep)
        spread = {name: mean_sd(top1[name])[1] for name in top1}
        lines.append(f'- Both budgets together ({n} runs of each block type, each budget centred '
                     f'on its own mean): bottleneck {diff:+.2f} points (standard error {se:.2f}, '
                     f'Welch p = {p:.3f}). Seed std: ' + ', '.join(
                         f'{name} {sd:.2f}' for name, sd in spread.items()) + '.')
    return '\n'.join(textwrap.fill(line, 96, subsequent_indent='  ', break_on_hyphens=False)
                     for line in lines)


def sweep_block(key: str, sweep: dict[str, Any]) -> str:
    return '\n\n'.join([sweep_table(sweep), _wrap(sweep_provenance(sweep)),
                        sweep_findings(key, sweep)])


def _wrap(text: str, width: int = 96, indent: str = '') -> str:
    return '\n'.join(textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=indent,
                                   break_on_hyphens=False))


# ---------------------------------------------------------------------------------------------
# Plots


def plot_accuracy(sweep: dict[str, Any], cost: str, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = accuracy_figure(sweep, cost, title)
    fig.savefig(path, dpi=100, metadata={'Software': None})
    plt.close(fig)


def accuracy_figure(sweep: dict[str, Any], cost: str, title: str):
    """Top-1 (mean, bars: std over seeds) against params or MACs. Points carry no text labels
    (neighbours at equal cost overprinted them): each variant has its own marker in a legend."""
    import matplotlib

    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    top1 = by_variant(sweep)
    markers = 'osD^vP*Xh'
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for i, variant in enumerate(sweep['variants']):
        run = next(r for r in sweep['runs'] if r['variant'] == variant)
        mean, sd = mean_sd(top1[variant])
        x = run[cost] / 1e6 if cost == 'macs' else run[cost]
        ax.errorbar([x], [mean], yerr=[sd], fmt=markers[i % len(markers)], ms=7, capsize=4,
                    label=f'{variant} ({mean:.2f}%)')
    ax.set_xlabel('MACs per image (millions)' if cost == 'macs' else 'parameters')
    ax.set_ylabel(f"final eval top-1 (%), bars: std over {len(sweep['seeds'])} seeds")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc='best')
    fig.tight_layout()
    return fig


def draw(figures: dict[str, Any]) -> None:
    IMAGES.mkdir(parents=True, exist_ok=True)
    titles = dict(shortcut='shortcut options A/B/C, ResNet-20',
                  block_type='basic vs bottleneck at matched MACs', depth='CIFAR ResNet depth')
    for key, sweep in figures.get('sweeps', {}).items():
        cost = 'params' if key == 'shortcut' else 'macs'
        name = 'params' if cost == 'params' else 'macs'
        plot_accuracy(sweep, cost, IMAGES / f'{key}_accuracy_vs_{name}.png', titles[key])


# ---------------------------------------------------------------------------------------------
# Writing the docs


def blocks(figures: dict[str, Any]) -> dict[str, dict[str, str]]:
    """{file: {key: text}}: what each doc's marked places must hold."""
    from resnet_flax import sweep as sweep_lib

    out: dict[str, dict[str, str]] = {}
    quick = figures.get('quickstart')
    if quick:
        out['README.md'] = {'quickstart': _wrap(readme_quickstart(quick))}
        out[QUICKSTART_CONFIG] = {'Measured': _wrap(digits_docstring(quick))}
    sweeps = figures.get('sweeps', {})
    ablations: dict[str, str] = {}
    for key, sweep in sweeps.items():
        ablations[f'sweep:{key}'] = sweep_block(key, sweep)
        file_seeds = sweep_lib.seeds(_sweep_config(key))
        out[f'configs/ablations/{key}.py'] = {'Measured': _wrap(sweep_docstring(sweep,
                                                                                file_seeds))}
    if 'shortcut' in sweeps:
        out['configs/ablations/small_digits.py'] = {
            'Measured': _wrap(small_digits_docstring(sweeps['shortcut']))}
    if ablations:
        out['docs/ablations.md'] = ablations
    return out


def _sweep_config(key: str):
    import importlib

    return importlib.import_module(f'configs.ablations.{key}').get_config()


def _replace_marked(text: str, key: str, body: str, where: str) -> str:
    pattern = re.compile(rf'(<!-- figures:{re.escape(key)} -->\n)(?:.*?\n)?(<!-- /figures:'
                         rf'{re.escape(key)} -->)', re.S)
    if not pattern.search(text):
        raise ValueError(f'{where} has no <!-- figures:{key} --> ... <!-- /figures:{key} -->')
    return pattern.sub(lambda m: m.group(1) + body + '\n' + m.group(2), text, count=1)


def _replace_paragraph(text: str, anchor: str, body: str, where: str) -> str:
    """The docstring paragraph that starts with `anchor (` up to a blank line or the end."""
    pattern = re.compile(rf'^{re.escape(anchor)} \(.*?(?=\n\n|\n""")', re.S | re.M)
    if not pattern.search(text):
        raise ValueError(f'{where} has no paragraph starting "{anchor} ("')
    return pattern.sub(lambda m: body, text, count=1)


def render(figures: dict[str, Any]) -> dict[str, str]:
    """{file: its new text} for every file that quotes figures."""
    out = {}
    for name, places in blocks(figures).items():
        path = REPO / name
        text = path.read_text()
        for key, body in places.items():
            if name.endswith('.md'):
                text = _replace_marked(text, key, body, name)
            else:
                text = _replace_paragraph(text, key, body, name)
        out[name] = text
    return out


def stale(figures: dict[str, Any]) -> list[str]:
    """The files whose quoted figures differ from `figures`."""
    return [name for name, text in render(figures).items()
            if (REPO / name).read_text() != text]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--measure', default='', help='quickstart and/or sweep names, commas')
    parser.add_argument('--store', default='', help='sweeps already run in --workdir, commas')
    parser.add_argument('--workdir', type=Path, help='where sweeps run (DIR/NAME)')
    parser.add_argument('--seeds', default='', help='e.g. 0,1,2,3,4; default: the file\'s')
    parser.add_argument('--check', action='store_true', help='exit 1 if a doc is stale')
    parser.add_argument('--no-images', action='store_true')
    args = parser.parse_args(argv)
    for name in filter(None, args.measure.split(',')):
        if name == 'quickstart':
            store('quickstart', measure_quickstart(None))
        else:
            if args.workdir is None:
                parser.error('--measure of a sweep needs --workdir')
            store(name, measure_sweep(name, args.workdir, args.seeds))
    for name in filter(None, args.store.split(',')):
        store(name, sweep_record(name, args.workdir / name, None, os.getloadavg()))
    figures = load()
    if args.check:
        files = stale(figures)
        if files:
            sys.exit(f'stale figures in {", ".join(files)}: run python docs/build_figures.py')
        return
    for name, text in render(figures).items():
        (REPO / name).write_text(text)
    if not args.no_images:
        draw(figures)


if __name__ == '__main__':
    main()
