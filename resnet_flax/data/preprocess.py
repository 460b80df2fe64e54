"""Per-example image recipes in TensorFlow: decode, crop, resize, to uint8.

Every random choice is a stateless op keyed by a per-example seed ([2] int64), so an example's
augmentation is a pure function of (seed, epoch, process, position) and survives a resume.

- ImageNet train (Szegedy et al. 2015): a random crop covering `area_range` of the image with
  aspect ratio in `aspect_range`, decoded fused with the crop (only the window's JPEG blocks are
  decoded), resized to the train size.
- ImageNet eval: the central crop covering `crop_fraction` of the short side, resized to the
  eval size; the same window as "resize the short side to size / crop_fraction, centre-crop
  size" (224 from 256), decoded fused with the crop.
- CIFAR (He et al. 2016): zero-pad `padding` pixels, random crop back.
- torchvision's eval (for weights converted from PyTorch): the whole image decoded with the
  accurate integer IDCT (PIL's default; the fast one differs by a few levels), the short side
  resized to `resize_size` with an antialiased bilinear filter (PIL's BILINEAR, which
  torchvision's Resize applies to PIL images), the centre crop at torchvision's offsets, and
  rounded to uint8 as PIL's output is.

The random flip, normalisation and Mixup/CutMix run on the device (`device_augment`); the
pipelines round resized images to uint8 (as PIL and torchvision do) before batching.

Non-JPEG files (PNG, GIF, BMP) are decoded whole, then cropped. Grayscale is replicated to
RGB and alpha dropped (channels=3 in every decoder).

TensorFlow is imported by the callers (tf.data sources) only; import this module lazily.
"""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

CHANNELS = 3


def _decode_window(encoded: tf.Tensor, window_fn) -> tf.Tensor:
    """uint8 [h, w, 3] of the window that window_fn(shape) -> [y, x, h, w] picks.

    JPEGs decode only the window (shape from the header); other formats decode once, whole.
    """

    def jpeg():
        window = window_fn(tf.image.extract_jpeg_shape(encoded)[:2])
        return tf.image.decode_and_crop_jpeg(
            encoded, window, channels=CHANNELS, dct_method='INTEGER_FAST')

    def other():
        image = decode(encoded)
        window = window_fn(tf.shape(image)[:2])
        return tf.slice(image, tf.stack([window[0], window[1], 0]),
                        tf.stack([window[2], window[3], CHANNELS]))

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, other)
    return tf.ensure_shape(image, [None, None, CHANNELS])


def decode(encoded: tf.Tensor) -> tf.Tensor:
    """The whole image, uint8 [h, w, 3]."""
    image = tf.io.decode_image(encoded, channels=CHANNELS, expand_animations=False)
    return tf.ensure_shape(image, [None, None, CHANNELS])


def decode_accurate(encoded: tf.Tensor) -> tf.Tensor:
    """The whole image, uint8 [h, w, 3]; JPEGs with libjpeg's accurate integer IDCT, as PIL."""

    def jpeg():
        return tf.image.decode_jpeg(encoded, channels=CHANNELS, dct_method='INTEGER_ACCURATE')

    image = tf.cond(tf.io.is_jpeg(encoded), jpeg, lambda: decode(encoded))
    return tf.ensure_shape(image, [None, None, CHANNELS])


def short_side_shape(shape: tf.Tensor, short: int) -> tf.Tensor:
    """[h, w] with the short side `short` and the long one int(short * long / short_side),
    truncated as torchvision's Resize(int) computes it."""
    height, width = tf.cast(shape[0], tf.float64), tf.cast(shape[1], tf.float64)
    small, target = tf.minimum(height, width), tf.constant(short, tf.float64)
    new_h = tf.where(height <= width, target, tf.floor(target * height / small))
    new_w = tf.where(height <= width, tf.floor(target * width / small), target)
    return tf.cast(tf.stack([new_h, new_w]), tf.int32)


def torchvision_center_crop(encoded: tf.Tensor, size: int, resize_size: int) -> tf.Tensor:
    """uint8 [size, size, 3]: Resize(resize_size) then CenterCrop(size), as torchvision."""
    image = decode_accurate(encoded)
    new_shape = short_side_shape(tf.shape(image)[:2], resize_size)
    resized = tf.cond(
        tf.reduce_all(new_shape == tf.shape(image)[:2]),
        lambda: tf.cast(image, tf.float32),  # torchvision leaves an image of that size alone
        lambda: tf.image.resize(image, new_shape, method='bilinear', antialias=True))
    # torchvision's offsets: round((h - size) / 2), halves to even, as Python's round().
    top = tf.cast(tf.round(tf.cast(new_shape[0] - size, tf.float64) / 2), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_shape[1] - size, tf.float64) / 2), tf.int32)
    crop = tf.slice(resized, tf.stack([top, left, 0]), [size, size, CHANNELS])
    return to_uint8(tf.clip_by_value(crop, 0.0, 255.0))


def inception_window(shape: tf.Tensor, seed: tf.Tensor, area_range: Sequence[float],
                     aspect_range: Sequence[float]) -> tf.Tensor:
    """[y, x, h, w] of a random crop; the whole image if 10 draws all fall outside it."""
    whole = tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, shape=[1, 1, 4])
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.concat([shape, [CHANNELS]], axis=0),
        bounding_boxes=whole,
        seed=seed,
        min_object_covered=float(area_range[0]),
        aspect_ratio_range=tuple(float(a) for a in aspect_range),
        area_range=tuple(float(a) for a in area_range),
        max_attempts=10,
        use_image_if_no_bounding_boxes=True,
    )
    return tf.stack([begin[0], begin[1], size[0], size[1]])


def center_window(shape: tf.Tensor, crop_fraction: float) -> tf.Tensor:
    """[y, x, h, w] of the central square covering `crop_fraction` of the short side."""
    side = tf.cast(tf.cast(tf.reduce_min(shape), tf.float32) * crop_fraction, tf.int32)
    side = tf.maximum(side, 1)
    top, left = (shape[0] - side + 1) // 2, (shape[1] - side + 1) // 2
    return tf.stack([top, left, side, side])


def resize(image: tf.Tensor, size: int, method: str, antialias: bool) -> tf.Tensor:
    """float32 [size, size, 3] in 0..255."""
    resized = tf.image.resize(image, [size, size], method=method, antialias=antialias)
    return tf.clip_by_value(resized, 0.0, 255.0)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
    return tf.cast(tf.round(image), tf.uint8)


def inception_crop(encoded: tf.Tensor, seed: tf.Tensor, size: int, *,
                   area_range: Sequence[float], aspect_range: Sequence[float], method: str,
                   antialias: bool) -> tf.Tensor:
    image = _decode_window(
        encoded, lambda shape: inception_window(shape, seed, area_range, aspect_range))
    return resize(image, size, method, antialias)


def center_crop(encoded: tf.Tensor, size: int, *, crop_fraction: float, method: str,
                antialias: bool) -> tf.Tensor:
    image = _decode_window(encoded, lambda shape: center_window(shape, crop_fraction))
    return resize(image, size, method, antialias)


def pad_crop(image: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
    """Zero-pads (black, before normalisation, as torchvision's RandomCrop) and crops back."""
    if padding == 0:
        return image
    padded = tf.pad(image, [[padding, padding], [padding, padding], [0, 0]])
    return tf.image.stateless_random_crop(padded, tf.shape(image), seed=seed)
