"""Preflight across the ResNet family and several targets: BENCHMARKS.md's table, re-runnable.

    python -m bench.preflight_table --depths=18,50,101,152,200 \
        --targets=v5p-8,v5p-128,h200,8xh200 --search_targets=v5p-8,h200 --out=/tmp/pf.jsonl

Each row is `resnet_flax.preflight.run` on `configs/resnetN.py` at the recipe's batch
(config.batch_size, global): GiB per chip, the largest per-chip batch that fits (searched by
compiling, on `--search_targets` only: the per-chip program of a data-parallel step hardly
depends on the slice size), GFLOP per image, the speed estimate and the host cores it needs.
Rows go to --out as JSON lines as they finish (a long table survives an interruption), and
the Markdown table is printed at the end. Needs libtpu and jax[cuda12]; no accelerator.
"""

from __future__ import annotations

import importlib
import json
import os
import time
from collections.abc import Sequence

from absl import app, flags
from etils import epath

flags.DEFINE_list('depths', ['18', '50', '101', '152', '200'], 'configs/resnetN.py to run.')
flags.DEFINE_list('targets', ['v5p-8', 'v5p-128', 'h200', '8xh200'], 'Preflight targets.')
flags.DEFINE_list('search_targets', ['v5p-8', 'h200'],
                  'Targets whose largest fitting batch is searched for by compiling.')
flags.DEFINE_integer('search_compiles', 2, 'Extra compiles per searched row.')
flags.DEFINE_float('efficiency', 0.2, 'Share of peak bf16 FLOP/s for the speed estimate.')
flags.DEFINE_bool('eval_step', False, 'Also compile the eval step (twice the time).')
flags.DEFINE_string('out', '', 'Write the rows so far as JSON lines to this file.')
flags.DEFINE_list('render', [], 'Only print the table of these --out files (no compiling).')
FLAGS = flags.FLAGS


def row(report: dict) -> str:
    est, search = report['estimate'], report['search']
    largest = report['largest_fitting_batch']
    if not search['compiles']:
        fits_at = 'not searched'
    else:
        over = f' (< {search["does_not_fit"]})' if search['does_not_fit'] else ''
        fits_at = f'{largest or "none"}{over}' if over or not largest else f'>= {largest}'
    per_chip = report['per_device_gib']
    gib = f'{per_chip:.1f}' if per_chip is not None else 'OOM'
    flops_source = 'XLA' if 'XLA' in report['flops_source'] else 'MACs'
    return (f'| {report["model"].split(" ")[0]} | {report["target"]} | '
            f'{report["batch_per_device"]} | {gib} of {report["budget_gib"]:g} | {fits_at} | '
            f'{report["flops_per_image"] / 1e9:.2f} ({flops_source}) | '
            f'{est["images_per_second_per_chip"]:,} | {est["images_per_second"]:,} | '
            f'{est["host_cores"]["raw JPEG"]} / {est["host_cores"]["prepared store"]} | '
            f'{report["train"]["compile_seconds"]:.0f} + {search["seconds"]:.0f} |')


HEADER = ('| model | target | batch per chip (recipe) | GiB per chip (of usable) | largest batch '
          'per chip that fits | GFLOP per image | est. img/s per chip | est. img/s | host cores '
          '(raw JPEG / store) | compile s (+ search) |\n' + '|---' * 10 + '|')


def main(argv: Sequence[str]) -> None:
    del argv
    if FLAGS.render:
        reports = [json.loads(line) for name in FLAGS.render
                   for line in epath.Path(name).read_text().splitlines() if line.strip()]
        reports.sort(key=lambda r: (int(r['model'].split()[0].split('-')[1]), r['target']))
        print(HEADER)
        print('\n'.join(row(r) for r in reports))
        return
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')  # compile-only
    from resnet_flax import cli, preflight

    cli.quiet_logs()
    rows, reports = [], []
    for depth in FLAGS.depths:
        config = importlib.import_module(f'configs.resnet{depth}').get_config()
        for target in FLAGS.targets:
            start = time.perf_counter()
            report = preflight.run(
                config, target, efficiency=FLAGS.efficiency,
                search_compiles=FLAGS.search_compiles if target in FLAGS.search_targets else 0,
                compile_eval=FLAGS.eval_step)
            report['wall_seconds'] = round(time.perf_counter() - start, 1)
            rows.append(row(report))
            print(rows[-1], flush=True)
            reports.append(report)
            if FLAGS.out:  # rewritten whole after each row (it may be an object store's)
                epath.Path(FLAGS.out).write_text(''.join(json.dumps(r) + '\n' for r in reports))
    print(HEADER)
    print('\n'.join(rows))


if __name__ == '__main__':
    app.run(main)
