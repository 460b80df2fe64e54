"""Batching for sources that fit in host memory (digits, synthetic): pure numpy, no TensorFlow.

Train order: each epoch is a permutation of the whole split drawn from (seed, epoch); global
batch k of the epoch is the k-th run of `global_batch_size` indices, and process p takes the
p-th slice of it. So the global batch does not depend on the number of processes, and
resuming at `start_step` only recomputes one permutation.

Eval: global batch k holds examples [k*G, (k+1)*G) (padded past the end), process p its p-th
slice; every process gets ceil(N / G) batches and the masks cover each example once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from resnet_flax.data import info as info_lib

# make_batch(indices [B_local], aug_rng) -> {'image': uint8 [B_local, H, W, C], 'label': int32}
MakeBatch = Callable[[np.ndarray, np.random.Generator], dict[str, np.ndarray]]


def steps_per_epoch(num_examples: int, global_batch_size: int) -> int:
    steps = num_examples // global_batch_size
    if steps < 1:
        raise ValueError(
            f'global_batch_size={global_batch_size} is larger than the train split '
            f'({num_examples} examples); lower batch_size.'
        )
    return steps


def train_indices(num_examples: int, *, global_batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (global step, this process's example indices), forever, from `start_step`."""
    info_lib.check_process(process_index, process_count)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    per_epoch = steps_per_epoch(num_examples, global_batch_size)
    step, order, order_epoch = start_step, None, None
    while True:
        epoch, k = divmod(step, per_epoch)
        if epoch != order_epoch:
            order, order_epoch = info_lib.rng(seed, epoch).permutation(num_examples), epoch
        start = k * global_batch_size + process_index * local
        yield step, order[start:start + local]
        step += 1


def train_batches(make_batch: MakeBatch, num_examples: int, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int,
                  process_count: int) -> Iterator[dict[str, np.ndarray]]:
    """Augmentation draws come from (seed, step, process), so they survive a resume too."""
    for step, indices in train_indices(
            num_examples, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
            process_index=process_index, process_count=process_count):
        yield make_batch(indices, info_lib.rng(seed, step, process_index))


def eval_batches(make_batch: MakeBatch, num_examples: int, *, global_batch_size: int,
                 process_index: int, process_count: int) -> Iterator[dict[str, np.ndarray]]:
    info_lib.check_process(process_index, process_count)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    no_augmentation = info_lib.rng(0)  # eval makers ignore it
    for k in range(info_lib.eval_batch_count(num_examples, global_batch_size)):
        positions = k * global_batch_size + process_index * local + np.arange(local)
        mask = positions < num_examples
        batch = make_batch(np.where(mask, positions, 0), no_augmentation)
        image = np.where(mask[:, None, None, None], batch['image'], 0).astype(batch['image'].dtype)
        label = np.where(mask, batch['label'], 0).astype(np.int32)
        yield {**batch, 'image': image, 'label': label, 'mask': mask}
