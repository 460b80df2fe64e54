"""Generated photo-like JPEGs of ImageNet's sizes, for the input benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

HEIGHTS = (333, 375, 400, 500)
WIDTH = 500


def write_jpegs(root: Path, count: int, seed: int = 0) -> float:
    """Photo-like JPEGs (smooth colour fields plus grain) in two class folders; mean KB."""
    rng = np.random.default_rng(seed)
    sizes = []
    for i in range(count):
        folder = root / f'class{i % 2}'
        folder.mkdir(parents=True, exist_ok=True)
        height = int(rng.choice(HEIGHTS))
        coarse = Image.fromarray((rng.random((12, 16, 3)) * 255).astype(np.uint8))
        field = np.asarray(coarse.resize((WIDTH, height), Image.Resampling.BICUBIC), np.float32)
        pixels = np.clip(field + rng.normal(0, 18, field.shape), 0, 255).astype(np.uint8)
        path = folder / f'{i:05d}.jpg'
        Image.fromarray(pixels).save(path, quality=90)
        sizes.append(path.stat().st_size)
    return float(np.mean(sizes)) / 1024
