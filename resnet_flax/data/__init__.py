"""Input pipelines: one interface over TFDS data sets, image folders, digits and synthetic data.

    info = get_info(config.data)  # cheap; a missing data set fails here
    for batch in train_batches(config.data, global_batch_size=256, seed=0, start_step=0,
                               process_index=0, process_count=1): ...
    for batch in eval_batches(config.data, global_batch_size=256,
                              process_index=0, process_count=1): ...

Batches are dicts of numpy arrays holding this process's slice of the global batch:
'image' uint8 [B_local, H, W, 3] in 0..255, already at the train (or eval) size, 'label'
int32 [B_local], and for eval 'mask' bool [B_local] (False marks padding).
B_local = global_batch_size // process_count. The train order is a pure function of
(seed, epoch, process); `start_step` resumes without decoding the skipped batches.

The host does what needs the image's geometry in uint8 (decode, Inception or pad crop,
resize, RandAugment). Casting, normalisation (`normalization(data_cfg)`), the random flip
(`random_flip(data_cfg)`) and Mixup/CutMix run on the device, inside the jitted step
(`resnet_flax/device_augment.py`): a quarter of the bytes of float32 cross to the device.

TensorFlow is imported only by the tf.data sources (TFDS and image folders with
data.loader='tf'); the grain loader (grain_source.py) and DALI need none.
"""

from __future__ import annotations

from collections.abc import Iterator

import ml_collections
import numpy as np

from resnet_flax.data import info as info_lib
from resnet_flax.data.info import DatasetInfo

__all__ = ['DatasetInfo', 'eval_batches', 'get_info', 'normalization', 'random_flip',
           'train_batches']

Batch = info_lib.Batch


def loader(data_cfg: ml_collections.ConfigDict) -> str:
    """Who reads an image folder, TFDS set or prepared store: 'tf', 'grain' or 'dali'.

    'auto' is tf.data where TensorFlow is installed (the measured TPU default) and grain where
    it is not; a prepared store is grain's.
    """
    import importlib.util

    choice = data_cfg.get('loader', 'auto')
    if choice not in info_lib.LOADERS:
        raise ValueError(f'data.loader={choice!r} is not one of {info_lib.LOADERS}.')
    if data_cfg.dataset == 'prepared':
        if choice not in ('auto', 'grain'):
            raise ValueError(f"data.dataset='prepared' is read by the grain loader; set "
                             f"data.loader='grain' (or 'auto'), not {choice!r}.")
        return 'grain'
    if choice == 'auto':
        return 'tf' if importlib.util.find_spec('tensorflow') is not None else 'grain'
    return choice


def _source(data_cfg):
    """The module that implements `data_cfg.dataset`; only tf.data sources import TensorFlow."""
    name = data_cfg.dataset
    if name == 'digits':
        from resnet_flax.data import digits as source
    elif name == 'synthetic':
        from resnet_flax.data import synthetic as source
    elif loader(data_cfg) == 'grain':
        from resnet_flax.data import grain_source as source
    elif loader(data_cfg) == 'dali':
        from resnet_flax.data import dali_source as source
    elif name == 'image_folder':
        from resnet_flax.data import image_folder as source
    else:
        from resnet_flax.data import tfds_source as source
    return source


def get_info(data_cfg: ml_collections.ConfigDict) -> DatasetInfo:
    """Sizes, classes and image shape; validates the config and fails early if data is missing."""
    info_lib.validate(data_cfg)
    return _source(data_cfg).get_info(data_cfg)


def split_names(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The split names the data set has, or None where they are not listed (digits,
    synthetic, held-out image folders, a TFDS data set that is not there)."""
    if data_cfg.dataset == 'image_folder':
        from resnet_flax.data import image_folder

        return image_folder.split_names(data_cfg)
    if data_cfg.dataset == 'prepared':
        from resnet_flax.data import grain_source, store

        try:
            return tuple(store.read_info(grain_source._store_root(data_cfg)).splits)  # noqa: SLF001
        except (FileNotFoundError, ValueError):
            return None
    if data_cfg.dataset in info_lib.BUILT_IN:
        return None
    import tensorflow_datasets as tfds

    try:
        found = tfds.builder(data_cfg.dataset, data_dir=data_cfg.data_dir)
        return tuple(found.info.splits) if found.is_prepared() else None
    except Exception:  # noqa: BLE001 - not there: get_info names the problem
        return None


def normalization(data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [3] in [0, 1] pixel units: the config's, or the data set's own."""
    if data_cfg.dataset == 'digits':
        from resnet_flax.data import digits

        return digits.normalization(data_cfg)
    return info_lib.normalization(data_cfg, *info_lib.default_statistics(data_cfg.dataset))


def random_flip(data_cfg: ml_collections.ConfigDict) -> bool:
    """Whether training mirrors images; never for digits (a flipped digit is no digit)."""
    return bool(data_cfg.random_flip) and data_cfg.dataset != 'digits'


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int = 0, process_index: int = 0,
                  process_count: int = 1) -> Iterator[Batch]:
    """Infinite iterator over this process's slices of the global train batches."""
    info_lib.validate(data_cfg)
    info_lib.check_process(process_index, process_count)
    info_lib.local_batch_size(global_batch_size, process_count)
    if start_step < 0:
        raise ValueError(f'start_step={start_step} must be >= 0.')
    return _source(data_cfg).train_batches(
        data_cfg, global_batch_size=global_batch_size, seed=seed, start_step=start_step,
        process_index=process_index, process_count=process_count)


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int,
                 split: str | None = None, process_index: int = 0,
                 process_count: int = 1) -> Iterator[Batch]:
    """One pass over `split` (default data.eval_split); every batch carries 'mask'.

    Every process yields the same number of batches, and over all processes each example
    appears exactly once with mask True.
    """
    info_lib.validate(data_cfg)
    info_lib.check_process(process_index, process_count)
    info_lib.local_batch_size(global_batch_size, process_count)
    return _source(data_cfg).eval_batches(
        data_cfg, global_batch_size=global_batch_size, split=split or data_cfg.eval_split,
        process_index=process_index, process_count=process_count)
