"""Preflight: the trainer's own step compiled for TPU slices and GPUs this machine does not have.

Target names are checked against Google's and NVIDIA's published layouts. The compiles need
libtpu (`pip install -e '.[tpu]'`; no TPU) and carry the `preflight` mark: CI runs them in a
step of their own (.ci/run). The GPU compile needs jax[cuda12] (~5.5 GB) and skips without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from configs import resnet50
from resnet_flax import models, preflight, summary, targets
from tests.tiny import REPO, tiny_config

# Whichever comes first in this worker, a JAX backend start or a topology, libtpu must not take
# its machine-wide lock: the CLI tests' subprocesses load libtpu too.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
HAS_LIBTPU = importlib.util.find_spec('libtpu') is not None
HAS_CUDA_PLUGIN = importlib.util.find_spec('jax_cuda12_plugin') is not None
needs_libtpu = pytest.mark.skipif(
    not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]' (CI: -m preflight)")


# ---------------------------------------------------------------------------------------------
# Target names (no compiler needed)

# Google Cloud's accelerator types: v4/v5p count TensorCores (2 per chip), v5e/v6e count chips.
# (name, libtpu topology, chips) from cloud.google.com/tpu/docs/{v4,v5p,v5e,v6e}.
TPU_NAMES = [
    ('v4-8', 'v4:2x2x1', 4), ('v4-32', 'v4:2x2x4', 16), ('v4-128', 'v4:4x4x4', 64),
    ('v5p-8', 'v5p:2x2x1', 4), ('v5p-128', 'v5p:4x4x4', 64), ('v5p-1024', 'v5p:8x8x8', 512),
    ('v5e-1', 'v5e:1x1', 1), ('v5e-16', 'v5e:4x4', 16), ('v5litepod-256', 'v5e:16x16', 256),
    ('v6e-8', 'v6e:2x4', 8), ('v6e-32', 'v6e:4x8', 32), ('v5p:4x4x12', 'v5p:4x4x12', 192),
]


@pytest.mark.parametrize(('name', 'topology', 'chips'), TPU_NAMES)
def test_tpu_names_count_tensorcores_on_v4_v5p_and_chips_on_v5e_v6e(name, topology, chips):
    target = targets.parse_target(name)
    assert target.topology == topology
    dims = [int(d) for d in topology.split(':')[1].split('x')]
    assert dims[0] * dims[1] * (dims[2] if len(dims) == 3 else 1) == chips


@pytest.mark.parametrize(('name', 'chip', 'topology'), [
    ('h200', 'h200', '1x1x1'), ('8xh100', 'h100', '1x1x8'), ('16xH200', 'h200', '1x2x8'),
    ('a100-80gb', 'a100-80gb', '1x1x1'), ('4xb200', 'b200', '1x1x4'),
])
def test_gpu_names_give_the_model_and_hosts_of_eight(name, chip, topology):
    target = targets.parse_target(name)
    assert (target.chip.name, target.platform, target.topology) == (chip, 'gpu', topology)


@pytest.mark.parametrize(('name', 'says'), [
    ('v5p-12', 'counts TensorCores (2 per chip)'), ('v5e-12', 'counts chips'),
    ('a100', 'a100-40gb or a100-80gb'), ('12xh100', 'multiple of 8'), ('tpu9', 'not a known'),
    ('v5p:4x4', '3 dimensions'),
])
def test_bad_target_names_say_what_to_write(name, says):
    with pytest.raises(ValueError, match='--target=') as error:
        targets.parse_target(name)
    assert says in str(error.value) and '\n' not in str(error.value)


def test_each_gpu_target_config_holds_the_memory_of_the_chip_table():
    for chip in (c for c in targets.CHIPS.values() if c.platform == 'gpu'):
        text = targets.gpu_target_config(chip)
        size = int(text.split('device_memory_size:')[1].split()[0])
        assert round(size / 2**30, 1) == chip.memory_gib, chip.name


# ---------------------------------------------------------------------------------------------
# Compiling for TPUs (libtpu, no TPU)


@needs_libtpu
@pytest.mark.preflight
@pytest.mark.parametrize(('name', 'slices', 'chips', 'hosts'), [
    ('v5p-128', 1, 64, 16), ('v5e-16', 1, 16, 4), ('v6e-8', 1, 8, 1), ('v4-32', 1, 16, 4),
    ('v5e-16', 2, 32, 8),
])
def test_topology_devices_have_the_published_hosts(name, slices, chips, hosts):
    """Hosts as Google lists them: 4 chips per host, 8 on a single-host v5e/v6e."""
    devices = targets.devices(targets.parse_target(name, slices))
    assert len(devices) == chips
    assert len({d.process_index for d in devices}) == hosts
    if slices > 1:
        assert {d.slice_index for d in devices} == set(range(slices))


def _tiny(batch: int, image_size: int = 16):
    return tiny_config(**{'batch_size': batch, 'data.image_size': image_size})


@needs_libtpu
@pytest.mark.preflight
def test_small_resnet_compiles_for_a_tpu_slice_with_flops_matching_its_macs():
    report = preflight.run(_tiny(64), 'v5p-8', search_compiles=0)
    assert report['fits'] and report['verdict'].startswith('fits: ')
    assert (report['devices'], report['hosts'], report['batch_per_device']) == (4, 1, 16)
    assert report['flops_source'] == preflight.FLOPS_SOURCES[0]  # XLA's own count on TPU
    macs = summary.summarize(models.from_config(_tiny(64).model), 16)['macs']
    # Forward + backward ~ 3 x forward, 2 FLOPs per MAC; XLA adds BN, ReLU, the optimizer.
    assert 0.9 < report['flops_per_image'] / (6 * macs) < 1.6
    kinds = {c['kind']: c for c in report['collectives']}
    params = summary.summarize(models.from_config(_tiny(64).model), 16)['params']
    assert kinds['all-reduce']['bytes'] >= 2 * params  # the gradients, bf16 or wider
    assert report['train']['alias_gib'] > 0 or report['train']['argument_gib'] < 0.01
    json.dumps(report)  # the --json line


@needs_libtpu
@pytest.mark.preflight
def test_two_slices_compile_with_the_data_axis_across_them():
    report = preflight.run(_tiny(64), 'v5e-4', num_slices=2, search_compiles=0,
                           compile_eval=False)
    assert (report['devices'], report['hosts'], report['batch_per_device']) == (8, 2, 8)
    reduced = sum(c['bytes'] for c in report['collectives'] if c['kind'] == 'all-reduce')
    params = summary.summarize(models.from_config(_tiny(64).model), 16)['params']
    assert reduced >= 2 * params
    # Two slices: each sends 2 (S - 1) / S = 1 x the reduced bytes over the DCN.
    assert report['dcn']['dcn_bytes_per_slice_per_step'] == reduced
    assert 'across 2 slices' in preflight.format_report(report)


@needs_libtpu
@pytest.mark.preflight
def test_an_oversized_batch_does_not_fit_and_the_batch_it_names_does():
    huge = 2**16  # per chip, at 64 px: far beyond a v5e's 16 GiB
    report = preflight.run(_tiny(huge, 64), 'v5e-1', search_compiles=3, compile_eval=False)
    assert not report['fits'] and report['verdict'].startswith('does not fit: ')
    largest = report['largest_fitting_batch']
    assert largest and largest < huge and f'largest batch that fits is {largest} per chip' in (
        report['verdict'])
    assert 'grad_accum_steps=' in report['verdict']
    # `largest` was itself compiled by the search and fitted; the batch it found not to fit lies
    # above it (a second compile of `largest` would only repeat that one).
    assert report['search']['compiles'] >= 1
    assert report['search']['does_not_fit'] is None or report['search']['does_not_fit'] > largest


@needs_libtpu
@pytest.mark.preflight
def test_resnet50_compiles_for_v5p_through_the_real_step():
    config = resnet50.get_config()
    config.batch_size = 128  # 32 per chip
    report = preflight.run(config, 'v5p-8', search_compiles=0, compile_eval=False)
    assert report['fits'], report['verdict']
    assert report['device_kind'].startswith('TPU v5')
    # 4.09 GMACs per 224 image (torchvision's ResNet-50 v1.5): ~24.5 GFLOP per train image.
    assert 23e9 < report['flops_per_image'] < 27e9
    assert 1 < report['train']['per_device_gib'] < 95
    assert any(c['kind'] == 'all-reduce' and c['bytes'] > 2 * 25e6 for c in report['collectives'])


def _preflight_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, '-m', 'resnet_flax.preflight', *args], cwd=REPO,
                          capture_output=True, text=True, timeout=900)


@pytest.mark.preflight
@pytest.mark.parametrize('args', [
    ['--target=v5p-12'],
    *([['--target=v5p-8', '--config.batch_size=30']] if HAS_LIBTPU else []),
])
def test_config_and_target_errors_are_one_line(args):
    result = _preflight_cli('--config=configs/digits.py', *args)
    lines = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
    assert result.returncode == 1 and len(lines) == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr


@pytest.mark.preflight
@pytest.mark.skipif(not HAS_CUDA_PLUGIN, reason="needs jax[cuda12] (~5.5 GB): pip install -e "
                    "'.[cuda12]'; its result is in BENCHMARKS.md section 13")
def test_gpu_target_compiles_without_a_gpu():
    result = _preflight_cli('--config=configs/digits.py', '--target=2xh100', '--json',
                            '--search_compiles=0', '--config.batch_size=64')
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report['device_kind'] == 'NVIDIA H100 80GB HBM3' and report['devices'] == 2
    assert report['fits'] and report['flops_per_image'] > 0
    assert report['flops_source'] == preflight.FLOPS_SOURCES[1]  # no FLOPs from XLA:GPU


# ---------------------------------------------------------------------------------------------
# train.py's first lines


def test_a_run_starts_by_naming_its_devices_and_warns_on_imagenet_scale_cpu_runs():
    import jax

    from configs import digits
    from resnet_flax import train

    devices = jax.devices()
    lines = train.start_lines(resnet50.get_config(), devices, 1)
    assert lines[0] == f'Training on {len(devices)} x cpu (cpu), 1 process.'
    assert len(lines) == 2 and lines[1].startswith('Warning: an ImageNet-scale config')
    assert 'data.image_size=224' in lines[1] and '\n' not in lines[1]
    assert train.start_lines(digits.get_config(), devices, 1) == lines[:1]  # 32 px: no warning
