"""The benchmark scripts run on CPU on a tiny model and print well-formed results.

No timing assertions: the numbers depend on the machine. What is checked is what does not:
the output's shape, the arithmetic between its fields, XLA's FLOP count against the model's
multiply-accumulates, the per-device work of the sharded step as devices are added, and the
PyTorch network's size against this project's.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import ml_collections
import pytest

from resnet_flax import models, summary
from tests.tiny import REPO, cpu_env

# configs/digits.py shrunk to the tests' tiny model (a CIFAR-stem ResNet, 16x16 images).
TINY_DIGITS = ['--config=configs/digits.py', '--config.model.stage_sizes=(1,1)',
               '--config.model.stage_widths=(8,16)', '--config.model.stem_width=8',
               '--image_size=16']
# An ImageNet-family model of the same size, for the PyTorch baseline (ImageNet stem only).
TINY_IMAGENET = ['--config=configs/resnet18.py', '--config.model.stage_sizes=(1,1)',
                 '--config.model.stage_widths=(8,16)', '--config.model.stem_width=8',
                 '--config.model.num_classes=10', '--image_size=32', '--dtype=float32']
QUICK = ['--steps=2', '--windows=2', '--warmup=1']
HAS_TORCH = importlib.util.find_spec('torch') is not None


def run_bench(module: str, args: list[str], devices: int = 1, timeout: float = 300) -> dict:
    """Runs `python -m bench.MODULE ARGS --json` and returns the JSON it printed."""
    result = subprocess.run(
        [sys.executable, '-m', f'bench.{module}', *args, '--json'],
        cwd=REPO, env=cpu_env(devices), capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1, f'expected one JSON line on stdout, got: {result.stdout[-2000:]}'
    return json.loads(lines[0])


def check_throughput_arithmetic(result: dict, batch_size: int) -> None:
    assert result['batch_size'] == batch_size
    assert len(result['window_ms_per_step']) == 2
    assert result['compile_s'] > 0
    assert result['images_per_sec'] == pytest.approx(
        batch_size * 1e3 / result['ms_per_step'], rel=1e-6)
    assert result['env']['backend'] == 'cpu'


@pytest.mark.slow
def test_train_throughput_reports_step_speed_and_flops():
    result = run_bench('train_throughput',
                       [*TINY_DIGITS, '--batch_size_per_device=16', '--peak_tflops=1', *QUICK])
    check_throughput_arithmetic(result, 16)
    assert result['benchmark'] == 'train'
    assert result['model_flops_per_image'] == 6 * result['macs_per_image']
    # XLA's own count of the step (conv/dense FLOPs plus BN, optimizer, loss) is close to the
    # 3 x forward estimate from the layer shapes.
    model_flops = result['model_flops_per_image'] * result['batch_size']
    assert 0.7 < result['xla_flops_per_device_step'] / model_flops < 1.5
    assert result['mfu'] == pytest.approx(
        result['images_per_sec'] * result['model_flops_per_image'] / 1e12, rel=1e-6)
    assert result['peak_memory_bytes'] is None  # the CPU backend tracks none
    assert math.isfinite(result['final_loss'])


@pytest.mark.slow
def test_inference_throughput_counts_forward_flops_only():
    result = run_bench('inference_throughput',
                       [*TINY_DIGITS, '--batch_size_per_device=16', *QUICK])
    check_throughput_arithmetic(result, 16)
    assert result['benchmark'] == 'inference'
    assert result['model_flops_per_image'] == 2 * result['macs_per_image']
    assert result['mfu'] is None  # no --peak_tflops


@pytest.mark.slow
def test_loop_overhead_times_the_real_loop(tmp_path):
    workdir = tmp_path / 'workdir'
    # The loop jits its own step: the persistent cache saves compiling it a second time.
    result = run_bench('loop_overhead', [*TINY_DIGITS, '--batch_size_per_device=16',
                                         '--steps=3', '--windows=2', '--warmup=0',
                                         f'--workdir={workdir}',
                                         f'--compilation_cache_dir={tmp_path / "cache"}'])
    # One window compiles, two are timed, one more ends at the final sync.
    assert result['loop_total_steps'] == 12
    assert len(result['loop_window_ms_per_step']) == 2
    assert len(result['bare_window_ms_per_step']) == 4  # before and after the loop
    assert result['overhead_pct'] == pytest.approx(
        100 * (result['loop_ms_per_step'] / result['bare_ms_per_step'] - 1))
    # The loop really ran: its metrics and final checkpoint are in the workdir.
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if r['split'] == 'train'] == [3, 6, 9, 12]
    assert any(r['split'] == 'eval' for r in records)


@pytest.mark.slow
def test_scaling_splits_the_work_evenly_over_devices():
    result = run_bench('scaling', [*TINY_DIGITS, '--batch_size_per_device=4',
                                   '--device_counts=1,2', *QUICK], timeout=600)
    rows = result['rows']
    assert [r['devices'] for r in rows] == [1, 2]
    assert [r['batch_size'] for r in rows] == [4, 8]
    # Each device computes its own slice: XLA's per-device FLOPs stay those of one device.
    assert rows[1]['flops_vs_1_device'] == pytest.approx(1.0, abs=0.05)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TORCH, reason='PyTorch is not installed')
def test_torch_baseline_alternates_with_the_jax_step():
    result = run_bench('torch_baseline',
                       [*TINY_IMAGENET, '--batch_size_per_device=8', '--with_jax', *QUICK])
    assert result['jax_over_torch'] == pytest.approx(
        result['jax_images_per_sec'] / result['torch_images_per_sec'])
    torch_out, jax_out = result['torch'], result['jax']
    assert len(torch_out['window_ms_per_step']) == len(jax_out['window_ms_per_step']) == 2
    assert not torch_out['torch_compile'] and not torch_out['channels_last']  # CPU: eager
    flax_params = summary.summarize(models.from_config(_tiny_imagenet_model()))['params']
    assert torch_out['params'] == flax_params


def _tiny_imagenet_model() -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(models.config_for(
        'resnet18', num_classes=10, stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8))


@pytest.mark.skipif(not HAS_TORCH, reason='PyTorch is not installed')
@pytest.mark.parametrize('name, params', [
    ('resnet18', 11_689_512), ('resnet50', 25_557_032), ('resnext50_32x4d', 25_028_904),
])
def test_torch_network_has_torchvisions_parameter_count(name, params):
    from bench.torch_baseline import build_torch_model, count_parameters

    model_cfg = ml_collections.ConfigDict(models.config_for(name))
    torch_model, source = build_torch_model(model_cfg, use_torchvision=False)
    assert source.startswith('torch.nn')
    assert count_parameters(torch_model) == params  # torchvision's published counts
    assert summary.summarize(models.from_config(model_cfg))['params'] == params


@pytest.mark.slow
def test_gpu_script_writes_its_json_and_table_when_nothing_fits(tmp_path):
    # BUDGET_S=0: every item is skipped, so this checks the script's plumbing (dependency
    # check, plan, records, summary) in seconds; the benchmarks themselves are tested above.
    env = {**cpu_env(), 'OUT': str(tmp_path), 'BUDGET_S': '0', 'SMOKE': '1',
           'PYTHON': sys.executable}
    result = subprocess.run(['bash', str(REPO / 'bench' / 'gpu.sh')], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    summary_json = json.loads((tmp_path / 'gpu_results.json').read_text())
    items = {r['item']: r['status'] for r in summary_json['items']}
    assert {'jax_r50_train', 'torch_r50_train', 'jax_r50_e2e', 'jax_r50_inference', 'jax_r18_train',
            'jax_r101_train', 'jax_r50_train_ghost_bn', 'jax_r50_loop_overhead'} <= set(items)
    assert all(status.startswith('skipped') for status in items.values())
    assert 'jax_r50_train' in (tmp_path / 'gpu_results.txt').read_text()
    assert (tmp_path / 'gpu_log.txt').exists()


@pytest.mark.slow
def test_input_pipeline_measures_every_loader_on_the_same_files():
    result = run_bench('input_pipeline', ['--images=16', '--batch=8', '--repeats=1',
                                          '--image_size=32', '--low_res_size=24',
                                          '--store_side=48'], timeout=600)
    records = result['records']
    keys = {'loader', 'recipe', 'images_per_sec_per_core', 'bytes_per_image_to_device'}
    assert all(keys <= set(r) for r in records)
    found = {(r['loader'], r['source'], r['recipe']) for r in records}
    assert ('grain-pil', 'store48', 'imagenet train 24') in found
    assert ('grain-pil_draft', 'jpeg', 'imagenet eval 32') in found
    assert ('pil_loop', 'jpeg', 'imagenet train 32') in found
    for record in records:
        assert record['images_per_sec_per_core'] > 0
        size = int(record['recipe'].split()[-1])
        if record['loader'].startswith('grain'):  # uint8 images and int32 labels
            assert record['bytes_per_image_to_device'] == size * size * 3 + 4


@pytest.mark.slow
def test_input_pipeline_stages_and_match():
    """--stages times each step of a store train example; --match selects loader rows."""
    args = ['--images=8', '--batch=4', '--repeats=1', '--low_res_size=24', '--store_side=48']
    stages = run_bench('input_pipeline', [*args, '--stages'])['stages_us']
    assert {'decode (simplejpeg)', 'train_example, cv2 resizer',
            'train_example, pil resizer'} <= set(stages)
    assert all(value > 0 for value in stages.values())
    rows = run_bench('input_pipeline', [*args, '--match=simplejpeg.* store48 train 24'])
    assert {r['loader'] for r in rows['records']} == {'grain-simplejpeg', 'grain-simplejpeg+cv2'}


def _write_wheel(path, name: str, version: str, files: dict[str, str]) -> None:
    """A wheel as pip builds one: the files, NAME.data/ and NAME-VERSION.dist-info/."""
    import zipfile

    info = f'{name}-{version}.dist-info'
    files = {**files, f'{info}/METADATA': f'Metadata-Version: 2.1\nName: {name}\n'
             f'Version: {version}\n', f'{info}/WHEEL': 'Wheel-Version: 1.0\nRoot-Is-Purelib: '
             'true\nTag: py3-none-any\n', f'{info}/RECORD': ''}
    with zipfile.ZipFile(path, 'w') as archive:
        for member, text in files.items():
            archive.writestr(member, text)


@pytest.mark.parametrize('use_pip', [False, True])
def test_gpu_wheels_installs_what_is_missing_and_imports_from_there(tmp_path, use_pip):
    from bench import gpu_wheels

    wheels = tmp_path / 'whl'
    wheels.mkdir()
    _write_wheel(wheels / 'rf_probe-1.0-py3-none-any.whl', 'rf_probe', '1.0', {
        'rf_probe/__init__.py': 'VALUE = 42\n',
        'rf_probe-1.0.data/purelib/rf_probe_extra.py': 'EXTRA = 7\n',
        'rf_probe-1.0.data/scripts/rf-probe': '#!/bin/sh\n'})
    _write_wheel(wheels / 'rf_probe-0.9-py3-none-any.whl', 'rf_probe', '0.9', {})  # older
    _write_wheel(wheels / 'rf_old-1.0-cp27-cp27mu-linux_x86_64.whl', 'rf_old', '1.0', {})
    _write_wheel(wheels / 'pytest-0.1-py3-none-any.whl', 'pytest', '0.1', {})  # installed
    _write_wheel(wheels / 'jax-0.1-py3-none-any.whl', 'jax', '0.1', {})  # the image's own
    chosen = gpu_wheels.wheels_to_install([wheels])
    assert [w.name for w in chosen] == ['rf_probe-1.0-py3-none-any.whl']
    assert gpu_wheels.unfit([wheels]) == ['rf-old']  # said, so that the right ones get fetched

    target = tmp_path / 'site'
    assert gpu_wheels.install(chosen, target, use_pip) == ('pip' if use_pip else 'unpacked')
    assert not (target / 'rf_probe-1.0.data').exists()  # purelib moved up, scripts dropped
    probe = ('import importlib.metadata, rf_probe, rf_probe_extra; '
             'print(rf_probe.VALUE, rf_probe_extra.EXTRA, importlib.metadata.version("rf_probe"), '
             'rf_probe.__file__)')
    out = subprocess.run([sys.executable, '-c', probe], env={'PYTHONPATH': str(target)},
                         capture_output=True, text=True, check=True).stdout.split()
    assert out[:3] == ['42', '7', '1.0'] and out[3].startswith(str(target))
    # A second run replaces its own directory; a directory it did not make is refused.
    gpu_wheels.install(chosen, target, use_pip=False)
    foreign = tmp_path / 'foreign'
    foreign.mkdir()
    (foreign / 'keep.txt').write_text('mine')
    with pytest.raises(SystemExit, match='not made by bench/gpu_wheels.py'):
        gpu_wheels.install(chosen, foreign, use_pip=False)
    assert (foreign / 'keep.txt').read_text() == 'mine'


@pytest.mark.slow
def test_init_compile_draws_every_kernel_shape_with_both_initializers():
    [row] = run_bench('init_compile', ['--models=tiny_resnet18'])
    # The tiny net's kernels: stem 7x7x3x8, 3x3x8x8, 3x3x8x16, 3x3x16x16, 1x1x8x16, head 16x5.
    assert row['model'] == 'tiny_resnet18' and row['kernel_shapes'] == 6
    assert row['same_numbers'] is True
    assert row['library_compile_s'] > 0 and row['ours_compile_s'] > 0
    assert row['ratio'] == pytest.approx(row['library_compile_s'] / row['ours_compile_s'],
                                         rel=0.02)
