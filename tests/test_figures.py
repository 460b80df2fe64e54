"""The figures the docs quote are docs/figures.json's, and figures.json is what the code produces.

docs/build_figures.py measures them and writes them into README.md, the configs' docstrings and
docs/ablations.md. The fast tests check that the docs quote figures.json as stored; the slow
ones retrain what is deterministic on a CPU (the quick start, one run of the shortcut sweep)
and compare the bits, so a trainer change that moves a number fails here, not in a reader's
hands.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.tiny import REPO, cpu_env, run_script

FIGURES = json.loads((REPO / 'docs' / 'figures.json').read_text())
RE_MEASURE = ('if the change is intended, re-measure with `python docs/build_figures.py '
              '--measure=...`, rebuild and commit docs/figures.json with the docs')


def load_builder():
    spec = importlib.util.spec_from_file_location('build_figures',
                                                  REPO / 'docs' / 'build_figures.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _final_eval(workdir) -> dict:
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return [r for r in records if r['split'] == 'eval'][-1]


def _same_cpu(record: dict) -> str:
    builder = load_builder()
    here, there = builder._cpu_model(), record['machine']['cpu']  # noqa: SLF001
    return '' if here == there else f' (measured on a {there}, this is a {here})'


# XLA compiles for the CPU it runs on (AVX2, AVX-512, ...), so float32 bits are a property of
# the CPU model as well as of the code: on the model that measured a figure it must come back
# bit for bit; on another, within one test image (1/360 of top-1) and 2% of the loss, which a
# change to the trainer's recipe would still exceed.
OTHER_CPU_TOP1 = 1.5 / 360
OTHER_CPU_LOSS = 0.02


def _reproduces(got: tuple[float, ...], stored: tuple[float, ...], record: dict) -> bool:
    if not _same_cpu(record):
        return got == stored
    top1_got, loss_got = got[0], got[-1]
    top1_stored, loss_stored = stored[0], stored[-1]
    return (abs(top1_got - top1_stored) <= OTHER_CPU_TOP1
            and abs(loss_got - loss_stored) <= OTHER_CPU_LOSS * loss_stored)


def test_docs_quote_the_stored_figures():
    builder = load_builder()
    assert builder.stale(FIGURES) == [], 'run `python docs/build_figures.py` and commit the docs'


def test_every_stored_figure_says_what_produced_it():
    records = [FIGURES['quickstart'], *FIGURES.get('sweeps', {}).values()]
    for record in records:
        assert len(record['commit']) == 40 and record['versions']['jax']
        assert record['machine']['cpus'] >= 1 and len(record['machine']['load_average_end']) == 3
    for sweep in FIGURES.get('sweeps', {}).values():
        assert {r['variant'] for r in sweep['runs']} == set(sweep['variants'])
        assert all(r['num_examples'] == 360 for r in sweep['runs'])  # every test digit


def test_readme_and_quick_start_config_quote_the_measured_top1():
    quick = FIGURES['quickstart']
    top1 = f"{100 * quick['top1']:.2f}%"
    assert top1 in (REPO / 'README.md').read_text()
    assert top1 in (REPO / 'configs' / 'digits.py').read_text()


@pytest.mark.slow
def test_quick_start_gives_the_documented_accuracy_bit_for_bit(tmp_path):
    quick = FIGURES['quickstart']
    run_script('train.py', ['--config=configs/digits.py', f'--workdir={tmp_path / "run"}'],
               env=cpu_env(), timeout=1500)
    final = _final_eval(tmp_path / 'run')
    assert final['step'] == quick['step']
    got = (final['top1'], final['ema_top1'], final['loss'])
    assert _reproduces(got, (quick['top1'], quick['ema_top1'], quick['loss']), quick), (
        f'the quick start now ends with top-1 {got[0]!r}, EMA {got[1]!r}, loss {got[2]!r}; '
        f"docs/figures.json says {quick['top1']!r}, EMA {quick['ema_top1']!r}, "
        f"loss {quick['loss']!r}"
        f'{_same_cpu(quick)}; {RE_MEASURE}')


@pytest.mark.slow
def test_a_shortcut_sweep_run_gives_its_documented_accuracy_bit_for_bit(tmp_path):
    # The cheapest sweep's first run, through the sweep runner itself.
    sweep = FIGURES['sweeps']['shortcut']
    stored = next(r for r in sweep['runs'] if r['variant'] == 'shortcut=A' and r['seed'] == 0)
    result = subprocess.run(
        [sys.executable, '-m', 'resnet_flax.sweep', '--sweep=configs/ablations/shortcut.py',
         f'--workdir={tmp_path}', '--variants=shortcut=A', '--config.seeds=(0,)'],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=1500)
    assert 'All runs finished' in result.stdout, result.stderr[-3000:]
    final = _final_eval(tmp_path / 'shortcut=A' / 'seed0')
    got = (final['top1'], final['loss'])
    assert _reproduces(got, (stored['top1'], stored['loss']), sweep), (
        f"shortcut=A seed 0 now gives top-1 {final['top1']!r}, loss {final['loss']!r}; "
        f"docs/figures.json says {stored['top1']!r}, {stored['loss']!r}{_same_cpu(sweep)}; "
        f'{RE_MEASURE}')


def test_accuracy_plots_have_no_overlapping_text():
    # Two variants at the same cost (the block-type sweep's budgets) once had their point
    # labels printed over each other.
    import matplotlib.pyplot as plt

    builder = load_builder()
    for key, sweep in FIGURES['sweeps'].items():
        fig = builder.accuracy_figure(sweep, 'macs', key)
        fig.canvas.draw()  # lays the text out as the saved PNG has it
        renderer = fig.canvas.get_renderer()
        ax = fig.axes[0]
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        ticks = ([t for t in ax.get_xticklabels() if x0 <= t.get_position()[0] <= x1] +
                 [t for t in ax.get_yticklabels() if y0 <= t.get_position()[1] <= y1])  # drawn
        texts = [ax.title, ax.xaxis.label, ax.yaxis.label, *ax.get_legend().get_texts(),
                 *ticks, *ax.texts]  # ax.texts: any label placed at a point
        boxes = [t.get_window_extent(renderer) for t in texts if t.get_text().strip()]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        plt.close(fig)
        assert [name.split(' (')[0] for name in legend] == sweep['variants']
        overlaps = [(a, b) for i, a in enumerate(boxes) for b in boxes[i + 1:] if a.overlaps(b)]
        assert not overlaps, f'{key}: {len(overlaps)} pairs of overlapping text'
