"""Orbax checkpoints of the train state: asynchronous saves, safe restores.

Layout under `<workdir>/checkpoints/<step>/`: `state` (the TrainState as sharded arrays) and
`meta` (JSON: the config, the code version, the step, and a checksum of every array). Orbax
writes each step to a temporary directory and renames it when complete, so a killed save never
looks like a checkpoint; temporary directories left by killed saves are removed on the next
start. A restore checks the arrays it read against the checksums saved with them, so a
checkpoint damaged on disk is moved aside instead of silently resuming from wrong values.
"""

from __future__ import annotations

import subprocess
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

PyTree = Any
CHECKPOINT_DIR = 'checkpoints'
QUARANTINE_DIR = 'checkpoints_unreadable'


class CheckpointMismatchError(ValueError):
    """A checkpoint does not fit the model being restored."""


class CheckpointCorruptError(RuntimeError):
    """A checkpoint's files are missing or damaged."""


def checkpoint_dir(workdir: epath.PathLike) -> epath.Path:
    return epath.Path(workdir) / CHECKPOINT_DIR


def create_manager(
    directory: epath.PathLike, keep: int = 3, keep_best: bool = True, read_only: bool = False
) -> ocp.CheckpointManager:
    """Keeps the newest `keep` checkpoints, plus the best by eval top-1 when `keep_best`."""
    policies = [checkpoint_managers.LatestN(n=keep)]
    if keep_best:
        policies.append(
            checkpoint_managers.BestN(
                get_metric_fn=lambda metrics: metrics['top1'],
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


def save(
    manager: ocp.CheckpointManager,
    step: int,
    state: PyTree,
    config: ml_collections.ConfigDict,
    metrics: dict[str, float] | None = None,
) -> None:
    """Starts an asynchronous save; returns once the arrays are copied off the devices."""
    meta = {
        'step': int(step),
        'code_version': code_version(),
        'saved_at': time.time(),
        'config': config.to_json_best_effort(),
        'checksums': checksums(state),
    }
    manager.save(
        int(step),
        args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
        metrics=metrics,
        force=True,
    )


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
            raise CheckpointCorruptError(
                f'Checkpoint {where} is damaged: {name} does not match the checksum saved with it.'
            )


def restore_step(manager: ocp.CheckpointManager, step: int, target: PyTree) -> PyTree:
    """Restores `step` into `target`'s shapes and shardings (any device count).

    Raises CheckpointMismatchError for a checkpoint of another model, CheckpointCorruptError (or
    orbax's own read errors) for missing or damaged files.
    """
    where = f'{manager.directory}/{step}'
    saved = manager.item_metadata(step)['state']
    if saved is None:
        raise CheckpointCorruptError(f'Checkpoint {where} has no readable state metadata.')
    check_compatible(saved, target, where)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                meta=ocp.args.JsonRestore()),
    )
    meta = restored['meta']
    if not meta:  # save() always writes it: a checkpoint without it lost files
        raise CheckpointCorruptError(f'Checkpoint {where} has no readable meta item.')
    if 'checksums' in meta:  # checkpoints written before checksums existed are taken as they are
        verify_checksums(restored['state'], meta['checksums'], where)
    return restored['state']


def _quarantine(manager: ocp.CheckpointManager, step: int) -> epath.Path:
    """Moves an unreadable checkpoint aside (never deletes it) so that the step can be redone."""
    source = epath.Path(manager.directory) / str(step)
    quarantine = epath.Path(manager.directory).parent / QUARANTINE_DIR
    destination = quarantine / f'{step}-{time.time():.0f}'
    if jax.process_index() == 0:
        destination.parent.mkdir(parents=True, exist_ok=True)
        source.rename(destination)
    manager.reload()
    return destination


def restore_latest(manager: ocp.CheckpointManager, target: PyTree) -> PyTree | None:
    """The newest readable checkpoint, or None for a fresh workdir.

    An unreadable newest checkpoint (truncated or missing files) is moved aside and the next
    older one is tried. A checkpoint of another model is an error, not a fallback.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return restore_step(manager, step, target)
        except CheckpointMismatchError:
            raise
        except Exception as error:  # noqa: BLE001 - any read failure means "unreadable"
            moved = _quarantine(manager, step)
            reason = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
            logging.warning('Checkpoint step %d is unreadable (%s); moved to %s.',
                            step, reason, moved)
            print(f'Checkpoint at step {step} is unreadable; moved it to {moved} and '
                  'resuming from the previous one.', flush=True)
    return None


def best_step(manager: ocp.CheckpointManager) -> int | None:
    """The step with the highest eval top-1 among the checkpoints that have eval metrics."""
    scored = []
    for step in manager.all_steps():
        metrics = manager.metrics(step)
        if metrics and 'top1' in metrics:
            scored.append((metrics['top1'], step))
    return max(scored)[1] if scored else None
