"""What the training loop costs on top of its step: the bare jitted step vs `train_and_evaluate`.

    python -m bench.loop_overhead --config=configs/resnet18.py --image_size=64 \
        --batch_size_per_device=16 --steps=10 --windows=5 --json

Both sides run the same jitted train step (`train.jit_train_step`) on the same device-resident
synthetic batch, in one process:
- bare: `--windows` windows of `--steps` steps, each ended by a wait for the results (before and
  after the loop, to spread machine noise over both);
- loop: `train.train_and_evaluate` on synthetic data, logging every `--steps` steps (the loop's
  only host sync), so its windows are the bare ones plus everything the loop does around the
  step: metrics, metrics.jsonl and TensorBoard, the progress bar, preemption and profiler checks.

The loop is timed from outside: the step it builds is wrapped to record the time of each call,
and the call that follows a logging sync starts a new window. The first windows (compilation and
`--warmup` steps) and the final eval and checkpoint are left out. The loop's own logged images/s
is shown beside it, as a check of its meter.
"""

from __future__ import annotations

import contextlib
import copy
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
from absl import app, flags
from etils import epath

from bench import common
from resnet_flax import cli, metrics, train

FLAGS = common.FLAGS
flags.DEFINE_string('workdir', '', 'Workdir of the loop run; default: a temporary directory.')


def loop_config(config: ml_collections.ConfigDict, steps_per_window: int, windows: int,
                warmup: int) -> tuple[ml_collections.ConfigDict, int]:
    """A copy of the benchmark config for the loop: log (= sync) every window; eval and
    checkpoint only at the end. Returns it and the number of leading windows to leave out."""
    config = copy.deepcopy(config)
    skipped = 1 + math.ceil(warmup / steps_per_window)  # the first one compiles
    total = (skipped + windows + 1) * steps_per_window  # + 1: the last window ends at a sync
    config.num_train_steps = total
    config.log_every_steps = steps_per_window
    config.eval_every_steps = total
    config.checkpoint_every_steps = 0
    config.profile_start_step = -1
    # The run is short: a warmup of epochs would outlast it (the step's cost does not change).
    config.optimizer.warmup_steps = 1
    config.init_from = ''
    return config, skipped


@contextlib.contextmanager
def timed_train_step(stamps: list[float]) -> Iterator[None]:
    """Makes the loop's jitted step record `time.perf_counter()` before each call."""
    original = train.jit_train_step

    def jit_and_time(*args, **kwargs):
        jitted = original(*args, **kwargs)

        def call(state, batch):
            stamps.append(time.perf_counter())
            return jitted(state, batch)

        return call

    train.jit_train_step = jit_and_time
    try:
        yield
    finally:
        train.jit_train_step = original


def run_loop(config: ml_collections.ConfigDict, skipped: int, windows: int,
             workdir: str) -> dict[str, Any]:
    steps_per_window = config.log_every_steps
    stamps: list[float] = []
    with timed_train_step(stamps), contextlib.redirect_stdout(sys.stderr):
        start = time.perf_counter()
        train.train_and_evaluate(config, workdir)
        wall = time.perf_counter() - start
    if len(stamps) != config.num_train_steps:
        raise RuntimeError(f'timed {len(stamps)} of the loop\'s {config.num_train_steps} steps: '
                           'train_and_evaluate no longer builds its step with '
                           'train.jit_train_step; update bench/loop_overhead.py.')
    bounds = [stamps[k * steps_per_window] for k in range(skipped, skipped + windows + 1)]
    times = [b - a for a, b in zip(bounds, bounds[1:], strict=False)]
    logged = {r['step']: r['images_per_sec'] for r in metrics.read_metrics(workdir, 'train')}
    measured_steps = range((skipped + 1) * steps_per_window,
                           (skipped + windows + 1) * steps_per_window, steps_per_window)
    return dict(times=times, wall_s=wall, total_steps=config.num_train_steps,
                logged_images_per_sec=statistics.median(logged[s] for s in measured_steps))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if FLAGS.workdir and epath.Path(FLAGS.workdir).exists() and any(
            epath.Path(FLAGS.workdir).iterdir()):
        raise ValueError(f'--workdir={FLAGS.workdir} is not empty; the loop would resume from '
                         'it. Give an empty or new directory, or none (a temporary one).')
    config = common.config_from_flags()
    setup = common.setup_train(config)
    devices = jax.device_count()
    batch = config.batch_size
    _, compile_s = common.compile_step(setup)
    runner = common.TrainRunner(setup)
    before = common.time_windows(runner, FLAGS.steps, FLAGS.windows, FLAGS.warmup)

    loop_cfg, skipped = loop_config(config, FLAGS.steps, FLAGS.windows, FLAGS.warmup)
    with contextlib.ExitStack() as stack:
        workdir = FLAGS.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        loop = run_loop(loop_cfg, skipped, FLAGS.windows, workdir)

    after = common.time_windows(runner, FLAGS.steps, FLAGS.windows, 0)
    bare = common.throughput(before + after, FLAGS.steps, batch, devices)
    looped = common.throughput(loop['times'], FLAGS.steps, batch, devices)
    result = dict(
        benchmark='loop_overhead',
        **common.describe_config(config, setup.model),
        steps_per_window=FLAGS.steps,
        compile_s=compile_s,
        bare_ms_per_step=bare['ms_per_step'],
        loop_ms_per_step=looped['ms_per_step'],
        bare_images_per_sec=bare['images_per_sec'],
        loop_images_per_sec=looped['images_per_sec'],
        overhead_pct=100 * (looped['ms_per_step'] / bare['ms_per_step'] - 1),
        # Noise from other work on the machine only ever adds time: the fastest windows are
        # the steadiest comparison on a shared machine.
        bare_best_ms_per_step=min(bare['window_ms_per_step']),
        loop_best_ms_per_step=min(looped['window_ms_per_step']),
        best_overhead_pct=100 * (min(looped['window_ms_per_step']) /
                                 min(bare['window_ms_per_step']) - 1),
        loop_logged_images_per_sec=loop['logged_images_per_sec'],
        bare_window_ms_per_step=bare['window_ms_per_step'],
        loop_window_ms_per_step=looped['window_ms_per_step'],
        loop_total_steps=loop['total_steps'],
        loop_wall_s=loop['wall_s'],
        env=common.environment(),
    )
    common.report(result, FLAGS.json)


if __name__ == '__main__':
    common.define_flags(steps_default=10, windows_default=5)
    cli.run(main)  # bad input: a one-line error, no traceback
