"""tf.data pieces shared by the TFDS and image-folder sources.

Import lazily: this module imports TensorFlow.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator

import ml_collections
from absl import logging

from resnet_flax.data import budget
from resnet_flax.data import info as info_lib

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '1')

import tensorflow as tf  # noqa: E402

from resnet_flax.data import augment, preprocess  # noqa: E402

# TensorFlow must leave the accelerators to JAX.
with contextlib.suppress(RuntimeError):  # raised when TF already fixed its devices
    tf.config.set_visible_devices([], 'GPU')

Batch = info_lib.Batch


def options(data_cfg: ml_collections.ConfigDict) -> tf.data.Options:
    """Deterministic order, a private thread pool (this process's share of the host's cores,
    budget.py) and a RAM cap, all from the config."""
    opts = tf.data.Options()
    opts.deterministic = True
    opts.threading.private_threadpool_size = budget.compute(data_cfg).threads
    opts.threading.max_intra_op_parallelism = 1  # parallelism comes from map, not from ops
    opts.autotune.enabled = True
    if data_cfg.ram_budget_gb > 0:
        opts.autotune.ram_budget = int(data_cfg.ram_budget_gb * 2**30)
    return opts


def parallel_calls(data_cfg: ml_collections.ConfigDict) -> int:
    calls = int(data_cfg.num_parallel_calls)
    return tf.data.AUTOTUNE if calls < 0 else max(calls, 1)


def prefetch(data_cfg: ml_collections.ConfigDict) -> int:
    batches = int(data_cfg.prefetch_batches)
    return tf.data.AUTOTUNE if batches < 0 else batches


def stream_seed(*keys: int) -> int:
    """An int64 seed for tf from integer keys (e.g. seed, epoch, process)."""
    return int(info_lib.rng(*keys).integers(0, 2**62))


def example_seed(stream: int, position: tf.Tensor) -> tf.Tensor:
    """[2] int64 stateless seed of the example at `position` of a seeded stream."""
    return tf.stack([tf.constant(stream, tf.int64), tf.cast(position, tf.int64)])


def _resize_to(image: tf.Tensor, size: int, data_cfg) -> tf.Tensor:
    """uint8 [size, size, 3]; images already that size pass through untouched."""
    same = tf.reduce_all(tf.shape(image)[:2] == size)
    return tf.cond(
        same,
        lambda: tf.ensure_shape(image, [None, None, 3]),
        lambda: preprocess.to_uint8(
            preprocess.resize(image, size, data_cfg.resize_method, data_cfg.antialias)))


def train_example_fn(data_cfg: ml_collections.ConfigDict, crop: str) -> Callable:
    """(encoded bytes, label, seed [2]) -> (uint8 [S, S, 3], int32 label).

    Flip, normalisation and Mixup/CutMix happen on the device (`device_augment`).
    """
    size = int(data_cfg.image_size)

    def fn(encoded, label, seed):
        crop_seed, _, augment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
        if crop == 'inception':
            image = preprocess.to_uint8(preprocess.inception_crop(
                encoded, crop_seed, size, area_range=tuple(data_cfg.inception_area_range),
                aspect_range=tuple(data_cfg.inception_aspect_range),
                method=data_cfg.resize_method, antialias=data_cfg.antialias))
        else:
            image = _resize_to(preprocess.decode(encoded), size, data_cfg)
            if crop == 'pad':
                image = preprocess.pad_crop(image, crop_seed, int(data_cfg.crop_padding))
        image = tf.ensure_shape(image, [size, size, 3])
        if data_cfg.auto_augment:
            image = augment.apply(image, augment_seed, data_cfg)
        return image, tf.cast(label, tf.int32)

    # A tf.function traces once; every epoch's pipeline reuses the trace (RandAugment's is slow).
    return tf.function(fn)


def eval_example_fn(data_cfg: ml_collections.ConfigDict, crop: str) -> Callable:
    """(encoded bytes, label) -> (uint8 [S, S, 3], int32 label), S the eval size; normalised
    on the device."""
    size = info_lib.eval_image_size(data_cfg)

    def fn(encoded, label):
        if data_cfg.eval_preset == 'torchvision':
            resize_size = round(size / float(data_cfg.eval_crop_fraction))
            image = preprocess.torchvision_center_crop(encoded, size, resize_size)
        elif crop == 'center':
            image = preprocess.to_uint8(preprocess.center_crop(
                encoded, size, crop_fraction=float(data_cfg.eval_crop_fraction),
                method=data_cfg.resize_method, antialias=data_cfg.antialias))
        else:
            image = _resize_to(preprocess.decode(encoded), size, data_cfg)
        image = tf.ensure_shape(image, [size, size, 3])
        return image, tf.cast(label, tf.int32)

    return fn


def batch_train(ds: tf.data.Dataset, data_cfg: ml_collections.ConfigDict, *,
                local_batch: int) -> tf.data.Dataset:
    """Batches (image, label) pairs into {'image': uint8, 'label': int32} dicts."""
    ds = ds.batch(local_batch, drop_remainder=True, num_parallel_calls=parallel_calls(data_cfg))
    return ds.map(lambda image, label: {'image': image, 'label': label})


def pad_eval(ds: tf.data.Dataset, data_cfg: ml_collections.ConfigDict, *, count: int,
             num_batches: int, local_batch: int) -> tf.data.Dataset:
    """Appends masked zero examples so this process yields exactly `num_batches` batches."""
    size = info_lib.eval_image_size(data_cfg)
    ds = ds.map(lambda image, label: (image, label, True))
    total = num_batches * local_batch
    padding = tf.data.Dataset.from_tensors(
        (tf.zeros([size, size, 3], tf.uint8), tf.constant(0, tf.int32), False))
    ds = ds.concatenate(padding.repeat(max(total - count, 0))).take(total)
    ds = ds.batch(local_batch)
    return ds.map(lambda image, label, mask: {'image': image, 'label': label, 'mask': mask})


def as_numpy(ds: tf.data.Dataset) -> Iterator[Batch]:
    return ds.as_numpy_iterator()


class _Background:
    """Runs fn(*args) on a daemon thread (nothing to shut down at exit); result() joins."""

    def __init__(self, fn: Callable, *args):
        self._value, self._error = None, None
        self._thread = threading.Thread(target=self._run, args=(fn, args), daemon=True,
                                        name='next-epoch')
        self._thread.start()

    def _run(self, fn: Callable, args: tuple) -> None:
        try:
            self._value = fn(*args)
        except BaseException as error:  # re-raised in the consumer by result()
            self._error = error

    def result(self):
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def chain_epochs(make_epoch: Callable[[int, int], tf.data.Dataset], first_epoch: int,
                 first_offset: int, steps_per_epoch: int, lookahead: int) -> Iterator[Batch]:
    """Yields the batches of epochs first_epoch, first_epoch + 1, ... forever.

    make_epoch(epoch, skip_batches) builds one epoch's pipeline (on this thread: TFDS builders
    are not thread-safe). The next epoch's first batch is fetched on a helper thread
    `lookahead` batches before the current epoch ends, so its shuffle buffer fills while the
    trainer still has batches. An epoch that yields fewer batches than expected (records lost
    or unreadable) ends early with a warning and the next one starts.
    """
    lookahead = max(lookahead, 1)

    def first_batch(ds: tf.data.Dataset):
        iterator = as_numpy(ds)
        return iterator, next(iterator, None)

    upcoming = _Background(first_batch, make_epoch(first_epoch, first_offset))
    epoch, offset = first_epoch, first_offset
    while True:
        iterator, batch = upcoming.result()
        if batch is None:
            raise ValueError(
                f'Epoch {epoch} of the training data yielded no batch: this process\'s share of '
                'the split is smaller than its batch; use a smaller batch_size or more data.'
            )
        remaining = steps_per_epoch - offset  # batches of this epoch, `batch` included
        next_started = False
        for left in range(remaining, 0, -1):
            if left == min(lookahead, remaining):
                upcoming = _Background(first_batch, make_epoch(epoch + 1, 0))
                next_started = True
            yield batch
            if left > 1:
                batch = next(iterator, None)
                if batch is None:
                    logging.warning('Epoch %d ended after %d of %d batches; starting epoch %d.',
                                    epoch, steps_per_epoch - left + 1, steps_per_epoch, epoch + 1)
                    break
        if not next_started:
            upcoming = _Background(first_batch, make_epoch(epoch + 1, 0))
        epoch, offset = epoch + 1, 0
