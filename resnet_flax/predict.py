"""Top-k classes, with names and probabilities, for image files.

    model, variables = ...  # e.g. from eval_checkpoint.restore_for_prediction
    for p in predict.predict_files(model, variables, ['cat.jpg'], config.data): print(p)

Images go through the config's EVAL preprocessing (`data/single_image.py`, uint8) and its
normalisation (`device_augment`, as the eval step applies it), the model runs in eval mode,
and the probabilities are the softmax of the logits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np

from resnet_flax import device_augment
from resnet_flax.data import single_image

PyTree = Any


@dataclasses.dataclass(frozen=True)
class Prediction:
    """The top classes of one image, most probable first."""

    image: str
    classes: tuple[int, ...]
    names: tuple[str, ...]
    probabilities: tuple[float, ...]

    def as_dict(self) -> dict[str, Any]:
        return {'image': self.image,
                'top': [{'class': c, 'name': n, 'probability': p} for c, n, p
                        in zip(self.classes, self.names, self.probabilities, strict=True)]}

    def format(self) -> str:
        width = max(len(n) for n in self.names)
        rows = [f'  {rank}. {name:<{width}}  {probability:.4f}' for rank, (name, probability)
                in enumerate(zip(self.names, self.probabilities, strict=True), start=1)]
        return '\n'.join([self.image, *rows])


def class_names(data_cfg: ml_collections.ConfigDict, num_classes: int) -> tuple[str, ...]:
    """The data set's class names, or 'class N' where it has none (or not as many)."""
    names = single_image.label_names(data_cfg)
    if len(names) != num_classes:
        return tuple(f'class {i}' for i in range(num_classes))
    return names


def top_k(probabilities: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k largest entries of each row, largest first (ties: lower index)."""
    return np.argsort(-probabilities, axis=-1, kind='stable')[:, :k]


def predict_files(model: nn.Module, variables: PyTree, paths: Sequence[str],
                  data_cfg: ml_collections.ConfigDict, k: int = 5) -> list[Prediction]:
    """The top-`k` classes of each image file under `model` with `variables`."""
    images = np.stack([single_image.load_eval_image(path, data_cfg) for path in paths])
    augment = device_augment.AugmentConfig.normalization_only(data_cfg)

    def forward(v, x):
        return model.apply(v, device_augment.normalize(x, augment), train=False)

    logits = jax.jit(forward)(variables, images)
    probabilities = np.asarray(jax.nn.softmax(np.asarray(logits, np.float32), axis=-1))
    names = class_names(data_cfg, probabilities.shape[-1])
    predictions = []
    for path, row, best in zip(paths, probabilities, top_k(probabilities, k), strict=True):
        predictions.append(Prediction(
            image=str(path), classes=tuple(int(c) for c in best),
            names=tuple(names[c] for c in best),
            probabilities=tuple(float(row[c]) for c in best)))
    return predictions
