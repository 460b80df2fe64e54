"""Images/s of the train step on 1, 2, 4, 8 simulated CPU devices at a fixed per-device batch.

    python -m bench.scaling --config=configs/resnet18.py --image_size=32 \
        --batch_size_per_device=8 --device_counts=1,2,4,8 --json

Each device count runs `bench.train_throughput` in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=N (the flag must be set before JAX starts), so
the global batch grows with N. Every other flag is passed on to it.

What shows a hidden serial part: the simulated devices share the host's cores, so with the
per-device batch fixed, N devices do N times the work on the same cores, and images/s should
stay flat (`vs_1_device` near 1). Work that is replicated rather than split, or serial
communication, makes it fall. A second, noise-free check is XLA's own count of the FLOPs each
device runs per step: with the batch split evenly it stays constant as N grows
(`flops_vs_1_device` near 1; the replicated optimizer update is the only work that is not split).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

from absl import app, flags

from bench import common
from resnet_flax import cli

FLAGS = common.FLAGS
flags.DEFINE_list('device_counts', ['1', '2', '4', '8'], 'Simulated CPU device counts.')
flags.DEFINE_integer('timeout', 1800, 'Seconds allowed for each device count.')

_OWN_FLAGS = ('--device_counts', '--timeout', '--json', '--nojson')


def child_args(argv: list[str], batch_size_per_device: int) -> list[str]:
    """This run's flags for `bench.train_throughput`, without the ones only scaling takes."""
    args = [a for a in argv if a.split('=')[0] not in _OWN_FLAGS]
    args = [a for a in args if not a.startswith('--batch_size_per_device')]
    return [*args, f'--batch_size_per_device={batch_size_per_device}', '--json']


def run_devices(count: int, args: list[str], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    env['XLA_FLAGS'] = (env.get('XLA_FLAGS', '') +
                        f' --xla_force_host_platform_device_count={count}').strip()
    env['JAX_PLATFORMS'] = 'cpu'
    result = subprocess.run([sys.executable, '-m', 'bench.train_throughput', *args],
                            cwd=common.REPO, env=env, capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f'{count} devices failed ({result.returncode}): '
                           f'{result.stderr.strip().splitlines()[-1:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    common.quiet_logging()
    common.check_timing_flags()
    counts = [int(c) for c in FLAGS.device_counts]
    if not counts or min(counts) < 1:
        raise ValueError(f'--device_counts={FLAGS.device_counts} must be positive integers.')
    per_device = FLAGS.batch_size_per_device or 8
    args = child_args(sys.argv[1:], per_device)
    rows = []
    for count in counts:
        out = run_devices(count, args, FLAGS.timeout)
        rows.append(dict(
            devices=out['env']['devices'], batch_size=out['batch_size'],
            ms_per_step=out['ms_per_step'], images_per_sec=out['images_per_sec'],
            xla_flops_per_device_step=out['xla_flops_per_device_step'],
            compile_s=out['compile_s'], spread_pct=out['spread_pct']))
    base = rows[0]
    for row in rows:
        row['vs_1_device'] = row['images_per_sec'] / base['images_per_sec'] if (
            base['devices'] == 1) else None
        flops, base_flops = row['xla_flops_per_device_step'], base['xla_flops_per_device_step']
        row['flops_vs_1_device'] = flops / base_flops if (
            flops and base_flops and base['devices'] == 1) else None
    result = dict(benchmark='scaling', batch_size_per_device=per_device,
                  image_size=out['image_size'], model=out['model'], dtype=out['dtype'],
                  rows=rows, env={**common.environment(), 'devices': None})
    if FLAGS.json:
        common.report(result, as_json=True)
        return
    print(f"{result['model']} at {result['image_size']}px, {result['dtype']}, "
          f'{per_device} images per device; simulated CPU devices on {os.cpu_count()} cores')
    print(common.format_table(rows, ['devices', 'batch_size', 'ms_per_step', 'images_per_sec',
                                     'vs_1_device', 'xla_flops_per_device_step',
                                     'flops_vs_1_device', 'compile_s', 'spread_pct']))


if __name__ == '__main__':
    common.define_flags()
    cli.run(main)  # bad input: a one-line error, no traceback
