r"""Writes a pre-resized copy of a data set as ArrayRecord shards for the grain loader.

    python -m resnet_flax.data.prepare --dataset=imagenet2012 --data_dir=~/tensorflow_datasets \
        --out=/data/imagenet-256 --max_side=256 --quality=90 --splits=train,validation
    python -m resnet_flax.data.prepare --dataset=image_folder --data_dir=/data/photos \
        --out=/data/photos-256 --holdout_fraction=0.02

Then train with data.dataset='prepared', data.data_dir=OUT (and e.g. data.image_size=176,
data.eval_image_size=224 for low-resolution training). Each image is decoded, shrunk so its
longest side is at most --max_side (never enlarged; images already small enough keep their
original JPEG bytes) and re-encoded as JPEG at --quality: the FFCV recipe, which measured
2.0-2.7x faster decoding than the originals (BENCHMARKS.md).

Sources: an image folder (its splits as the loaders see them), a TFDS data set prepared as
ArrayRecord (read without TensorFlow) or as TFRecord (read with tf.data, TensorFlow needed).

Shards hold --examples_per_shard consecutive examples in source order. Each is written to a
local temporary file, then copied to OUT/<split>/ under a temporary name and renamed, with a
small .json beside it holding its count and the settings it was made with: an interrupted run
leaves only whole shards, and a rerun with the same settings skips them; a rerun with other
ones (--max_side, --quality, the source) is refused in one line, as one store cannot mix
them. store.json, written last, is what makes OUT a store; it lists the splits of every run
into OUT. Files that fail to decode (corrupt, or over PIL's decompression-bomb limit) are
skipped and counted. OUT may be local or gs:// (reading needs local or mounted).
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import io
import json
import math
import tempfile

from absl import app, flags, logging
from etils import epath
from PIL import Image

from resnet_flax.data import pil_preprocess, store

FLAGS = flags.FLAGS
flags.DEFINE_string('dataset', 'image_folder', "'image_folder' or a TFDS name (imagenet2012).")
flags.DEFINE_string('data_dir', None, 'The image folder root, or the TFDS data_dir.')
flags.DEFINE_string('out', None, 'Where to write the store (local or gs://).')
flags.DEFINE_integer('max_side', 256, 'Longest side of the stored images, in pixels.')
flags.DEFINE_integer('quality', 90, 'JPEG quality of the re-encoded images.')
flags.DEFINE_list('splits', ['train', 'validation'], 'Splits to copy (TFDS split names, or '
                  "the image folder's train_split / eval_split).")
flags.DEFINE_string('train_split', 'train', 'Image folders: the train folder name.')
flags.DEFINE_string('eval_split', 'validation', 'Image folders: the eval folder name.')
flags.DEFINE_float('holdout_fraction', 0.0, 'Image folders: held-out eval fraction.')
flags.DEFINE_integer('examples_per_shard', 1024, 'Examples per ArrayRecord shard.')
flags.DEFINE_integer('workers', 0, 'Processes writing shards; 0 = one per core.')


@dataclasses.dataclass(frozen=True)
class Job:
    split: str
    index: int
    count: int
    start: int
    stop: int


def shrink(encoded: bytes, max_side: int, quality: int) -> tuple[bytes, int]:
    """(JPEG bytes with the longest side at most max_side, that side); small RGB JPEGs stay
    as they are."""
    with Image.open(io.BytesIO(encoded)) as image:
        width, height = image.size
        scale = max_side / max(width, height)
        if scale >= 1 and image.format == 'JPEG' and image.mode == 'RGB':
            return encoded, max(width, height)
        if scale < 1:  # decode at the smallest DCT scale still >= 2x the target, then filter
            target = (max(round(width * scale), 1), max(round(height * scale), 1))
            image.draft('RGB', (2 * target[0], 2 * target[1]))
            rgb = image.convert('RGB').resize(target, Image.Resampling.LANCZOS)
        else:
            rgb = image.convert('RGB')
    out = io.BytesIO()
    rgb.save(out, format='JPEG', quality=quality)
    return out.getvalue(), max(rgb.size)


def settings(cfg_json: str, max_side: int, quality: int) -> dict:
    """What decides a store's contents; every shard's sidecar records it."""
    return {'max_side': max_side, 'quality': quality, 'source': json.loads(cfg_json)}


def _describe(made_with: dict | None) -> str:
    if not made_with:
        return 'unrecorded settings (an older prepare)'
    source = made_with['source']
    return (f"--max_side={made_with['max_side']} --quality={made_with['quality']} from "
            f"{source.get('dataset')} {source.get('data_dir')}")


def check_earlier_run(out: str, made_with: dict) -> None:
    """A one-line ValueError when OUT holds shards made with other settings: a rerun would
    keep them and write a store.json describing only itself."""
    for sidecar in epath.Path(out).glob('*/*.array_record.json'):
        theirs = json.loads(sidecar.read_text()).get('made_with')
        if theirs != made_with:
            raise ValueError(
                f'{out} holds shards made with {_describe(theirs)} ({sidecar.name}), and this '
                f'run asks for {_describe(made_with)}: one store cannot mix them; write to '
                f'another --out, or delete {out} to redo it.')


def _data_config(dataset: str, data_dir: str | None, train_split: str, eval_split: str,
                 holdout_fraction: float):
    """The data-config fields the sources read to find and index a data set."""
    import ml_collections

    return ml_collections.ConfigDict({
        'dataset': dataset, 'data_dir': data_dir, 'train_split': train_split,
        'eval_split': eval_split, 'holdout_fraction': holdout_fraction, 'holdout_seed': 0,
        'verify_images': False, 'download': False, 'threadpool_size': 0,
        'shuffle_buffer_size': 1, 'processes_per_host': 0, 'num_workers': 0})


@functools.lru_cache(maxsize=4)
def _source(cfg_json: str, split: str):
    """Random-access (encoded, label) records of a split, or None for TFRecord TFDS sets."""
    from resnet_flax.data import grain_source

    cfg = _data_config(**json.loads(cfg_json))
    try:
        return grain_source.records(cfg, split)
    except FileNotFoundError:
        if cfg.dataset == 'image_folder':
            raise
        return None  # a TFDS set in TFRecords: read ranges with tf.data (_tfrecord_range)


def _tfrecord_range(cfg_json: str, split: str, start: int, stop: int):
    import tensorflow_datasets as tfds

    from resnet_flax.data import tfds_source

    cfg = _data_config(**json.loads(cfg_json))
    builder = tfds_source.builder(cfg)
    image_key, label_key = tfds_source._keys(builder)  # noqa: SLF001 - same checks
    ds = builder.as_dataset(split=f'{split}[{start}:{stop}]', shuffle_files=False,
                            decoders={image_key: tfds.decode.SkipDecoding()})
    for example in tfds.as_numpy(ds):
        yield example[image_key], int(example[label_key])


def _examples(cfg_json: str, job: Job):
    source = _source(cfg_json, job.split)
    if source is None:
        yield from _tfrecord_range(cfg_json, job.split, job.start, job.stop)
    else:
        for i in range(job.start, job.stop):
            try:
                yield source[i]
            except OSError as error:  # an unreadable file: counted as skipped by the caller
                logging.warning('Skipping example %d of %s: %s', i, job.split, error)
                yield None, -1


def write_shard(cfg_json: str, job: Job, out: str, max_side: int, quality: int) -> dict:
    """Writes one shard (atomically) unless it exists; returns its sidecar: {num_examples,
    skipped, sides (stored larger side -> count), made_with (settings())}."""
    from array_record.python import array_record_module

    folder = epath.Path(out) / job.split
    final = folder / store.shard_name(job.split, job.index, job.count)
    sidecar = final.parent / (final.name + '.json')
    if sidecar.exists() and final.exists():
        return json.loads(sidecar.read_text())
    written, skipped, sides = 0, 0, collections.Counter()
    with tempfile.TemporaryDirectory() as scratch:
        local = f'{scratch}/{final.name}'
        writer = array_record_module.ArrayRecordWriter(local, 'group_size:1')
        for encoded, label in _examples(cfg_json, job):
            try:
                stored, side = shrink(encoded, max_side, quality)
                writer.write(store.encode_record(label, stored))
                written += 1
                sides[side] += 1
            except (*pil_preprocess.UNREADABLE, TypeError) as error:  # corrupt, a bomb
                logging.warning('Skipping an undecodable image in %s: %s', final.name, error)
                skipped += 1
        writer.close()
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / (final.name + '.partial')
        epath.Path(local).copy(partial, overwrite=True)
        partial.replace(final)
    counts = {'num_examples': written, 'skipped': skipped,
              'sides': {str(k): v for k, v in sorted(sides.items())},
              'made_with': settings(cfg_json, max_side, quality)}
    partial = folder / (sidecar.name + '.partial')
    partial.write_text(json.dumps(counts))
    partial.replace(sidecar)
    return counts


def _split_size(cfg_json: str, split: str) -> int:
    source = _source(cfg_json, split)
    if source is not None:
        return len(source)
    from resnet_flax.data import tfds_source

    cfg = _data_config(**json.loads(cfg_json))
    return tfds_source.num_examples(tfds_source.builder(cfg), split)


def _classes(cfg_json: str) -> tuple[str, ...]:
    cfg = _data_config(**json.loads(cfg_json))
    from resnet_flax.data import grain_source

    try:
        return grain_source.find(cfg).label_names
    except FileNotFoundError:
        from resnet_flax.data import tfds_source

        found = tfds_source.builder(cfg)
        label_key = tfds_source._keys(found)[1]  # noqa: SLF001 - same checks
        return tuple(found.info.features[label_key].names)


def _median_side(sidecars: list[dict]) -> int | None:
    """The median larger side over the shards' side counts (info.image_side)."""
    counts = collections.Counter()
    for sidecar in sidecars:
        counts.update({int(k): v for k, v in sidecar.get('sides', {}).items()})
    total, seen = sum(counts.values()), 0
    for side in sorted(counts):
        seen += counts[side]
        if 2 * seen >= total:
            return side
    return None


def _kept_splits(out: str, splits: list[str]) -> dict[str, store.SplitInfo]:
    """The splits an earlier run with the same settings wrote and this one does not redo."""
    try:
        earlier = store.read_info(out)
    except FileNotFoundError:
        return {}
    return {name: split for name, split in earlier.splits.items() if name not in splits}


def _sidecars(out: str, splits: dict[str, store.SplitInfo]) -> list[dict]:
    root = epath.Path(out)
    return [json.loads((root / name / (shard + '.json')).read_text())
            for name, split in splits.items() for shard in split.shards]


def prepare(cfg_json: str, splits: list[str], out: str, *, max_side: int, quality: int,
            examples_per_shard: int, workers: int) -> store.StoreInfo:
    """Writes every missing shard of `splits` under `out`, then store.json (which also lists
    the splits an earlier run with the same settings wrote there). Refuses, in one line, an
    `out` holding shards made with other settings."""
    from tqdm import tqdm

    check_earlier_run(out, settings(cfg_json, max_side, quality))
    jobs = []
    for split in splits:
        size = _split_size(cfg_json, split)
        count = max(math.ceil(size / examples_per_shard), 1)
        jobs += [Job(split, i, count, i * size // count, (i + 1) * size // count)
                 for i in range(count)]
    results: dict[Job, dict] = {}
    context = concurrent.futures.ProcessPoolExecutor if workers > 1 else \
        concurrent.futures.ThreadPoolExecutor
    with context(max(workers, 1)) as pool:
        futures = {pool.submit(write_shard, cfg_json, job, out, max_side, quality): job
                   for job in jobs}
        for future in tqdm(concurrent.futures.as_completed(futures), total=len(jobs),
                           desc=f'shards -> {out}', unit='shard'):
            results[futures[future]] = future.result()
    skipped = sum(result['skipped'] for result in results.values())
    if skipped:
        logging.warning('Skipped %d undecodable image(s).', skipped)
    kept = _kept_splits(out, splits)
    written = {split: store.SplitInfo(
        sum(results[job]['num_examples'] for job in jobs if job.split == split),
        tuple(store.shard_name(split, job.index, job.count)
              for job in jobs if job.split == split)) for split in splits}
    info = store.StoreInfo(
        classes=_classes(cfg_json), splits={**kept, **written}, max_side=max_side,
        quality=quality, source=json.loads(cfg_json)['dataset'],
        image_side=_median_side(list(results.values()) + _sidecars(out, kept)))
    partial = epath.Path(out) / (store.METADATA + '.partial')
    partial.write_text(info.to_json())
    partial.replace(epath.Path(out) / store.METADATA)
    return info


def main(argv: list[str]) -> None:
    del argv
    if not FLAGS.out:
        raise app.UsageError('--out=DIR is required: where to write the store.')
    import os
    import sys

    cfg_json = json.dumps({
        'dataset': FLAGS.dataset, 'data_dir': FLAGS.data_dir, 'train_split': FLAGS.train_split,
        'eval_split': FLAGS.eval_split, 'holdout_fraction': FLAGS.holdout_fraction})
    try:
        info = prepare(cfg_json, FLAGS.splits, FLAGS.out, max_side=FLAGS.max_side,
                       quality=FLAGS.quality, examples_per_shard=FLAGS.examples_per_shard,
                       workers=FLAGS.workers or os.cpu_count() or 1)
    except ValueError as error:  # settings that do not fit OUT or the source: one line
        sys.exit(f'prepare: {error}')
    sizes = {name: split.num_examples for name, split in info.splits.items()}
    print(f'Wrote {FLAGS.out}: {sizes}, {len(info.classes)} classes. Train with '
          f"data.dataset='prepared' data.data_dir={FLAGS.out}")


if __name__ == '__main__':
    app.run(main)
