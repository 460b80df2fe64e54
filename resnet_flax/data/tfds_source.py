"""Any TFDS image-classification data set (imagenet2012, cifar10, cifar100, ...) via tf.data.

Shares: process p of P reads `tfds.even_splits(split, P)[p]` (disjoint, covering, sizes within
one example). Train epochs all have N // global_batch_size steps on every process; extra
examples of an epoch are dropped.

Train order: each epoch is its own pipeline, a pure function of (seed, epoch, process):
shard order shuffled with a seed, shards interleaved deterministically, a seeded shuffle
buffer, then per-example augmentation keyed by the example's position in the epoch.
Resuming at `start_step` starts at that epoch and skips the consumed examples before the
decode map, so they are read from disk but never decoded.

Eval: each process reads its share in file order, pads to the same number of batches as
every other process and marks the padding with mask False.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import ml_collections
from etils import epath

from resnet_flax.data import budget
from resnet_flax.data import info as info_lib

if TYPE_CHECKING:  # imported on first use at run time (_tf)
    import tensorflow_datasets as tfds

MANUAL_DATASETS = ('imagenet2012',)


def _tf():
    """TensorFlow and TFDS, imported on first use (never by the numpy sources)."""
    import tensorflow_datasets as tfds

    from resnet_flax.data import tf_pipeline

    return tf_pipeline, tfds


def _default_data_dir() -> str:
    """Where TFDS looks when data.data_dir is unset ($TFDS_DATA_DIR or ~/tensorflow_datasets)."""
    from tensorflow_datasets.core import constants

    return str(constants.DATA_DIR)


def _not_prepared_error(data_cfg, builder) -> FileNotFoundError:
    name = data_cfg.dataset
    data_dir = data_cfg.data_dir or _default_data_dir()
    if builder.MANUAL_DOWNLOAD_INSTRUCTIONS or name.split(':')[0] in MANUAL_DATASETS:
        manual = epath.Path(data_dir) / 'downloads' / 'manual'
        return FileNotFoundError(
            f'{name} is not prepared: TFDS looked in {builder.data_dir}. Prepare it from the '
            f'manually downloaded archives (https://image-net.org/download-images): '
            f'mkdir -p {manual} && mv ILSVRC2012_img_train.tar ILSVRC2012_img_val.tar {manual}/ '
            f'&& tfds build {name} --data_dir={data_dir} --manual_dir={manual} '
            f'(then set --config.data.data_dir={data_dir}).'
        )
    return FileNotFoundError(
        f'{name} is not prepared: TFDS looked in {builder.data_dir}. Run '
        f'`tfds build {name} --data_dir={data_dir}`, or set --config.data.download=True.'
    )


def builder(data_cfg: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
    """The prepared TFDS builder; a missing data set raises a one-line FileNotFoundError."""
    _, tfds = _tf()
    name = data_cfg.dataset
    try:
        found = tfds.builder(name, data_dir=data_cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(
            f'data.dataset={name!r} is neither a built-in source {info_lib.BUILT_IN} nor a '
            f'TFDS data set ({first_line}).'
        ) from None
    if not found.is_prepared():
        if not data_cfg.download or name.split(':')[0] in MANUAL_DATASETS:
            raise _not_prepared_error(data_cfg, found)
        found.download_and_prepare()
    return found


def _keys(builder) -> tuple[str, str]:
    """(image key, label key) from the supervised keys, checked to be an image and a class."""
    _, tfds = _tf()
    keys = builder.info.supervised_keys
    features = builder.info.features
    if (not keys or len(keys) != 2 or not isinstance(keys[0], str)
            or not isinstance(features[keys[0]], tfds.features.Image)
            or not isinstance(features[keys[1]], tfds.features.ClassLabel)):
        raise ValueError(
            f'data.dataset={builder.name!r} is not an image-classification data set: its '
            f'supervised_keys are {keys}, not (Image, ClassLabel).'
        )
    return keys[0], keys[1]


def _split_sizes(builder) -> dict[str, int]:
    return {name: split.num_examples for name, split in builder.info.splits.items()}


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Examples in `split` (TFDS split syntax); counts via the dataset when info has none."""
    sizes = _split_sizes(builder)
    if sizes:
        try:
            return int(builder.info.splits[split].num_examples)
        except (KeyError, ValueError, AssertionError):
            raise ValueError(
                f'{builder.name} has no split {split!r}; its splits: {sorted(sizes)} '
                "(slices like 'train[:10%]' work too)."
            ) from None
    # No recorded sizes (e.g. under tfds.testing.mock_data): ask the dataset's cardinality.
    _, tfds = _tf()
    ds = builder.as_dataset(split=split, decoders={_keys(builder)[0]: tfds.decode.SkipDecoding()})
    return int(ds.cardinality())


def _image_max_side(builder) -> int | None:
    shape = builder.info.features[_keys(builder)[0]].shape
    if shape[0] is None or shape[1] is None:
        return None
    return max(shape[0], shape[1])


def recipes(data_cfg: ml_collections.ConfigDict,
            builder: tfds.core.DatasetBuilder) -> tuple[str, str]:
    """(train crop, eval crop) with '' resolved from the declared image size."""
    return info_lib.crops(data_cfg, _image_max_side(builder))


def get_info(data_cfg: ml_collections.ConfigDict) -> info_lib.DatasetInfo:
    found = builder(data_cfg)
    _, label_key = _keys(found)
    labels = found.info.features[label_key]
    size = int(data_cfg.image_size)
    return info_lib.DatasetInfo(
        num_classes=int(labels.num_classes),
        num_train_examples=num_examples(found, data_cfg.train_split),
        num_eval_examples=num_examples(found, data_cfg.eval_split),
        image_shape=(size, size, info_lib.CHANNELS),
        label_names=tuple(labels.names),
        image_side=_image_max_side(found),
    )


def _process_split(split: str, process_index: int, process_count: int) -> str:
    _, tfds = _tf()
    if process_count == 1:
        return split
    return tfds.even_splits(split, n=process_count)[process_index]


def _read(data_cfg, found, split: str, *, shuffle_seed: int | None):
    """(encoded image, label) pairs of `split`, shard order shuffled when a seed is given."""
    tf_pipeline, tfds = _tf()
    image_key, label_key = _keys(found)
    read_config = tfds.ReadConfig(
        options=tf_pipeline.options(data_cfg),
        try_autocache=False,
        shuffle_seed=shuffle_seed,
        skip_prefetch=True,
        num_parallel_calls_for_interleave_files=tf_pipeline.parallel_calls(data_cfg),
    )
    ds = found.as_dataset(
        split=split, shuffle_files=shuffle_seed is not None, read_config=read_config,
        decoders={image_key: tfds.decode.SkipDecoding()})
    return ds.map(lambda example: (example[image_key], example[label_key]))


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int,
                  process_count: int) -> Iterator[info_lib.Batch]:
    tf_pipeline, _ = _tf()
    found = builder(data_cfg)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    total = num_examples(found, data_cfg.train_split)
    steps_per_epoch = total // global_batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f'global_batch_size={global_batch_size} is larger than {data_cfg.dataset} '
            f'{data_cfg.train_split!r} ({total} examples); lower batch_size.'
        )
    share = _process_split(data_cfg.train_split, process_index, process_count)
    crop, _ = recipes(data_cfg, found)
    example_fn = tf_pipeline.train_example_fn(data_cfg, crop)
    cached = _read(data_cfg, found, share, shuffle_seed=None).cache() if data_cfg.cache else None

    def make_epoch(epoch: int, skip_batches: int):
        stream = tf_pipeline.stream_seed(seed, epoch, process_index)
        if cached is not None:
            records = cached
        else:
            records = _read(data_cfg, found, share,
                            shuffle_seed=tf_pipeline.stream_seed(seed, epoch, process_index, 1))
        records = records.shuffle(budget.compute(data_cfg).shuffle_buffer,
                                  seed=tf_pipeline.stream_seed(seed, epoch, process_index, 2))
        records = records.take(steps_per_epoch * local).enumerate()
        records = records.skip(skip_batches * local)  # before decoding: skipped ones stay raw
        examples = records.map(
            lambda position, pair: example_fn(
                pair[0], pair[1], tf_pipeline.example_seed(stream, position)),
            num_parallel_calls=tf_pipeline.parallel_calls(data_cfg), deterministic=True)
        batches = tf_pipeline.batch_train(examples, data_cfg, local_batch=local)
        return batches.prefetch(tf_pipeline.prefetch(data_cfg))

    first_epoch, offset = divmod(start_step, steps_per_epoch)
    return tf_pipeline.chain_epochs(make_epoch, first_epoch, offset, steps_per_epoch,
                                    lookahead=max(int(data_cfg.prefetch_batches), 1))


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, split: str,
                 process_index: int, process_count: int) -> Iterator[info_lib.Batch]:
    tf_pipeline, _ = _tf()
    found = builder(data_cfg)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    total = num_examples(found, split)
    share = _process_split(split, process_index, process_count)
    _, crop = recipes(data_cfg, found)
    records = _read(data_cfg, found, share, shuffle_seed=None)
    count = int(records.cardinality())
    if count < 0:  # unknown to tf.data: count the raw records (nothing is decoded)
        count = int(records.reduce(tf_pipeline.tf.constant(0, tf_pipeline.tf.int64),
                                   lambda n, *_: n + 1))
    examples = records.map(tf_pipeline.eval_example_fn(data_cfg, crop),
                           num_parallel_calls=tf_pipeline.parallel_calls(data_cfg),
                           deterministic=True)
    largest_share = -(-total // process_count)
    batches = tf_pipeline.pad_eval(examples, data_cfg, count=count,
                                   num_batches=-(-largest_share // local), local_batch=local)
    return tf_pipeline.as_numpy(batches.prefetch(tf_pipeline.prefetch(data_cfg)))
