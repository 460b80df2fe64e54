"""Random images and labels of the configured shape, for timing the model without input cost.

Images are uniform random uint8 (normalised on the device like any other), labels uniform over
`data.synthetic_num_classes`. A block of images is drawn once per (seed, process) and every
batch reuses it with fresh labels, so producing a batch costs almost nothing. The split sizes
(`data.synthetic_num_train_examples`, `data.synthetic_num_eval_examples`) only set the epoch
length and the eval pass.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from resnet_flax.data import in_memory
from resnet_flax.data import info as info_lib

SPLITS = ('train', 'test', 'validation')


def _num_examples(data_cfg, split: str) -> int:
    if split not in SPLITS:
        raise ValueError(f'synthetic has no split {split!r}; valid splits: {SPLITS}.')
    if split == 'train':
        return int(data_cfg.synthetic_num_train_examples)
    return int(data_cfg.synthetic_num_eval_examples)


def get_info(data_cfg: ml_collections.ConfigDict) -> info_lib.DatasetInfo:
    if data_cfg.synthetic_num_classes < 1 or data_cfg.synthetic_num_train_examples < 1:
        raise ValueError(
            f'data.synthetic_num_classes={data_cfg.synthetic_num_classes} and '
            f'data.synthetic_num_train_examples={data_cfg.synthetic_num_train_examples} '
            'must be >= 1.'
        )
    size = int(data_cfg.image_size)
    return info_lib.DatasetInfo(
        num_classes=int(data_cfg.synthetic_num_classes),
        num_train_examples=_num_examples(data_cfg, data_cfg.train_split),
        num_eval_examples=_num_examples(data_cfg, data_cfg.eval_split),
        image_shape=(size, size, info_lib.CHANNELS),
    )


def _make_batch_fn(data_cfg, seed: int, process_index: int, local: int,
                   split: str) -> in_memory.MakeBatch:
    size = int(data_cfg.image_size)
    images = info_lib.rng(seed, process_index, SPLITS.index(split)).integers(
        0, 256, (local, size, size, info_lib.CHANNELS), dtype=np.uint8)
    images.flags.writeable = False  # shared by every batch
    num_classes = int(data_cfg.synthetic_num_classes)

    def make_batch(indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        # A label is a function of the example index, so eval passes agree with each other.
        labels = (indices * 2654435761 + seed) % num_classes
        return {'image': images, 'label': labels.astype(np.int32)}

    return make_batch


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int,
                  process_count: int) -> Iterator[info_lib.Batch]:
    local = info_lib.local_batch_size(global_batch_size, process_count)
    make_batch = _make_batch_fn(data_cfg, seed, process_index, local, 'train')
    return in_memory.train_batches(
        make_batch, _num_examples(data_cfg, data_cfg.train_split),
        global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, split: str,
                 process_index: int, process_count: int) -> Iterator[info_lib.Batch]:
    local = info_lib.local_batch_size(global_batch_size, process_count)
    make_batch = _make_batch_fn(data_cfg, 0, process_index, local, split)
    return in_memory.eval_batches(
        make_batch, _num_examples(data_cfg, split), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count)
