"""Mixup and CutMix on a host batch (numpy, so every source can use them without TensorFlow).

Pairs are formed inside the batch by reversing it, as timm does: example i is mixed with
example B-1-i, so one draw of the mixing weight serves the whole batch.
"""

from __future__ import annotations

import numpy as np

from resnet_flax.data import info as info_lib


def enabled(data_cfg) -> bool:
    return data_cfg.mixup_alpha > 0 or data_cfg.cutmix_alpha > 0


def one_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def mix_batch(batch: dict[str, np.ndarray], data_cfg, num_classes: int,
              rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Returns the batch with images mixed and float32 [B, num_classes] soft labels."""
    images, labels = batch['image'], one_hot(batch['label'], num_classes)
    use_cutmix = data_cfg.cutmix_alpha > 0 and (
        data_cfg.mixup_alpha <= 0 or rng.random() < data_cfg.cutmix_prob)
    if use_cutmix:
        images, lam = _cutmix(images, data_cfg.cutmix_alpha, rng)
    else:
        lam = float(rng.beta(data_cfg.mixup_alpha, data_cfg.mixup_alpha))
        images = (lam * images + (1 - lam) * images[::-1]).astype(np.float32)
    labels = (lam * labels + (1 - lam) * labels[::-1]).astype(np.float32)
    return {**batch, 'image': images, 'label': labels}


def _cutmix(images: np.ndarray, alpha: float, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """Pastes one box from the partner image; the label weight is the area actually kept."""
    _, height, width, _ = images.shape
    lam = rng.beta(alpha, alpha)
    cut_h, cut_w = int(height * np.sqrt(1 - lam)), int(width * np.sqrt(1 - lam))
    cy, cx = rng.integers(height), rng.integers(width)
    top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
    left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
    mixed = images.copy()
    mixed[:, top:bottom, left:right] = images[::-1, top:bottom, left:right]
    kept = 1 - (bottom - top) * (right - left) / (height * width)
    return mixed, float(kept)


def maybe_mix(batch: dict[str, np.ndarray], data_cfg, num_classes: int, seed: int, step: int,
              process_index: int) -> dict[str, np.ndarray]:
    """Mixes when the config asks; the draw is a pure function of (seed, step, process)."""
    if not enabled(data_cfg):
        return batch
    return mix_batch(batch, data_cfg, num_classes, info_lib.rng(seed, step, process_index, 0x313))
