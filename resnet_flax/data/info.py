"""What every source shares: the dataset description, config checks and the batch arithmetic.

No TensorFlow here: digits and synthetic must run where TensorFlow is not installed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import ml_collections
import numpy as np

# Per-channel statistics in [0, 1] pixel units.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Over the 50,000 training images (pixel-wise population std).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)

BUILT_IN = ('digits', 'synthetic', 'image_folder', 'prepared')
LOADERS = ('auto', 'tf', 'grain', 'dali')
TRAIN_CROPS = ('', 'inception', 'pad', 'none')
EVAL_CROPS = ('', 'center', 'resize')
# '' = automatic: 'torchvision' for weights converted from PyTorch, else the data set's recipe.
EVAL_PRESETS = ('', 'native', 'torchvision')
AUTO_AUGMENTS = ('', 'randaugment', 'trivialaugment')
# Images whose larger side is at most this get the CIFAR recipe by default (pad-crop, resize).
SMALL_IMAGE_MAX_SIDE = 64
# The default recipes, by image size (crops()): (train crop, eval crop).
SMALL_IMAGE_CROPS = ('pad', 'resize')  # CIFAR: pad-and-crop, the whole image at eval
LARGE_IMAGE_CROPS = ('inception', 'center')  # ImageNet: Inception crop, centre crop at eval
CHANNELS = 3
# One process's slice of a batch: 'image' uint8 [B, H, W, 3], 'label' int32 [B] (float32
# [B, classes] once mixed), plus a bool 'mask' [B] in eval (False on padding).
Batch = dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """What the trainer needs to know about a data set before reading it."""

    num_classes: int
    num_train_examples: int  # the whole train split, over all processes
    num_eval_examples: int  # the whole eval split, over all processes
    image_shape: tuple[int, int, int]  # (H, W, C) of every batch image
    label_names: tuple[str, ...] = ()
    # Files a source found but could not read and left out (image folders); None: not tracked.
    num_skipped_examples: int | None = None
    # The larger side of a typical source image (image_side()); None: unknown or not images.
    image_side: int | None = None


def rng(*keys: int) -> np.random.Generator:
    """A numpy generator that is a pure function of integer keys (any sign)."""
    return np.random.default_rng([int(k) % 2**63 for k in keys])


def local_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f'global_batch_size={global_batch_size} must be a positive multiple of '
            f'process_count={process_count}.'
        )
    return global_batch_size // process_count


def check_process(process_index: int, process_count: int) -> None:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f'process_index={process_index} must be in [0, process_count={process_count}).'
        )


def normalization(data_cfg: ml_collections.ConfigDict, default_mean: Sequence[float],
                  default_std: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) float32 [3] from the config, or the data set's defaults."""
    mean = tuple(data_cfg.mean_rgb) or tuple(default_mean)
    std = tuple(data_cfg.std_rgb) or tuple(default_std)
    if len(mean) != CHANNELS or len(std) != CHANNELS or min(std) <= 0:
        raise ValueError(
            f'data.mean_rgb={tuple(data_cfg.mean_rgb)} / data.std_rgb={tuple(data_cfg.std_rgb)} '
            'must be 3 values each (std > 0) in [0, 1] pixel units, or () for the defaults.'
        )
    return np.asarray(mean, np.float32), np.asarray(std, np.float32)


def default_statistics(dataset: str) -> tuple[Sequence[float], Sequence[float]]:
    """(mean, std) a data set is normalised with by default (digits computes its own).

    CIFAR's for cifar10/100, none for synthetic data, ImageNet's for everything else.
    """
    base = dataset.split(':')[0].split('/')[0]  # 'cifar10:3.0.2' -> 'cifar10'
    if base == 'cifar10':
        return CIFAR10_MEAN, CIFAR10_STD
    if base == 'cifar100':
        return CIFAR100_MEAN, CIFAR100_STD
    if base == 'synthetic':
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    return IMAGENET_MEAN, IMAGENET_STD


def validate(data_cfg: ml_collections.ConfigDict) -> None:
    """Checks the fields every source reads; raises a one-line ValueError naming the field."""
    if not isinstance(data_cfg.dataset, str) or not data_cfg.dataset:
        raise ValueError(
            f'data.dataset={data_cfg.dataset!r} must name a source: a TFDS data set '
            f"('imagenet2012', 'cifar10', ...) or one of {BUILT_IN}."
        )
    if int(data_cfg.image_size) < 1:
        raise ValueError(f'data.image_size={data_cfg.image_size} must be a positive integer.')
    choices = (('train_crop', TRAIN_CROPS), ('eval_crop', EVAL_CROPS),
               ('auto_augment', AUTO_AUGMENTS), ('eval_preset', EVAL_PRESETS))
    for name, valid in choices:
        if data_cfg[name] not in valid:
            raise ValueError(f'data.{name}={data_cfg[name]!r} is not one of {valid}.')
    if not 0 < data_cfg.eval_crop_fraction <= 1:
        raise ValueError(
            f'data.eval_crop_fraction={data_cfg.eval_crop_fraction} must be in (0, 1] '
            '(0.875 crops 224 from 256).'
        )
    if not 0 <= data_cfg.holdout_fraction < 1:
        raise ValueError(
            f'data.holdout_fraction={data_cfg.holdout_fraction} must be in [0, 1).'
        )
    low, high = data_cfg.inception_area_range
    if not 0 < low <= high <= 1:
        raise ValueError(
            f'data.inception_area_range={tuple(data_cfg.inception_area_range)} must satisfy '
            '0 < low <= high <= 1.'
        )
    low, high = data_cfg.inception_aspect_range
    if not 0 < low <= high:
        raise ValueError(
            f'data.inception_aspect_range={tuple(data_cfg.inception_aspect_range)} must satisfy '
            '0 < low <= high.'
        )
    if data_cfg.crop_padding < 0:
        raise ValueError(f'data.crop_padding={data_cfg.crop_padding} must be >= 0.')
    if data_cfg.mixup_alpha < 0 or data_cfg.cutmix_alpha < 0:
        raise ValueError(
            f'data.mixup_alpha={data_cfg.mixup_alpha} and data.cutmix_alpha='
            f'{data_cfg.cutmix_alpha} must be >= 0 (0 = off).'
        )
    if not 0 <= data_cfg.cutmix_prob <= 1:
        raise ValueError(f'data.cutmix_prob={data_cfg.cutmix_prob} must be in [0, 1].')
    if not 0 <= data_cfg.randaugment_magnitude <= 30 or data_cfg.randaugment_num_ops < 0:
        raise ValueError(
            f'data.randaugment_magnitude={data_cfg.randaugment_magnitude} must be in [0, 30] and '
            f'data.randaugment_num_ops={data_cfg.randaugment_num_ops} >= 0.'
        )
    if data_cfg.shuffle_buffer_size < 1 or data_cfg.threadpool_size < 0:
        raise ValueError(
            f'data.shuffle_buffer_size={data_cfg.shuffle_buffer_size} must be >= 1 and '
            f'data.threadpool_size={data_cfg.threadpool_size} >= 0 (0 = one per core).'
        )
    if data_cfg.num_parallel_calls == 0 or data_cfg.prefetch_batches < -1:
        raise ValueError(
            f'data.num_parallel_calls={data_cfg.num_parallel_calls} must be -1 (autotune) or '
            f'>= 1, and data.prefetch_batches={data_cfg.prefetch_batches} -1 or >= 0.'
        )
    normalization(data_cfg, IMAGENET_MEAN, IMAGENET_STD)  # checks the shapes


def image_side(longer_sides: Sequence[int]) -> int | None:
    """The larger side of a typical image: the median of the images' larger sides, so a
    few odd files do not flip a data set's recipe. None for no images."""
    return int(np.median(longer_sides)) if len(longer_sides) else None


def crops(data_cfg: ml_collections.ConfigDict, side: int | None) -> tuple[str, str]:
    """(train crop, eval crop): data.train_crop / data.eval_crop where set, else the one rule
    for every source (TFDS sets, image folders, prepared stores) from the larger side of a
    typical image: at most SMALL_IMAGE_MAX_SIDE, the CIFAR recipe; larger or unknown
    (a TFDS set of variable-size images), ImageNet's."""
    small = side is not None and side <= SMALL_IMAGE_MAX_SIDE
    train, evaluation = SMALL_IMAGE_CROPS if small else LARGE_IMAGE_CROPS
    return data_cfg.train_crop or train, data_cfg.eval_crop or evaluation


def describe_crops(data_cfg: ml_collections.ConfigDict, side: int | None) -> str:
    """One line for the start of a run: the crops in use and why."""
    train, evaluation = crops(data_cfg, side)
    size = f'images about {side} px' if side is not None else 'image size not declared'
    if data_cfg.train_crop and data_cfg.eval_crop:
        why = 'as configured'
    else:
        recipe = 'CIFAR' if (train, evaluation) == SMALL_IMAGE_CROPS else 'ImageNet' if (
            train, evaluation) == LARGE_IMAGE_CROPS else 'mixed'
        why = (f'the {recipe} recipe for {size} (up to {SMALL_IMAGE_MAX_SIDE} px: CIFAR\'s); '
               'set --config.data.train_crop / --config.data.eval_crop to choose')
    return f'data recipe: train_crop={train!r}, eval_crop={evaluation!r}: {why}'


def eval_image_size(data_cfg: ml_collections.ConfigDict) -> int:
    """The eval crop size: data.eval_image_size, or data.image_size when it is 0."""
    size = int(data_cfg.get('eval_image_size', 0))
    if size < 0:
        raise ValueError(f'data.eval_image_size={size} must be >= 0 (0 = data.image_size).')
    return size or int(data_cfg.image_size)


def eval_batch_count(num_examples: int, global_batch_size: int) -> int:
    """Batches in one eval pass: every process yields this many (the last ones padded)."""
    return -(-num_examples // global_batch_size)
