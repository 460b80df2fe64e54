"""ImageNet-1k class names: the WordNet ids data sets label with, and the short names people read.

`imagenet_classes.tsv` beside this file lists the 1000 ILSVRC2012 classes in class-id order
(sorted WordNet ids, the order of TFDS's imagenet2012 and of torchvision's weights), each with
the short name torchvision shows ('n01440764' -> 'tench').
"""

from __future__ import annotations

import functools
import pathlib
from collections.abc import Sequence

TABLE = pathlib.Path(__file__).with_name('imagenet_classes.tsv')
NUM_CLASSES = 1000


@functools.cache
def _table() -> tuple[tuple[str, str], ...]:
    rows = [line.split('\t') for line in TABLE.read_text().splitlines()
            if line and not line.startswith('#')]
    return tuple((wnid, name) for wnid, name in rows)


def wnids() -> tuple[str, ...]:
    return tuple(wnid for wnid, _ in _table())


def names() -> tuple[str, ...]:
    """The 1000 short names in class-id order."""
    return tuple(name for _, name in _table())


def readable(labels: Sequence[str]) -> tuple[str, ...]:
    """Short names for labels that are all ImageNet WordNet ids; other labels as they are."""
    by_wnid = dict(_table())
    if labels and all(label in by_wnid for label in labels):
        return tuple(by_wnid[label] for label in labels)
    return tuple(labels)
