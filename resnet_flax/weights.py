"""Model weights on disk: find a checkpoint, read its params and BN statistics, write one.

Three layouts hold weights, and every reader here accepts each of them:
- a train workdir (`<workdir>/checkpoints/<step>/`), or its `checkpoints/` folder: a step is
  chosen by number, 'latest' or 'best' (highest eval top-1);
- one step directory of a workdir, `<workdir>/checkpoints/<step>/`;
- a directory written by `python -m resnet_flax.convert` (pretrained PyTorch weights).

Each is a directory with two orbax items: `state` (a TrainState, or just `params` and
`batch_stats` for converted weights) and `meta` (JSON; the config or the model's fields).
Only the arrays asked for are read (orbax partial restore), straight into the shardings of
the target, so the optimizer state of a train checkpoint is never loaded to evaluate it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import re
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from resnet_flax import checkpoint

PyTree = Any
STATE_ITEM = 'state'
META_ITEM = 'meta'
_BLOCK = re.compile(r'stage(\d+)_block(\d+)')
STEP_CHOICES = "a step number, 'latest' or 'best'"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One readable set of weights: a directory holding the `state` and `meta` items."""

    directory: epath.Path
    step: int | None  # None for converted weights
    meta: dict[str, Any]

    @property
    def description(self) -> str:
        """How to name these weights in a message."""
        name = self.meta.get('name')
        return f'{self.directory} (converted {name})' if name else str(self.directory)

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """'params/stem_conv/kernel' -> shape, for every array the `state` item holds."""
        metadata = ocp.PyTreeCheckpointHandler().metadata(self.directory / STATE_ITEM)
        return flat_shapes(getattr(metadata, 'tree', metadata))

    def has_ema(self) -> bool:
        return any(name.startswith('ema_params/') for name in self.shapes)


def flat_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
    """'a/b/c' -> shape of every array-like leaf of a nested dict (None leaves dropped)."""
    flat = flax.traverse_util.flatten_dict(dict(tree), sep='/')
    return {name: tuple(leaf.shape) for name, leaf in flat.items() if hasattr(leaf, 'shape')}


def _read_meta(directory: epath.Path) -> dict[str, Any]:
    if not (directory / META_ITEM).exists():
        return {}
    return ocp.JsonCheckpointHandler().restore(directory / META_ITEM) or {}


def _not_found(path: str, why: str) -> FileNotFoundError:
    return FileNotFoundError(
        f'No checkpoint at {path}: {why}. Pass a train workdir, one of its '
        'checkpoints/<step> directories, or a directory written by '
        '`python -m resnet_flax.convert`.'
    )


def locate(path: str | epath.PathLike, step: str | int = 'latest',
           best_metric: str = 'top1') -> Checkpoint:
    """The checkpoint at `path`; for a workdir, its step `step` (a number, 'latest', or 'best':
    highest `best_metric`, 'ema_top1' to rank by the EMA weights)."""
    root = epath.Path(path)
    if not root.exists():
        raise _not_found(str(path), 'the path does not exist')
    if not root.is_dir():
        raise _not_found(str(path), 'it is a file, not a directory')
    if (root / STATE_ITEM).is_dir():
        if str(step) != 'latest':
            raise ValueError(f'{path} is a single checkpoint; choosing a step ({step}) needs '
                             'the workdir that holds it.')
        meta = _read_meta(root)
        return Checkpoint(root, meta.get('step'), meta)
    manager_dir = root / checkpoint.CHECKPOINT_DIR
    manager_dir = manager_dir if manager_dir.is_dir() else root
    with _quiet():  # a read-only manager warns that it will not save
        manager = checkpoint.create_manager(manager_dir, read_only=True)
    try:
        chosen = _choose_step(manager, str(path), step, best_metric)
    finally:
        manager.close()
    directory = manager_dir / str(chosen)
    return Checkpoint(directory, chosen, _read_meta(directory))


@contextlib.contextmanager
def _quiet():
    level = logging.get_verbosity()
    logging.set_verbosity(logging.ERROR)
    try:
        yield
    finally:
        logging.set_verbosity(level)


def _choose_step(manager: ocp.CheckpointManager, path: str, step: str | int,
                 best_metric: str = 'top1') -> int:
    steps = sorted(manager.all_steps())
    if not steps:
        raise _not_found(path, 'it holds no checkpoint')
    if str(step) == 'latest':
        return steps[-1]
    if str(step) == 'best':
        best = checkpoint.best_step(manager, best_metric)
        if best is None and best_metric != 'top1':  # saved before EMA metrics were kept
            best = checkpoint.best_step(manager)
            if best is not None:
                print(f'No checkpoint in {path} records {best_metric}; ranked by top1.',
                      flush=True)
        if best is None:
            raise ValueError(f'No checkpoint in {path} has eval metrics, so none is the best; '
                             f'choose one of the steps {steps} or latest.')
        return best
    try:
        number = int(step)
    except ValueError:
        raise ValueError(f'checkpoint step {step!r} is not {STEP_CHOICES}.') from None
    if number not in steps:
        raise ValueError(f'{path} has no checkpoint of step {number}; its steps: {steps}.')
    return number


def model_order(name: str) -> tuple:
    """Sort key: parameters before BN statistics, each from the stem to the head (so the
    first difference named is the earliest layer, not the alphabetically first)."""
    collection, _, rest = name.partition('/')
    module = rest.split('/', 1)[0]
    block = _BLOCK.fullmatch(module)
    if module.startswith('stem'):
        rank = (0, 0, 0)
    elif block:
        rank = (1, int(block[1]), int(block[2]))
    else:  # final_bn, head
        rank = (2, int(module == 'head'), 0)
    return collection != 'params', rank, name


def compare(saved: Mapping[str, tuple], wanted: Mapping[str, tuple]) -> tuple[list, list, list]:
    """(missing names, unexpected names, [(name, saved shape, wanted shape)]) between two
    flat shape tables; missing = wanted but not saved."""
    wanted = {name: wanted[name] for name in sorted(wanted, key=model_order)}
    missing = [name for name in wanted if name not in saved]
    unexpected = [name for name in saved if name not in wanted]
    different = [(name, saved[name], shape) for name, shape in wanted.items()
                 if name in saved and tuple(saved[name]) != tuple(shape)]
    return missing, unexpected, different


def _collections(use_ema: bool) -> dict[str, str]:
    """Model collection -> the `state` item's key that holds it."""
    if use_ema:
        return {'params': 'ema_params', 'batch_stats': 'ema_batch_stats'}
    return {'params': 'params', 'batch_stats': 'batch_stats'}


def saved_variable_shapes(ckpt: Checkpoint, use_ema: bool = False) -> dict[str, tuple]:
    """The shapes of the saved model variables, named as the model names them
    ('params/...', 'batch_stats/...'), the EMA copy when `use_ema`."""
    if use_ema and not ckpt.has_ema():
        raise ValueError(f'{ckpt.description} has no EMA weights (its run had ema_decay=0); '
                         'leave out --ema.')
    renamed = {}
    for collection, key in _collections(use_ema).items():
        for name, shape in ckpt.shapes.items():
            if name.startswith(key + '/'):
                renamed[collection + name[len(key):]] = shape
    return renamed


def saved_model_fields(ckpt: Checkpoint) -> dict[str, Any] | None:
    """The `model` config section the checkpoint was written with, when its meta says."""
    if isinstance(ckpt.meta.get('model'), Mapping):  # converted weights
        return dict(ckpt.meta['model'])
    try:  # train checkpoints keep the whole config as a JSON string
        return dict(json.loads(ckpt.meta['config'])['model'])
    except (KeyError, TypeError, ValueError):
        return None


def model_flags(fields: Mapping[str, Any], reference: Mapping[str, Any]) -> list[str]:
    """`--config.model.X=V` for each field of `fields` that differs from `reference`."""
    flags = []
    for key, value in fields.items():
        current = reference.get(key)
        if isinstance(value, list | tuple):
            if isinstance(current, list | tuple) and tuple(current) == tuple(value):
                continue
            value = f'({",".join(map(str, value))}{"," if len(value) == 1 else ""})'
        elif value == current:
            continue
        flags.append(f'--config.model.{key}={value}')
    return flags


def mismatch_error(ckpt: Checkpoint, missing: list, unexpected: list, different: list,
                   model_cfg: Mapping[str, Any] | None = None) -> ValueError:
    """One line naming the first difference between the checkpoint and the model, and, when
    the checkpoint records its model, the config flags that would rebuild it."""
    fix = 'use the config of the model that wrote it'
    saved = saved_model_fields(ckpt)
    if saved is not None and model_cfg is not None:
        current = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
        flags = model_flags(saved, current)
        if flags:
            fix = f'its model differs from the config in: {" ".join(flags)}'
    where = f'Checkpoint {ckpt.description} does not fit this model'
    if different:
        name, there, here = different[0]
        return ValueError(f'{where}: {name} is {there} there but {here} here; {fix}.')
    if missing:
        return ValueError(f'{where}: it has no {missing[0]} ({len(missing)} arrays missing); '
                          f'{fix}.')
    return ValueError(f'{where}: it has {unexpected[0]}, which this model lacks '
                      f'({len(unexpected)} extra arrays); {fix}.')


def restore(ckpt: Checkpoint, target: PyTree, use_ema: bool = False) -> PyTree:
    """Reads the leaves of `target` ({'params': ..., 'batch_stats': ...} of ShapeDtypeStructs
    with shardings; leaves may be left out) into those shardings. No shape checks here."""
    item = {_collections(use_ema)[name]: tree for name, tree in target.items()}
    restored = ocp.PyTreeCheckpointHandler().restore(
        ckpt.directory / STATE_ITEM,
        args=ocp.args.PyTreeRestore(
            item=item,
            restore_args=ocp.checkpoint_utils.construct_restore_args(item),
            partial_restore=True,
        ),
    )
    return {name: restored[key] for name, key in _collections(use_ema).items() if name in target}


def abstract_like(tree: PyTree, sharding: jax.sharding.Sharding | None = None) -> PyTree:
    """ShapeDtypeStructs of `tree`'s leaves, in `sharding` or each leaf's own sharding."""
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding or x.sharding), tree)


def load_variables(ckpt: Checkpoint, target: PyTree, use_ema: bool = False,
                   model_cfg: Mapping[str, Any] | None = None) -> PyTree:
    """All of `target`'s variables from `ckpt`, which must hold exactly those shapes;
    `model_cfg` (the config's model section) only improves the error message."""
    saved = saved_variable_shapes(ckpt, use_ema)
    missing, unexpected, different = compare(saved, flat_shapes(target))
    if missing or unexpected or different:
        raise mismatch_error(ckpt, missing, unexpected, different, model_cfg)
    return restore(ckpt, target, use_ema)


def save_converted(directory: str | epath.PathLike, variables: PyTree,
                   meta: dict[str, Any]) -> epath.Path:
    """Writes {'params', 'batch_stats'} (host arrays) and `meta` as a new checkpoint."""
    out = epath.Path(directory)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FileExistsError(f'{out} already exists and is not empty; choose a new --out '
                              'or delete it.')
    if out.exists():
        out.rmdir()
    checkpointer = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
    checkpointer.save(out, args=ocp.args.Composite(
        **{STATE_ITEM: ocp.args.StandardSave(variables), META_ITEM: ocp.args.JsonSave(meta)}))
    checkpointer.close()
    return out
