"""Builds docs/lesson.md and its pictures from the code. Nothing in the lesson is typed by hand.

    python docs/build_lesson.py              # lesson.md + docs/img/*.png, from the code (~1 min)
    python docs/build_lesson.py --measure    # first train and time on digits (~15 min, 2 cores)
    python docs/build_lesson.py --out /tmp/lesson.md --no-images   # what tests/test_lesson.py runs
    python docs/build_lesson.py --degradation DIR   # store a finished degradation sweep's runs

Every python block of the lesson is executed here and followed by what it printed; every `$`
command is run as a subprocess and followed by its stdout. Shapes, parameter counts, MACs and
layer counts are therefore live. The measurements (accuracy on the built-in digits data and
training images/s on this machine) take minutes, so `--measure` stores them in
docs/lesson_results.json and the lesson embeds that file: a rebuild without `--measure`
reproduces lesson.md byte for byte, which the test checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / 'docs'))  # build_figures, for the ablation sweeps it stores

LESSON = REPO / 'docs' / 'lesson.md'
RESULTS = REPO / 'docs' / 'lesson_results.json'
# The plain-vs-residual sweep (configs/ablations/degradation.py), stored by --degradation DIR.
DEGRADATION = REPO / 'docs' / 'degradation_results.json'
DEGRADATION_SWEEP = 'configs/ablations/degradation.py'

# ---------------------------------------------------------------------------------------------
# Measurements (--measure)

# The protocol, stored with the results. The digits are 8x8 images: at 16x16 the CIFAR-style
# nets see every pixel of them at a quarter of the 32x32 cost. Three seeds for the cheap
# ResNet-8 pair, two for the three larger budget models: that is what fits in ~15-20 minutes
# of two CPU cores shared with other work.
PROTOCOL = dict(config='configs/digits.py', image_size=16, num_epochs=10,
                seeds=dict(shortcut=[0, 1, 2], budget=[0, 1]),
                throughput_steps_per_window=10, throughput_windows=3)

# name -> `model` config overrides on top of configs/digits.py (a CIFAR ResNet-8, option A).
EXPERIMENTS: dict[str, dict[str, dict[str, Any]]] = {
    'shortcut': {
        'A (zero-pad)': dict(shortcut='A'),
        'B (projection)': dict(shortcut='B'),
    },
    'budget': {
        'basic-20': dict(depth=20, block='basic', shortcut='B'),
        'bottleneck-20': dict(depth=20, block='bottleneck', shortcut='B'),
        'bottleneck-26': dict(block='bottleneck', stage_sizes=(3, 3, 2), shortcut='B'),
    },
}


def experiment_config(model_overrides: dict[str, Any], seed: int) -> Any:
    """configs/digits.py at the protocol's size and length, one eval at the end."""
    from configs import digits

    config = digits.get_config()
    config.seed = seed
    config.data.image_size = PROTOCOL['image_size']
    # The stored results were measured without the quick start's shifts, smoothing and EMA.
    config.data.train_crop = 'none'
    config.label_smoothing = 0.0
    config.ema_decay = 0.0
    config.num_epochs = PROTOCOL['num_epochs']
    config.eval_every_epochs = PROTOCOL['num_epochs']
    config.checkpoint_every_steps = 10**9  # only the final one
    for key, value in model_overrides.items():
        config.model[key] = value
    return config


def _plain(tree: Any) -> Any:
    """JSON's view of a value (tuples become lists), to compare a stored protocol with ours."""
    return json.loads(json.dumps(tree))


def measure_accuracy(partial: Path) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """Trains every model of EXPERIMENTS for each of its seeds, keeping the final eval top-1.

    Seeds are the outer loop, so a change in the machine's load spreads over all models. Each
    finished run is saved to `partial` at once; a rerun with the same protocol resumes there."""
    from resnet_flax import train

    key = _plain(dict(protocol=PROTOCOL, experiments=EXPERIMENTS))
    saved = json.loads(partial.read_text()) if partial.exists() else {}
    runs = saved.get('runs', {}) if saved.get('key') == key else {}
    for seed in sorted({s for seeds in PROTOCOL['seeds'].values() for s in seeds}):
        for group, models in EXPERIMENTS.items():
            if seed not in PROTOCOL['seeds'][group]:
                continue
            for name, overrides in models.items():
                done = runs.setdefault(group, {}).setdefault(name, [])
                if any(r['seed'] == seed for r in done):
                    continue
                with tempfile.TemporaryDirectory() as workdir:
                    result = train.train_and_evaluate(experiment_config(overrides, seed), workdir)
                done.append(dict(seed=seed, top1=result['eval_top1'],
                                 train_loss=result['train_loss'],
                                 wall_time_sec=round(result['wall_time_sec'], 1)))
                partial.write_text(json.dumps(dict(key=key, runs=runs), indent=1) + '\n')
                print(f'[measure] {group} {name} seed {seed}: top1 {result["eval_top1"]:.4f}',
                      flush=True)
    return runs


def measure_throughput() -> dict[str, dict[str, Any]]:
    """Training images/s of every model: the trainer's jitted step (bench/common.py) on a real
    digits batch; windows taken round-robin over the models so that they share the load."""
    from bench import common

    runners = {}
    for group, models in EXPERIMENTS.items():
        for name, overrides in models.items():
            setup = common.setup_train(experiment_config(overrides, seed=0))
            runners[f'{group}/{name}'] = (common.TrainRunner(setup), setup.config.batch_size)
    for runner, _ in runners.values():
        runner(2)  # compile and warm up
    times: dict[str, list[float]] = {key: [] for key in runners}
    steps = PROTOCOL['throughput_steps_per_window']
    for _ in range(PROTOCOL['throughput_windows']):
        for key, (runner, _) in runners.items():
            start = time.perf_counter()
            runner(steps)
            times[key].append(time.perf_counter() - start)
    return {key: dict(common.throughput(times[key], steps, batch, 1), batch_size=batch)
            for key, (_, batch) in runners.items()}


def measure(partial: Path) -> dict[str, Any]:
    import jax
    from build_figures import provenance

    start, load_start = time.time(), os.getloadavg()
    runs = measure_accuracy(partial)
    throughput = measure_throughput()
    return dict(
        provenance=provenance(load_start),
        protocol=_plain(PROTOCOL),
        experiments=_plain(EXPERIMENTS),
        machine=dict(backend=jax.default_backend(), cpus=os.cpu_count(), jax=jax.__version__,
                     load_average_start=[round(x, 2) for x in load_start],
                     load_average_end=[round(x, 2) for x in os.getloadavg()]),
        minutes=round((time.time() - start) / 60, 1),
        runs=runs,
        throughput=throughput,
    )


def collect_degradation(sweep_dir: Path) -> dict[str, Any]:
    """The degradation sweep's runs as `resnet_flax.sweep --report` gathers them: final train
    and eval numbers of finished runs, train-loss curves and per-block gradient norms of all."""
    import jax

    from resnet_flax import metrics, sweep

    runs = []
    for record in sweep.report(sweep_dir)['runs']:
        model = record['config']['model']
        train = metrics.read_metrics(record['workdir'], 'train')
        runs.append(dict(
            variant=record['variant'], seed=record['seed'], depth=model['depth'],
            plain=model['shortcut'] == 'none', finished=record['finished'],
            step=train[-1]['step'] if train else 0, final_step=record['final_step'],
            train_loss=record['train_loss'], train_top1=record['train_top1'],
            top1=record['top1'], eval_loss=record['loss'],
            wall_time_sec=record['wall_time_sec'],
            train_curve=[[s, round(v, 6)] for s, v in record['train_curve']],
            grad_norms=record['grad_norms']))
    return dict(sweep=DEGRADATION_SWEEP, machine=dict(
        backend=jax.default_backend(), cpus=os.cpu_count(), jax=jax.__version__,
        note='2 CPU cores shared with other jobs (load average 15-20)'), runs=runs)


# ---------------------------------------------------------------------------------------------
# Running the lesson's code


def run_python(code: str) -> str:
    """Executes a lesson snippet in a fresh namespace; returns what it printed."""
    code = textwrap.dedent(code).strip()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, '<lesson>', 'exec'), {'__name__': '__lesson__'})  # noqa: S102
    return f'```python\n{code}\n```\n\n```text\n{out.getvalue().rstrip()}\n```\n'


def run_shell(command: str, images: bool = True) -> str:
    """Runs a `python ...` command from the repository root; returns it and its stdout.

    With images=False a command that writes a picture is shown but not run (the test does
    not redraw them); its printed text then comes from running it with --out removed."""
    args = shlex.split(command)
    if not images and '--out' in args:
        at = args.index('--out')
        args = args[:at] + args[at + 2:]
    env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=str(REPO))
    result = subprocess.run([sys.executable, *args[1:]], cwd=REPO, env=env, capture_output=True,
                            text=True, timeout=600)
    if result.returncode != 0:
        raise RuntimeError(f'{command} failed:\n{result.stderr[-3000:]}')
    lines = [line for line in result.stdout.rstrip().splitlines()
             if not line.startswith('wrote ')]
    output = '\n'.join(lines)
    block = f'```console\n$ {command}\n'
    return block + (f'{output}\n```\n' if output else '```\n')


def picture(path: str, alt: str, width: str = '') -> str:
    size = f' width="{width}"' if width else ''
    return f'<img src="{path}" alt="{alt}"{size}>'


# ---------------------------------------------------------------------------------------------
# Numbers from the stored measurements


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _top1(runs: list[dict[str, Any]]) -> dict[str, Any]:
    values = [100 * r['top1'] for r in runs]
    mean, sd = _mean_sd(values)
    return dict(values=values, mean=mean, sd=sd, low=min(values), high=max(values))


def _cost(overrides: dict[str, Any]) -> dict[str, Any]:
    """Layers, params and MACs of an experiment's model at the protocol's image size (live)."""
    from resnet_flax import models, summary

    config = experiment_config(overrides, seed=0)
    model = models.from_config(config.model)
    s = summary.summarize(model, config.data.image_size)
    return dict(layers=s['layers'], params=s['params'], macs=s['macs'], block=model.block,
                sizes='-'.join(map(str, model.stage_sizes)))


def _digits_info() -> Any:
    from resnet_flax import data

    return data.get_info(experiment_config({}, seed=0).data)


def _table(header: list[str], rows: list[list[str]], align: str = '') -> str:
    align = align or 'l' + 'r' * (len(header) - 1)
    rule = ['---:' if a == 'r' else '---' for a in align]
    lines = [header, rule, *rows]
    return '\n'.join('| ' + ' | '.join(line) + ' |' for line in lines) + '\n'


def _seeds(t: dict[str, Any]) -> str:
    return ', '.join(f'{v:.1f}' for v in t['values'])


def _resolved(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Is the difference of two means larger than the seeds' scatter (sd, and no overlap)?"""
    overlap = a['low'] <= b['high'] and b['low'] <= a['high']
    return not overlap and abs(b['mean'] - a['mean']) > max(a['sd'], b['sd'])


def _verdict(a: dict[str, Any], b: dict[str, Any]) -> str:
    """How a difference of means compares with the seed-to-seed spread."""
    diff = b['mean'] - a['mean']
    spread = max(a['sd'], b['sd'])
    if not _resolved(a, b):
        return (f'{diff:+.1f} points, which is within the seed-to-seed spread (the ranges '
                f'{a["low"]:.1f}-{a["high"]:.1f} and {b["low"]:.1f}-{b["high"]:.1f} overlap): '
                'no difference this experiment can resolve')
    return (f'{diff:+.1f} points, larger than the seed-to-seed spread (standard deviation '
            f'up to {spread:.1f}; the ranges do not overlap)')


# ---------------------------------------------------------------------------------------------
# The lesson, section by section



def _measured_when(results: dict[str, Any]) -> str:
    """When and with what code the stored training runs were made, and what changed since."""
    made = results['provenance']
    commit = made.get('commit') or made['stored_in_commit']
    return (f"They were made on {made['date'][:10]} (commit {commit[:8]}). Later trainer "
            'changes (the uint8 input and the CPU convolutions of 2026-12-02) change the bits of '
            'each run, so a new `--measure` gives other per-seed numbers: compare the spread '
            'between seeds and the speed ratios, not single values.')


def header(results: dict[str, Any]) -> str:
    return f"""# Residual blocks, runnable: the lesson in this codebase's terms

<!-- Generated by docs/build_lesson.py. Do not edit by hand: edit the script and rebuild. -->

This page is generated by `python docs/build_lesson.py` from the code in `resnet_flax/`. Every
table, shape, count and picture below is what the code shown just above it printed or drew.
The training measurements were made by `python docs/build_lesson.py --measure`
({results['minutes']} minutes on this machine) and are stored in
[`lesson_results.json`](lesson_results.json), which this page embeds. {_measured_when(results)}
`tests/test_lesson.py` rebuilds the page and fails if the committed copy has drifted from the
code.

The lesson on residual blocks ends with two questions, answered with evidence at the end:

1. Why must the shortcut be adjusted, for example with a 1x1 convolution, when the main path
   changes dimension? ([answer](#5-question-1-why-the-shortcut-must-adapt))
2. With a limited compute budget but a need for a deep network, which block would you choose,
   and why? ([answer](#6-question-2-which-block-for-a-deep-network-on-a-budget))

Contents:

- [1. H(x) = F(x) + x](#1-hx--fx--x)
- [2. Anatomy of a block: basic and bottleneck](#2-anatomy-of-a-block-basic-and-bottleneck)
- [3. Stages](#3-stacking-blocks-into-stages-and-why-the-first-block-downsamples)
- [4. How the names count layers](#4-how-the-names-count-layers)
- [5. Question 1: the shortcut](#5-question-1-why-the-shortcut-must-adapt)
- [6. Question 2: the budget](#6-question-2-which-block-for-a-deep-network-on-a-budget)
- [7. Rebuilding this page](#7-rebuilding-this-page)
"""


PIECES = _table(['piece of the lesson', 'where it is in `resnet_flax/`'], [
    ['F(x), the residual branch',
     '`BasicBlock.__call__`, `BottleneckBlock.__call__` in '
     '[`blocks.py`](../resnet_flax/blocks.py)'],
    ['x, the shortcut (identity, zero-padded identity or 1x1 projection)',
     '`blocks.shortcut()`; `blocks.needs_projection()` decides when to project'],
    ['the `+` and the ReLU after it', 'the last line of each block: `self.act(y + residual)`'],
    ['stacking blocks into stages, the stride-2 first block',
     '`models.ResNet.__call__` in [`models.py`](../resnet_flax/models.py)'],
    ["the family's names and depths",
     '`models.REGISTRY`, `models.IMAGENET_DEPTHS`, `models.resolve()`'],
    ['parameters, MACs and layer counts',
     '[`summary.py`](../resnet_flax/summary.py) (`python -m resnet_flax.summary`)'],
    ['the pictures on this page',
     '[`diagram.py`](../resnet_flax/diagram.py) (`python -m resnet_flax.diagram`)'],
], align='ll')


def section_residual() -> str:
    source = run_python("""
        import inspect
        from resnet_flax import blocks

        print(inspect.getsource(blocks.BasicBlock))
    """)
    identity = run_python("""
        import jax
        import jax.numpy as jnp
        from resnet_flax import models

        images = jax.random.normal(jax.random.key(0), (2, 32, 32, 3))
        for zero_init in (True, False):
            # zero_init_last_bn: the BN at the end of F starts with scale 0, so F(x) = 0
            model = models.create('resnet20', zero_init_last_bn=zero_init)
            variables = model.init(jax.random.key(1), images, train=False)
            _, state = model.apply(variables, images, train=False, capture_intermediates=True,
                                   mutable=['intermediates'])
            x = state['intermediates']['stage1_block1']['__call__'][0]  # input of block 2
            h = state['intermediates']['stage1_block2']['__call__'][0]  # its output H(x)
            print(f'zero_init_last_bn={zero_init}: H(x) == x exactly? {bool(jnp.all(h == x))}')
    """)
    return f"""
## 1. H(x) = F(x) + x

A plain stack of layers has to learn the whole mapping H(x) it is asked for. A residual block
learns only the *residual* F(x) = H(x) - x and adds its input back: H(x) = F(x) + x, followed by
a ReLU. If the best a block can do is to change nothing, F only has to go to zero; and the
gradient reaches earlier layers through the `+` without passing through F's layers. This is
what lets networks of hundreds of layers train (the family below goes up to ResNet-1202).

Where each piece lives:

{PIECES}
The whole basic block, as the code has it: conv, BN, ReLU, conv, BN, add the shortcut, ReLU.

{source}
The identity is easy to reach. With `zero_init_last_bn=True` the last BN of F starts with a
zero scale, so F(x) = 0 and the block computes ReLU(0 + x) = x (x is already non-negative: it
is the previous block's ReLU output). A block of the real ResNet-20 then passes its input
through unchanged, to the last bit:

{identity}"""


def _pm_cell(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    if not values:
        return 'n/a'
    mean, sd = _mean_sd([scale * v for v in values])
    return f'{mean:.{digits}f}' + (f' ± {sd:.{digits}f}' if len(values) > 1 else '')


def _loss_at(run: dict[str, Any], step: int) -> float:
    """The train loss of the last logged window at or before `step`."""
    return [loss for s, loss in run['train_curve'] if s <= step][-1]


def _degradation_table(runs: list[dict[str, Any]]) -> tuple[str, dict[int, int]]:
    """Final train loss, train and test error per (depth, plain/residual), and the train loss
    of both at the last step every run of that depth reached (unfinished runs included)."""
    rows, common = [], {}
    for depth in sorted({r['depth'] for r in runs}):
        same_depth = [r for r in runs if r['depth'] == depth]
        common[depth] = min((r['step'] for r in same_depth if r['train_curve']), default=0)
        for plain in (True, False):
            group = [r for r in same_depth if r['plain'] == plain]
            done = [r for r in group if r['finished']]
            at_common = [_loss_at(r, common[depth]) for r in group if r['train_curve']]
            stopped = ', '.join(f"seed {r['seed']} stopped at step {r['step']}"
                                for r in group if not r['finished'])
            rows.append([
                f"{'plain' if plain else 'resnet'}{depth}", str(len(done)) + (
                    f' ({stopped})' if stopped else ''),
                _pm_cell([r['train_loss'] for r in done], digits=4),
                _pm_cell([1 - r['train_top1'] for r in done], 100),
                _pm_cell([1 - r['top1'] for r in done], 100),
                _pm_cell(at_common, digits=4) + f' (step {common[depth]})'])
    header = ['net', 'finished seeds', 'final train loss', 'train error (%)', 'test error (%)',
              'train loss, all runs at one step']
    return _table(header, rows), common


def _grad_norm_table(runs: list[dict[str, Any]]) -> str:
    """Gradient norm of the first and the last block, early and over training (seed means)."""
    rows = []
    for depth in sorted({r['depth'] for r in runs}):
        for plain in (True, False):
            group = [r['grad_norms'] for r in runs
                     if r['depth'] == depth and r['plain'] == plain and r['grad_norms']]
            if not group:
                continue
            cells = []
            for when in ('first', 'mean'):
                first = statistics.mean(g[when][0] for g in group)
                last = statistics.mean(g[when][-1] for g in group)
                cells += [f'{first:.3f}', f'{last:.3f}', f'{first / last:.2f}']
            rows.append([f"{'plain' if plain else 'resnet'}{depth}", str(len(group[0]['first'])),
                         *cells])
    header = ['net', 'blocks', 'block 1, first window', 'last block, first window', 'ratio',
              'block 1, whole run', 'last block, whole run', 'ratio']
    return _table(header, rows)


def _group(runs: list[dict[str, Any]], depth: int, plain: bool) -> list[dict[str, Any]]:
    return [r for r in runs if r['depth'] == depth and r['plain'] == plain]


def _degradation_verdict(runs: list[dict[str, Any]], common: dict[int, int]) -> str:
    """What the table shows, in sentences whose numbers come from the stored runs."""
    depths = sorted(common)
    final = {}  # (depth, plain) -> mean final train loss of the finished seeds
    for depth in depths:
        for plain in (True, False):
            done = [r['train_loss'] for r in _group(runs, depth, plain) if r['finished']]
            if done:
                final[depth, plain] = statistics.mean(done)
    plain_depths = [d for d in depths if (d, True) in final]
    lines = []
    if len(plain_depths) > 1:
        shallow, deep = plain_depths[0], plain_depths[-1]
        lines.append(
            f'The plain nets degrade with depth, in *training* loss: plain{deep} ends at a train '
            f'loss {final[deep, True] / final[shallow, True]:.0f} times plain{shallow}\'s '
            f'({final[deep, True]:.4f} against {final[shallow, True]:.4f}), so this is an '
            'optimisation failure, not overfitting, as in the paper.')
    for depth in depths:
        step = common[depth]
        pair = {plain: [_loss_at(r, step) for r in _group(runs, depth, plain)
                        if r['train_curve']] for plain in (True, False)}
        unfinished = [r for r in runs if r['depth'] == depth and not r['finished']]
        if unfinished and pair[True] and pair[False]:
            lines.append(
                f'At depth {depth} not every run finished on this machine; at step {step}, '
                f'which all of them reached, plain{depth} is at a train loss of '
                f'{statistics.mean(pair[True]):.4f} and resnet{depth} at '
                f'{statistics.mean(pair[False]):.4f}.')
    for depth in depths:
        if (depth, True) in final and (depth, False) in final:
            ratio = final[depth, True] / final[depth, False]
            lines.append(f'At depth {depth} plain and residual end at train losses of '
                         f'{final[depth, True]:.4f} and {final[depth, False]:.4f} '
                         f'(ratio {ratio:.2f}).')
    lines.append(
        'The shallow nets fit the 1,437 training digits completely, with or without shortcuts, '
        'so at 8 and 20 layers the test error differences are of the order of the seed spread '
        '(one or two seeds, one digit = 0.28 points); the effect this small data set shows '
        'clearly is the deep plain net failing to train.')
    return ' '.join(lines)


def _gradient_verdict(runs: list[dict[str, Any]]) -> str:
    ratios = {}
    for depth in sorted({r['depth'] for r in runs}):
        for plain in (True, False):
            group = [r['grad_norms'] for r in _group(runs, depth, plain) if r['grad_norms']]
            if group:
                ratios[depth, plain] = statistics.mean(g['first'][0] / g['first'][-1]
                                                       for g in group)
    plain = ', '.join(f'{ratios[d, True]:.1f}x at {d} layers' for d, p in ratios if p)
    residual = ', '.join(f'{ratios[d, False]:.1f}x at {d} layers' for d, p in ratios if not p)
    return (
        'In the first window the plain nets\' gradient grows towards the input, the more the '
        f'deeper the net (block 1 against the last block: {plain}); with shortcuts the profile '
        f'grows far less ({residual}). So the plain nets here do not suffer from *vanishing* '
        'gradients (BN prevents that, as He et al. argue) but from gradients that *explode* '
        'towards the input, as mean-field theory predicts for deep BN networks (Yang et al. '
        '2019): one learning rate has to serve blocks whose gradients differ by orders of '
        'magnitude. The identity path gives every block a direct route to the loss, and the '
        'norms stay within a small factor of each other.')


def section_degradation() -> str:
    stored = json.loads(DEGRADATION.read_text())
    runs = stored['runs']
    table, common = _degradation_table(runs)
    return f"""
### Without the `+`: plain networks, measured

`model.shortcut='none'` builds the same blocks with no shortcut and no addition (a ReLU where
the add-then-ReLU was): the paper's *plain* networks, with exactly the residual nets' parameters
when the shortcuts are parameter-free (option A, the CIFAR nets). `plain20` ... `plain110` and
`plain18`/`plain34` are named members. He et al. 2015 found that plain nets get *worse* as they
get deeper, in training error too (so it is not overfitting): on CIFAR-10 plain-56 trains and
tests worse than plain-20 (Fig. 6, left), while ResNet-56 beats ResNet-20 (Fig. 6, middle;
Table 6: 8.75% / 7.51% / 7.17% / 6.97% test error for ResNet-20/32/44/56); on ImageNet plain-34
has 28.54% top-1 error against plain-18's 27.94%, while ResNet-34 has 25.03% against ResNet-18's
27.88% (Table 2).

The sweep [`{stored['sweep']}`](../{stored['sweep']}) repeats the experiment at the scale of
this machine ({stored['machine']['note']}): the CIFAR-style nets on the digits at 16x16, widths
8/16/32, 15 epochs of 22 steps, option-A shortcuts, every block's gradient norm logged
(`config.log_block_grad_norms`). Train numbers are the last logged window (11 steps, BN in
training mode); test error is on the 360 held-out digits (one digit = 0.28 points). Mean ± sample
std over the finished seeds:

{table}
{_degradation_verdict(runs, common)}

The gradient norm of each block (the L2 norm of its parameters' gradient, `grad_norm/stageI_blockJ`
in `metrics.jsonl`), for the block next to the input and the one next to the head, in the first
logged window (steps 1-11) and averaged over the run; mean over seeds. The plots are in
[ablations.md](ablations.md#the-degradation-problem-plain-vs-residual-networks).

{_grad_norm_table(runs)}
{_gradient_verdict(runs)}
"""


def section_blocks(images: bool) -> str:
    cost = run_python("""
        import math
        import jax
        from resnet_flax import models, summary

        def block_cost(model, block, image_size=224):
            traced = summary.trace(model, image_size)
            weights = jax.tree.leaves(traced['variables']['params'][block])
            params = sum(math.prod(w.shape) for w in weights)
            macs = sum(layer['macs'] for layer in traced['layers'] if layer['path'][0] == block)
            shape = next(b['output_shape'] for b in traced['blocks'] if b['path'][0] == block)
            return params, macs, 'x'.join(map(str, shape))

        wide_basic = models.create('resnet18', stage_widths=(256, 512, 1024, 2048))
        rows = {
            'basic block, ResNet-18': block_cost(models.create('resnet18'), 'stage1_block2'),
            'bottleneck block, ResNet-50': block_cost(models.create('resnet50'), 'stage1_block2'),
            'basic block as wide as the bottleneck': block_cost(wide_basic, 'stage1_block2'),
        }
        for name, (params, macs, shape) in rows.items():
            print(f'{name:38s} out {shape:10s} {params:>9,} params {macs / 1e6:8.1f}M MACs')
        bottleneck, wide = rows['bottleneck block, ResNet-50'], rows[
            'basic block as wide as the bottleneck']
        print(f'wide basic / bottleneck: {wide[1] / bottleneck[1]:.1f}x the MACs')
    """)
    return f"""
## 2. Anatomy of a block: basic and bottleneck

Both block types stack conv -> BN -> ReLU units on the main path and end with the addition and
a last ReLU. The **basic block** (ResNet-18/34 and the CIFAR nets) has two 3x3 convs at the same
width. The **bottleneck block** (ResNet-50 and deeper) has three: a 1x1 conv that reduces the
channels four-fold, a 3x3 conv at the reduced width, and a 1x1 conv that expands them back.

The pictures are drawn by `resnet_flax/diagram.py` from a trace of the model
(`jax.make_jaxpr` on abstract inputs, so nothing is computed): every box is an operation the
model runs, labelled with the kernel, stride and output channels its convolution really has,
and the shortcut is found by following the data into the block's addition. Each picture shows
the first block whose shortcut is the identity, the first block that downsamples, and the
stage layout with the shape after every stage.

{run_shell('python -m resnet_flax.diagram resnet18 --text --out docs/img/resnet18.png', images)}
{picture('img/resnet18.png', 'ResNet-18: basic blocks and stage layout')}

{run_shell('python -m resnet_flax.diagram resnet50 --text --out docs/img/resnet50.png', images)}
{picture('img/resnet50.png', 'ResNet-50: bottleneck blocks and stage layout')}

What the two designs buy: a bottleneck block carries four times as many channels from block
to block as its 3x3 conv works on (compare the `out` column below), for about the same
parameters and MACs as a basic block, because that 3x3 conv, the expensive layer, runs at the
reduced width. A basic block that carried as many channels would cost many times more:

{cost}"""


def _stage_loop_source() -> str:
    """The lines of models.ResNet.__call__ that stack the blocks into stages."""
    return run_python("""
        import inspect
        import textwrap
        from resnet_flax import models

        lines = inspect.getsource(models.ResNet.__call__).splitlines()
        start = next(i for i, line in enumerate(lines) if 'for i, (size, width)' in line)
        end = next(i for i, line in enumerate(lines) if "name=f'stage{i}_block{j}'" in line)
        print(textwrap.dedent('\\n'.join(lines[start:end + 1])))
    """)


def _resnet50_block_table() -> str:
    """Every block of ResNet-50: input and output shapes, shortcut kind and MACs."""
    return run_python("""
        from resnet_flax import diagram, models, summary

        model = models.create('resnet50')
        network = diagram.trace(model, name='resnet50')
        layers = summary.trace(model, 224)['layers']
        dims = lambda shape: 'x'.join(map(str, shape))
        print(f"{'block':14s} {'input':>10s} -> {'output':10s} {'shortcut':11s} {'MACs':>8s}")
        for block in network.blocks:
            macs = sum(layer['macs'] for layer in layers if layer['path'][0] == block.name)
            print(f'{block.name:14s} {dims(block.in_shape):>10s} -> {dims(block.out_shape):10s} '
                  f'{block.shortcut_kind:11s} {macs / 1e6:7.1f}M')
        changing = [b.name for b in network.blocks if b.in_shape != b.out_shape]
        print(f'{len(changing)} of {len(network.blocks)} blocks change the shape: '
              f'{", ".join(changing)}')
    """)


def _stride_placement_macs() -> str:
    """ResNet-50's MACs with the stride on the first 1x1 conv (v1) and on the 3x3 conv (v1.5)."""
    return run_python("""
        from resnet_flax import models, summary

        for placement in ('v1', 'v1.5'):
            s = summary.summarize(models.create('resnet50', stride_placement=placement))
            print(f"stride on the {'first 1x1' if placement == 'v1' else '3x3'} conv "
                  f"({placement}): {s['macs'] / 1e9:.2f}G MACs")
    """)


def section_stages() -> str:
    loop, per_block = _stage_loop_source(), _resnet50_block_table()
    placement = _stride_placement_macs()
    return f"""
## 3. Stacking blocks into stages, and why the first block downsamples

A ResNet is a stem, then stages of blocks, then a global average pool and a dense layer. All
blocks of a stage have the same width. The first block of every stage after the first halves
the height and width (stride 2) and doubles the width; the others keep the shape. In
`models.ResNet.__call__`:

{loop}
The per-stage table of ResNet-50 at 224x224, from shape inference (`summary.py`):

{run_shell('python -m resnet_flax.summary resnet50')}
and of the quick-start model, the CIFAR ResNet-8 of `configs/digits.py`:

{run_shell('python -m resnet_flax.summary --config=configs/digits.py')}
Every block of ResNet-50, with the shape it receives and returns and what it costs:

{per_block}
Why the downsampling sits at the first block of a stage:

- **Only one block per stage has to adapt its shortcut.** The shape changes once, where the
  stage begins, so that one block (in ResNet-50 also the very first, which widens the stem's
  output four-fold) needs a shortcut that is not the identity; all the other blocks keep the
  free identity shortcut and the clean gradient path through it. The same stride is applied
  to the main path and to the shortcut of that block, so F(x) and x arrive at the `+` with
  the same shape.
- **Every block then costs the same.** Halving height and width divides the positions by 4,
  doubling the width multiplies the cost per position by 4, so a block in stage 4 costs what
  a block in stage 1 costs (the identity blocks above are equal to the MAC). The network can
  grow deep in any stage at the same price per block.
- **The rest of the stage runs on the smaller map.** Reducing the resolution as early as
  possible means the stage's other blocks all work at the lower resolution. Where the stride
  sits *inside* that first block is the same trade-off at a smaller scale: the paper put it on
  the first 1x1 conv (v1), torchvision and this code default to the 3x3 conv (v1.5), which
  costs more MACs and loses less information (a strided 1x1 conv skips three pixels out of
  four):

{placement}"""


def section_names() -> str:
    names = run_python("""
        from resnet_flax import models, summary

        print(f"{'name':18s} {'block':10s} {'blocks per stage':17s} {'2 + k x blocks':20s} "
              f"{'layers':>6s} {'weight layers':>13s} {'params':>8s}")
        for name in models.names():
            model = models.create(name)
            s = summary.summarize(model)
            k = 2 if model.block == 'basic' else 3  # convs on the main path of a block
            n = sum(model.stage_sizes)
            rule = f'2 + {k} x {n} = {2 + k * n}'
            print(f"{name:18s} {model.block:10s} {'-'.join(map(str, model.stage_sizes)):17s} "
                  f"{rule:20s} {s['layers']:6d} {s['weight_layers']:13d} "
                  f"{s['params'] / 1e6:7.2f}M")
    """)
    return f"""
## 4. How the names count layers

The number in a name counts the layers with weights along the main path: the stem's conv, the
convs on the main path of every block, and the final dense layer. Shortcut projections, BN,
ReLU and pooling are not counted. A name is therefore 2 + k x (number of blocks), with k = 2
convs per basic block and k = 3 per bottleneck block. ImageNet nets take their blocks per
stage from the paper's table (`models.IMAGENET_DEPTHS`); CIFAR nets have three stages of n
blocks each, so 6n + 2 layers with basic blocks (`models.resolve`). The deep stem of
ResNet-50-D has three 3x3 convs where ResNet-50 has one 7x7 conv; it still counts as one layer
for the name, and only its weight-layer count shows the difference. Wide ResNets and ResNeXts
change widths and groups, not depth, and keep the name of the depth they are built on. For
every member of the family, `summary.py` counts the layers from the traced model, and the rule
agrees:

{names}"""


def question_shortcut(results: dict[str, Any], images: bool) -> str:
    return f"""
## 5. Question 1: why the shortcut must adapt

*Why must the shortcut be adjusted, for example with a 1x1 convolution, when the main path
changes dimension?*

{_identity_shortcut_fails()}
{_shortcut_fixes(images)}
{_shortcut_measurements(results)}"""


def _identity_shortcut_fails() -> str:
    """What the code says when x cannot be added to F(x) as it is."""
    error = run_python("""
        import jax
        import jax.numpy as jnp
        from resnet_flax import models

        # shortcut='identity': H(x) = F(x) + x with x never adapted.
        for name, size in (('resnet20', 32), ('resnet50', 224)):
            try:
                models.create(name, shortcut='identity').init(
                    jax.random.key(0), jnp.zeros((1, size, size, 3)), train=False)
            except ValueError as error:
                print(f'{name}: {type(error).__name__}: {error}')
    """)
    refusal = run_python("""
        from resnet_flax import models

        try:
            models.create('resnet50', shortcut='A')
        except ValueError as error:
            print(f'ValueError: {error}')
    """)
    return f"""### What happens if the shortcut stays the identity

The addition in H(x) = F(x) + x is elementwise, so F(x) and x must have the same shape. The
first block of a stage makes F(x) smaller in height and width (stride 2) and wider in channels.
Build the real ResNet-20 and ResNet-50 with `shortcut='identity'`, which is what the formula
says literally: x is added as it is, never adapted.

{error}
In ResNet-20 the first block to fail is the first of stage 2, which halves the map and doubles
the channels; in ResNet-50 it is already the first block of stage 1, which keeps the
resolution but widens the channels four-fold (the bottleneck's expansion). Neither output can
be added to its input, and `blocks.shortcut` refuses with the error above. Option A has a
limit of its own: zero-padding cannot make the channels of a bottleneck's expansion, so
the configuration validation in `models.py` refuses it there:

{refusal}
So wherever the main path changes the shape, the shortcut has to change x to the same shape,
and it has to do it without destroying what makes the shortcut useful: a short, almost
unobstructed path for the signal and its gradient.
"""


def _shortcut_fixes(images: bool) -> str:
    """Options A and B: what they do, drawn, and what they cost."""
    costs = run_python("""
        from resnet_flax import models, summary

        print(f"{'model':30s} {'shortcut':8s} {'params':>10s} {'MACs':>14s} {'extra params':>13s}"
              f" {'extra MACs':>11s}")
        pairs = [('ResNet-8, configs/digits.py', 'resnet20', dict(depth=8), ('A', 'B')),
                 ('ResNet-56 (CIFAR)', 'resnet56', {}, ('A', 'B')),
                 ('ResNet-50 (ImageNet)', 'resnet50', {}, ('B', 'C'))]
        for title, name, fields, options in pairs:
            base = None
            for option in options:
                s = summary.summarize(models.create(name, shortcut=option, **fields))
                base = base or s
                extra_params = f"{100 * (s['params'] / base['params'] - 1):+.2f}%"
                extra_macs = f"{100 * (s['macs'] / base['macs'] - 1):+.2f}%"
                print(f"{title:30s} {option:8s} {s['params']:>10,} {s['macs']:>14,} "
                      f"{extra_params:>13s} {extra_macs:>11s}")
    """)
    a_cmd = ('python -m resnet_flax.diagram --config=configs/digits.py --blocks=stage2_block1 '
             "--nolayout --title='ResNet-8, option A' --text --out docs/img/shortcut_A.png")
    b_cmd = ('python -m resnet_flax.diagram --config=configs/digits.py '
             "--config.model.shortcut=B --blocks=stage2_block1 --nolayout "
             "--title='ResNet-8, option B' --text --out docs/img/shortcut_B.png")
    return f"""### The two fixes, side by side

- **Option A, zero-padding** (the CIFAR nets' default, `shortcut='A'`): take every second
  pixel (the same stride as the main path) and append zero channels. No parameters, no MACs.
  But three of every four positions are dropped, and the new channels carry nothing: only the
  main path can put information in them.
- **Option B, projection** (the ImageNet nets' default, `shortcut='B'`): a 1x1 conv with the
  block's stride, then BN (`proj_conv`, `proj_bn`), only in the blocks that change the shape.
  It learns how to map every input channel to every output channel. Option C
  (`shortcut='C'`) projects in every block, identity or not.

Drawn from the quick-start ResNet-8 of `configs/digits.py`, the first block of stage 2 with
each option:

{run_shell(a_cmd, images)}
{run_shell(b_cmd, images)}
<p>{picture('img/shortcut_A.png', 'option A: subsample and zero-pad', '45%')}
{picture('img/shortcut_B.png', 'option B: 1x1 projection', '45%')}</p>

What the projections cost, from `summary.py` at each model's own image size (32x32 for the
CIFAR nets, 224x224 for ResNet-50):

{costs}"""


def _shortcut_measurements(results: dict[str, Any]) -> str:
    protocol = results['protocol']
    group = EXPERIMENTS['shortcut']
    rows, tops = [], {}
    for name, overrides in group.items():
        cost = _cost(overrides)
        top = tops[name] = _top1(results['runs']['shortcut'][name])
        speed = results['throughput'][f'shortcut/{name}']
        rows.append([name, f"{cost['params']:,}", f"{cost['macs']:,}",
                     f"{speed['images_per_sec']:,.0f}", _seeds(top),
                     f"{top['mean']:.1f} ± {top['sd']:.1f}"])
    (a_name, a), (b_name, b) = tops.items()
    a_cost, b_cost = (_cost(o) for o in group.values())
    table = _table(['shortcut', 'params', 'MACs', 'train images/s', 'top-1 % per seed',
                    'top-1 % mean ± sd'], rows)
    info = _digits_info()
    return f"""
Measured on the built-in digits data ({info.num_train_examples:,} train and
{info.num_eval_examples:,} test images of handwritten digits):
the ResNet-8 of `configs/digits.py` trained for {protocol['num_epochs']} epochs at
{protocol['image_size']}x{protocol['image_size']} (the digits are 8x8 images, so 16x16 holds all
their pixels at a quarter of 32x32's cost), without its random shifts, label smoothing and
weight averaging, once per seed ({len(protocol['seeds']['shortcut'])}
seeds: {', '.join(map(str, protocol['seeds']['shortcut']))}). Params and MACs are at
{protocol['image_size']}x{protocol['image_size']}; images/s is the median of
{protocol['throughput_windows']} windows of {protocol['throughput_steps_per_window']} training
steps (see [Question 2](#6-question-2-which-block-for-a-deep-network-on-a-budget) for how).

{table}
Option B adds {b_cost['params'] - a_cost['params']:,} parameters
({100 * (b_cost['params'] / a_cost['params'] - 1):.1f}%) and
{b_cost['macs'] - a_cost['macs']:,} MACs
({100 * (b_cost['macs'] / a_cost['macs'] - 1):.1f}%). Its mean top-1 differs from option A's
by {_verdict(a, b)}.

{_answer_shortcut(a, b, a_cost, b_cost)}
"""


def _imagenet_pair() -> str:
    """ResNet-34 against ResNet-50, in numbers from summary.py."""
    from resnet_flax import summary

    s34, s50 = summary.summarize('resnet34'), summary.summarize('resnet50')
    features = [s['stages'][-2]['output_shape'][-1] for s in (s34, s50)]
    return (f"ResNet-34 and ResNet-50 cost about the same: ResNet-50 needs "
            f"{s50['macs'] / s34['macs']:.2f}x the MACs of ResNet-34, yet has "
            f"{s50['layers'] - s34['layers']} more layers and ends with "
            f"{features[1] // features[0]}x as many features ({features[1]:,} against "
            f"{features[0]:,}), because its bottleneck blocks spend their compute on a narrow 3x3 "
            "conv and pass wide features, made by cheap 1x1 convs, between blocks. Per MAC the "
            "bottleneck buys more depth and more width.")


def _answer_shortcut(a: dict[str, Any], b: dict[str, Any], a_cost: dict[str, Any],
                     b_cost: dict[str, Any]) -> str:
    diff = b['mean'] - a['mean']
    if _resolved(a, b):
        measured = (f"On digits the projection {'helped' if diff > 0 else 'hurt'} by "
                    f"{abs(diff):.1f} points, more than the seeds scatter.")
    else:
        measured = ('On digits the two fixes cannot be told apart: the difference in top-1 is '
                    'smaller than the scatter between seeds, for '
                    f"{100 * (b_cost['params'] / a_cost['params'] - 1):.1f}% more parameters. "
                    'This easy problem does not need the learned channel mixing; harder ones '
                    '(ImageNet) are where He et al. found projections ahead (2015, Table 3).')
    return f"""**Answer.** The shortcut must be adjusted because F(x) + x is an elementwise sum:
when the main path halves the resolution and widens the channels, x no longer has F(x)'s shape
and the sum is not defined (the error above). The adjustment must give x the new shape while
keeping the shortcut short and cheap. A 1x1 convolution with the block's stride does exactly
that: it is the cheapest layer that maps every input channel to every output channel at the new
resolution, and because the shape changes only in the first block of a stage it appears in only
a handful of blocks, so it costs little (the tables above). Zero-padding (option A) is the
free alternative: it fixes the shape but not the content, since the new channels start empty
and three of four positions are dropped. {measured}
"""


def question_budget(results: dict[str, Any]) -> str:
    protocol = results['protocol']
    group = EXPERIMENTS['budget']
    costs = {name: _cost(overrides) for name, overrides in group.items()}
    tops = {name: _top1(results['runs']['budget'][name]) for name in group}
    speed = {name: results['throughput'][f'budget/{name}'] for name in group}
    table = _budget_table(costs, tops, speed)
    basic, deep, matched = (costs[n] for n in group)
    b_name, d_name, m_name = group
    machine = results['machine']
    ratio = lambda a, b, key: f"{a[key] / b[key]:.2f}x"
    speed_ratio = lambda a, b: f"{speed[a]['images_per_sec'] / speed[b]['images_per_sec']:.2f}x"
    return f"""
## 6. Question 2: which block for a deep network on a budget

*With a limited compute budget but a need for a deep network, which block would you choose,
and why?*

### At ImageNet scale, from the code

{run_shell('python -m resnet_flax.summary --compare resnet18 resnet34 resnet50 resnet101')}
{_imagenet_pair()}

### Measured on the built-in digits data

Three CIFAR-style nets (widths 16/32/64 times the block's expansion, projection shortcuts in all
three so that only the block type differs), each trained as in Question 1: {protocol['num_epochs']}
epochs at {protocol['image_size']}x{protocol['image_size']}, seeds
{', '.join(map(str, protocol['seeds']['budget']))}.

- **Matched depth:** {b_name} against {d_name}, both {basic['layers']} layers.
- **Matched MACs:** {b_name} against {m_name}; the bottleneck net costs
  {ratio(matched, basic, 'macs')} the MACs with {matched['layers']} layers instead of
  {basic['layers']}.

Training images/s is the median of {protocol['throughput_windows']} windows of
{protocol['throughput_steps_per_window']} steps of the trainer's own jitted train step
(`train.jit_train_step`, through `bench/common.py`) at batch size
{speed[b_name]['batch_size']}, the windows taken in turn over all five models of this page so
that they share the machine's load (± is half the spread between windows). This machine:
{machine['cpus']} CPU cores (JAX backend: {machine['backend']}), shared with other work during the
measurement (load average {machine['load_average_start'][0]:.1f} at the start,
{machine['load_average_end'][0]:.1f} at the end), so treat the speeds as rough ratios.

{table}
- Matched depth: {d_name} has {ratio(deep, basic, 'params')} the parameters and
  {ratio(deep, basic, 'macs')} the MACs of {b_name}, and trains at
  {speed_ratio(d_name, b_name)} its images/s. Top-1: {_verdict(tops[b_name], tops[d_name])}.
- Matched MACs: {m_name} has {ratio(matched, basic, 'params')} the parameters and
  {ratio(matched, basic, 'macs')} the MACs of {b_name} with
  {matched['layers'] - basic['layers']} more layers, and trains at
  {speed_ratio(m_name, b_name)} its images/s. Top-1: {_verdict(tops[b_name], tops[m_name])}.

{_answer_budget(costs, tops, speed, names=list(group))}
"""


def _budget_table(costs: dict[str, Any], tops: dict[str, Any], speed: dict[str, Any]) -> str:
    rows = []
    for name, cost in costs.items():
        s, t = speed[name], tops[name]
        rows.append([name, cost['block'], cost['sizes'], str(cost['layers']),
                     f"{cost['params']:,}", f"{cost['macs']:,}",
                     f"{s['images_per_sec']:,.0f} (±{s['spread_pct'] / 2:.0f}%)", _seeds(t),
                     f"{t['mean']:.1f} ± {t['sd']:.1f}"])
    return _table(['model', 'block', 'blocks per stage', 'layers', 'params', 'MACs',
                   'train images/s', 'top-1 % per seed', 'top-1 % mean ± sd'], rows,
                  align='lllrrrrrr')


def _answer_budget(costs: dict[str, Any], tops: dict[str, Any], speed: dict[str, Any],
                   names: list[str]) -> str:
    basic, deep, matched = names
    rate = {n: speed[n]['images_per_sec'] for n in names}
    mac_rate = {n: rate[n] * costs[n]['macs'] for n in names}  # MACs per second, forward
    slower = [n for n in (deep, matched) if rate[n] < rate[basic]]
    speed_words = ('slower' if len(slower) == 2 else 'faster' if not slower else 'mixed')
    resolved = [_resolved(tops[basic], tops[n]) for n in (deep, matched)]
    accuracy = ('Accuracy did not separate them: every difference between the nets is smaller '
                'than the scatter between seeds, on a problem easy enough that all reach about '
                f"{min(t['mean'] for t in tops.values()):.0f}% or more."
                if not any(resolved) else
                'Accuracy did separate some of them (see the comparisons above).')
    param_ratio = costs[matched]['params'] / costs[basic]['params']
    if speed_words == 'slower':
        why = ('The likely reason is memory traffic rather than arithmetic: a bottleneck block '
               'has three convs, three BNs and four-times-wider activations between blocks where '
               'a basic block has two of each, and thin layers do little arithmetic per byte '
               'they move; on two CPU cores at these small widths that traffic, not the '
               'multiplications, sets the pace. At such widths, for time, the basic block is the '
               'better buy.')
        caveat = ('on this machine, with small widths, the same MACs ran markedly slower in '
                  'bottleneck blocks, and shallow, narrow nets (ResNet-18/34, the CIFAR nets) '
                  'are better served by basic blocks.')
    else:
        why = 'Here the savings in MACs did not cost speed.'
        caveat = 'here MACs and time agreed, which is not true of every machine.'
    return f"""**Answer.** It depends on what the budget counts, and the measurements separate the
two cases.

- *If the budget is MACs or parameters* (the lesson's "compute"), choose **bottleneck
  blocks**. At matched MACs the bottleneck net is deeper ({costs[matched]['layers']} layers
  against {costs[basic]['layers']} here, with {param_ratio:.2f}x the parameters; ResNet-50
  against ResNet-34 at ImageNet scale) and passes features four times wider than its 3x3 convs
  between blocks, because its one expensive layer, the 3x3 conv, runs
  at a quarter of the block's width. A basic block that carried as many channels would cost
  many times the MACs (section 2). This is why the family switches to bottleneck blocks from
  ResNet-50 on (`models.IMAGENET_DEPTHS`) and how ResNet-101 and -152 stay affordable.
- *If the budget is training time on this machine*, MACs are not time. Here the bottleneck
  nets trained at {rate[deep] / rate[basic]:.2f}x ({deep}) and {rate[matched] / rate[basic]:.2f}x
  ({matched}) the images/s of {basic} ({speed_words}), that is
  {mac_rate[deep] / mac_rate[basic]:.2f}x and {mac_rate[matched] / mac_rate[basic]:.2f}x its
  MACs per second. {why}
- {accuracy}

{_ablation_note()}

So for a deep network on a limited compute budget, the bottleneck block: it is the only one of
the two that buys depth and width at a price in MACs and parameters that stays affordable, as
ResNet-50 against ResNet-34 shows. Check the price in time on the target hardware, though:
{caveat}
"""


def _ablation_note() -> str:
    """How this answer squares with docs/ablations.md, which measured other bottleneck nets."""
    import build_figures

    sweep = build_figures.load().get('sweeps', {}).get('block_type')
    rerun = ''
    if sweep:
        diff, se, p, n = build_figures.block_type_pooled(sweep)
        rerun = (f' Its re-run with the current code ({n} runs of each block type, '
                 f'docs/figures.json) gives bottleneck {diff:+.2f} points (standard error '
                 f'{se:.2f}, p = {p:.2f}).')
    return ('**The ablation page measured other bottleneck nets, and found basic blocks better.** '
            '[docs/ablations.md](ablations.md#block-type-at-matched-compute) compares the two '
            'block types at equal MACs with half these widths and bottleneck nets made much '
            'thinner to match: 29 layers against 8 or 14, 3x3 convs of 4 to 24 channels, 1x1 '
            'convs that squeeze 16 channels into 4. There the basic nets were about 1.4 points '
            'better, with 5 seeds per net (its first measurement, 2026-11-29).' + rerun +
            ' Both results hold for what they measured: bottlenecks this thin lose accuracy and '
            'stability, while at the widths above (16 to 64 channels in the 3x3 convs) the '
            "difference stays within the seed spread. ImageNet's ResNet-50 (64 to 512 channels "
            "in its 3x3 convs) is nearer to this page's setting than to the ablation's.")


def section_rebuild(results: dict[str, Any]) -> str:
    return f"""
## 7. Rebuilding this page

```console
$ python docs/build_lesson.py            # this page and docs/img/*.png, from the code
$ python docs/build_lesson.py --measure  # re-train and re-time ({results['minutes']:.0f} min)
$ python -m pytest tests/test_lesson.py tests/test_diagram.py
```

`tests/test_lesson.py` rebuilds the page into a temporary file (without `--measure`, and
without redrawing the pictures) and compares it with this file byte for byte, so every shape,
parameter count, MAC count and layer count above is checked against the code on each test run.
`tests/test_diagram.py` runs the diagram command on ResNet-18 and ResNet-50 and checks that the
drawn labels are the model's.
"""


# ---------------------------------------------------------------------------------------------
# Command line


def _reflow(markdown: str, width: int = 96) -> str:
    """Rewraps the prose (paragraphs and list items) of generated markdown; code blocks,
    tables, headings and HTML stay as they are."""
    out: list[str] = []
    prose: list[list[str]] = []  # list items (or one paragraph), each a list of lines

    def flush() -> None:
        for item in prose:
            marker = re.match(r'^(- |\d+\. )', item[0])
            indent = ' ' * len(marker.group(1)) if marker else ''
            out.append(textwrap.fill(' '.join(line.strip() for line in item), width,
                                     subsequent_indent=indent, break_long_words=False,
                                     break_on_hyphens=False))
        prose.clear()

    fenced = False
    for line in markdown.splitlines():
        if line.startswith('```') or fenced:
            flush()
            out.append(line)
            fenced = fenced != line.startswith('```')
        elif not line.strip() or line.startswith(('|', '<', '#', '>')):
            flush()
            out.append(line)
        elif re.match(r'^(- |\d+\. )', line) or not prose:
            prose.append([line])
        else:
            prose[-1].append(line)
    flush()
    return '\n'.join(out) + '\n'


def build(results: dict[str, Any], images: bool) -> str:
    parts = [header(results), section_residual(), section_degradation(), section_blocks(images),
             section_stages(),
             section_names(), question_shortcut(results, images), question_budget(results),
             section_rebuild(results)]
    return _reflow('\n'.join(part.strip('\n') + '\n' for part in parts))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--measure', action='store_true',
                        help='train and time on digits first, writing --results (~15 min)')
    parser.add_argument('--out', default=str(LESSON), help='where to write the lesson')
    parser.add_argument('--results', default=str(RESULTS), help='the stored measurements')
    parser.add_argument('--no-images', dest='images', action='store_false',
                        help='do not redraw docs/img/*.png (the test uses this)')
    parser.add_argument('--degradation', metavar='DIR',
                        help=f'store the runs of a {DEGRADATION_SWEEP} sweep in {DEGRADATION}')
    args = parser.parse_args(argv)
    if args.degradation:
        stored = collect_degradation(Path(args.degradation))
        DEGRADATION.write_text(json.dumps(stored, indent=1) + '\n')
    results_path = Path(args.results)
    if args.measure:
        partial = results_path.with_name(results_path.stem + '.partial.json')
        results = measure(partial)
        results_path.write_text(json.dumps(results, indent=1) + '\n')
        partial.unlink(missing_ok=True)
    if not results_path.exists():
        raise FileNotFoundError(f'{results_path} is missing; run python docs/build_lesson.py '
                                '--measure to create it')
    results = json.loads(results_path.read_text())
    Path(args.out).write_text(build(results, args.images))
    print(f'wrote {args.out}')


if __name__ == '__main__':
    main()
