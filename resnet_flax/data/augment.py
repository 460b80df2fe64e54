"""Stronger augmentation in TensorFlow: RandAugment and TrivialAugment on uint8 images.

RandAugment (Cubuk et al. 2020) applies `num_ops` ops drawn uniformly from the 14 below, all
at one magnitude m in [0, 30] (the paper's scale; ResNet-50 on ImageNet uses 2 ops at 9).
TrivialAugment (Mueller & Hutter 2021) applies one op at a magnitude drawn uniformly from
[0, 30]. At m = 30: rotate 30 degrees, shear 0.3, translate 45% of the side, colour factors
1 +- 0.9, posterize to 4 bits, solarize at threshold 0. Geometric ops fill with grey (128).
Every draw is a stateless op keyed by the example's seed.

Images are uint8 [H, W, 3] in and out. Mixup and CutMix run on the device
(`resnet_flax/device_augment.py`). TensorFlow sources import this module lazily.
"""

from __future__ import annotations

import math

import ml_collections
import tensorflow as tf

MAX_MAGNITUDE = 30.0
FILL = 128.0


def _blend(degenerate: tf.Tensor, image: tf.Tensor, factor: tf.Tensor) -> tf.Tensor:
    """PIL ImageEnhance: factor 0 gives `degenerate`, 1 the image, > 1 extrapolates."""
    degenerate, image = tf.cast(degenerate, tf.float32), tf.cast(image, tf.float32)
    blended = degenerate + factor * (image - degenerate)
    return tf.cast(tf.clip_by_value(tf.round(blended), 0, 255), tf.uint8)


def _gray(image: tf.Tensor) -> tf.Tensor:
    return tf.image.grayscale_to_rgb(tf.image.rgb_to_grayscale(image))


def _affine(image: tf.Tensor, transform: list) -> tf.Tensor:
    """Output pixel (x, y) samples the input at (a0 x + a1 y + a2, b0 x + b1 y + b2)."""
    transform = tf.cast(tf.stack(transform + [0.0, 0.0]), tf.float32)[None]
    out = tf.raw_ops.ImageProjectiveTransformV3(
        images=tf.cast(image, tf.float32)[None], transforms=transform,
        output_shape=tf.shape(image)[:2], fill_value=FILL, interpolation='BILINEAR',
        fill_mode='CONSTANT')
    return tf.cast(tf.clip_by_value(tf.round(out[0]), 0, 255), tf.uint8)


def _rotate(image, level):
    angle = level * math.radians(30.0)
    height, width = tf.cast(tf.shape(image)[0], tf.float32), tf.cast(tf.shape(image)[1], tf.float32)
    cos, sin = tf.cos(angle), tf.sin(angle)
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Inverse rotation about the centre.
    return _affine(image, [cos, -sin, cx - cos * cx + sin * cy,
                           sin, cos, cy - sin * cx - cos * cy])


def _shear_x(image, level):
    return _affine(image, [1.0, level * 0.3, 0.0, 0.0, 1.0, 0.0])


def _shear_y(image, level):
    return _affine(image, [1.0, 0.0, 0.0, level * 0.3, 1.0, 0.0])


def _translate_x(image, level):
    shift = level * 0.45 * tf.cast(tf.shape(image)[1], tf.float32)
    return _affine(image, [1.0, 0.0, -shift, 0.0, 1.0, 0.0])


def _translate_y(image, level):
    shift = level * 0.45 * tf.cast(tf.shape(image)[0], tf.float32)
    return _affine(image, [1.0, 0.0, 0.0, 0.0, 1.0, -shift])


def _autocontrast(image, level):
    del level
    image = tf.cast(image, tf.float32)
    low = tf.reduce_min(image, axis=[0, 1])
    high = tf.reduce_max(image, axis=[0, 1])
    scale = tf.where(high > low, 255.0 / tf.maximum(high - low, 1.0), 1.0)
    offset = tf.where(high > low, low, 0.0)
    return tf.cast(tf.clip_by_value((image - offset) * scale, 0, 255), tf.uint8)


def _equalize_channel(channel: tf.Tensor) -> tf.Tensor:
    """PIL ImageOps.equalize on one uint8 channel [H, W]."""
    histogram = tf.histogram_fixed_width(tf.cast(channel, tf.int32), [0, 255], nbins=256)
    nonzero = tf.boolean_mask(histogram, histogram != 0)
    step = (tf.reduce_sum(nonzero) - nonzero[-1]) // 255

    def equalized():
        lut = (tf.cumsum(histogram) + step // 2) // step
        lut = tf.clip_by_value(tf.concat([[0], lut[:-1]], 0), 0, 255)
        return tf.cast(tf.gather(lut, tf.cast(channel, tf.int32)), tf.uint8)

    return tf.cond(step > 0, equalized, lambda: channel)


def _equalize(image, level):
    del level
    return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _solarize(image, level):
    threshold = 256.0 - tf.abs(level) * 256.0
    return tf.where(tf.cast(image, tf.float32) >= threshold, 255 - image, image)


def _posterize(image, level):
    bits = 8 - tf.cast(tf.abs(level) * 4.0, tf.int32)
    shift = tf.cast(8 - bits, tf.uint8)
    return tf.bitwise.left_shift(tf.bitwise.right_shift(image, shift), shift)


def _color(image, level):
    return _blend(_gray(image), image, 1.0 + level * 0.9)


def _contrast(image, level):
    mean = tf.reduce_mean(tf.cast(tf.image.rgb_to_grayscale(image), tf.float32))
    return _blend(tf.fill(tf.shape(image), mean), image, 1.0 + level * 0.9)


def _brightness(image, level):
    return _blend(tf.zeros_like(image), image, 1.0 + level * 0.9)


def _sharpness(image, level):
    kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
    kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
    smooth = tf.nn.depthwise_conv2d(tf.cast(image, tf.float32)[None], kernel, [1, 1, 1, 1],
                                    padding='SAME')[0]
    return _blend(tf.clip_by_value(tf.round(smooth), 0, 255), image, 1.0 + level * 0.9)


def _identity(image, level):
    del level
    return image


# Signed ops take level in [-1, 1] (the sign is drawn); unsigned ones use |level|.
OPS = (_identity, _autocontrast, _equalize, _rotate, _solarize, _color, _posterize, _contrast,
       _brightness, _sharpness, _shear_x, _shear_y, _translate_x, _translate_y)


def _apply_random_op(image: tf.Tensor, magnitude: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    op_seed, sign_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    index = tf.random.stateless_uniform([], op_seed, 0, len(OPS), dtype=tf.int32)
    sign = tf.where(tf.random.stateless_uniform([], sign_seed) < 0.5, -1.0, 1.0)
    level = sign * magnitude / MAX_MAGNITUDE
    branches = [lambda op=op: tf.ensure_shape(op(image, level), image.shape) for op in OPS]
    return tf.switch_case(index, branches)


def randaugment(image: tf.Tensor, seed: tf.Tensor, num_ops: int, magnitude: float) -> tf.Tensor:
    seeds = tf.random.experimental.stateless_split(seed, max(num_ops, 1))
    for i in range(num_ops):
        image = _apply_random_op(image, tf.constant(float(magnitude)), seeds[i])
    return image


def trivialaugment(image: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
    magnitude_seed, op_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    magnitude = tf.random.stateless_uniform([], magnitude_seed, 0.0, MAX_MAGNITUDE)
    return _apply_random_op(image, magnitude, op_seed)


def apply(image: tf.Tensor, seed: tf.Tensor, data_cfg: ml_collections.ConfigDict) -> tf.Tensor:
    """The config's auto-augmentation ('' = none) on a uint8 image."""
    if data_cfg.auto_augment == 'randaugment':
        return randaugment(image, seed, int(data_cfg.randaugment_num_ops),
                           float(data_cfg.randaugment_magnitude))
    if data_cfg.auto_augment == 'trivialaugment':
        return trivialaugment(image, seed)
    return image
