"""Image folders: one sub-folder per class, any common image format, read with tf.data.

Layouts under `data.data_dir` (local or gs://):
- split folders: ROOT/<data.train_split>/CLASS/* and ROOT/<data.eval_split>/CLASS/*;
- one pool: ROOT/CLASS/*, with `data.holdout_fraction` of each class (fixed by
  `data.holdout_seed`) held out as the eval split.
With holdout_fraction > 0 the eval split is always held out of the train folder. Classes are
the sorted train sub-folder names; eval folders may lack some but not add any.

Indexing (once per process) opens every file with PIL, decoding JPEGs at 1/8 scale, when
`data.verify_images` is set: unreadable or corrupt files are skipped, counted and logged,
never a crash. Grayscale, palette and alpha images become RGB. Formats TensorFlow cannot
decode (e.g. TIFF) are decoded by PIL inside the pipeline.

Train order is index-level, like the numpy sources: epoch e is a permutation of the whole
split from (seed, e), global batch k is its k-th run of global_batch_size files and process p
reads the p-th slice; augmentation is keyed by (seed, epoch, global position). Resuming skips
indices, not images. The recipes follow the images' size (info.crops: CIFAR's up to 64 px,
ImageNet's above, from the median larger side of the train images) unless the config says
otherwise.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import io
from collections.abc import Iterator

import ml_collections
import numpy as np
from absl import logging
from etils import epath

from resnet_flax.data import budget
from resnet_flax.data import info as info_lib

EXTENSIONS = frozenset({'.jpg', '.jpeg', '.png', '.gif', '.bmp', '.webp', '.tif', '.tiff',
                        '.ppm', '.pgm'})
TF_FORMATS = frozenset({'JPEG', 'PNG', 'GIF', 'BMP', 'WEBP'})
MIN_CLASSES = 2


@dataclasses.dataclass(frozen=True)
class Split:
    paths: tuple[str, ...]
    labels: np.ndarray  # int32 [N]
    needs_pil: np.ndarray  # bool [N]: a format tf.io.decode_image cannot read


@dataclasses.dataclass(frozen=True)
class Index:
    classes: tuple[str, ...]
    splits: dict[str, Split]
    skipped: tuple[str, ...]  # corrupt or unreadable files, left out of every split
    image_side: int | None = None  # the larger side of a typical train image (info.image_side)


def _class_dirs(folder: epath.Path) -> list[epath.Path]:
    return sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith('.')),
                  key=lambda d: d.name)


def _image_files(folder: epath.Path) -> list[epath.Path]:
    return sorted(f for f in folder.iterdir()
                  if f.suffix.lower() in EXTENSIONS and not f.name.startswith('.'))


def _check_file(path: epath.Path, verify: bool) -> tuple[str, int] | None:
    """(the PIL format name, the larger side), or None if the file is unreadable or corrupt
    (PIL's DecompressionBombError, over Image.MAX_IMAGE_PIXELS, included)."""
    from PIL import Image

    try:
        with path.open('rb') as file, Image.open(file) as image:
            image_format = image.format, max(image.size)
            if verify:  # JPEGs decode at 1/8 scale: ~10x faster, still reads every block
                image.draft('RGB', (max(image.width // 8, 1), max(image.height // 8, 1)))
                image.load()
        return image_format
    except Exception:  # noqa: BLE001 - PIL raises many types for bad files
        return None


def _check_files(paths: list[epath.Path], verify: bool,
                 threads: int) -> list[tuple[str, int] | None]:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        return list(pool.map(functools.partial(_check_file, verify=verify), paths))


def _holdout(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """bool [N]: the held-out examples, round(fraction * n) of each class, fixed by seed."""
    held = np.zeros(len(labels), bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        count = int(round(fraction * len(members)))
        held[info_lib.rng(seed, int(label)).permutation(members)[:count]] = True
    return held


def _subset(split: Split, keep: np.ndarray) -> Split:
    return Split(tuple(p for p, k in zip(split.paths, keep, strict=True) if k),
                 split.labels[keep], split.needs_pil[keep])


def _read_folder(folder: epath.Path, classes: list[str], verify: bool, threads: int):
    files, labels = [], []
    for class_dir in _class_dirs(folder):
        if class_dir.name not in classes:
            raise ValueError(
                f'{class_dir} is a class the train folder lacks; the classes are {classes}.')
        for path in _image_files(class_dir):
            files.append(path)
            labels.append(classes.index(class_dir.name))
    checked = _check_files(files, verify, threads)
    good = [f is not None for f in checked]
    split = Split(tuple(str(p) for p in files), np.asarray(labels, np.int32),
                  np.asarray([f is not None and f[0] not in TF_FORMATS for f in checked], bool))
    skipped = tuple(str(p) for p, ok in zip(files, good, strict=True) if not ok)
    sides = [f[1] for f in checked if f is not None]
    return _subset(split, np.asarray(good, bool)), skipped, sides


@functools.lru_cache(maxsize=8)
def _index(root: str, train_split: str, eval_split: str, holdout_fraction: float,
           holdout_seed: int, verify: bool, threads: int) -> Index:
    root_path = epath.Path(root)
    if not root_path.is_dir():
        raise FileNotFoundError(f'data.data_dir={root} is not a folder of class folders.')
    train_dir = root_path / train_split
    split_layout = train_dir.is_dir() and bool(_class_dirs(train_dir))
    pool_dir = train_dir if split_layout else root_path
    classes = [d.name for d in _class_dirs(pool_dir)]
    if len(classes) < MIN_CLASSES:
        raise ValueError(
            f'{pool_dir} has {len(classes)} class folder(s) {classes}; an image folder needs '
            f'at least {MIN_CLASSES} (ROOT/CLASS/*.jpg or ROOT/{train_split}/CLASS/*.jpg).'
        )
    train, skipped, sides = _read_folder(pool_dir, classes, verify, threads)
    if empty := [c for i, c in enumerate(classes) if not np.any(train.labels == i)]:
        raise ValueError(f'{pool_dir} has class folder(s) with no readable image: {empty}; each '
                         'class folder is a class of the model, so add images or remove them.')
    eval_dir = root_path / eval_split
    splits = {}
    if split_layout and eval_dir.is_dir() and holdout_fraction == 0:
        splits[eval_split], eval_skipped, _ = _read_folder(eval_dir, classes, verify, threads)
        skipped += eval_skipped
    elif holdout_fraction > 0:
        held = _holdout(train.labels, holdout_fraction, holdout_seed)
        splits[eval_split] = _subset(train, held)
        train = _subset(train, ~held)
    splits[train_split] = train
    for name, split in splits.items():
        if not split.paths:
            raise ValueError(f'The image folder split {name!r} under {root} has no images.')
    if skipped:
        logging.warning('Skipped %d unreadable or corrupt image(s) under %s, e.g. %s',
                        len(skipped), root, skipped[:3])
    return Index(tuple(classes), splits, skipped, info_lib.image_side(sides))


def index(data_cfg: ml_collections.ConfigDict) -> Index:
    """The folder's classes, splits and skipped files (cached per process)."""
    if not data_cfg.data_dir:
        raise ValueError('data.dataset=image_folder needs data.data_dir=ROOT (ROOT/CLASS/*.jpg).')
    return _index(str(data_cfg.data_dir), data_cfg.train_split, data_cfg.eval_split,
                  float(data_cfg.holdout_fraction), int(data_cfg.holdout_seed),
                  bool(data_cfg.verify_images), budget.compute(data_cfg).threads)


def _split(data_cfg, name: str) -> Split:
    found = index(data_cfg)
    if name not in found.splits:
        raise ValueError(
            f'The image folder {data_cfg.data_dir} has no split {name!r} (no such folder); '
            f'its splits: {sorted(found.splits)}. Set data.eval_split to a folder name or '
            'data.holdout_fraction > 0.'
        )
    return found.splits[name]


def get_info(data_cfg: ml_collections.ConfigDict) -> info_lib.DatasetInfo:
    found = index(data_cfg)
    size = int(data_cfg.image_size)
    return info_lib.DatasetInfo(
        num_classes=len(found.classes),
        num_train_examples=len(_split(data_cfg, data_cfg.train_split).paths),
        num_eval_examples=len(_split(data_cfg, data_cfg.eval_split).paths),
        image_shape=(size, size, info_lib.CHANNELS),
        label_names=found.classes,
        num_skipped_examples=len(found.skipped),
        image_side=found.image_side,
    )


def _pil_to_png(encoded: bytes) -> bytes:
    """Re-encodes a file TensorFlow cannot decode (TIFF, ...) as an RGB PNG."""
    from PIL import Image

    with Image.open(io.BytesIO(encoded)) as image:
        out = io.BytesIO()
        image.convert('RGB').save(out, format='PNG')
    return out.getvalue()


def _read_bytes(path: bytes) -> bytes:
    """A file's bytes through etils.epath: object stores take the project's storage route."""
    return epath.Path(path.decode()).read_bytes()


def _loader(split: Split):
    """index -> (encoded bytes TF can decode, label)."""
    from resnet_flax.data import tf_pipeline

    tf = tf_pipeline.tf

    paths = tf.constant(split.paths)
    labels = tf.constant(split.labels)
    needs_pil = tf.constant(split.needs_pil)
    any_pil = bool(split.needs_pil.any())
    # gs:// files are read the way every other file of the run is (storage.py), not through
    # TensorFlow's own GCS client; local files keep TF's reader.
    remote = any('://' in path for path in split.paths[:1])

    def read(path):
        if remote:
            return tf.reshape(tf.numpy_function(_read_bytes, [path], tf.string), [])
        return tf.io.read_file(path)

    def load(index):
        encoded = read(tf.gather(paths, index))
        if any_pil:
            encoded = tf.cond(
                tf.gather(needs_pil, index),
                lambda: tf.reshape(tf.numpy_function(_pil_to_png, [encoded], tf.string), []),
                lambda: encoded)
        return encoded, tf.gather(labels, index)

    return load


def _recipes(data_cfg) -> tuple[str, str]:
    return info_lib.crops(data_cfg, index(data_cfg).image_side)


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int,
                  process_count: int) -> Iterator[info_lib.Batch]:
    from resnet_flax.data import tf_pipeline

    tf = tf_pipeline.tf

    split = _split(data_cfg, data_cfg.train_split)
    total, local = len(split.paths), info_lib.local_batch_size(global_batch_size, process_count)
    steps_per_epoch = total // global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f'global_batch_size={global_batch_size} is larger than the image folder train split '
            f'({total} images); lower batch_size.'
        )
    crop, _ = _recipes(data_cfg)
    example_fn = tf_pipeline.train_example_fn(data_cfg, crop)
    load = _loader(split)
    order_seed = tf_pipeline.stream_seed(seed, 0x0D)
    augment_seed = tf_pipeline.stream_seed(seed, 0xA6)
    first_epoch, offset = divmod(start_step, steps_per_epoch)

    def epoch_indices(epoch):
        order = tf.random.experimental.stateless_shuffle(
            tf.range(total, dtype=tf.int64), seed=tf.stack([order_seed, epoch]))
        batches = tf.reshape(order[:steps_per_epoch * global_batch_size],
                             [steps_per_epoch, global_batch_size])
        mine = tf.reshape(batches[:, process_index * local:(process_index + 1) * local], [-1])
        # Global position of each of this process's examples: the key of its augmentation.
        steps = tf.range(steps_per_epoch, dtype=tf.int64)[:, None] * global_batch_size
        positions = tf.reshape(
            steps + process_index * local + tf.range(local, dtype=tf.int64)[None], [-1])
        ds = tf.data.Dataset.from_tensor_slices((mine, positions))
        ds = ds.skip(tf.where(epoch == first_epoch, tf.constant(offset * local, tf.int64), 0))
        return ds.map(lambda i, position: (i, epoch, position))

    def load_example(i, epoch, position):
        encoded, label = load(i)
        example_seed = tf.random.experimental.stateless_fold_in(
            tf.stack([tf.constant(augment_seed, tf.int64), epoch]), position)
        return example_fn(encoded, label, example_seed)

    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(epoch_indices)
    ds = ds.map(load_example, num_parallel_calls=tf_pipeline.parallel_calls(data_cfg),
                deterministic=True)
    ds = tf_pipeline.batch_train(ds, data_cfg, local_batch=local)
    ds = ds.prefetch(tf_pipeline.prefetch(data_cfg)).with_options(tf_pipeline.options(data_cfg))
    return tf_pipeline.as_numpy(ds)


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, split: str,
                 process_index: int, process_count: int) -> Iterator[info_lib.Batch]:
    from resnet_flax.data import tf_pipeline

    tf = tf_pipeline.tf

    found = _split(data_cfg, split)
    total, local = len(found.paths), info_lib.local_batch_size(global_batch_size, process_count)
    _, crop = _recipes(data_cfg)
    example_fn = tf_pipeline.eval_example_fn(data_cfg, crop)
    load = _loader(found)
    num_batches = info_lib.eval_batch_count(total, global_batch_size)
    # Global batch k holds examples [k G, (k + 1) G); this process reads its slice of each.
    positions = (np.arange(num_batches)[:, None] * global_batch_size + process_index * local
                 + np.arange(local)[None]).reshape(-1)
    mask = positions < total

    def load_example(position, valid):
        image, label = example_fn(*load(tf.where(valid, position, 0)))
        return {'image': tf.where(valid, image, tf.zeros_like(image)),
                'label': tf.where(valid, label, 0), 'mask': valid}

    ds = tf.data.Dataset.from_tensor_slices((positions, mask))
    ds = ds.map(load_example, num_parallel_calls=tf_pipeline.parallel_calls(data_cfg),
                deterministic=True)
    ds = ds.batch(local).prefetch(tf_pipeline.prefetch(data_cfg))
    return tf_pipeline.as_numpy(ds.with_options(tf_pipeline.options(data_cfg)))


def split_names(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """The splits the folder offers: ROOT/<name>/CLASS/ folders (only the train split for
    ROOT/CLASS/*), or None with data.holdout_fraction > 0 (the eval split is then held out)."""
    root = epath.Path(data_cfg.data_dir)
    if data_cfg.holdout_fraction > 0 or not data_cfg.data_dir or not root.is_dir():
        return None
    train_dir = root / data_cfg.train_split
    if not (train_dir.is_dir() and _class_dirs(train_dir)):
        return (data_cfg.train_split,)  # ROOT/CLASS/*: the whole folder is the train split
    return tuple(d.name for d in _class_dirs(root) if _class_dirs(d))
