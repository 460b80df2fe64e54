"""Start a run from existing weights (`config.init_from`): pretrained or from another run.

The training loop calls `initialize_from` on a freshly initialised state when the workdir has
no checkpoint yet. Every parameter and BN statistic is loaded from the checkpoint, except a
classifier head of another size (another number of classes), which keeps its fresh
initialisation; the user is told which arrays those are. The optimizer state starts anew.
"""

from __future__ import annotations

import flax.traverse_util
import jax
import optax

from resnet_flax import weights
from resnet_flax.state import TrainState

HEAD = 'params/head/'


def _merge(fresh: dict, loaded: dict) -> dict:
    """`fresh` with every leaf that `loaded` has replaced by the loaded one."""
    flat = flax.traverse_util.flatten_dict(fresh, sep='/')
    flat.update(flax.traverse_util.flatten_dict(loaded, sep='/'))
    return flax.traverse_util.unflatten_dict(flat, sep='/')


def _without(tree: dict, prefix: str, names: list[str]) -> dict:
    """`tree` (one collection) minus the leaves named '<prefix>/...' in `names`."""
    flat = flax.traverse_util.flatten_dict(tree, sep='/')
    kept = {key: value for key, value in flat.items() if f'{prefix}/{key}' not in names}
    return flax.traverse_util.unflatten_dict(kept, sep='/')


def plan(ckpt: weights.Checkpoint, target: dict) -> list[str]:
    """The names of `target`'s arrays that keep their fresh values (a head of another size);
    any other difference between the checkpoint and the model is a one-line ValueError."""
    saved = weights.saved_variable_shapes(ckpt)
    missing, unexpected, different = weights.compare(saved, weights.flat_shapes(target))
    body_different = [d for d in different if not d[0].startswith(HEAD)]
    body_missing = [name for name in missing if not name.startswith(HEAD)]
    body_unexpected = [name for name in unexpected if not name.startswith(HEAD)]
    if body_missing or body_unexpected or body_different:
        raise weights.mismatch_error(ckpt, body_missing, body_unexpected, body_different)
    return sorted([d[0] for d in different] + [name for name in missing])


def initialize_from(state: TrainState, path: str, optimizer: optax.GradientTransformation,
                    ) -> TrainState:
    """`state` with params and batch_stats from the checkpoint at `path` (a converted
    checkpoint, a train workdir or one of its step directories), in the state's shardings.
    A head of another shape stays as initialised; the optimizer state is re-initialised."""
    ckpt = weights.locate(path)
    variables = {'params': state.params, 'batch_stats': state.batch_stats}
    target = weights.abstract_like(variables)
    kept = plan(ckpt, target)
    partial = {name: _without(tree, name, kept) for name, tree in target.items()}
    loaded = weights.restore(ckpt, partial)
    params = _merge(state.params, loaded['params'])
    batch_stats = _merge(state.batch_stats, loaded['batch_stats'])

    opt_shardings = jax.tree.map(lambda x: x.sharding, state.opt_state)
    opt_state = jax.jit(optimizer.init, out_shardings=opt_shardings)(params)
    new = state.replace(params=params, batch_stats=batch_stats, opt_state=opt_state)
    if state.ema_params is not None:
        new = new.replace(ema_params=params, ema_batch_stats=batch_stats)
    _report(ckpt, kept, target, saved=weights.saved_variable_shapes(ckpt))
    return new


def _report(ckpt: weights.Checkpoint, kept: list[str], target: dict, saved: dict) -> None:
    if jax.process_index() != 0:
        return
    total = len(weights.flat_shapes(target))
    if not kept:
        print(f'init_from: loaded all {total} arrays from {ckpt.description}.', flush=True)
        return
    wanted = weights.flat_shapes(target)
    details = ', '.join(
        f'{name} {wanted[name]}' + (f' (checkpoint: {saved[name]})' if name in saved else '')
        for name in kept)
    print(f'init_from: loaded {total - len(kept)} of {total} arrays from {ckpt.description}; '
          f'not loaded, freshly initialised (head of another size): {details}.', flush=True)
