"""Ablation sweeps: the grid, the train.py commands, running/resuming/skipping, and the report."""

from __future__ import annotations

import csv
import importlib
import json
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags
from PIL import Image

from configs import digits
from resnet_flax import models, summary, sweep
from tests.tiny import REPO, cpu_env

ABLATIONS = sorted(p.stem for p in (REPO / 'configs' / 'ablations').glob('*.py')
                   if p.stem not in ('__init__', 'small_digits'))

TINY_SWEEP = '''
from tests.tiny import tiny_config


def get_config():
    config = tiny_config()
    config.axes = [{'name': 'narrow', 'model.stage_widths': (8, 8)},
                   {'name': 'wide', 'model.stage_widths': (8, 16)}]
    config.seeds = (0, 1)
    return config
'''


def _sweep_cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, '-m', 'resnet_flax.sweep', *args], cwd=REPO,
                            env=cpu_env(), capture_output=True, text=True, timeout=900)
    if check and result.returncode:
        raise AssertionError(f'sweep {args} failed ({result.returncode}):\n{result.stderr[-4000:]}'
                             f'\n{result.stdout[-4000:]}')
    return result


def _records(run_dir: Path, split: str) -> list[dict]:
    lines = (run_dir / 'metrics.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['split'] == split]


def _real_param_count(config: dict) -> int:
    """Parameters of the model in a run's config.json, by a real init (not the summary's trace)."""
    model = models.from_config(config['model'])
    size = config['data']['image_size']
    variables = model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
    return sum(x.size for x in jax.tree.leaves(variables['params']))


def _load(name: str) -> ml_collections.ConfigDict:
    return importlib.import_module(f'configs.ablations.{name}').get_config()


@pytest.mark.slow
def test_sweep_resumes_skips_and_reports_the_runs_real_metrics(tmp_path):
    sweep_file, workdir = tmp_path / 'tiny_sweep.py', tmp_path / 'sweep'
    sweep_file.write_text(TINY_SWEEP)
    args = [f'--sweep={sweep_file}', f'--workdir={workdir}']

    # An interrupted variant: both seeds of 'narrow' stop at step 3 of 6.
    _sweep_cli(*args, '--variants=narrow', '--config.num_train_steps=3')
    first_steps = [r['step'] for r in _records(workdir / 'narrow' / 'seed0', 'train')]
    assert first_steps == [1, 2, 3]

    # The runs resume with a longer schedule than they started with: a deliberate config change.
    out = _sweep_cli(*args, '--config.allow_config_change=True').stdout
    assert out.count('resuming after step 3') == 2, out
    _check_finished_runs(workdir, interrupted='narrow')

    before = (workdir / 'wide' / 'seed1' / 'metrics.jsonl').read_text()
    out = _sweep_cli(*args).stdout
    assert out.count('skipped') == 4, out
    assert (workdir / 'wide' / 'seed1' / 'metrics.jsonl').read_text() == before

    out = _sweep_cli('--report', f'--workdir={workdir}').stdout
    table = (workdir / 'results.md').read_text()
    assert table in out
    rows = {r['variant']: r for r in csv.DictReader((workdir / 'results.csv').open())}
    runs = list(csv.DictReader((workdir / 'runs.csv').open()))
    assert list(rows) == ['narrow', 'wide'] and len(runs) == 4
    for variant, row in rows.items():
        _check_variant_row(workdir, variant, row, table)
    for run in runs:
        _check_run_row(workdir, run)
    assert float(rows['narrow']['macs']) < float(rows['wide']['macs'])
    _check_plots(workdir)


def _check_finished_runs(workdir: Path, interrupted: str) -> None:
    """Every run of the tiny sweep finished all 6 steps, the interrupted variant's on a second
    attempt, with its own seed and widths."""
    for variant in ('narrow', 'wide'):
        for seed in (0, 1):
            run_dir = workdir / variant / f'seed{seed}'
            # Resumed from the checkpoint at step 3, not restarted: every step logged once.
            assert [r['step'] for r in _records(run_dir, 'train')] == [1, 2, 3, 4, 5, 6]
            assert _records(run_dir, 'eval')[-1]['step'] == 6
            status = json.loads((run_dir / sweep.RUN_FILE).read_text())
            assert status['attempts'] == (2 if variant == interrupted else 1)
            assert status['finished'] and status['returncode'] == 0
            config = json.loads((run_dir / 'config.json').read_text())
            assert config['seed'] == seed
            assert tuple(config['model']['stage_widths']) == ((8, 8) if variant == 'narrow'
                                                              else (8, 16))


def _check_variant_row(workdir: Path, variant: str, row: dict, table: str) -> None:
    """A results.csv row (and its results.md line) against its two seeds' own metrics."""
    finals = [_records(workdir / variant / f'seed{s}', 'eval')[-1] for s in (0, 1)]
    for metric in ('top1', 'top5', 'loss'):
        values = [f[metric] for f in finals]
        assert float(row[f'{metric}_mean']) == pytest.approx(statistics.mean(values), 1e-12)
        assert float(row[f'{metric}_std']) == pytest.approx(statistics.stdev(values), 1e-12)
    top1 = ' ± '.join(f'{100 * v:.2f}' for v in (statistics.mean(f['top1'] for f in finals),
                                                 statistics.stdev(f['top1'] for f in finals)))
    assert f'| {variant} |' in table and top1 in table
    config = json.loads((workdir / variant / 'seed0' / 'config.json').read_text())
    assert int(row['params']) == _real_param_count(config)
    assert f"{int(row['params']):,}" in table
    assert row['seeds'] == '2' and row['steps'] == '6'


def _check_run_row(workdir: Path, run: dict) -> None:
    """A runs.csv row against that run's metrics.jsonl."""
    run_dir = workdir / run['variant'] / f"seed{run['seed']}"
    speeds = [r['images_per_sec'] for r in _records(run_dir, 'train')]
    assert float(run['images_per_sec']) == pytest.approx(statistics.median(speeds), 1e-12)
    assert float(run['top1']) == _records(run_dir, 'eval')[-1]['top1']
    assert float(run['train_loss']) == _records(run_dir, 'train')[-1]['loss']
    assert float(run['wall_time_sec']) > 0


def _check_plots(workdir: Path) -> None:
    for name, size in (('accuracy_vs_macs.png', (600, 400)),
                       ('accuracy_vs_params.png', (600, 400)), ('curves.png', (1000, 400))):
        path = workdir / name
        with Image.open(path) as image:
            assert image.format == 'PNG' and image.size == size
        assert path.stat().st_size < 150_000


def test_print_commands_reproduce_each_runs_config(tmp_path, monkeypatch):
    """Every printed train.py command parses (as train.py parses it) to the run's config."""
    out = _sweep_cli('--sweep=configs/ablations/block_type.py', f'--workdir={tmp_path}',
                     '--print-commands', '--config.data.dataset=cifar10',
                     '--config.seeds=(0,1,2)').stdout
    lines = out.strip().splitlines()
    base = _load('block_type')
    base.seeds = (0, 1, 2)  # a sweep field: it sets the runs, and is no train.py flag
    runs = sweep.plan(base, tmp_path)
    assert len(lines) == len(runs) == 4 * 3 and '--config.seeds' not in out
    for line, run in zip(lines, runs, strict=True):
        argv = shlex.split(line)
        assert argv[:3] == ['python', 'train.py', '--config=configs/ablations/block_type.py']
        assert f'--workdir={run.workdir}' in argv
        flag_values = flags.FlagValues()
        config_flags.DEFINE_config_file('config', flag_values=flag_values, sys_argv=argv[1:])
        flags.DEFINE_string('workdir', None, '', flag_values=flag_values)
        monkeypatch.chdir(REPO)  # the command's paths are relative to the repository root
        flag_values(argv[1:])  # as train.py's absl parses its argv
        parsed = flag_values.config
        expected = sweep.run_config(base, run, {'data.dataset': 'cifar10'})
        assert parsed.data.dataset == 'cifar10' and parsed.seed == run.seed
        training = lambda c: {k: v for k, v in c.to_dict().items() if k not in sweep.SWEEP_FIELDS}
        assert training(parsed) == training(expected)
    assert json.loads((tmp_path / sweep.SWEEP_FILE).read_text())['seeds'] == [0, 1, 2]


@pytest.mark.parametrize('name', [  # two here; every sweep with the slow tests (2-8 s each)
    n if n in ('block_type', 'depth') else pytest.param(n, marks=pytest.mark.slow)
    for n in ABLATIONS])
def test_ablation_sweeps_define_buildable_variants(name):
    config = _load(name)
    grid = sweep.variants(config)
    assert len(grid) >= 2 and sweep.seeds(config)
    configs = set()
    for run in sweep.plan(config, '/tmp/unused'):
        run_config = sweep.run_config(config, run)
        model = models.from_config(run_config.model)
        assert summary.summarize(model, image_size=run_config.data.image_size)['macs'] > 0
        assert sweep.final_step(run_config) > 0
        run_config.seed = 0
        configs.add(run_config.to_json_best_effort(sort_keys=True))
    assert len(configs) == len(grid), 'two variants train the same config'


def test_block_type_sweep_matches_compute_across_block_types():
    config = _load('block_type')
    cost = {}
    for variant in sweep.variants(config):
        run_config = sweep.run_config(config, sweep.Run(variant, 0, None))
        model = models.from_config(run_config.model)
        cost[variant.name] = (model.block, summary.summarize(model, image_size=16))
    for basic, bottleneck in (('basic-8', 'bottleneck-29-w4'), ('basic-14', 'bottleneck-29-w6')):
        assert cost[basic][0] == 'basic' and cost[bottleneck][0] == 'bottleneck'
        macs = cost[basic][1]['macs'], cost[bottleneck][1]['macs']
        assert abs(macs[0] - macs[1]) / macs[0] < 0.02, (basic, bottleneck, macs)
        assert cost[bottleneck][1]['layers'] > cost[basic][1]['layers']


def test_shortcut_sweep_is_option_a_b_c_in_order_of_parameters():
    config = _load('shortcut')
    grid = sweep.variants(config)
    assert [v.name for v in grid] == ['shortcut=A', 'shortcut=B', 'shortcut=C']
    params = [summary.summarize(models.from_config(
        sweep.run_config(config, sweep.Run(v, 0, None)).model), image_size=16)['params']
        for v in grid]
    assert params[0] < params[1] < params[2]  # A is parameter-free, C projects in every block


def test_product_axes_name_every_combination():
    config = digits.get_config()
    config.axes = [('model.block', ['basic', 'bottleneck']), ('model.stage_widths', [(8, 16)]),
                   ('optimizer.learning_rate', [0.1, 0.2])]
    grid = sweep.variants(config)
    assert [v.name for v in grid] == [
        'block=basic,stage_widths=8-16,learning_rate=0.1',
        'block=basic,stage_widths=8-16,learning_rate=0.2',
        'block=bottleneck,stage_widths=8-16,learning_rate=0.1',
        'block=bottleneck,stage_widths=8-16,learning_rate=0.2',
    ]
    assert grid[3].overrides == {'model.block': 'bottleneck', 'model.stage_widths': (8, 16),
                                 'optimizer.learning_rate': 0.2}


@pytest.mark.parametrize('axes, overrides, message', [
    ([{'name': 'a', 'model.dept': 8}], {}, "'model.dept'; did you mean model.depth"),
    ([{'model.depth': 8}], {}, "has no 'name'"),
    ([{'name': 'a', 'model.depth': 8}, {'name': 'a', 'model.depth': 14}], {}, 'more than once'),
    ([{'name': 'a b', 'model.depth': 8}], {}, 'names a directory'),
    ([{'name': 'a', 'seed': 3}], {}, '`seeds`'),
    ([('model.depth', [])], {}, 'neither'),
    ([{'name': 'a', 'model.depth': 8}], {'model.depth': 14}, 'varied by the sweep'),
    ([{'name': 'a', 'model.depth': 8}], {'seed': 1}, '`seeds`'),
    ([], {}, 'no `axes`'),
])
def test_bad_sweeps_fail_with_one_line_errors(axes, overrides, message):
    config = digits.get_config()
    config.axes = axes
    with pytest.raises(ValueError, match='.*') as error:
        sweep.check_overrides(config, overrides)
    assert message in str(error.value) and '\n' not in str(error.value)


def test_format_value_round_trips_through_config_flags():
    config = digits.get_config()
    values = {'model.stage_widths': (8,), 'model.shortcut': 'C', 'model.preactivation': True,
              'optimizer.learning_rate': 0.05, 'num_epochs': 2.5, 'data.mean_rgb': (0.5, 0.25, 1)}
    argv = ['prog', *(f'--config.{k}={sweep.format_value(v)}' for k, v in values.items())]
    flag_values = flags.FlagValues()
    config_flags.DEFINE_config_dict('config', config, flag_values=flag_values, sys_argv=argv)
    flag_values(argv)
    for key, value in values.items():
        node = flag_values.config
        for part in key.split('.'):
            node = node[part]
        assert node == value and type(node) is type(value), key
