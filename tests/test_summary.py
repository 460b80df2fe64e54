"""The summary tool: MACs against published figures, layer counts, per-stage rows, the CLI."""

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_flax import models, summary

REPO = Path(__file__).resolve().parents[1]

# torchvision.models docs (GFLOPS column, which counts multiply-accumulates) at 224x224.
PUBLISHED_GMACS = {'resnet18': 1.81, 'resnet34': 3.66, 'resnet50': 4.09, 'resnet101': 7.80,
                   'resnet152': 11.51}


@functools.cache
def summarize(name: str, **overrides) -> dict:
    return summary.summarize(models.create(name, **overrides), name=name)


@pytest.mark.parametrize('name', sorted(PUBLISHED_GMACS))
def test_macs_match_published_figures_at_224(name):
    assert summarize(name)['macs'] / 1e9 == pytest.approx(PUBLISHED_GMACS[name], rel=0.02)


def test_v1_resnet50_macs_are_near_the_papers_3_8g():
    v1 = summarize('resnet50', stride_placement='v1')['macs']
    assert v1 / 1e9 == pytest.approx(3.8, rel=0.02)  # He et al. 2015, Table 1: 3.8 x 10^9
    assert v1 < summarize('resnet50')['macs']  # v1.5 strides later, so it costs more


def test_macs_are_exact_for_a_hand_counted_net():
    # One basic block per stage, widths 4 and 8, CIFAR stem of width 4, 8x8 RGB images.
    model = models.create('resnet20', num_classes=3, stage_sizes=(1, 1), stage_widths=(4, 8),
                          stem_width=4)
    s = summary.summarize(model, image_size=8)
    stem = 8 * 8 * 4 * (3 * 3 * 3)
    stage1 = 2 * 8 * 8 * 4 * (3 * 3 * 4)
    stage2 = 4 * 4 * 8 * (3 * 3 * 4) + 4 * 4 * 8 * (3 * 3 * 8)  # option A: a free shortcut
    head = 8 * 3
    assert [r['macs'] for r in s['stages']] == [stem, stage1, stage2, head]
    assert s['macs'] == stem + stage1 + stage2 + head
    assert [r['output_shape'] for r in s['stages']] == [(8, 8, 4), (8, 8, 4), (4, 4, 8), (3,)]


def test_grouped_conv_macs_are_divided_by_the_group_count():
    grouped = summarize('resnext50_32x4d')['macs']
    dense = summarize('resnet50', base_width=128)['macs']  # same widths, groups=1
    # Only the 3x3 convs differ: (blocks, output side, inner width) per stage, v1.5 strides.
    conv2 = sum(n * side * side * 9 * width * width
                for n, side, width in ((3, 56, 128), (4, 28, 256), (6, 14, 512), (3, 7, 1024)))
    assert dense - grouped == conv2 - conv2 // 32
    assert summarize('resnext50_32x4d')['macs'] / 1e9 == pytest.approx(4.23, rel=0.02)


# The deepest and widest nets take 3-20 s each to trace here: those run with the slow tests.
TRACED_SLOWLY = {'resnet1202', 'resnet200', 'resnet152', 'resnext101_32x8d', 'wide_resnet101_2'}


@pytest.mark.parametrize('name', [
    pytest.param(n, marks=pytest.mark.slow) if n in TRACED_SLOWLY else n for n in models.names()])
def test_layers_equal_the_number_in_the_name(name):
    expected = int(re.match(r'\D+(\d+)', name).group(1))
    assert summarize(name)['layers'] == expected


@pytest.mark.slow
def test_resnet1202_matches_the_papers_19_4m_params():
    assert summarize('resnet1202')['params'] == pytest.approx(19.4e6, rel=0.03)


def test_deep_stem_counts_as_one_layer_but_three_weight_layers():
    s = summarize('resnet50d')
    assert (s['layers'], s['weight_layers']) == (50, 52)
    assert summarize('resnet50')['weight_layers'] == 50


def test_se_and_projections_are_not_counted_as_layers():
    assert summarize('resnet50', se_ratio=1 / 16, shortcut='C')['layers'] == 50


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnet56'])
def test_stage_rows_add_up_to_the_totals(name):
    s = summarize(name)
    assert sum(r['params'] for r in s['stages']) == s['params']
    assert sum(r['macs'] for r in s['stages']) == s['macs']
    assert [r['blocks'] for r in s['stages'][1:-1]] == list(models.create(name).stage_sizes)


def test_stage_output_shapes_at_224():
    shapes = [r['output_shape'] for r in summarize('resnet50')['stages']]
    assert shapes == [(56, 56, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048),
                      (1000,)]
    cifar = [r['output_shape'] for r in summarize('resnet56')['stages']]
    assert cifar == [(32, 32, 16), (32, 32, 16), (16, 16, 32), (8, 8, 64), (10,)]


def test_format_summary_and_comparison_show_the_numbers():
    s = summarize('resnet18')
    text = summary.format_summary(s)
    assert '11,689,512' in text and 'stage4' in text and '7x7x512' in text
    table = summary.format_comparison([s, summarize('resnet50')])
    assert 'resnet18' in table and 'resnet50' in table and '25.56M' in table


def _cli(*args: str) -> str:
    result = subprocess.run([sys.executable, '-m', 'resnet_flax.summary', *args], cwd=REPO,
                            capture_output=True, text=True, timeout=120,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout


@pytest.mark.slow
def test_cli_json_and_config():
    by_name = json.loads(_cli('resnet50', '--json'))
    assert (by_name['params'], by_name['layers']) == (25_557_032, 50)
    assert by_name['macs'] == summarize('resnet50')['macs']
    by_config = json.loads(_cli('--config=configs/resnet50.py', '--config.model.depth=101',
                                '--json'))
    assert (by_config['params'], by_config['layers']) == (44_549_160, 101)


@pytest.mark.slow
def test_cli_compare_and_table():
    table = _cli('--compare', 'resnet34', 'resnet50')
    assert 'resnet34' in table and 'resnet50' in table and '3.664G' in table
    assert 'stage3' in _cli('resnet20')


def test_cli_config_overrides_change_a_named_model():
    plain = json.loads(_cli('resnet34', '--config.model.shortcut=none', '--json'))
    assert plain['name'] == 'resnet34 (shortcut=none)'
    assert (plain['params'], plain['layers'], plain['macs']) == (
        summarize('plain34')['params'], 34, summarize('plain34')['macs'])
    # ResNet-34 minus its three projection shortcuts (1x1 conv + BN at stages 2-4).
    projections = sum(c_in * c_out + 2 * c_out for c_in, c_out in ((64, 128), (128, 256),
                                                                  (256, 512)))
    assert plain['params'] == 21_797_672 - projections


def test_plain_net_from_the_imagenet_recipe_says_one_line_and_goes_on():
    # configs/resnet34.py turns zero_init_last_bn on, which a plain net has no use for.
    result = subprocess.run(
        [sys.executable, '-m', 'resnet_flax.summary', '--config=configs/resnet34.py',
         '--config.model.shortcut=none', '--json'], cwd=REPO, capture_output=True, text=True,
        timeout=120, env={**os.environ, 'JAX_PLATFORMS': ''})  # let JAX look for a TPU
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads(result.stdout)['params'] == summarize('plain34')['params']
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [models.plain_zero_init_note({'shortcut': 'none', 'zero_init_last_bn': True})]
    assert 'Unable to initialize backend' not in result.stderr  # library logs stay hidden


def test_config_problems_are_one_line_errors_from_the_cli():
    for args, message in (
            (['resnet18', '--config.model.shortcutt=B'], "no field 'model.shortcutt'"),
            (['--config=configs/resnet34.py', '--config.model.depth=33'],
             'model.depth=33 has no ImageNet stage table')):
        result = subprocess.run([sys.executable, '-m', 'resnet_flax.summary', *args], cwd=REPO,
                                capture_output=True, text=True, timeout=120,
                                env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
        assert result.returncode != 0 and 'Traceback' not in result.stderr, result.stderr[-2000:]
        errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
        assert len(errors) == 1 and message in errors[0], result.stderr[-2000:]
