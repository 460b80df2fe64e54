"""What the benchmarks share: flags, the real train and eval steps on synthetic data, timing.

Every benchmark times the functions the trainer runs: `train.jit_train_step` with the config's
optimizer, schedule, BN updates and weight decay, and `evaluate.make_eval_fn`, on one synthetic
batch that stays on the devices (as the loop keeps it), so no input cost is timed.

Timing: compile (trace + lower + XLA) once and report how long it took, run `--warmup` untimed
steps, then `--windows` windows of `--steps` steps, each ended by a wait for the results; the
median window gives ms/step and images/s.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from resnet_flax import data, evaluate, models, sharding, summary, train
from resnet_flax.device_augment import AugmentConfig
from resnet_flax.state import TrainState, create_train_state

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / 'configs' / 'resnet50.py'
FLAGS = flags.FLAGS


def define_flags(steps_default: int = 10, windows_default: int = 5) -> None:
    """The flags every benchmark takes (the config with `--config.x=y` overrides, sizes, timing)."""
    config_flags.DEFINE_config_file(
        'config', str(DEFAULT_CONFIG), 'Experiment config file; --config.x=y overrides a field.',
        lock_config=False)
    flags.DEFINE_integer('batch_size_per_device', 0,
                         'Examples per device per step; 0 = config.batch_size / devices.')
    flags.DEFINE_string('dtype', '', "Compute dtype: 'bfloat16', 'float32' or '' (the config's).")
    flags.DEFINE_integer('image_size', 0, 'Square input size; 0 = config.data.image_size.')
    flags.DEFINE_integer('steps', steps_default, 'Steps per timed window.')
    flags.DEFINE_integer('warmup', 2, 'Untimed steps after compiling.')
    flags.DEFINE_integer('windows', windows_default, 'Timed windows; the median is reported.')
    flags.DEFINE_float('peak_tflops', 0.0,
                       'Peak dense TFLOP/s of one device, for the model FLOPs utilisation (MFU); '
                       '0 = no MFU.')
    flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
    flags.DEFINE_string('compilation_cache_dir', '',
                        'Persistent XLA compilation cache, so that a second run compiles fast.')


def quiet_logging() -> None:
    """absl/XLA INFO lines (e.g. the missing TPU library) off, unless -v was given."""
    if not FLAGS['verbosity'].present:
        logging.set_verbosity(logging.WARNING)


def check_timing_flags() -> None:
    if FLAGS.steps < 1 or FLAGS.windows < 1 or FLAGS.warmup < 0:
        raise ValueError(f'--steps={FLAGS.steps} and --windows={FLAGS.windows} must be >= 1 and '
                         f'--warmup={FLAGS.warmup} >= 0.')


def enable_compilation_cache(directory: str) -> None:
    """Compiled executables go to (and come from) `directory`; set before anything compiles."""
    if directory:
        jax.config.update('jax_compilation_cache_dir', directory)


def bench_config(config: ml_collections.ConfigDict, batch_size_per_device: int = 0,
                 dtype: str = '', image_size: int = 0) -> ml_collections.ConfigDict:
    """A copy of `config` on synthetic data, with the benchmark's batch, dtype and image size."""
    config = copy.deepcopy(config)
    devices = jax.device_count()
    per_device = batch_size_per_device or config.batch_size // devices
    if per_device < 1:
        raise ValueError(f'--batch_size_per_device={batch_size_per_device} (config.batch_size='
                         f'{config.batch_size} over {devices} devices) must be >= 1.')
    if dtype and dtype not in models.DTYPES:
        raise ValueError(f'--dtype={dtype!r} is not one of {tuple(models.DTYPES)}.')
    config.batch_size = per_device * devices
    config.eval_batch_size = 0
    if dtype:
        config.model.dtype = dtype
    if image_size:
        config.data.image_size = image_size
    config.data.dataset = 'synthetic'
    config.data.train_split = 'train'
    config.data.eval_split = 'validation'
    config.data.synthetic_num_classes = config.model.num_classes
    config.data.synthetic_num_eval_examples = config.batch_size
    return config


def config_from_flags() -> ml_collections.ConfigDict:
    quiet_logging()
    check_timing_flags()
    enable_compilation_cache(FLAGS.compilation_cache_dir)
    return bench_config(FLAGS.config, FLAGS.batch_size_per_device, FLAGS.dtype, FLAGS.image_size)


@dataclasses.dataclass
class Setup:
    """The model, the jitted step, its inputs, and the config they came from."""

    config: ml_collections.ConfigDict
    model: models.ResNet
    mesh: jax.sharding.Mesh
    state: TrainState
    step_fn: Callable  # the jitted train step, or the jitted eval step
    batch: dict[str, jax.Array]

    @property
    def image_size(self) -> int:
        return int(self.config.data.image_size)


def setup_train(config: ml_collections.ConfigDict) -> Setup:
    """The trainer's jitted step, a fresh train state, and one device-resident synthetic batch."""
    train.validate_config(config)
    info = data.get_info(config.data)
    schedule = train.make_schedule(config, info.num_train_examples)
    parts = train.build_step_parts(config, info.image_shape, schedule.steps_per_epoch,
                                   sharding.create_mesh())
    model, mesh = parts.model, parts.mesh
    state = create_train_state(model, parts.optimizer, jax.random.PRNGKey(config.seed),
                               info.image_shape, parts.use_ema, mesh)
    step_fn = parts.train_step
    host_batch = next(data.train_batches(
        config.data, global_batch_size=config.batch_size, seed=config.seed,
        process_index=jax.process_index(), process_count=jax.process_count()))
    return Setup(config, model, mesh, state, step_fn, sharding.put_batch(host_batch, mesh))


def setup_eval(config: ml_collections.ConfigDict) -> Setup:
    """The evaluator's jitted step, fresh variables, and one device-resident eval batch."""
    setup = setup_train(config)
    host_batch = next(data.eval_batches(
        config.data, global_batch_size=config.batch_size,
        process_index=jax.process_index(), process_count=jax.process_count()))
    eval_fn = evaluate.make_eval_fn(setup.model, setup.mesh,
                                   AugmentConfig.from_config(config))
    return dataclasses.replace(setup, step_fn=eval_fn,
                               batch=sharding.put_batch(host_batch, setup.mesh))


class TrainRunner:
    """Runs n train steps, carrying the (donated) state, and waits for the last one."""

    def __init__(self, setup: Setup):
        self.step_fn = setup.step_fn
        self.batch = setup.batch
        self.state = setup.state
        self.metrics: dict[str, jax.Array] = {}

    def __call__(self, n: int) -> None:
        state, metrics = self.state, self.metrics
        for _ in range(n):
            state, metrics = self.step_fn(state, self.batch)
        jax.block_until_ready((state, metrics))
        self.state, self.metrics = state, metrics

    def last_loss(self) -> float:
        return float(self.metrics['loss']) if self.metrics else math.nan


class EvalRunner:
    """Runs n eval steps on fixed variables and waits for all of them."""

    def __init__(self, setup: Setup):
        self.step_fn = setup.step_fn
        self.batch = setup.batch
        self.variables = setup.state.variables()

    def __call__(self, n: int) -> None:
        jax.block_until_ready([self.step_fn(self.variables, self.batch) for _ in range(n)])


def compile_step(setup: Setup, inference: bool = False) -> tuple[Any, float]:
    """Traces, lowers and compiles the step (jit's cache keeps it); returns it and the seconds."""
    first = setup.state.variables() if inference else setup.state
    start = time.perf_counter()
    compiled = setup.step_fn.lower(first, setup.batch).compile()
    return compiled, time.perf_counter() - start


def time_windows(run: Callable[[int], None], steps_per_window: int, windows: int,
                 warmup: int) -> list[float]:
    """Seconds of each timed window of `steps_per_window` steps, after `warmup` untimed steps."""
    if warmup:
        run(warmup)
    times = []
    for _ in range(windows):
        start = time.perf_counter()
        run(steps_per_window)
        times.append(time.perf_counter() - start)
    return times


def throughput(times: Sequence[float], steps_per_window: int, images_per_step: int,
               devices: int) -> dict[str, Any]:
    """ms/step and images/s of the median window, and the spread of the windows."""
    median = statistics.median(times)
    return dict(
        ms_per_step=1e3 * median / steps_per_window,
        images_per_sec=images_per_step * steps_per_window / median,
        images_per_sec_per_device=images_per_step * steps_per_window / median / devices,
        window_ms_per_step=[round(1e3 * t / steps_per_window, 3) for t in times],
        spread_pct=100 * (max(times) - min(times)) / median,
    )


def model_macs(model: models.ResNet, image_size: int) -> int:
    """Multiply-accumulates of one forward pass of one image (convs and dense layers)."""
    return int(summary.summarize(model, image_size)['macs'])


def xla_flops(compiled: Any) -> float | None:
    """FLOPs of one call of a compiled step by XLA's cost analysis (per device), if it says."""
    try:
        cost = compiled.cost_analysis()
    except Exception:  # some backends have no cost model
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    flops = (cost or {}).get('flops')
    return float(flops) if flops else None


def compiled_memory_bytes(compiled: Any) -> int | None:
    """The compiler's estimate of the step's device memory: arguments, outputs and temporaries."""
    try:
        stats = compiled.memory_analysis()
    except Exception:
        return None
    if stats is None:
        return None
    peak = getattr(stats, 'peak_memory_in_bytes', 0)
    if peak:
        return int(peak)
    return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
               + stats.temp_size_in_bytes - stats.alias_size_in_bytes)


def _memory_stat(name: str) -> int | None:
    values = []
    for device in jax.local_devices():
        stats = device.memory_stats()
        if stats and name in stats:
            values.append(int(stats[name]))
    return max(values) if values else None


def peak_memory_bytes() -> int | None:
    """Peak bytes in use on this process's busiest device since start; None where not tracked."""
    return _memory_stat('peak_bytes_in_use')


def memory_limit_bytes() -> int | None:
    """The bytes JAX may use on a device (its allocator's limit); None where not tracked."""
    return _memory_stat('bytes_limit')


def mfu(images_per_sec: float, flops_per_image: float, peak_tflops: float,
        devices: int) -> float | None:
    """Model FLOPs utilisation: achieved model FLOP/s over the devices' peak."""
    if peak_tflops <= 0:
        return None
    return images_per_sec * flops_per_image / (peak_tflops * 1e12 * devices)


def environment() -> dict[str, Any]:
    """Where and with what a number was measured."""
    import flax
    import jaxlib
    import optax

    device = jax.devices()[0]
    return dict(
        date=datetime.date.today().isoformat(),
        backend=jax.default_backend(),
        device_kind=device.device_kind,
        devices=jax.device_count(),
        processes=jax.process_count(),
        host_cpus=os.cpu_count(),
        python=platform.python_version(),
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        flax=flax.__version__,
        optax=optax.__version__,
        xla_flags=os.environ.get('XLA_FLAGS', ''),
    )


def describe_config(config: ml_collections.ConfigDict, model: models.ResNet) -> dict[str, Any]:
    """The benchmarked settings in a few fields."""
    return dict(
        model=f'{model.block} {"-".join(map(str, model.stage_sizes))} '
              f'widths {"-".join(map(str, model.stage_widths))}',
        depth=int(config.model.depth),
        dtype=str(config.model.dtype),
        image_size=int(config.data.image_size),
        batch_size=int(config.batch_size),
        batch_size_per_device=int(config.batch_size) // jax.device_count(),
        bn_group_size=int(config.model.bn_group_size),
        optimizer=str(config.optimizer.name),
    )


def benchmark_step(setup: Setup, inference: bool, steps_per_window: int, windows: int,
                   warmup: int, peak_tflops: float) -> dict[str, Any]:
    """Compiles and times the train (or eval) step of `setup`; the numbers as one dict."""
    devices = jax.device_count()
    compiled, compile_s = compile_step(setup, inference)
    runner = EvalRunner(setup) if inference else TrainRunner(setup)
    times = time_windows(runner, steps_per_window, windows, warmup)
    result = dict(
        benchmark='inference' if inference else 'train',
        **describe_config(setup.config, setup.model),
        compile_s=compile_s,
        **throughput(times, steps_per_window, setup.config.batch_size, devices),
    )
    macs = model_macs(setup.model, setup.image_size)
    # A train step is a forward and a backward pass, the backward costing twice the forward.
    flops_per_image = 2 * macs * (1 if inference else 3)
    result.update(
        macs_per_image=macs,
        model_flops_per_image=flops_per_image,
        xla_flops_per_device_step=xla_flops(compiled),
        peak_tflops=peak_tflops or None,
        mfu=mfu(result['images_per_sec'], flops_per_image, peak_tflops, devices),
        peak_memory_bytes=peak_memory_bytes(),
        memory_limit_bytes=memory_limit_bytes(),
        compiled_memory_bytes=compiled_memory_bytes(compiled),
        compilation_cache=getattr(jax.config, 'jax_compilation_cache_dir', None) or None,
    )
    if not inference:
        result['final_loss'] = runner.last_loss()
    result['env'] = environment()
    return result


def run_step_benchmark(inference: bool) -> None:
    """bench.train_throughput and bench.inference_throughput: the config from the flags, its
    train (or eval) step timed, the result reported."""
    config = config_from_flags()
    setup = setup_eval(config) if inference else setup_train(config)
    result = benchmark_step(setup, inference=inference, steps_per_window=FLAGS.steps,
                            windows=FLAGS.windows, warmup=FLAGS.warmup,
                            peak_tflops=FLAGS.peak_tflops)
    report(result, FLAGS.json)


# ---------------------------------------------------------------------------------------------
# Printing


def _format_value(value: Any) -> str:
    if value is None:
        return 'n/a'
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return f'{value:,.4g}' if abs(value) < 1e4 else f'{value:,.0f}'
    if isinstance(value, int):
        return f'{value:,}'
    return str(value)


def _format_bytes(n: int) -> str:
    return f'{n / 2**30:.2f} GiB' if n >= 2**30 else f'{n / 2**20:.1f} MiB'


def format_result(result: dict[str, Any]) -> str:
    """One aligned `name  value` line per scalar field; nested dicts are indented blocks."""
    lines = []
    width = max(len(k) for k in result)
    for key, value in result.items():
        if isinstance(value, dict):
            lines.append(f'{key}:')
            lines.extend('  ' + line for line in format_result(value).splitlines())
        elif isinstance(value, list):
            lines.append(f'{key.ljust(width)}  {", ".join(_format_value(v) for v in value)}')
        else:
            if key.endswith('_bytes') and isinstance(value, int):
                value = _format_bytes(value)
            elif key in ('mfu',) and value is not None:
                value = f'{100 * value:.1f}%'
            lines.append(f'{key.ljust(width)}  {_format_value(value)}')
    return '\n'.join(lines)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Rows of dicts as a plain-text table with the given columns."""
    cells = [list(columns)] + [[_format_value(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    fmt = lambda row: '  '.join(c.rjust(w) for c, w in zip(row, widths, strict=True))
    return '\n'.join([fmt(cells[0]), '-' * len(fmt(cells[0])), *map(fmt, cells[1:])])


def report(result: dict[str, Any], as_json: bool) -> None:
    """Prints the result: one JSON line (`--json`), or a readable table."""
    if as_json:
        print(json.dumps(result), flush=True)
    else:
        print(format_result(result), flush=True)
