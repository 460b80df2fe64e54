"""A tiny ImageNet in the real ILSVRC2012 archive format, prepared by the real TFDS builder.

    from tests.imagenet_fixture import make_imagenet
    data_dir = make_imagenet(tmp_path, num_classes=3, train_per_class=4, val_per_class=2)
    # config.data.dataset = 'imagenet2012'; config.data.data_dir = data_dir
    # config.data.eval_split = 'validation'; config.model.num_classes = 1000

It writes, in `root/manual`:
- ILSVRC2012_img_train.tar: one nXXXXXXXX.tar per class, each holding nXXXXXXXX_i.JPEG;
- ILSVRC2012_img_val.tar: ILSVRC2012_val_%08d.JPEG.
Then `tfds.builder('imagenet2012').download_and_prepare(manual_dir=...)` runs offline and
writes TFRecords in `root/tfds`, which it returns.

The builder labels validation images by pairing the archive's sorted member names with the
lines of its packaged validation_labels.txt (the real 50,000 labels). So the classes used are
the first `num_classes` synsets to reach `val_per_class` lines there, and every other line up
to the last one used becomes an empty directory member of the val archive: it takes its label
slot in the sorted order, and the builder yields no example for it.

Images are JPEGs of `image_size` (height, width), a flat colour per class (hue spread over
the classes) plus mild noise, so a model can learn them. The pixels and the sizes are a pure
function of `seed`.
"""

from __future__ import annotations

import colorsys
import io
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

NUM_LABELS = 1000


def _validation_labels() -> list[str]:
    import tensorflow_datasets as tfds

    path = tfds.core.tfds_path('datasets/imagenet2012/validation_labels.txt')
    return path.read_text().split()


def _choose_classes(labels: list[str], num_classes: int,
                    val_per_class: int) -> tuple[list[str], dict[int, str]]:
    """The first classes to reach val_per_class lines, and {line: class} of the images."""
    seen: dict[str, list[int]] = {}
    chosen: list[str] = []
    for line, synset in enumerate(labels):
        seen.setdefault(synset, []).append(line)
        if len(seen[synset]) == val_per_class and synset not in chosen:
            chosen.append(synset)
            if len(chosen) == num_classes:
                break
    val_lines = {line: synset for synset in chosen for line in seen[synset][:val_per_class]}
    return chosen, val_lines


def _jpeg(class_index: int, num_classes: int, image_size: tuple[int, int],
          rng: np.random.Generator) -> bytes:
    hue = class_index / max(num_classes, 1)
    colour = np.array(colorsys.hsv_to_rgb(hue, 0.8, 0.9)) * 255
    pixels = colour + rng.normal(0, 12, size=(*image_size, 3))
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, format='JPEG', quality=90)
    return buffer.getvalue()


def _add_bytes(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    tar.addfile(member, io.BytesIO(payload))


def _add_directory(tar: tarfile.TarFile, name: str) -> None:
    member = tarfile.TarInfo(name)
    member.type = tarfile.DIRTYPE
    tar.addfile(member)


def write_archives(manual_dir: Path, *, num_classes: int = 3, train_per_class: int = 4,
                   val_per_class: int = 2, image_size: tuple[int, int] = (40, 48),
                   seed: int = 0) -> list[str]:
    """Writes the two ILSVRC2012 archives into manual_dir; returns the synsets used."""
    manual_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    labels = _validation_labels()
    classes, val_lines = _choose_classes(labels, num_classes, val_per_class)
    with tarfile.open(manual_dir / 'ILSVRC2012_img_train.tar', 'w') as train_tar:
        for index, synset in enumerate(classes):
            inner = io.BytesIO()
            with tarfile.open(fileobj=inner, mode='w') as class_tar:
                for i in range(train_per_class):
                    payload = _jpeg(index, num_classes, image_size, rng)
                    _add_bytes(class_tar, f'{synset}_{i}.JPEG', payload)
            _add_bytes(train_tar, f'{synset}.tar', inner.getvalue())
    with tarfile.open(manual_dir / 'ILSVRC2012_img_val.tar', 'w') as val_tar:
        for line in range(max(val_lines) + 1):
            name = f'ILSVRC2012_val_{line + 1:08d}.JPEG'
            if line in val_lines:
                index = classes.index(val_lines[line])
                _add_bytes(val_tar, name, _jpeg(index, num_classes, image_size, rng))
            else:
                _add_directory(val_tar, name)
    return classes


def make_imagenet(root, *, num_classes: int = 3, train_per_class: int = 4,
                  val_per_class: int = 2, image_size: tuple[int, int] = (40, 48),
                  seed: int = 0, file_format: str = 'tfrecord') -> str:
    """Writes tiny ILSVRC2012 archives under root/manual, prepares imagenet2012 into
    root/tfds with the real builder (offline, as `file_format`: 'tfrecord' for tf.data,
    'array_record' for the grain loader) and returns that data_dir.

    Splits: 'train' (num_classes * train_per_class), 'validation'
    (num_classes * val_per_class). Labels index the 1,000 ImageNet synsets.
    """
    import tensorflow_datasets as tfds

    root = Path(root)
    manual_dir, data_dir = root / 'manual', root / 'tfds'
    write_archives(manual_dir, num_classes=num_classes, train_per_class=train_per_class,
                   val_per_class=val_per_class, image_size=image_size, seed=seed)
    builder = tfds.builder('imagenet2012', data_dir=str(data_dir), file_format=file_format)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
    return str(data_dir)
