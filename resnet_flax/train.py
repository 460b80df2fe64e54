"""The training loop: data -> step -> metrics, evaluation and checkpoints.

All side effects live here; the step itself (`steps.train_step`) is pure and jitted once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import math
import os
import signal
import sys
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_flax import (
    checkpoint,
    config_checks,
    data,
    evaluate,
    input_wait,
    models,
    optim,
    peer_watch,
    precision,
    run_config,
    sharding,
    steps,
    workdir_lock,
)
from resnet_flax import metrics as metrics_lib
from resnet_flax.state import TrainState, abstract_state, create_train_state


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or Inf loss."""


@dataclasses.dataclass(frozen=True)
class Schedule:
    """When things happen, in optimizer steps."""

    steps_per_epoch: int
    total_steps: int
    eval_every: int
    checkpoint_every: int
    log_every: int

    def is_due(self, step: int, every: int) -> bool:
        return step == self.total_steps or (every > 0 and step % every == 0)


def make_schedule(config: ml_collections.ConfigDict, num_train_examples: int) -> Schedule:
    steps_per_epoch = max(1, num_train_examples // config.batch_size)
    total_steps = optim.total_train_steps(config, steps_per_epoch)
    if config.eval_every_steps > 0:
        eval_every = config.eval_every_steps
    else:
        eval_every = max(1, round(config.eval_every_epochs * steps_per_epoch))
    return Schedule(
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        eval_every=eval_every,
        checkpoint_every=config.checkpoint_every_steps,
        log_every=max(1, config.log_every_steps),
    )


def validate_config(config: ml_collections.ConfigDict, device_count: int | None = None) -> None:
    """Fails fast, before anything compiles, on settings that cannot work here (or on
    `device_count` devices: a preflight target's)."""
    devices = device_count or jax.device_count()
    sharding.check_batch_size(config.batch_size, devices=devices)
    precision.check_training_dtypes(config.model)
    sharding.check_batch_size(evaluate.eval_batch_size(config), 'eval_batch_size', devices)
    k = config.grad_accum_steps
    if k < 1 or config.batch_size % (k * devices):
        raise ValueError(
            f'config.batch_size={config.batch_size} cannot be split into '
            f'grad_accum_steps={k} micro-batches over {devices} devices; '
            f'use a batch size that is a multiple of {max(k, 1) * devices}.'
        )


class PreemptionWatcher:
    """Turns SIGTERM or a Ctrl-C (SIGINT) into a flag the loop checks between steps, so no
    work is lost mid-step; a second Ctrl-C aborts at once.

    With several processes, JAX's coordination service catches SIGTERM (in C++: a Python
    SIGTERM handler would replace it) and every process agrees on the step to stop at,
    through orbax's `reached_preemption`. A Ctrl-C there becomes that same notice.
    """

    def __init__(self):
        self.requested = False
        self.signal_name = ''
        self._previous = {}
        if jax.process_count() == 1:
            for signum in (signal.SIGTERM, signal.SIGINT):
                self._previous[signum] = signal.signal(signum, self._handle)
        elif _preemption_service_on():
            self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_sigint)

    def _handle(self, signum, frame):
        del frame
        if self.requested and signum == signal.SIGINT:
            _abort_on_second_interrupt()
        if signum == signal.SIGINT:
            print('\nInterrupted: saving a checkpoint at the end of this step '
                  '(Ctrl-C again to stop at once).', file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = signal.Signals(signum).name

    def _forward_sigint(self, signum, frame):
        """Ctrl-C on one process of several: a KeyboardInterrupt there would leave the others
        waiting for it in the next collective (both still ran 240 s later). Instead it goes on as
        a preemption notice (SIGTERM to this process, which JAX catches and tells every
        process), so all stop at one step and save; this process then exits 130."""
        del frame
        if self.requested:
            _abort_on_second_interrupt()
        print('\nInterrupted: every process saves a checkpoint at the step they all reach '
              '(Ctrl-C again to stop at once).', file=sys.stderr, flush=True)
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        os.kill(os.getpid(), signal.SIGTERM)

    def should_stop(self, manager, step: int) -> bool:
        if jax.process_count() > 1:
            return manager.reached_preemption(step)
        return self.requested

    def close(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)


def _preemption_service_on() -> bool:
    """Whether JAX's preemption sync manager (and so its C++ SIGTERM handler) is running."""
    return jax.distributed.is_initialized() and bool(jax.config.jax_enable_preemption_service)


def _abort_on_second_interrupt() -> None:
    print('Interrupted again: stopped at once; run the same command to resume from '
          'the last checkpoint.', file=sys.stderr, flush=True)
    os._exit(130)  # no cleanup: an unfinished checkpoint is a temporary directory


def _train_batches(config: ml_collections.ConfigDict, start_step: int, mesh):
    if config.data.dataset == 'synthetic':
        # Synthetic data lives on the devices: one batch, reused, so no input cost is timed.
        first = next(_host_batches(config, start_step))
        return itertools.repeat(sharding.put_batch(first, mesh))
    return sharding.prefetch_to_mesh(_host_batches(config, start_step), mesh)


def _host_batches(config, start_step: int):
    return data.train_batches(
        config.data,
        global_batch_size=config.batch_size,
        seed=config.seed,
        start_step=start_step,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )


def _mean_metrics(window: list[dict[str, jax.Array]]) -> dict[str, float]:
    """One host sync for a whole logging window."""
    fetched = jax.device_get(window)
    return {name: float(np.mean([m[name] for m in fetched])) for name in fetched[0]}


def _check_finite(summary: dict[str, float], step: int, last_checkpoint: int | None) -> None:
    # A NaN gradient with a finite loss poisons the weights just as surely, and the next
    # checkpoint would keep them: check both before anything is saved.
    bad = next((name for name in ('loss', 'grad_norm')
                if name in summary and not math.isfinite(summary[name])), None)
    if bad is not None:
        kept = (f'the last checkpoint (step {last_checkpoint}) is intact'
                if last_checkpoint is not None else 'no checkpoint was written')
        what = 'loss' if bad == 'loss' else 'gradient norm'
        raise NonFiniteLossError(
            f'Training {what} is {summary[bad]} by step {step}; stopped, and {kept}. '
            'Lower optimizer.learning_rate or add warmup, then run the same command to resume.'
        )


@contextlib.contextmanager
def _workdir_locked(workdir: epath.Path):
    """Process 0 holds the workdir lock; every process learns whether it got it."""
    lock = workdir_lock.WorkdirLock(workdir)
    refused = None
    if jax.process_index() == 0:
        try:
            lock.acquire()
        except workdir_lock.WorkdirLockedError as error:
            refused = error
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        if multihost_utils.broadcast_one_to_all(np.int32(refused is not None)) and not refused:
            refused = workdir_lock.WorkdirLockedError(
                f'Process 0 could not lock {workdir}; see its log.')
    if refused is not None:
        raise refused
    try:
        yield lock
    except BaseException:
        with contextlib.suppress(OSError):  # storage still down: the error that stopped the
            lock.release()  # run is the one to report; a dead run's lock is taken over
        raise
    lock.release()


def _make_workdir(workdir: epath.Path) -> None:
    """Creates the workdir, or says in one line why --workdir cannot be one."""
    if workdir.exists() and not workdir.is_dir():
        raise ValueError(f'--workdir={workdir} is a file, not a directory; choose another '
                         '--workdir.')
    try:
        workdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:  # a file on the way, no permission, read-only file system
        reason = error.strerror or type(error).__name__
        raise ValueError(f'--workdir={workdir} cannot be created ({reason}: '
                         f'{error.filename or workdir}); choose a --workdir in a directory '
                         'you can write to.') from None


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Trains `config` in `workdir`, resuming from its newest checkpoint. Returns final metrics."""
    workdir = epath.Path(workdir)
    if jax.process_index() == 0:
        for line in start_lines(config, jax.devices(), jax.process_count()):
            print(line, file=sys.stderr, flush=True)
    # Fields the data makes obvious are inferred (and announced); every other problem is
    # named in one error, before any compile or any file in the workdir.
    config, info, notes = config_checks.resolve(config, workdir, validate_config)
    if jax.process_index() == 0:
        for note in notes:
            print(note, file=sys.stderr, flush=True)
    _make_workdir(workdir)
    # With several processes, the death of one stops the others within seconds, in one line.
    with _workdir_locked(workdir) as lock, peer_watch.watching(before_exit=lock.release):
        return _train_and_evaluate(config, workdir, info)


@dataclasses.dataclass
class _Run:
    """Everything one training run holds: fixed parts from set-up, plus the loop's position."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    info: data.DatasetInfo
    schedule: Schedule
    mesh: Any
    manager: Any
    state: TrainState
    train_step: Any
    eval_fn: Any
    use_ema: bool
    writer: metrics_lib.MetricWriter
    progress: metrics_lib.Progress
    preemption: PreemptionWatcher
    profiler: Profiler
    step: int
    last_checkpoint: int | None
    window: list[dict[str, jax.Array]] = dataclasses.field(default_factory=list)
    window_start: float = dataclasses.field(default_factory=time.time)
    eval_metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    train_summary: dict[str, float] = dataclasses.field(default_factory=dict)
    run_start: float = dataclasses.field(default_factory=time.time)
    batches: input_wait.TimedBatches | None = None  # the loop's iterator, timed


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.Path,
                        info: data.DatasetInfo) -> dict[str, Any]:
    run = _set_up(config, workdir, info)
    with _closing(run):
        if run.step >= run.schedule.total_steps:
            return _report_complete(run)
        _announce(run)
        preempted = _loop(run)
    if preempted:
        return {'step': run.step, 'preempted': True,
                'interrupted': run.preemption.signal_name == 'SIGINT'}
    return _final_summary(run)


def _restore_or_init(config, parts: StepParts, manager, info):
    """The newest checkpoint that restores, else fresh (or fine-tuning) weights. A workdir
    whose checkpoints all fail to restore stops the run (checkpoint.CheckpointRestoreError)
    unless config.checkpoint_fallback='scratch' says to move them aside and start over."""
    try:
        state = checkpoint.restore_latest(manager, parts.target, model_config=config.model,
                                          fallback=config.checkpoint_fallback)
    except BaseException:
        manager.close()  # else its threads print tracebacks at exit, under the one-line error
        raise
    if state is None:
        state = create_train_state(parts.model, parts.optimizer, jax.random.PRNGKey(config.seed),
                                   info.image_shape, parts.use_ema, parts.mesh)
        if config.init_from:
            from resnet_flax import finetune

            state = finetune.initialize_from(state, config.init_from, parts.optimizer)
    return state


@dataclasses.dataclass(frozen=True)
class StepParts:
    """What a run compiles, built one way for training, benchmarks and preflight: the model,
    optimizer and schedule of the config, the state's abstract shape and shardings on `mesh`,
    and the two jitted steps (not yet compiled)."""

    model: models.ResNet
    optimizer: Any
    learning_rate_fn: Any
    step_cfg: steps.StepConfig
    mesh: Any
    target: TrainState  # ShapeDtypeStructs with their shardings
    train_step: Any
    eval_fn: Any
    use_ema: bool


def build_step_parts(config: ml_collections.ConfigDict, image_shape: tuple[int, ...],
                     steps_per_epoch: int, mesh) -> StepParts:
    """The model, optimizer, shardings, donation, dtype, gradient accumulation and BN grouping
    of `config`, and its jitted train and eval steps on `mesh`. Nothing is compiled here."""
    model = models.from_config(config.model)
    learning_rate_fn = optim.create_learning_rate_schedule(config, steps_per_epoch)
    optimizer = optim.create_optimizer(config, steps_per_epoch)
    use_ema = config.ema_decay > 0
    target = abstract_state(model, optimizer, image_shape, use_ema, mesh)
    step_cfg = steps.StepConfig.from_config(config)
    return StepParts(
        model=model, optimizer=optimizer, learning_rate_fn=learning_rate_fn, step_cfg=step_cfg,
        mesh=mesh, target=target,
        train_step=jit_train_step(model, optimizer, learning_rate_fn, step_cfg, mesh, target),
        eval_fn=evaluate.make_eval_fn(model, mesh, step_cfg.augment), use_ema=use_ema)


def _set_up(config: ml_collections.ConfigDict, workdir: epath.Path,
            info: data.DatasetInfo) -> _Run:
    """Mesh, step parts, checkpoint manager and state (restored or new)."""
    schedule = make_schedule(config, info.num_train_examples)
    parts = build_step_parts(config, info.image_shape, schedule.steps_per_epoch,
                             sharding.create_mesh())
    manager = checkpoint.create_manager(
        checkpoint.checkpoint_dir(workdir), keep=config.keep_checkpoints
    )
    _check_config_change(config, workdir, manager.latest_step())
    state = _restore_or_init(config, parts, manager, info)
    start_step = int(state.step)
    if jax.process_index() == 0:
        run_config.save(workdir, config, start_step)

    is_main = jax.process_index() == 0
    return _Run(
        config=config, workdir=workdir, info=info, schedule=schedule, mesh=parts.mesh,
        manager=manager, state=state, train_step=parts.train_step, eval_fn=parts.eval_fn,
        use_ema=parts.use_ema,
        writer=metrics_lib.MetricWriter(workdir, enabled=is_main),
        progress=metrics_lib.Progress(schedule.total_steps, start_step,
                                      enabled=is_main and start_step < schedule.total_steps),
        preemption=PreemptionWatcher(), profiler=Profiler(config, workdir),
        step=start_step, last_checkpoint=manager.latest_step(),
    )


def _check_config_change(config: ml_collections.ConfigDict, workdir: epath.Path,
                         latest_step: int | None) -> None:
    if latest_step is None:  # nothing trained yet: the new config simply applies
        return
    note = run_config.check_resume(workdir, config, latest_step)
    if note and jax.process_index() == 0:
        print(note, file=sys.stderr, flush=True)


def _announce(run: _Run) -> None:
    if run.step:
        run.progress.write(f'Resumed from step {run.step} in {run.workdir}.')
    run.progress.write(
        f'Training to step {run.schedule.total_steps} ({run.schedule.steps_per_epoch} per '
        'epoch).')


# From this input size on a config is ImageNet-scale (the CIFAR and digits recipes use <= 64).
IMAGENET_SCALE_MIN_IMAGE_SIZE = 128


def start_lines(config: ml_collections.ConfigDict, devices, process_count: int) -> list[str]:
    """A run's first lines: what it trains on, and a warning when an ImageNet-scale config
    is about to train on a CPU."""
    lines = [f'Training on {describe_devices(devices, process_count)}.']
    size = int(config.data.image_size)
    if devices[0].platform == 'cpu' and size >= IMAGENET_SCALE_MIN_IMAGE_SIZE:
        lines.append(
            f'Warning: an ImageNet-scale config (data.image_size={size} >= '
            f'{IMAGENET_SCALE_MIN_IMAGE_SIZE}) is training on the CPU, where an epoch takes days; '
            'on a GPU or TPU machine see README "On a GPU or TPU machine" (no accelerator found '
            'here: is jax[cuda12] or jax[tpu] installed?).')
    return lines


def describe_devices(devices, process_count: int) -> str:
    """'8 x NVIDIA H200 (cuda), 1 process': what a run (or a preflight target) runs on."""
    kinds = sorted({d.device_kind for d in devices})
    platform = devices[0].platform
    processes = f'{process_count} process' + ('es' if process_count != 1 else '')
    return f"{len(devices)} x {' + '.join(kinds)} ({platform}), {processes}"


def _report_complete(run: _Run) -> dict[str, Any]:
    """A finished run: says so and shows its final eval, from metrics.jsonl when recorded
    there (else evaluated again); the train step is never compiled."""
    records = metrics_lib.read_metrics(run.workdir)
    final = {r['split']: r for r in records if r['step'] == run.step}
    if 'eval' in final:
        run.eval_metrics = {k: v for k, v in final['eval'].items() if k not in ('step', 'split')}
    else:
        run.eval_metrics = _evaluate_all(run.eval_fn, run.state, run.config, run.mesh,
                                         run.use_ema)
    run.train_summary = final.get('train', {})
    run.progress.write(f'The run in {run.workdir} is already complete: step {run.step} of '
                       f'{run.schedule.total_steps}. To train longer, raise num_epochs or '
                       'num_train_steps with --config.allow_config_change=True.')
    run.progress.write('Final ' + _format_eval(run.step, run.eval_metrics))
    return _final_summary(run, trained=False)


def _loop(run: _Run) -> bool:
    """Steps to the end of the schedule. Returns True if stopped early by a preemption."""
    schedule = run.schedule
    run.batches = input_wait.TimedBatches(_train_batches(run.config, run.step, run.mesh))
    pacer = input_wait.StepPacer(run.config.max_steps_ahead)
    run.window_start = run.run_start = time.time()
    while run.step < schedule.total_steps:
        # A save that failed stops the run now, not in the next save's wait (which, if it
        # failed on this process alone, waits for the others' part of it for 20 minutes).
        checkpoint.check_background_save(run.manager)
        if run.preemption.should_stop(run.manager, run.step):
            _save_for_preemption(run)
            return True
        run.profiler.before_step(run.step)
        run.state, step_metrics = run.train_step(run.state, next(run.batches))
        pacer.dispatched(step_metrics)
        run.window.append(step_metrics)
        run.step += 1
        run.profiler.after_step(run.step)

        eval_due = schedule.is_due(run.step, schedule.eval_every)
        checkpoint_due = schedule.is_due(run.step, schedule.checkpoint_every)
        if schedule.is_due(run.step, schedule.log_every) or eval_due or checkpoint_due:
            _log_window(run)
        if eval_due:
            _evaluate_and_log(run)
        if eval_due or checkpoint_due:
            _save_checkpoint(run, with_eval=eval_due)
    return False


def _log_window(run: _Run) -> None:
    """Averages the logging window's step metrics (one host sync), checks and writes them."""
    summary = _mean_metrics(run.window)  # waits for the window's last step
    elapsed = time.time() - run.window_start
    summary['images_per_sec'] = len(run.window) * run.config.batch_size / elapsed
    summary['input_wait_fraction'] = run.batches.wait_fraction(elapsed)
    if run.info.num_skipped_examples is not None:
        summary['skipped_images'] = run.info.num_skipped_examples
    if run.config.halt_on_nan:
        _check_finite(summary, run.step, run.last_checkpoint)
    run.writer.write(run.step, 'train', summary)
    run.progress.update(run.step, summary)
    run.train_summary = summary
    run.window, run.window_start = [], time.time()


def _evaluate_and_log(run: _Run) -> None:
    run.eval_metrics = _evaluate_all(run.eval_fn, run.state, run.config, run.mesh, run.use_ema)
    run.writer.write(run.step, 'eval', run.eval_metrics)
    run.progress.write(_format_eval(run.step, run.eval_metrics))


def _save_checkpoint(run: _Run, with_eval: bool) -> None:
    # The eval top-1 of the weights and of their EMA rank checkpoints for --checkpoint_step=best.
    metrics = ({k: run.eval_metrics[k] for k in ('top1', 'ema_top1') if k in run.eval_metrics}
               if with_eval else None)
    checkpoint.save(run.manager, run.step, run.state, run.config, metrics=metrics)
    run.last_checkpoint = run.step
    run.window_start = time.time()  # do not charge eval/checkpoint time to the step
    run.batches.restart()


def _save_for_preemption(run: _Run) -> None:
    if run.last_checkpoint != run.step:  # a step is saved once; orbax refuses a second save
        checkpoint.save(run.manager, run.step, run.state, run.config)
    checkpoint.wait_until_saved(run.manager)
    why = 'Interrupted' if run.preemption.signal_name == 'SIGINT' else 'Preempted'
    run.progress.write(f'{why}: saved a checkpoint at step {run.step}; run the same '
                       'command to resume.')


@contextlib.contextmanager
def _closing(run: _Run):
    """Closes the run at the end; after an error, a failure to close (the storage may still
    be down) is only logged, so that the error that stopped the run is the one reported."""
    try:
        yield
    except BaseException:
        try:
            _close(run)
        except Exception as error:  # noqa: BLE001 - secondary to the error being raised
            logging.warning('While stopping: %s', str(error).splitlines()[0][:300])
        raise
    _close(run)


def _close(run: _Run) -> None:
    """Waits for the last save (a failed one raises CheckpointWriteError), then closes the
    rest whatever happened: the metrics writer still writes its last records."""
    try:
        checkpoint.wait_until_saved(run.manager)
    finally:
        run.preemption.close()
        run.progress.close()
        run.writer.close()
        run.profiler.close()


def _final_summary(run: _Run, trained: bool = True) -> dict[str, Any]:
    """The run's final numbers; the wall time only of a run that trained now (a finished run
    re-run has none: its training time is not recorded)."""
    summary = {
        'step': run.step,
        **{f'eval_{k}': v for k, v in run.eval_metrics.items()},
        'train_loss': run.train_summary.get('loss'),
        **({'wall_time_sec': time.time() - run.run_start} if trained else
           {'already_complete': True}),
    }
    if jax.process_index() == 0:
        print('Done: ' + ', '.join(f'{k}={_short(v)}' for k, v in summary.items()), flush=True)
    return summary


def jit_train_step(model, optimizer, learning_rate_fn, step_cfg, mesh, target: TrainState):
    """The train step jitted with its shardings, the old state donated to the new one."""
    batch_sharding = sharding.batch_sharding(mesh)
    state_shardings = jax.tree.map(lambda x: x.sharding, target)
    step_fn = functools.partial(
        steps.train_step,
        model=model,
        optimizer=optimizer,
        learning_rate_fn=learning_rate_fn,
        cfg=step_cfg,
        batch_sharding=batch_sharding,
    )
    return jax.jit(
        step_fn,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, sharding.replicated(mesh)),
        donate_argnums=0,
    )


def _evaluate_all(eval_fn, state: TrainState, config, mesh, use_ema: bool) -> dict[str, float]:
    results = evaluate.evaluate(eval_fn, state.variables(), config, mesh)
    if use_ema:
        ema = evaluate.evaluate(eval_fn, state.variables(use_ema=True), config, mesh)
        results.update({f'ema_{k}': v for k, v in ema.items() if k != 'num_examples'})
    return results


def _format_eval(step: int, metrics: dict[str, float]) -> str:
    ema = (f"; EMA weights: loss {metrics['ema_loss']:.4f}, top1 {metrics['ema_top1']:.4f}, "
           f"top5 {metrics['ema_top5']:.4f}" if 'ema_top1' in metrics else '')
    return (f"eval @ step {step}: loss {metrics['loss']:.4f}, top1 {metrics['top1']:.4f}, "
            f"top5 {metrics['top5']:.4f} over {metrics['num_examples']} examples{ema}")


def _short(value: Any) -> str:
    return f'{value:.4g}' if isinstance(value, float) else str(value)


class Profiler:
    """Writes a trace of `profile_num_steps` steps from `profile_start_step` (TensorBoard)."""

    def __init__(self, config: ml_collections.ConfigDict, workdir: epath.Path):
        self.start = config.profile_start_step
        self.stop = config.profile_start_step + config.profile_num_steps
        self.directory = workdir / 'profile'
        self.running = False

    def before_step(self, step: int) -> None:
        if self.start >= 0 and step == self.start:
            jax.profiler.start_trace(str(self.directory))
            self.running = True

    def after_step(self, step: int) -> None:
        if self.running and step >= self.stop:
            self.close()

    def close(self) -> None:
        if self.running:
            jax.profiler.stop_trace()
            self.running = False
