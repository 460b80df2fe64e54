"""Exact evaluation over a whole split: every example counted once, padding masked out."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import Mesh

from resnet_flax import data, sharding, steps
from resnet_flax.device_augment import AugmentConfig

PyTree = Any
EVAL_PROGRESS_DELAY_SEC = 3.0  # passes shorter than this print nothing


def make_eval_fn(model: nn.Module, mesh: Mesh,
                 augment: AugmentConfig) -> Callable[[PyTree, dict], dict]:
    """The jitted eval step: replicated variables, a batch sharded over the data axis.

    `augment` gives the normalisation (e.g. `AugmentConfig.from_config(config)`).
    """
    return jax.jit(
        functools.partial(steps.eval_step, model=model, augment=augment),
        in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
        out_shardings=sharding.replicated(mesh),
    )


def eval_batch_size(config: ml_collections.ConfigDict) -> int:
    return config.eval_batch_size or config.batch_size


def evaluate(
    eval_fn: Callable[[PyTree, dict], dict],
    variables: PyTree,
    config: ml_collections.ConfigDict,
    mesh: Mesh,
    split: str | None = None,
) -> dict[str, float]:
    """Loss, top-1 and top-5 over every example of `split` (default: the config's eval split).

    The per-batch sums stay on the devices until the pass ends: one host sync per evaluation.
    """
    batches = data.eval_batches(
        config.data,
        global_batch_size=eval_batch_size(config),
        split=split,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
    )
    totals = None
    for batch in _progress(sharding.prefetch_to_mesh(batches, mesh), split or
                           config.data.eval_split, eval_batch_size(config)):
        sums = eval_fn(variables, batch)
        totals = sums if totals is None else jax.tree.map(jnp.add, totals, sums)
    if totals is None:
        raise ValueError(f'The eval split {split or config.data.eval_split!r} has no examples.')
    return steps.summarize_eval(jax.device_get(totals))


def _progress(batches: Iterator[dict], split: str, batch_size: int) -> Iterator[dict]:
    """A progress bar on process 0 for an eval pass that takes more than a few seconds (a
    short one shows nothing); it counts batches as they are dispatched, with no host sync."""
    from tqdm import tqdm

    return tqdm(batches, desc=f'eval {split!r}, batches of {batch_size}', unit='batch',
                file=sys.stderr, delay=EVAL_PROGRESS_DELAY_SEC, leave=False, dynamic_ncols=True,
                disable=jax.process_index() != 0)
