"""The TensorFlow-free loader: grain over image folders, TFDS ArrayRecord sets and prepared stores.

Selected by data.loader='grain' (data.loader='auto' picks it where TensorFlow is missing, and
always for data.dataset='prepared'). Reads, by data.dataset:
- 'prepared': a store written by `python -m resnet_flax.data.prepare` (store.py);
- 'image_folder': the same folders and splits as image_folder.py (its index is shared);
- any other name: a TFDS data set prepared as ArrayRecord
  (`tfds build NAME --file_format=array_record`), read with `tfds.data_source`, which
  imports no TensorFlow.

Batches follow the data contract: 'image' uint8 [B_local, S, S, 3] cropped and resized to
data.image_size (eval: data.eval_image_size), 'label' int32 [B_local], eval 'mask' bool.
Flips, normalisation and mixing are the device's (the jitted step).

Order, as the other index-level sources: epoch e is a permutation of the whole split from
(seed, e), global batch k is its k-th run of global_batch_size examples and process p takes
the p-th slice; each example's crop is keyed by (seed, epoch, global position). Batch k of
the stream is a pure function of (seed, k, process), so `start_step` resumes exactly without
reading the skipped examples, whatever the number of workers. Eval: global batch k holds
examples [k G, (k + 1) G) of the split, padded with masked zeros at the end.

Parallelism (budget.py): data.num_workers grain worker processes each decode whole batches
on data.threadpool_size / workers threads; with 0 workers, threads in this process decode.
"""

from __future__ import annotations

import dataclasses
import random
import threading
from collections.abc import Iterator

import numpy as np
from absl import logging

from resnet_flax.data import budget as budget_lib
from resnet_flax.data import info as info_lib
from resnet_flax.data import pil_preprocess, store

Batch = dict[str, np.ndarray]
# The train stream is indexable up to this many epochs: grain wants a finite length.
MAX_EPOCHS = 1 << 20
ORDER_STREAM, AUGMENT_STREAM = 0x0D, 0xA6


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The per-example recipe, from the config: small and picklable for the workers."""

    decoder: str
    train_crop: str
    eval_crop: str
    image_size: int
    eval_image_size: int
    area_range: tuple[float, float]
    aspect_range: tuple[float, float]
    crop_padding: int
    eval_crop_fraction: float
    resize_method: str
    eval_preset: str = ''
    train_resizer: str = 'pil'
    antialias: bool = False  # train resizes: smooth when shrinking (data.antialias)
    window_decode: bool = False  # train JPEGs: decode only the crop (jpeg_window.py)


# ---- records: index -> (encoded image, label), picklable for grain's worker processes.

class FolderRecords:
    def __init__(self, paths: tuple[str, ...], labels: np.ndarray):
        self.paths, self.labels = paths, labels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        from etils import epath

        return epath.Path(self.paths[index]).read_bytes(), int(self.labels[index])


class StoreRecords:
    def __init__(self, shard_paths: list[str]):
        from array_record.python import array_record_data_source

        self.source = array_record_data_source.ArrayRecordDataSource(shard_paths)

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        return store.decode_record(self.source[index])


class TfdsRecords:
    def __init__(self, source, image_key: str, label_key: str):
        self.source, self.image_key, self.label_key = source, image_key, label_key

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, index: int) -> tuple[bytes, int]:
        example = self.source[index]
        return example[self.image_key], int(example[self.label_key])


@dataclasses.dataclass(frozen=True)
class Found:
    """What a data set offers the loader."""

    num_classes: int
    label_names: tuple[str, ...]
    image_side: int | None  # a typical image's larger side: picks the default recipe
    skipped: int | None = None


def _tfds_builder(data_cfg):
    import tensorflow_datasets as tfds

    try:
        builder = tfds.builder(data_cfg.dataset, data_dir=data_cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(f'data.dataset={data_cfg.dataset!r} is neither a built-in source '
                         f'{info_lib.BUILT_IN} nor a TFDS data set.') from None
    file_format = getattr(builder.info, 'file_format', None)
    if not builder.is_prepared() or str(getattr(file_format, 'value', file_format)) != \
            'array_record':
        raise FileNotFoundError(
            f'data.loader=grain reads TFDS data sets prepared as ArrayRecord, and '
            f'{data_cfg.dataset} under {data_cfg.data_dir or "the default data_dir"} is '
            f'{"in " + str(file_format) if builder.is_prepared() else "not prepared"}: run '
            f'`tfds build {data_cfg.dataset} --file_format=array_record`, or '
            '`python -m resnet_flax.data.prepare`, or use data.loader=tf.')
    return builder


def _tfds_keys(builder) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    keys = builder.info.supervised_keys
    features = builder.info.features
    if (not keys or len(keys) != 2 or not isinstance(keys[0], str)
            or not isinstance(features[keys[0]], tfds.features.Image)
            or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
        raise ValueError(f'data.dataset={builder.name!r} is not an image-classification data '
                         f'set: its supervised_keys are {keys}, not (Image, ClassLabel).')
    return keys[0], keys[1]


def find(data_cfg) -> Found:
    name = data_cfg.dataset
    if name == 'prepared':
        found = store.read_info(_store_root(data_cfg))
        # Stores written before image_side was recorded: their images are at most max_side.
        side = found.image_side if found.image_side is not None else found.max_side
        return Found(len(found.classes), found.classes, side)
    if name == 'image_folder':
        from resnet_flax.data import image_folder

        index = image_folder.index(data_cfg)
        return Found(len(index.classes), index.classes, index.image_side, len(index.skipped))
    builder = _tfds_builder(data_cfg)
    image_key, label_key = _tfds_keys(builder)
    shape = builder.info.features[image_key].shape
    side = None if None in shape[:2] else max(shape[:2])
    labels = builder.info.features[label_key]
    return Found(int(labels.num_classes), tuple(labels.names), side)


def _store_root(data_cfg) -> str:
    if not data_cfg.data_dir:
        raise ValueError("data.dataset='prepared' needs data.data_dir=ROOT, a store written "
                         'by python -m resnet_flax.data.prepare --out=ROOT.')
    return str(data_cfg.data_dir)


def records(data_cfg, split: str):
    """The split's records: a picklable random-access sequence of (encoded, label)."""
    name = data_cfg.dataset
    if name == 'prepared':
        root = _store_root(data_cfg)
        return StoreRecords(store.shard_paths(root, split, store.read_info(root)))
    if name == 'image_folder':
        from resnet_flax.data import image_folder

        found = image_folder._split(data_cfg, split)  # noqa: SLF001 - the shared index
        return FolderRecords(found.paths, found.labels)
    import tensorflow_datasets as tfds

    builder = _tfds_builder(data_cfg)
    image_key, label_key = _tfds_keys(builder)
    try:
        source = builder.as_data_source(
            split=split, decoders={image_key: tfds.decode.SkipDecoding()})
    except (KeyError, ValueError) as error:
        raise ValueError(f'{builder.name} has no split {split!r}; its splits: '
                         f'{sorted(builder.info.splits)} ({error}).') from None
    return TfdsRecords(source, image_key, label_key)


def recipe(data_cfg, found: Found) -> Recipe:
    if data_cfg.auto_augment:
        raise ValueError(f'data.auto_augment={data_cfg.auto_augment!r} runs in the tf.data '
                         "pipeline only: set data.loader='tf', or data.auto_augment=''.")
    train_crop, eval_crop = info_lib.crops(data_cfg, found.image_side)
    return Recipe(
        decoder=pil_preprocess.resolve_decoder(data_cfg.get('decoder', 'auto')),
        train_crop=train_crop,
        eval_crop=eval_crop,
        image_size=int(data_cfg.image_size),
        eval_image_size=info_lib.eval_image_size(data_cfg),
        area_range=tuple(float(a) for a in data_cfg.inception_area_range),
        aspect_range=tuple(float(a) for a in data_cfg.inception_aspect_range),
        crop_padding=int(data_cfg.crop_padding),
        eval_crop_fraction=float(data_cfg.eval_crop_fraction),
        resize_method=str(data_cfg.resize_method),
        eval_preset=str(data_cfg.get('eval_preset', '')),
        train_resizer=pil_preprocess.resolve_resizer(data_cfg.get('train_resizer', 'auto'),
                                                     str(data_cfg.resize_method)),
        antialias=bool(data_cfg.antialias),
        window_decode=pil_preprocess.resolve_window_decode(data_cfg.get('decoder', 'auto')),
    )


def get_info(data_cfg) -> info_lib.DatasetInfo:
    found = find(data_cfg)
    recipe(data_cfg, found)  # decoder, resizer, augmentation: refused before anything runs
    size = int(data_cfg.image_size)
    return info_lib.DatasetInfo(
        num_classes=found.num_classes,
        num_train_examples=len(records(data_cfg, data_cfg.train_split)),
        num_eval_examples=len(records(data_cfg, data_cfg.eval_split)),
        image_shape=(size, size, info_lib.CHANNELS),
        label_names=found.label_names,
        num_skipped_examples=found.skipped,
        image_side=found.image_side,
    )


# ---- the train stream and the eval pass, as grain MapDatasets.

class TrainPlan:
    """Element k of this process's train stream: (record index, epoch, global position)."""

    def __init__(self, total: int, global_batch: int, local: int, process_index: int,
                 seed: int):
        self.total, self.global_batch, self.local = total, global_batch, local
        self.process_index, self.seed = process_index, seed
        self.steps_per_epoch = total // global_batch
        self._orders: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k not in ('_orders', '_lock')}

    def __setstate__(self, state):
        self.__dict__.update(state, _orders={}, _lock=threading.Lock())

    def __len__(self) -> int:
        return self.steps_per_epoch * self.local * MAX_EPOCHS

    def order(self, epoch: int) -> np.ndarray:
        """The permutation of epoch `epoch` (the last two kept: workers straddle epochs)."""
        with self._lock:
            if epoch not in self._orders:
                self._orders[epoch] = info_lib.rng(self.seed, ORDER_STREAM, epoch).permutation(
                    self.total)
                for old in sorted(self._orders)[:-2]:
                    del self._orders[old]
            return self._orders[epoch]

    def __getitem__(self, k: int) -> tuple[int, int, int]:
        epoch, within = divmod(int(k), self.steps_per_epoch * self.local)
        step, slot = divmod(within, self.local)
        position = step * self.global_batch + self.process_index * self.local + slot
        return int(self.order(epoch)[position]), epoch, position

    def batch(self, step: int) -> list[tuple[int, int, int]]:
        """Elements [step * local, (step + 1) * local): this process's share of global batch
        `step`."""
        return [self[step * self.local + slot] for slot in range(self.local)]


def _batch_arrays(count: int, size: int) -> Batch:
    return {'image': np.zeros((count, size, size, info_lib.CHANNELS), np.uint8),
            'label': np.zeros((count,), np.int32)}


# A grain element is a whole batch, decoded into preallocated arrays: with per-record
# elements, grain's map and stack machinery took ~20% of a decoding thread's time (py-spy,
# BENCHMARKS.md section 7a), ~5% this way.

# A file that does not decode (corrupt, cut, over PIL's decompression-bomb limit) is skipped,
# counted and logged rather than stopping the run: in training the next records of the split
# stand in (the same ones on every process and after a resume); in eval it is masked out.
# Index-time checks (image folders) catch most such files before the run; these are the rest.
SUBSTITUTE_TRIES = 16
_UNREADABLE: set[tuple[str, int]] = set()  # (split kind, record) this process skipped


def _skip_unreadable(kind: str, index: int, error: Exception) -> None:
    if (kind, index) not in _UNREADABLE:
        _UNREADABLE.add((kind, index))
        logging.warning('Skipping unreadable %s image %d (%s: %s); %d skipped so far by this '
                        'process.', kind, index, type(error).__name__, str(error)[:160],
                        len(_UNREADABLE))


class LoadTrainBatch:
    def __init__(self, plan: TrainPlan, source, recipe: Recipe, seed: int):
        self.plan, self.source, self.recipe, self.seed = plan, source, recipe, seed

    def _example(self, index: int, epoch: int, position: int, out: np.ndarray) -> int:
        """Decodes record `index` (or the next readable one) into `out`; returns its label."""
        for offset in range(SUBSTITUTE_TRIES):
            candidate = (index + offset) % len(self.source)
            encoded, label = self.source[candidate]
            # random.Random seeded with a string is deterministic on every platform and ~20x
            # cheaper to build than a numpy Generator: it matters at 1,000 images/s per core.
            rng = random.Random(f'{self.seed}/{AUGMENT_STREAM}/{epoch}/{position}')
            try:
                pil_preprocess.train_example(encoded, rng, self.recipe, out)
                return label
            except pil_preprocess.UNREADABLE as error:
                _skip_unreadable('train', candidate, error)
                last = error
        raise ValueError(f'{SUBSTITUTE_TRIES} images in a row from record {index} of the '
                         f'train split do not decode (the last: {type(last).__name__}: '
                         f'{str(last)[:120]}): check the data set (prepare it again, or set '
                         'data.verify_images=True for an image folder).')

    def __call__(self, step: int) -> Batch:
        batch = _batch_arrays(self.plan.local, self.recipe.image_size)
        for slot, (index, epoch, position) in enumerate(self.plan.batch(step)):
            batch['label'][slot] = self._example(index, epoch, position, batch['image'][slot])
        return batch


class LoadEvalBatch:
    """Global batch k holds examples [k G, (k + 1) G); padding slots stay zero and masked."""

    def __init__(self, source, recipe: Recipe, global_batch: int, local: int,
                 process_index: int):
        self.source, self.recipe = source, recipe
        self.global_batch, self.local, self.process_index = global_batch, local, process_index

    def __call__(self, k: int) -> Batch:
        batch = _batch_arrays(self.local, self.recipe.eval_image_size)
        first = k * self.global_batch + self.process_index * self.local
        positions = range(first, min(first + self.local, len(self.source)))
        batch['mask'] = np.arange(first, first + self.local) < len(self.source)
        for slot, position in enumerate(positions):
            encoded, label = self.source[position]
            try:
                batch['image'][slot] = pil_preprocess.eval_example(encoded, self.recipe)
                batch['label'][slot] = label
            except pil_preprocess.UNREADABLE as error:  # left out of the metrics
                _skip_unreadable('eval', position, error)
                batch['mask'][slot] = False
        return batch


def _iterate(dataset, data_cfg) -> Iterator[Batch]:
    """Runs a batched MapDataset on this process's budget of threads and worker processes."""
    import grain

    found = budget_lib.compute(data_cfg)
    prefetch = int(data_cfg.prefetch_batches)
    prefetch = 2 if prefetch < 0 else max(prefetch, 1)
    threads = max(found.threads // max(found.workers, 1), 1)
    iterable = dataset.to_iter_dataset(
        grain.ReadOptions(num_threads=threads, prefetch_buffer_size=prefetch))
    if found.workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags (defaults here)
            flags.FLAGS.mark_as_parsed()
        iterable = iterable.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=found.workers, per_worker_buffer_size=prefetch))
    iterator = iter(iterable)
    try:
        yield from iterator
    finally:
        close = getattr(iterator, 'close', None)
        if close is not None:
            close()


def train_batches(data_cfg, *, global_batch_size: int, seed: int, start_step: int,
                  process_index: int, process_count: int) -> Iterator[Batch]:
    import grain

    source = records(data_cfg, data_cfg.train_split)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    if len(source) < global_batch_size:
        raise ValueError(f'global_batch_size={global_batch_size} is larger than the train split '
                         f'({len(source)} examples); lower batch_size.')
    plan = TrainPlan(len(source), global_batch_size, local, process_index, seed)
    load = LoadTrainBatch(plan, source, recipe(data_cfg, find(data_cfg)), seed)
    dataset = grain.MapDataset.range(plan.steps_per_epoch * MAX_EPOCHS).map(load)
    return _iterate(dataset[start_step:], data_cfg)


def eval_batches(data_cfg, *, global_batch_size: int, split: str, process_index: int,
                 process_count: int) -> Iterator[Batch]:
    import grain

    source = records(data_cfg, split)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    num_batches = info_lib.eval_batch_count(len(source), global_batch_size)
    load = LoadEvalBatch(source, recipe(data_cfg, find(data_cfg)), global_batch_size, local,
                         process_index)
    return _iterate(grain.MapDataset.range(num_batches).map(load), data_cfg)
