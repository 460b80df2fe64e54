"""scikit-learn's handwritten digits: 1,797 8x8 grayscale images, 10 classes, values 0..16.

The split is fixed: the first 1,437 images train, the last 360 test (the order of the file,
no shuffle, so it is the same everywhere). Images (ink 0..16) are scaled to [0, 1], upsampled
bilinearly to `data.image_size`, rounded to uint8 0..255 (16 ink -> 255) and replicated to 3
channels so every model applies unchanged. Default normalisation (on the device): the pixel
mean and std of the upsampled train split. Optional augmentation (`data.train_crop='pad'`):
zero-pad `data.crop_padding` pixels and crop back, i.e. a random shift. Digits are never
flipped.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator

import ml_collections
import numpy as np

from resnet_flax.data import in_memory
from resnet_flax.data import info as info_lib

NUM_TRAIN = 1437
NUM_CLASSES = 10
MAX_VALUE = 16.0
SPLITS = ('train', 'test')


@functools.cache
def _load() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 images in [0, 1], float32 [N, 8, 8], and int32 labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / MAX_VALUE).astype(np.float32), digits.target.astype(np.int32)


def _split(name: str) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _load()
    if name == 'train':
        return images[:NUM_TRAIN], labels[:NUM_TRAIN]
    if name == 'test':
        return images[NUM_TRAIN:], labels[NUM_TRAIN:]
    raise ValueError(f'digits has no split {name!r}; valid splits: {SPLITS}.')


def _resize_matrix(size_in: int, size_out: int) -> np.ndarray:
    """[size_out, size_in] bilinear interpolation with half-pixel centres (edges clamped)."""
    centres = (np.arange(size_out) + 0.5) * size_in / size_out - 0.5
    centres = np.clip(centres, 0, size_in - 1)
    low = np.floor(centres).astype(int)
    high = np.minimum(low + 1, size_in - 1)
    frac = (centres - low).astype(np.float32)
    matrix = np.zeros((size_out, size_in), np.float32)
    np.add.at(matrix, (np.arange(size_out), low), 1 - frac)
    np.add.at(matrix, (np.arange(size_out), high), frac)
    return matrix


def to_uint8(images: np.ndarray) -> np.ndarray:
    """[0, 1] floats -> uint8 0..255, rounded to the nearest level."""
    return np.round(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)


def _shift(images: np.ndarray, padding: int, rng: np.random.Generator) -> np.ndarray:
    """Zero-pad then crop back at a random offset: a shift of up to `padding` pixels."""
    n, size, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding)))
    offsets = rng.integers(0, 2 * padding + 1, size=(n, 2))
    return np.stack([padded[i, y:y + size, x:x + size] for i, (y, x) in enumerate(offsets)])


@functools.cache
def _train_statistics(size: int) -> tuple[float, float]:
    """Pixel mean and std of the train split as the model sees it (after upsampling)."""
    matrix = _resize_matrix(8, size)
    big = np.einsum('hi,nij,wj->nhw', matrix, _split('train')[0], matrix)
    return float(big.mean()), float(big.std())


def normalization(data_cfg: ml_collections.ConfigDict) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) [3]: the config's, or the upsampled train split's own."""
    train_mean, train_std = _train_statistics(int(data_cfg.image_size))
    return info_lib.normalization(data_cfg, [train_mean] * 3, [train_std] * 3)


def _train_crop(data_cfg) -> str:
    crop = data_cfg.train_crop or 'none'
    if crop not in ('none', 'pad'):
        raise ValueError(
            f"data.train_crop={crop!r} is not available for digits; use 'none' or 'pad'.")
    return crop


def get_info(data_cfg: ml_collections.ConfigDict) -> info_lib.DatasetInfo:
    _train_crop(data_cfg)
    size = int(data_cfg.image_size)
    return info_lib.DatasetInfo(
        num_classes=NUM_CLASSES,
        num_train_examples=len(_split(data_cfg.train_split)[1]),
        num_eval_examples=len(_split(data_cfg.eval_split)[1]),
        image_shape=(size, size, info_lib.CHANNELS),
        label_names=tuple(str(d) for d in range(NUM_CLASSES)),
    )


def _make_batch_fn(data_cfg, split: str, train: bool) -> in_memory.MakeBatch:
    images, labels = _split(split)
    matrix = _resize_matrix(images.shape[1], int(data_cfg.image_size))
    shift = train and _train_crop(data_cfg) == 'pad' and data_cfg.crop_padding > 0

    def make_batch(indices: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
        big = to_uint8(np.einsum('hi,nij,wj->nhw', matrix, images[indices], matrix))
        if shift:
            big = _shift(big, int(data_cfg.crop_padding), rng)
        return {'image': np.repeat(big[..., None], info_lib.CHANNELS, axis=-1),
                'label': labels[indices].copy()}

    return make_batch


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int,
                  process_count: int) -> Iterator[info_lib.Batch]:
    make_batch = _make_batch_fn(data_cfg, data_cfg.train_split, train=True)
    return in_memory.train_batches(
        make_batch, len(_split(data_cfg.train_split)[1]), global_batch_size=global_batch_size,
        seed=seed, start_step=start_step, process_index=process_index,
        process_count=process_count)


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, split: str,
                 process_index: int, process_count: int) -> Iterator[info_lib.Batch]:
    make_batch = _make_batch_fn(data_cfg, split, train=False)
    return in_memory.eval_batches(
        make_batch, len(_split(split)[1]), global_batch_size=global_batch_size,
        process_index=process_index, process_count=process_count)
