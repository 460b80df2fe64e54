"""Preflight: compile the real train step for hardware you do not have, before you pay for it.

    python -m resnet_flax.preflight --config=configs/resnet50.py --target=v5p-128 \
        --config.batch_size=4096

Builds the model, optimizer, mesh, shardings, donation, dtype, gradient accumulation and BN
grouping exactly as `train.py` would (`train.build_step_parts`), compiles the train and eval
steps for every device of the target in this one process (a CPU machine will do), and reports
whether the step fits in the chip's memory, the largest batch that does (found by compiling),
FLOPs per image, the collectives, and an estimate of the speed and of the input rate each host
must sustain. Needs `pip install -e '.[tpu]'` (libtpu) for TPU targets or `'.[cuda12]'` for
GPUs; no accelerator, driver, data or workdir. `--json` adds one JSON object as the last line.
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

from absl import app, flags
from ml_collections import config_flags

from resnet_flax import cli

FLAGS = flags.FLAGS

GIB = 2**30
# Train images per second per host CPU core, from BENCHMARKS.md section 7c (grain loader, window
# decoder + OpenCV, unshared 2-vCPU EPYC, 2026-12-02): what the input estimate divides by.
LOADER_IMAGES_PER_CORE = {'raw JPEG': 776.4, 'prepared store': 2399.1}
FLOPS_SOURCES = ("XLA's cost analysis", "summary MACs x 2 x 3 (forward + backward)")


def memory_budget(target, gpu_memory_fraction: float | None) -> tuple[float, str]:
    """Bytes the step may use per device, and how that was decided."""
    chip = target.chip
    if target.platform == 'tpu':
        return chip.memory_gib * GIB, ''
    fraction = gpu_memory_fraction or float(os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 0.75))
    return (fraction * chip.memory_gib * GIB,
            f' ({fraction:.0%} of the {chip.name}\'s {chip.memory_gib:g} GiB, what JAX takes; '
            'XLA_PYTHON_CLIENT_MEM_FRACTION sets it)')


def _gib(n: float) -> float:
    return round(n / GIB, 2)


def _step_dict(report) -> dict[str, Any]:
    return {
        'batch_per_device': report.batch_per_device, 'fits': report.fits,
        'argument_gib': _gib(report.argument_bytes), 'output_gib': _gib(report.output_bytes),
        'alias_gib': _gib(report.alias_bytes), 'temp_gib': _gib(report.temp_bytes),
        'per_device_gib': _gib(report.per_device_bytes) if not report.error else None,
        'compile_seconds': round(report.compile_seconds, 1), 'error': report.error,
    }


def flops_per_image(config, train_report) -> tuple[float, str]:
    """Train FLOPs per image: XLA's count where the backend gives it, else the MAC count."""
    if train_report.flops:
        return train_report.flops / train_report.batch_per_device, FLOPS_SOURCES[0]
    from resnet_flax import models, summary

    macs = summary.summarize(models.from_config(config.model),
                             int(config.data.image_size))['macs']
    return 6.0 * macs, FLOPS_SOURCES[1]


def speed_estimate(target, flops_image: float, batch_per_device: int, devices: int,
                   hosts: int, efficiency: float) -> dict[str, Any]:
    """Roofline estimate: the chip's peak bf16 FLOP/s at `efficiency`, and the input rate each
    host must then sustain, in CPU cores of this project's loader. An estimate, not a run."""
    flop_rate = target.chip.peak_bf16_tflops * 1e12 * efficiency
    per_chip = flop_rate / flops_image
    per_host = per_chip * devices / hosts
    return {
        'efficiency': efficiency, 'peak_bf16_tflops': target.chip.peak_bf16_tflops,
        'step_seconds': round(batch_per_device * flops_image / flop_rate, 4),
        'images_per_second_per_chip': round(per_chip), 'images_per_second': round(per_chip
                                                                                  * devices),
        'images_per_second_per_host': round(per_host),
        'host_cores': {source: math.ceil(per_host / rate)
                       for source, rate in LOADER_IMAGES_PER_CORE.items()},
    }


def dcn_estimate(target, collectives, devices: int) -> dict[str, Any] | None:
    """Multi-slice: the all-reduces span the slices, so each slice sends about 2(S-1)/S of the
    reduced bytes over the data-centre network every step (reduced within the slice first)."""
    slices = target.num_slices
    if slices < 2:
        return None
    reduced = sum(c.bytes for c in collectives if c.kind == 'all-reduce')
    per_slice = 2 * (slices - 1) / slices * reduced
    estimate = {'slices': slices, 'all_reduce_bytes_per_step': reduced,
                'dcn_bytes_per_slice_per_step': round(per_slice)}
    if target.chip.dcn_gbps:
        link = target.chip.dcn_gbps * 1e9 / 8 * devices // slices
        estimate['dcn_seconds_per_step'] = round(per_slice / link, 4)
    return estimate


def _grad_accum_hint(batch_per_device: int, largest: int | None, accum: int) -> str:
    if not largest:
        return ''
    # `largest` was found with `accum` micro-batches: a micro-batch of largest / accum fits.
    k = next((k for k in range(accum + 1, batch_per_device + 1)
              if batch_per_device % k == 0 and batch_per_device / k <= largest / accum), None)
    return f' (or use --config.grad_accum_steps={k})' if k else ''


def verdict(report: dict[str, Any], budget_note: str) -> str:
    """'fits: 14.9 of 141 GiB per chip' or 'does not fit: needs ...: the largest batch ...'."""
    train = report['train']
    chip = report['chip']
    usable = report['budget_gib']
    if report['fits']:
        return f'fits: {train["per_device_gib"]:.1f} of {usable:g} GiB per chip{budget_note}'
    need = (f'needs {train["per_device_gib"]:.1f} GiB per chip' if train['per_device_gib']
            else f'XLA refused it ({train["error"]})')
    evaluation = report['eval'] or {'fits': None}
    if train['fits']:  # only the eval step is too big
        return (f'does not fit: the eval step needs {evaluation["per_device_gib"]} GiB per chip, '
                f'{chip} has {usable:g}{budget_note}: set a smaller --config.eval_batch_size')
    if evaluation['fits'] is False:
        need += ', and the eval step does not fit either'
    largest = report['largest_fitting_batch']
    advice = (f'the largest batch that fits is {largest} per chip' if largest
              else 'no batch tried fits')
    hint = _grad_accum_hint(report['batch_per_device'], largest, report['grad_accum_steps'])
    return f'does not fit: {need}, {chip} has {usable:g}{budget_note}: {advice}{hint}'


def run(config, target_name: str, num_slices: int = 1, efficiency: float = 0.2,
        search_compiles: int = 4, gpu_memory_fraction: float | None = None,
        compile_eval: bool = True, search_limit: int = 8192) -> dict[str, Any]:
    """Compiles `config`'s steps for the target and returns the report (see the module doc).
    `compile_eval=False` skips the eval step (a table of many targets)."""
    from resnet_flax import preflight_step, targets, train

    target = targets.parse_target(target_name, num_slices)
    config, notes = preflight_step.for_target(config)
    devices = targets.devices(target)
    train.validate_config(config, device_count=len(devices))  # before minutes of compiling
    budget, budget_note = memory_budget(target, gpu_memory_fraction)
    first = preflight_step.compile_train_step(config, devices, budget)
    evaluation = (preflight_step.compile_eval_step(config, devices, budget) if compile_eval
                  else None)
    hosts = len({d.process_index for d in devices})
    per_device = config.batch_size // len(devices)
    search = preflight_step.largest_fitting_batch(
        lambda b: preflight_step.compile_train_step(
            preflight_step.with_batch(config, b * len(devices)), devices, budget),
        first, budget, preflight_step.search_step(config), search_compiles, search_limit)
    flops_image, flops_source = flops_per_image(config, first)
    report = {
        'model': f'ResNet-{config.model.depth} ({config.model.dtype})',
        'target': target.name, 'chip': target.chip.name, 'platform': target.platform,
        'device_kind': devices[0].device_kind, 'topology': target.topology,
        'num_slices': num_slices, 'devices': len(devices), 'hosts': hosts, 'processes': hosts,
        'devices_per_host': len(devices) // hosts, 'global_batch': config.batch_size,
        'batch_per_host': config.batch_size // hosts, 'batch_per_device': per_device,
        'grad_accum_steps': config.grad_accum_steps,
        'starts_as': train.describe_devices(devices, hosts),
        'device_memory_gib': target.chip.memory_gib, 'budget_gib': round(budget / GIB, 1),
        'fits': first.fits and (evaluation is None or evaluation.fits),
        'per_device_gib': _step_dict(first)['per_device_gib'],
        'train': _step_dict(first), 'eval': _step_dict(evaluation) if evaluation else None,
        'flops_per_image': flops_image, 'flops_per_step_per_device': flops_image * per_device,
        'flops_source': flops_source,
        'collectives': [vars(c) for c in first.collectives],
        'dcn': dcn_estimate(target, first.collectives, len(devices)),
        'estimate': speed_estimate(target, flops_image, per_device, len(devices), hosts,
                                   efficiency),
        'largest_fitting_batch': search.fits,
        'largest_fitting_global_batch': search.fits * len(devices) if search.fits else None,
        'search': {'does_not_fit': search.does_not_fit, 'step': search.step,
                   'limit': search_limit,
                   'compiles': search.compiles, 'seconds': round(search.seconds, 1)},
        'notes': notes, 'chip_source': target.chip.source,
    }
    report['verdict'] = verdict(report, budget_note)
    return report


def _rows(report: dict[str, Any]) -> list[str]:
    train = report['train']
    evaluation = report['eval'] or dict.fromkeys(train)  # not compiled: '-'
    fields = [('arguments', 'argument_gib'), ('outputs', 'output_gib'),
              ('donated', 'alias_gib'), ('temporaries', 'temp_gib'),
              ('per chip', 'per_device_gib'), ('compile seconds', 'compile_seconds')]
    rows = [f'  {"":<22}{"train step":>12}{"eval step":>12}']
    for label, key in [('batch per chip', 'batch_per_device'), *fields]:
        unit = ' (GiB)' if key.endswith('_gib') else ''
        cells = ''.join(f'{"-" if s[key] is None else s[key]:>12}' for s in (train, evaluation))
        rows.append(f'  {label + unit:<22}{cells}')
    return rows


def _collective_line(collectives: list[dict[str, Any]]) -> str:
    if not collectives:
        return '  collectives in the train step: none (one device)'
    parts = [f'{c["kind"]} x {c["count"]} ({c["bytes"] / 1e6:,.1f} MB)' for c in collectives]
    return ('  collectives in the train step (per chip): ' + ', '.join(parts)
            + ': the gradient all-reduce and the synced-BN reductions')


def format_report(report: dict[str, Any]) -> str:
    est, search = report['estimate'], report['search']
    slices = f', {report["num_slices"]} slices' if report['num_slices'] > 1 else ''
    lines = [
        f'Preflight: {report["model"]} on {report["target"]} ({report["topology"]}{slices}): '
        f'{report["starts_as"]}, {report["devices_per_host"]} devices per host',
        f'  batch {report["global_batch"]} = {report["batch_per_host"]} per host = '
        f'{report["batch_per_device"]} per chip'
        + (f', in {report["grad_accum_steps"]} micro-batches' if report['grad_accum_steps'] > 1
           else ''),
        *_rows(report),
        f'  FLOPs per image (train): {report["flops_per_image"] / 1e9:.2f} G, per chip per '
        f'step {report["flops_per_step_per_device"] / 1e12:.2f} T ({report["flops_source"]})',
        _collective_line(report['collectives']),
        f'  estimate at {est["efficiency"]:.0%} of {est["peak_bf16_tflops"]:g} TFLOP/s bf16 per '
        f'chip: {est["step_seconds"] * 1e3:.0f} ms per step, {est["images_per_second_per_chip"]:,}'
        f' img/s per chip, {est["images_per_second"]:,} img/s in all',
        f'  estimated input per host: {est["images_per_second_per_host"]:,} img/s = '
        + ' or '.join(f'{n} cores from a {s}' for s, n in est['host_cores'].items())
        + ' (per-core loader rates of BENCHMARKS.md 7c)',
    ]
    if report['dcn']:
        dcn = report['dcn']
        time = (f', ~{dcn["dcn_seconds_per_step"] * 1e3:.0f} ms at {report["chip"]}\'s DCN rate'
                if 'dcn_seconds_per_step' in dcn else '')
        lines.append(f'  across {dcn["slices"]} slices (estimate): '
                     f'{dcn["dcn_bytes_per_slice_per_step"] / 1e6:,.0f} MB per slice per step '
                     f'over the data-centre network{time}')
    if search['compiles'] or not report['fits']:
        over = (f'; {search["does_not_fit"]} does not' if search['does_not_fit'] else
                '; larger batches were not tried' if report['largest_fitting_batch'] == search[
                    'limit'] else '')
        lines.append(f'  largest batch that fits: {report["largest_fitting_batch"] or "none"}'
                     f' per chip{over} ({search["compiles"]} more compiles, '
                     f'{search["seconds"]:.0f} s)')
    lines += [f'  note: {note}' for note in report['notes']]
    lines.append(report['verdict'])
    return '\n'.join(lines)


def _define_flags() -> None:
    """Only when run as a program: the library (run, format_report) defines no flags."""
    config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
    flags.DEFINE_string('target', None, 'Hardware to compile for: a TPU slice (v4-32, v5e-16, '
                        'v5p-128, v6e-8, v5p:4x4x4) or GPUs (h200, 8xh100, a100-80gb, 16xb200).')
    flags.DEFINE_integer('num_slices', 1, 'TPU slices joined by the data-centre network (DCN); '
                         'the data axis spans them.')
    flags.DEFINE_bool('json', False, 'Also print the report as one JSON object on the last line.')
    flags.DEFINE_float('efficiency', 0.2, 'Share of the chip peak bf16 FLOP/s the speed estimate '
                       'assumes (0.2: MLPerf ResNet-50 on H200, 7.95k img/s per GPU).')
    flags.DEFINE_integer('search_compiles', 4, 'Extra compiles to find the largest batch that '
                         'fits (0: none).')
    flags.DEFINE_float('gpu_memory_fraction', None, 'Share of GPU memory the step may use; default '
                       "XLA_PYTHON_CLIENT_MEM_FRACTION, else JAX's 0.75.")
    flags.DEFINE_integer('max_batch_per_chip', 8192, 'The search tries no larger batch.')
    flags.DEFINE_bool('eval_step', True, 'Also compile the eval step.')
    flags.mark_flags_as_required(['config', 'target'])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    # Compile-only: never start (or wait for) an accelerator of this machine, if it has one.
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
    cli.quiet_logs()
    report = run(FLAGS.config, FLAGS.target, FLAGS.num_slices, FLAGS.efficiency,
                 FLAGS.search_compiles, FLAGS.gpu_memory_fraction,
                 compile_eval=FLAGS.eval_step, search_limit=FLAGS.max_batch_per_chip)
    print(format_report(report), flush=True)
    if FLAGS.json:
        print(json.dumps(report), flush=True)
    sys.exit(0 if report['fits'] else 2)


if __name__ == '__main__':
    _define_flags()
    cli.run(main)
