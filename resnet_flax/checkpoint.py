"""Orbax checkpoints of the train state: asynchronous saves, safe restores.

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState as sharded arrays) and
`meta` (JSON: the config, the code version, the step, and a checksum of every array). Orbax
writes each step to a temporary directory and renames it when complete, so a killed save never
looks like a checkpoint; temporary directories left by killed saves are removed on the next
start. A restore checks the arrays it read against the checksums saved with them, so a
checkpoint damaged on disk is moved aside instead of silently resuming from wrong values.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging as std_logging
import os
import re
import subprocess
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from orbax.checkpoint import checkpoint_managers

import resnet_flax
from resnet_flax import run_config, save_watch, storage

PyTree = Any
CHECKPOINT_DIR = 'checkpoints'
QUARANTINE_DIR = 'checkpoints_unreadable'


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being restored."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint's files are missing or damaged."""


class ChecksumMismatchError(CheckpointCorruptError):
    """An array read back does not match the checksum saved with it: the bytes are bad."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written: the storage stopped answering for longer than its
    clients retry (gcsfs about 35 s, tensorstore longer)."""


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def create_manager(
    directory: epath.PathLike, keep: int = 3, keep_best: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints, plus the best by eval top-1 when `keep_best` (and
    the best by EMA top-1, for --checkpoint_step=best --ema)."""
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        for metric in ('top1', 'ema_top1'):
            policies.append(
                checkpoint_managers.BestN(
                    get_metric_fn=lambda metrics, m=metric: metrics.get(m, metrics['top1']),
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
    options = ocp.CheckpointManagerOptions(
        preservation_policy=checkpoint_managers.AnyPreservationPolicy(policies),
        # Orbax writes a checkpoint's metrics only when it tracks a best_fn.
        best_fn=(lambda metrics: metrics['top1']) if keep_best else None,
        best_mode='max',
        enable_async_checkpointing=True,
        cleanup_tmp_directories=not read_only,  # left by saves that a kill interrupted
        create=not read_only,
        read_only=read_only,
    )
    if not read_only:
        save_watch.start()
        _quiet_abandoned_io()
    handlers = {'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(epath.Path(directory), options=options, item_handlers=handlers)


def code_version() -> str:
    """Package version, plus the git commit when run from a checkout."""
    try:
        commit = subprocess.run(
            ['git', 'rev-parse', '--short', 'HEAD'],
            cwd=epath.Path(resnet_flax.__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ''
    return f'{resnet_flax.__version__}+{commit}' if commit else resnet_flax.__version__


def library_versions() -> dict[str, str]:
    """The versions of what writes and reads the checkpoint files. A restore that fails on a
    step written by other versions is a software change, not damage: nothing is moved."""
    from importlib import metadata

    versions = {}
    for name in ('orbax-checkpoint', 'tensorstore'):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = 'unknown'
    return versions


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: PyTree,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    check_background_save(manager)
    meta = {
        'step': int(step),
        'code_version': code_version(),
        'saved_at': time.time(),
        'config': config.to_json_best_effort(),
        'checksums': checksums(state),
        'libraries': library_versions(),
    }
    with _write_errors_explained(manager, int(step)):
        manager.save(
            int(step),
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave(meta)),
            metrics=metrics,
            force=True,
        )
    _in_flight[id(manager)] = int(step)


# Per manager (by id): the step of the save last started, and whether a save of it failed
# (after which nothing waits on it: its threads may wait for the other processes for good).
_in_flight: dict[int, int] = {}
_failed: set[int] = set()


def check_background_save(manager: ocp.CheckpointManager) -> None:
    """Raises CheckpointWriteError if a background save failed on this process, as soon as
    orbax has logged it (save_watch.py): cheap enough to call after every step."""
    error = save_watch.failure()
    if error is not None:
        _failed.add(id(manager))
        raise _write_error(manager, _in_flight.get(id(manager)), error) from error


def wait_until_saved(manager: ocp.CheckpointManager) -> None:
    """Blocks until the save in flight is committed; a storage failure is one line. After a
    failed save, only lets orbax's threads end (with several processes, it returns at once:
    they may be waiting for the others' part of that save, for good)."""
    check_background_save(manager)
    if id(manager) in _failed:
        if jax.process_count() == 1:
            with contextlib.suppress(Exception):  # the failure was reported already
                manager.wait_until_finished()
        return
    with _write_errors_explained(manager, None):
        manager.wait_until_finished()


@contextlib.contextmanager
def _write_errors_explained(manager: ocp.CheckpointManager, step: int | None):
    """Turns a storage error of a save into a CheckpointWriteError that says what is intact.

    Saves are asynchronous, so a failure surfaces at the next save or wait: it may belong to the
    save still in flight (which orbax then forgets), or to `step`, the one being started.
    """
    newest_before = manager.latest_step()
    try:
        yield
    except Exception as error:
        if not storage.is_storage_error(error):
            raise
        _failed.add(id(manager))
        save_watch.failure()  # this one, logged by orbax too: reported here, once
        intact = manager.latest_step()
        failed = newest_before if newest_before != intact else step
        raise _write_error(manager, failed, error) from error


def _write_error(manager: ocp.CheckpointManager, failed: int | None,
                 error: BaseException) -> CheckpointWriteError:
    """The one line for a save of step `failed` that could not be written, and what is kept."""
    intact = max((s for s in manager.all_steps() if failed is None or s < failed), default=None)
    reason = _shortened(str(error).splitlines()[0] if str(error) else type(error).__name__)
    kind = 'a storage error' if storage.is_storage_error(error) else 'an error'
    kept = (f'the checkpoints up to step {intact} are intact' if intact is not None
            else 'no checkpoint had been committed yet')
    what = f'the checkpoint of step {failed}' if failed is not None else 'a checkpoint'
    return CheckpointWriteError(
        f'Could not save {what} to {manager.directory}: {kind} ({reason}); '
        f'{kept}. Check the storage (network, credentials, free space), then run the '
        'same command to resume.')


def _shortened(text: str, limit: int = 240) -> str:
    """`text` cut in its middle to `limit` characters: tensorstore names the file first and
    the OS error last."""
    if len(text) <= limit:
        return text
    half = (limit - 5) // 2
    return f'{text[:half]} ... {text[-half:]}'


def _words(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (one word per element, two for 64-bit)."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32).reshape(-1)
    unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)


@jax.jit
def _array_checksums(leaves: list[jax.Array]) -> list[jax.Array]:
    """Per array: the wrapping uint32 sum of its words, and of its words times their position.

    Integer sums do not depend on the order of the reduction, so they are exact on any device
    count. The first catches any one changed word, the second most reorderings and
    multi-word damage; together they miss random damage with odds of about 2**-64.
    """
    sums = []
    for leaf in leaves:
        words = _words(leaf)
        position = jnp.arange(1, words.size + 1, dtype=jnp.uint32)
        sums.append(jnp.stack([jnp.sum(words, dtype=jnp.uint32),
                               jnp.sum(words * position, dtype=jnp.uint32)]))
    return sums


def checksums(tree: PyTree) -> dict[str, list[int]]:
    """'params/.../kernel' -> two uint32 checksums of the array's exact bits."""
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    values = jax.device_get(_array_checksums([leaf for _, leaf in flat]))
    return {_path_name(path): [int(v) for v in value]
            for (path, _), value in zip(flat, values, strict=True)}


def _path_name(path: tuple) -> str:
    """'params/stage1_block1/conv1/kernel', the same for dicts, dataclasses and tuples."""
    parts = []
    for key in path:
        for attribute in ('key', 'name', 'idx'):
            if hasattr(key, attribute):
                parts.append(str(getattr(key, attribute)))
                break
    return '/'.join(parts)


def _flat_shapes(tree: PyTree) -> dict[str, tuple[tuple[int, ...], str]]:
    tree = getattr(tree, 'tree', tree)  # orbax's TreeMetadata wraps the saved tree
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        _path_name(path): (tuple(leaf.shape), str(np.dtype(leaf.dtype)))
        for path, leaf in flat
        if leaf is not None
    }


def check_compatible(saved: PyTree, target: PyTree, where: str) -> None:
    """Raises a one-line error naming the first parameter whose shape differs."""
    saved_shapes, target_shapes = _flat_shapes(saved), _flat_shapes(target)
    for name, (shape, _) in target_shapes.items():
        if name not in saved_shapes:
            raise CheckpointMismatchError(
                f'Checkpoint {where} has no {name} {shape}: it was written by a different model '
                'or optimizer; use a fresh --workdir or the config that wrote it.'
            )
        if saved_shapes[name][0] != shape:
            raise CheckpointMismatchError(
                f'Checkpoint {where} does not fit this model: {name} is {saved_shapes[name][0]} '
                f'there but {shape} here; use a fresh --workdir or the config that wrote it.'
            )
    extra = sorted(set(saved_shapes) - set(target_shapes))
    if extra:
        raise CheckpointMismatchError(
            f'Checkpoint {where} has {extra[0]}, which this model lacks: it was written by a '
            'different model or optimizer; use a fresh --workdir or the config that wrote it.'
        )


def verify_checksums(tree: PyTree, saved: dict[str, list[int]], where: str) -> None:
    """Raises CheckpointCorruptError where an array of `tree` differs from `meta['checksums']`.

    `tree` is the restored state or a part of it with the same names ({'params': ...}).
    """
    for name, value in checksums(tree).items():
        if saved.get(name) != value:
            raise ChecksumMismatchError(
                f'Checkpoint {where} is damaged: {name} does not match the checksum saved with it.'
            )


def check_network(meta: dict[str, Any], model_config: Any, where: str) -> None:
    """Raises CheckpointMismatchError when the config saved in a checkpoint's `meta` builds
    another network than `model_config` (v1 vs v1.5 strides, bn_epsilon, ...: arrays of the
    same shapes that compute something else). Checkpoints without a saved config pass."""
    try:
        saved_model = json.loads(meta['config'])['model']
    except (KeyError, TypeError, ValueError):
        return
    try:
        run_config.check_same_network(saved_model, model_config, f'Checkpoint {where}',
                                      'use the config that wrote it or a fresh --workdir.')
    except run_config.ConfigChangeError as error:
        raise CheckpointMismatchError(str(error)) from None


def restore_step(manager: ocp.CheckpointManager, step: int, target: PyTree,
                 model_config: Any = None) -> PyTree:
    """Restores `step` into `target`'s shapes and shardings (any device count).

    Reads with the item handlers directly, not through the manager: the manager's restore ends
    in a barrier, which a process whose read failed would never reach, and which would then
    stop every other process. Agreement on what was read is `restore_latest`'s job.

    Raises CheckpointMismatchError for a checkpoint of another model (by its arrays' shapes,
    and by its saved config when `model_config` is given), CheckpointCorruptError (or orbax's
    and the storage's own errors) for missing, damaged or unreachable files.
    """
    where = f'{manager.directory}/{step}'
    step_dir = epath.Path(manager.directory) / str(step)
    saved = manager.item_metadata(step)['state']
    if saved is None:
        raise CheckpointCorruptError(f'Checkpoint {where} has no readable state metadata.')
    check_compatible(saved, target, where)
    meta = ocp.JsonCheckpointHandler().restore(step_dir / 'meta')
    if not meta:  # save() always writes it: a checkpoint without it lost files
        raise CheckpointCorruptError(f'Checkpoint {where} has no readable meta item.')
    if model_config is not None:
        check_network(meta, model_config, where)
    state = ocp.StandardCheckpointHandler().restore(
        step_dir / 'state', args=ocp.args.StandardRestore(target))
    state = _inject_read_fault(step, state)
    if 'checksums' in meta:  # checkpoints written before checksums existed are taken as they are
        verify_checksums(state, meta['checksums'], where)
    return state


# ---- Restoring the newest good checkpoint, agreed by every process.

READ_ATTEMPTS = 5  # reads of one checkpoint before a storage error stops the run
READ_FIRST_WAIT_SECONDS = 2.0  # then 4, 8, 16 s: a 30 s outage is ridden out
# What one process's read of a checkpoint found:
_READ = 0  # every array, checksums matching
_DAMAGED = 1  # bytes that do not match their checksums: damage, for certain
_UNREACHABLE = 2  # the storage did not answer: retried
_MISSING = 3  # a file missing, truncated or unparsable while the storage answers: damage only
# if every process finds it so on two reads in a row, since orbax reports some storage errors
# as a missing item (it swallows an OSError listing a step, or reading its step metadata), and
# one host's view of shared storage can lag (NFS attribute caches, gcsfuse's stat cache)
_FAILED = 4  # any other error, or one on a step written by other orbax/tensorstore versions:
# a software or environment problem, never a reason to move a step
# Status codes (tensorstore, absl) and messages that mean the files themselves are bad.
_DAMAGE_CODES = ('OUT_OF_RANGE', 'FAILED_PRECONDITION', 'DATA_LOSS', 'NOT_FOUND',
                 'INVALID_ARGUMENT')
FAULT_ENV = 'RESNET_FLAX_INJECT_READ_FAULT'
# config.checkpoint_fallback: how far a restore may go when checkpoints do not read.
FALLBACKS = ('one', 'all', 'scratch')
FALLBACK_FLAG = '--config.checkpoint_fallback'


class CheckpointReadError(RuntimeError):
    """A checkpoint could not be read for a storage reason, even after retries."""


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none can be restored without moving steps that show no evidence
    of damage (or more than one): the run stops instead of starting over."""


def _inject_read_fault(step: int, state: PyTree) -> PyTree:
    """Test hook, off unless $RESNET_FLAX_INJECT_READ_FAULT is set in this process.

    'unavailable:N' makes the first N checkpoint reads fail as a dropped connection does;
    'damaged:N' flips one bit of the first N states read, as a bad read from disk would, so
    the checksum check finds it. The tests use it to hurt one process of several.
    """
    spec = os.environ.get(FAULT_ENV)
    if not spec or int(spec.split(':')[1]) <= 0:
        return state
    kind, count = spec.split(':')
    os.environ[FAULT_ENV] = f'{kind}:{int(count) - 1}'
    if kind == 'unavailable':
        raise ConnectionResetError(f'injected ({FAULT_ENV}): connection reset reading step {step}')
    leaves, treedef = jax.tree.flatten(state)
    i = next(i for i, leaf in enumerate(leaves) if jnp.issubdtype(leaf.dtype, jnp.floating))
    values = np.asarray(jax.device_get(leaves[i])).copy()  # replicated: every process has all
    values.reshape(-1).view(np.uint8)[0] ^= 1
    leaves[i] = jax.make_array_from_callback(values.shape, leaves[i].sharding,
                                             lambda index: values[index])
    return jax.tree.unflatten(treedef, leaves)


def _classify(error: Exception) -> int:
    """_DAMAGED or _MISSING for files that look bad, _UNREACHABLE for a storage that did not
    answer (retried), _FAILED for anything else (software: not retried, never damage)."""
    chain = [error]
    while chain[-1].__cause__ is not None and len(chain) < 8:
        chain.append(chain[-1].__cause__)
    for e in chain:
        if isinstance(e, ChecksumMismatchError):
            return _DAMAGED
        if isinstance(e, (CheckpointCorruptError, FileNotFoundError)):
            return _MISSING
        if isinstance(e, OSError):  # connection refused, reset, timed out
            return _UNREACHABLE
    text = ' '.join(str(e) for e in chain)
    if any(code in text for code in _DAMAGE_CODES):
        return _MISSING
    return _UNREACHABLE if storage.is_storage_error(error) else _FAILED


def _storage_answers(step_dir: epath.Path) -> bool:
    """Whether the storage answers a fresh read in `step_dir` now (a missing file is an
    answer): damage is only believed while it does."""
    try:
        (step_dir / '_CHECKPOINT_METADATA').read_bytes()
    except FileNotFoundError:
        return True
    except Exception as error:  # noqa: BLE001 - only storage errors say it did not answer
        return not storage.is_storage_error(error)
    return True


def _written_by_other_libraries(step_dir: epath.Path) -> str:
    """'' or what differs, when the step's meta names other orbax/tensorstore versions than
    these (checkpoints from before the versions were recorded: '')."""
    try:
        saved = ocp.JsonCheckpointHandler().restore(step_dir / 'meta').get('libraries')
    except Exception:  # noqa: BLE001 - an unreadable meta says nothing about versions
        return ''
    here = library_versions()
    if not isinstance(saved, dict) or saved == here:
        return ''
    return ', '.join(f'{name} {saved.get(name)} there, {here[name]} here' for name in here
                     if saved.get(name) != here[name])


class _AbandonedReadsFilter(std_logging.Filter):
    """asyncio's 'Task exception was never retrieved' for tensorstore reads (or writes) a
    failed restore (or save) left behind."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not ('exception was never retrieved' in str(record.msg)
                    and 'tensorstore' in str(error))


def _quiet_abandoned_io() -> None:
    """When one array of a step fails to read, orbax closes its event loop while tensorstore
    still reads the step's other arrays; each of those then ends in a traceback (10 to 75 over
    one failed resume of the tiny model), which would bury the one-line error. Those two
    reports are dropped; nothing else is. Installed before the first read, since they arrive
    from tensorstore's threads while the failure is still being raised. A save that failed
    leaves writes behind the same way (about 20 tracebacks after an outage of 90 s)."""
    if getattr(_quiet_abandoned_io, 'installed', False):
        return
    _quiet_abandoned_io.installed = True
    previous = sys.unraisablehook

    def hook(unraisable):
        value = unraisable.exc_value
        if isinstance(value, RuntimeError) and str(value) == 'Event loop is closed':
            return
        previous(unraisable)

    sys.unraisablehook = hook
    std_logging.getLogger('asyncio').addFilter(_AbandonedReadsFilter())


def _read(manager, step: int, target: PyTree,
          model_config: Any) -> tuple[PyTree | None, int, str]:
    _quiet_abandoned_io()
    try:
        return restore_step(manager, step, target, model_config), _READ, ''
    except CheckpointMismatchError:
        raise
    except Exception as error:  # noqa: BLE001 - classified: damaged, retried, or a failure
        reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
        outcome = _classify(error)
        step_dir = epath.Path(manager.directory) / str(step)
        if outcome == _MISSING and not _storage_answers(step_dir):
            outcome = _UNREACHABLE
        if outcome in (_DAMAGED, _MISSING):
            other = _written_by_other_libraries(step_dir)
            if other:
                outcome, reason = _FAILED, f'written by other versions ({other}): {reason}'
        return None, outcome, reason


def _all_processes(value: int) -> list[int]:
    """`value` from every process, in process order (the same list on each)."""
    if jax.process_count() == 1:
        return [value]
    from jax.experimental import multihost_utils

    return [int(v) for v in multihost_utils.process_allgather(np.int32(value))]


def _from_process_0(value: int) -> int:
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _newest_below(manager: ocp.CheckpointManager, below: int | None) -> int | None:
    """Process 0's newest step under `below`, the same on every process (-1: none)."""
    steps = [s for s in manager.all_steps() if below is None or s < below]
    step = _from_process_0(max(steps) if steps else -1)
    return None if step < 0 else step


def _read_agreed(manager, step: int, target: PyTree,
                 model_config: Any) -> tuple[PyTree | None, int, str, list[int]]:
    """Every process reads `step`; storage errors anywhere are retried by all, with back-off.

    Returns (state, verdict, this process's reason, the processes whose read failed), the
    verdict the same on every process:
    _READ; _DAMAGED on evidence of damage (a checksum mismatch on any process, or a file
    missing on every process on two reads in a row while the storage answers); _FAILED for
    anything else (software, or other library versions). A storage error, or a file that
    some processes miss while others read it, that outlasts READ_ATTEMPTS stops the run.
    """
    wait, missing_before = READ_FIRST_WAIT_SECONDS, False
    for attempt in range(1, READ_ATTEMPTS + 1):
        state, outcome, reason = _read(manager, step, target, model_config)
        outcomes = _all_processes(outcome)
        failed = _processes_with(outcomes, _READ, False)
        for verdict in (_DAMAGED, _FAILED):
            if verdict in outcomes:
                return state, verdict, reason, failed
        if not failed:
            return state, _READ, reason, failed
        missing_everywhere = all(o == _MISSING for o in outcomes)
        if missing_everywhere and missing_before:
            return None, _DAMAGED, reason, failed
        missing_before = missing_everywhere
        if attempt < READ_ATTEMPTS:
            logging.warning('Reading checkpoint step %d failed on process(es) %s (%s); %s in '
                            '%.0f s.', step, failed,
                            reason or 'see that process',
                            'reading it again to be sure' if missing_before else 'retrying', wait)
            time.sleep(wait)
            wait *= 2
    raise CheckpointReadError(_unreadable_message(manager, step, outcomes, reason))


def _unreadable_message(manager, step: int, outcomes: list[int], reason: str) -> str:
    failed = _processes_with(outcomes, _READ, False)
    why = reason or 'see that process'
    if _UNREACHABLE not in outcomes:  # missing on some processes, read by the others
        return (f'Process(es) {failed} could not find files of checkpoint step {step} in '
                f'{manager.directory} that process(es) {_processes_with(outcomes, _READ)} '
                f'read, on {READ_ATTEMPTS} attempts ({why}); it is left in place. Their view '
                'of the storage lags or differs (an NFS attribute cache, a gcsfuse stat cache, '
                'another mount): check that every host mounts the same storage, then run the '
                'same command to resume.')
    return (f'Could not read checkpoint step {step} in {manager.directory} after '
            f'{READ_ATTEMPTS} attempts on process(es) {failed} ({why}); it is left in place. '
            'Check the storage (network, credentials), then run the same command to resume.')


def _processes_with(outcomes: list[int], kind: int, equal: bool = True) -> list[int]:
    return [i for i, o in enumerate(outcomes) if (o == kind) == equal]


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves a checkpoint aside (never deletes it) so that the step can be redone."""
    source = epath.Path(manager.directory) / str(step)
    destination = quarantine_dir(manager) / f'{step}-{_from_process_0(int(time.time()))}'
    if jax.process_index() == 0:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
    _barrier(f'quarantined-{step}')
    manager.reload()
    return destination


def quarantine_dir(manager: ocp.CheckpointManager) -> epath.Path:
    return epath.Path(manager.directory).parent / QUARANTINE_DIR


@dataclasses.dataclass(frozen=True)
class _Unread:
    """A step that did not restore: the agreed verdict and this process's reason."""

    step: int
    verdict: int  # _DAMAGED (evidence of damage) or _FAILED
    reason: str
    processes: list[int]  # whose read failed

    def where(self) -> str:
        return '' if jax.process_count() == 1 else f' on process(es) {self.processes}'

    def describe(self) -> str:
        return f'step {self.step}{self.where()}: {self.why()}'

    def why(self) -> str:
        return self.reason[:160].rstrip('.') or 'see the other processes'


def restore_latest(manager: ocp.CheckpointManager, target: PyTree,
                   model_config: Any = None, fallback: str = 'one') -> PyTree | None:
    """The newest checkpoint that restores, the same one on every process; None for a
    workdir without checkpoints (or, with fallback='scratch', when none restores).

    Process 0 names each step to try, newest first; every process reads it and all see every
    outcome (`_read_agreed`: storage errors are retried, then stop the run). Steps that do not
    restore are only read, never moved, until one does; then `fallback` decides
    (`_settle_unreadable`): by default ('one') only a newest step with evidence of damage is
    moved aside, and anything else stops the run in one line with nothing moved. A checkpoint
    of another model is an error, not a fallback (by shapes, and by the saved config when
    `model_config`, the config.model of the run, is given).
    """
    if fallback not in FALLBACKS:
        raise ValueError(f'{FALLBACK_FLAG}={fallback!r}; choose one of {", ".join(FALLBACKS)}.')
    unread: list[_Unread] = []
    state, step = None, _newest_below(manager, None)
    while step is not None:
        state, verdict, reason, failed = _read_agreed(manager, step, target, model_config)
        if verdict == _READ:
            break
        unread.append(_Unread(step, verdict, reason, failed))
        state, step = None, _newest_below(manager, step)
    if unread:
        _settle_unreadable(manager, unread, step, fallback)
    return state


def _settle_unreadable(manager: ocp.CheckpointManager, unread: list[_Unread],
                       good: int | None, fallback: str) -> None:
    """Moves the unread steps aside when `fallback` allows it, else stops the run in one line.

    'one': only the newest step, only on evidence of damage, and only when an older one reads.
    'all': every unread step above the newest that reads. 'scratch': as 'all', and when none
    reads, every step (the run then starts from step 0).
    """
    allowed = (fallback == 'scratch' or (good is not None and (
        fallback == 'all' or (len(unread) == 1 and unread[0].verdict == _DAMAGED))))
    if not allowed:
        raise CheckpointRestoreError(_stop_message(manager, unread, good))
    for entry in unread:
        moved = _quarantine(manager, entry.step)
        where = (f'resuming from step {good}' if good is not None else
                 f'training from step 0 ({FALLBACK_FLAG}=scratch)')
        logging.warning('Checkpoint step %d moved to %s: %s.', entry.step, moved,
                        entry.describe())
        if jax.process_index() == 0:
            print(f'Checkpoint at step {entry.step} is unreadable{entry.where()}; moved it to '
                  f'{moved} and {where}: {entry.describe()}.', flush=True)


def _stop_message(manager: ocp.CheckpointManager, unread: list[_Unread],
                  good: int | None) -> str:
    aside = quarantine_dir(manager)
    same = len(unread) > 1 and len({re.sub(r'\d+', 'N', e.reason) for e in unread}) == 1
    if same:
        listed = (f'steps {", ".join(str(e.step) for e in unread)} all fail the same way: '
                  f'{unread[0].why()}')
    else:
        listed = '; '.join(entry.describe() for entry in unread)
    if good is None:
        cause = (' The same error on every step looks like a software or environment problem '
                 '(library versions, a path, a mount), not damage.' if same else '')
        return (f'No checkpoint in {manager.directory} could be restored ({listed}); nothing '
                f'was moved.{cause} Fix the cause and run the same command to resume, or pass '
                f'{FALLBACK_FLAG}=scratch to move them all to {aside} and train from step 0.')
    why = ('more than one step would be moved aside' if len(unread) > 1 else
           'that is no evidence of damage (a checksum mismatch, or files missing on every '
           'process)')
    return (f'Checkpoint(s) in {manager.directory} newer than step {good} did not restore '
            f'({listed}); step {good} does, but nothing was moved: {why}. Fix the cause and '
            f'run the same command to resume, or pass {FALLBACK_FLAG}=all to move them to '
            f'{aside} and resume from step {good}.')


def best_step(manager: ocp.CheckpointManager, metric: str = 'top1') -> int | None:
    """The step with the highest `metric` ('top1', or 'ema_top1' for the EMA weights) among
    the checkpoints that have it."""
    scored = []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and metric in metrics:
            scored.append((metrics[metric], step))
    return max(scored)[1] if scored else None
