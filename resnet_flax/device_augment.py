"""The part of the input recipe that runs on the accelerator, inside the jitted step.

Host pipelines send uint8 images already cropped to the train (or eval) size: a quarter of
the bytes of float32, and no per-pixel float work on the host. Here, on the device:

- cast and normalise: (x / 255 - mean) / std per channel, as one multiply-add;
- train only: a random horizontal flip per example, then Mixup (Zhang et al. 2018) or
  CutMix (Yun et al. 2019), which make the labels float32 [B, num_classes].

Every draw is a pure function of (seed, step, global example index): the step's key is
`fold_in(key(seed), step)`, and an example's key folds in its index in the global batch, so
the result does not depend on how many devices or processes share the batch. Mixing pairs
example 2i with 2i + 1 (a partner on the same device whenever the per-device batch is
even, so no image crosses devices) and draws one mixing weight per batch, as timm does.

Pure jax.numpy: no I/O, no host syncs; `steps.py` calls it.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from resnet_flax import data

Batch = dict[str, jax.Array]
# Keeps the augmentation's random stream apart from the others drawn from config.seed.
_AUGMENT_STREAM = 0x617567


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """What the device part of the input recipe needs; hashable, so jit can close over it."""

    mean_rgb: tuple[float, float, float] = (0.0, 0.0, 0.0)  # [0, 1] pixel units
    std_rgb: tuple[float, float, float] = (1.0, 1.0, 1.0)
    seed: int = 0
    random_flip: bool = False
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    cutmix_prob: float = 0.5
    num_classes: int = 0  # the width of the soft labels that mixing makes

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> AugmentConfig:
        """The device recipe of an experiment config (the data set's statistics by default)."""
        return dataclasses.replace(
            cls.normalization_only(config.data),
            seed=int(config.seed),
            random_flip=data.random_flip(config.data),
            mixup_alpha=float(config.data.mixup_alpha),
            cutmix_alpha=float(config.data.cutmix_alpha),
            cutmix_prob=float(config.data.cutmix_prob),
            num_classes=int(config.model.num_classes),
        )

    @classmethod
    def normalization_only(cls, data_cfg: ml_collections.ConfigDict) -> AugmentConfig:
        """The eval transform of a data config: its normalisation, nothing random."""
        mean, std = data.normalization(data_cfg)
        return cls(mean_rgb=tuple(float(m) for m in mean), std_rgb=tuple(float(s) for s in std))

    @property
    def mixing(self) -> bool:
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


def normalize(images: jax.Array, cfg: AugmentConfig) -> jax.Array:
    """uint8 [..., 3] in 0..255 -> float32 (x / 255 - mean) / std, as one multiply-add."""
    if images.dtype != jnp.uint8:
        raise TypeError(f'Batch images are {images.dtype}, but the input pipelines send uint8 '
                        '[B, H, W, 3] in 0..255 (normalisation happens on the device); '
                        'pass uint8 images.')
    scale = jnp.asarray([1.0 / (255.0 * s) for s in cfg.std_rgb], jnp.float32)
    offset = jnp.asarray([-m / s for m, s in zip(cfg.mean_rgb, cfg.std_rgb, strict=True)],
                         jnp.float32)
    return images.astype(jnp.float32) * scale + offset


def eval_batch(batch: Batch, cfg: AugmentConfig) -> Batch:
    """The eval transform: normalisation only."""
    return {**batch, 'image': normalize(batch['image'], cfg)}


def train_batch(batch: Batch, step: jax.Array, cfg: AugmentConfig) -> Batch:
    """Flip, normalise and mix the global train batch of optimizer step `step`."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), _AUGMENT_STREAM), step)
    flip_key, mix_key = jax.random.split(key)
    images, labels = batch['image'], batch['label']
    if cfg.random_flip:
        images = random_flip(images, flip_key)
    images = normalize(images, cfg)
    if cfg.mixing:
        images, labels = mix(images, labels, mix_key, cfg)
    return {**batch, 'image': images, 'label': labels}


def example_keys(key: jax.Array, batch_size: int) -> jax.Array:
    """One key per example, from its index in the global batch."""
    return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(batch_size))


def random_flip(images: jax.Array, key: jax.Array) -> jax.Array:
    """Mirrors each image left-right with probability 1/2."""
    flips = jax.vmap(jax.random.bernoulli)(example_keys(key, images.shape[0]))
    return jnp.where(flips[:, None, None, None], images[:, :, ::-1], images)


def partners(x: jax.Array) -> jax.Array:
    """x with examples 2i and 2i + 1 swapped (an odd last example is its own partner)."""
    even = x.shape[0] - x.shape[0] % 2
    pairs = x[:even].reshape(even // 2, 2, *x.shape[1:])[:, ::-1].reshape(even, *x.shape[1:])
    return jnp.concatenate([pairs, x[even:]]) if even < x.shape[0] else pairs


def mix(images: jax.Array, labels: jax.Array, key: jax.Array,
        cfg: AugmentConfig) -> tuple[jax.Array, jax.Array]:
    """Mixup or CutMix with the partner; returns the images and float32 soft labels."""
    choice_key, lam_key, box_key = jax.random.split(key, 3)
    one_hot = jax.nn.one_hot(labels, cfg.num_classes, dtype=jnp.float32)

    def mixup():
        lam = jax.random.beta(lam_key, cfg.mixup_alpha, cfg.mixup_alpha)
        return lam * images + (1 - lam) * partners(images), lam

    def cutmix():
        lam = jax.random.beta(lam_key, cfg.cutmix_alpha, cfg.cutmix_alpha)
        box = cutmix_box(images.shape[1], images.shape[2], lam, box_key)
        kept = 1.0 - jnp.mean(box.astype(jnp.float32))  # the area actually kept
        return jnp.where(box[None, :, :, None], partners(images), images), kept

    if cfg.mixup_alpha > 0 and cfg.cutmix_alpha > 0:
        use_cutmix = jax.random.bernoulli(choice_key, cfg.cutmix_prob)
        mixed, lam = jax.lax.cond(use_cutmix, cutmix, mixup)
    else:
        mixed, lam = cutmix() if cfg.cutmix_alpha > 0 else mixup()
    lam = lam.astype(jnp.float32)
    return mixed, lam * one_hot + (1 - lam) * partners(one_hot)


def cutmix_box(height: int, width: int, lam: jax.Array, key: jax.Array) -> jax.Array:
    """bool [H, W]: a box of about (1 - lam) of the area at a uniform centre, clipped."""
    cut_h = (height * jnp.sqrt(1 - lam)).astype(jnp.int32)
    cut_w = (width * jnp.sqrt(1 - lam)).astype(jnp.int32)
    y_key, x_key = jax.random.split(key)
    cy = jax.random.randint(y_key, (), 0, height)
    cx = jax.random.randint(x_key, (), 0, width)
    top, bottom = jnp.clip(cy - cut_h // 2, 0, height), jnp.clip(cy + cut_h // 2, 0, height)
    left, right = jnp.clip(cx - cut_w // 2, 0, width), jnp.clip(cx + cut_w // 2, 0, width)
    rows, cols = jnp.arange(height)[:, None], jnp.arange(width)[None, :]
    return (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)
