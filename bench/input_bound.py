"""Is training input-bound? The trainer on real JPEG files vs the same trainer on synthetic data.

    python -m bench.input_bound --config=configs/resnet18.py --config.model.stage_sizes='(1,1)' \
        --config.model.stage_widths='(8,16)' --config.model.stem_width=8 --image_size=112 \
        --batch_size_per_device=32 --images=512 --steps=10 --windows=4 --json

Writes `--images` generated ImageNet-like JPEGs (bench/input_pipeline.py's) into an image
folder, then runs `train.train_and_evaluate` -- the whole loop: data, step, metrics -- with a
tiny model (so that the input, not the model, is the limit) on:
- synthetic: random batches made in memory (no decoding): the loop's ceiling;
- tf: the image folder through tf.data (data.loader='tf');
- grain: the image folder through the TensorFlow-free loader (data.loader='grain');
- grain_store: a prepared store of the folder (longest side 256) through grain;
- grain_mp, grain_store_mp: the folder or the store with `--grain_workers` grain worker processes
  (default 2; -1 = the loader's own default, one per core less one) instead of threads in the
  trainer's process (the default below 3 cores is threads).
The decoder is the config's data.decoder ('auto': train crops decode only their window where
jpeg_window.c builds, else simplejpeg where installed, else PIL with draft).
`--write_workers` processes write the JPEGs and the store (on a GPU machine's many cores a few
thousand files take seconds). bench/gpu.sh runs this with ResNet-50 on the GPU.
Runs alternate (`--repeats` rounds) in one process. Each logs every `--steps` steps; the
first window (compilation) is left out and the median of the others' logged images/s and
`input_wait_fraction` (the share of step time spent waiting for the next batch, from
metrics.jsonl) is reported. An input-bound run has a wait fraction near 1 and images/s
near what its loader alone makes; a compute-bound one near 0 and the synthetic images/s.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copy
import importlib.util
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
from absl import flags

from bench import common
from bench.jpeg_files import write_jpegs
from resnet_flax import cli, metrics, train
from resnet_flax.data import info, pil_preprocess, prepare

FLAGS = common.FLAGS
flags.DEFINE_integer('images', 512, 'Generated JPEGs in the image folder.')
LOADERS = ('synthetic', 'tf', 'grain', 'grain_mp', 'grain_store', 'grain_store_mp')
flags.DEFINE_list('loaders', ['synthetic', 'tf', 'grain', 'grain_store', 'grain_store_mp'],
                  'What feeds the loop (tf is skipped where TensorFlow is missing).')
flags.DEFINE_integer('repeats', 1, 'Alternating rounds over the loaders.')
flags.DEFINE_integer('threads', 0, 'Decoding threads of the loaders; 0 = every core.')
flags.DEFINE_integer('grain_workers', 2, 'Grain worker processes of the *_mp loaders; -1 = the '
                     "loader's default (one per core less one).")
flags.DEFINE_integer('write_workers', 1, 'Processes writing the JPEGs and the prepared store.')


def run_config(config, loader: str, folder: Path, store: Path):
    """The benchmark config fed by `loader`, for --windows + 1 logged windows."""
    config = copy.deepcopy(config)
    total = (FLAGS.windows + 1) * FLAGS.steps
    config.update(num_train_steps=total, log_every_steps=FLAGS.steps, eval_every_steps=total,
                  checkpoint_every_steps=0, profile_start_step=-1, init_from='')
    config.optimizer.warmup_steps = 1
    # The same model, normalisation and schedule for every loader (the generated folder has two
    # classes and FLAGS.images examples): one train step, compiled once (the persistent cache
    # serves the later runs).
    config.model.num_classes = config.data.synthetic_num_classes = 2
    config.data.synthetic_num_train_examples = FLAGS.images
    config.data.mean_rgb, config.data.std_rgb = info.IMAGENET_MEAN, info.IMAGENET_STD
    if loader != 'synthetic':
        stored = loader.startswith('grain_store')
        config.data.update(
            dataset='prepared' if stored else 'image_folder',
            data_dir=str(store if stored else folder),
            loader='tf' if loader == 'tf' else 'grain', train_split='train',
            eval_split='train', holdout_fraction=0.0, verify_images=False,
            threadpool_size=FLAGS.threads,
            num_workers=FLAGS.grain_workers if loader.endswith('_mp') else 0)
    return config


def run_once(config) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as workdir, contextlib.redirect_stdout(sys.stderr):
        train.train_and_evaluate(config, workdir)
        records = metrics.read_metrics(workdir, 'train')[1:]  # the first window compiles
    waits = [r['input_wait_fraction'] for r in records if 'input_wait_fraction' in r]
    return {'images_per_sec': statistics.median(r['images_per_sec'] for r in records),
            'input_wait_fraction': statistics.median(waits) if waits else None}


def write_folder(train: Path, count: int, workers: int) -> None:
    """`count` JPEGs in train/class*/; with several workers each writes its share (its own
    seed) into a folder of its own, and the files are moved in under distinct names."""
    if workers <= 1:
        write_jpegs(train, count)
        return
    parts = [train.parent / f'part{k}' for k in range(workers)]
    counts = [count * (k + 1) // workers - count * k // workers for k in range(workers)]
    with concurrent.futures.ProcessPoolExecutor(workers) as pool:
        list(pool.map(write_jpegs, parts, counts, range(workers)))
    for k, part in enumerate(parts):
        for path in sorted(part.glob('class*/*.jpg')):
            (train / path.parent.name).mkdir(parents=True, exist_ok=True)
            path.rename(train / path.parent.name / f'{k:02d}_{path.name}')
        shutil.rmtree(part)


def write_data(root: Path, with_store: bool) -> tuple[Path, Path]:
    folder, store = root / 'jpeg', root / 'store'
    write_folder(folder / 'train', FLAGS.images, FLAGS.write_workers)
    if not with_store:
        return folder, store
    workers = max(FLAGS.write_workers, 1)
    cfg_json = json.dumps({'dataset': 'image_folder', 'data_dir': str(folder),
                           'train_split': 'train', 'eval_split': 'train',
                           'holdout_fraction': 0.0})
    prepare.prepare(cfg_json, ['train'], str(store), max_side=256, quality=90,
                    examples_per_shard=min(1024, max(64, -(-FLAGS.images // workers))),
                    workers=workers)
    return folder, store


def main(argv: list[str]) -> None:
    del argv
    unknown = set(FLAGS.loaders) - set(LOADERS)
    if unknown:
        raise ValueError(f'--loaders: {sorted(unknown)} not among {LOADERS}.')
    loaders = [name for name in FLAGS.loaders
               if name != 'tf' or importlib.util.find_spec('tensorflow') is not None]
    runs: dict[str, list[dict]] = {name: [] for name in loaders}
    with tempfile.TemporaryDirectory() as scratch:
        start = time.perf_counter()
        # Written before JAX starts its threads (the writers are forked processes).
        folder, store = write_data(Path(scratch), any('store' in name for name in loaders))
        write_s = time.perf_counter() - start
        config = common.config_from_flags()
        for _ in range(FLAGS.repeats):
            for name in loaders:
                runs[name].append(run_once(run_config(config, name, folder, store)))
    rows = []
    for name in loaders:
        best = max(runs[name], key=lambda run: run['images_per_sec'])
        rows.append({'loader': name, 'images_per_sec': round(best['images_per_sec'], 1),
                     'input_wait_fraction': best['input_wait_fraction'],
                     'workers': FLAGS.grain_workers if name.endswith('_mp') else 0})
    ceiling = rows[0]['images_per_sec'] if loaders[0] == 'synthetic' else None
    for row in rows:
        row['vs_synthetic'] = round(row['images_per_sec'] / ceiling, 3) if ceiling else None
    result = {'benchmark': 'input_bound', 'images': FLAGS.images,
              'batch_size': config.batch_size, 'image_size': int(config.data.image_size),
              'depth': int(config.model.depth), 'dtype': str(config.model.dtype),
              'steps_per_window': FLAGS.steps, 'windows': FLAGS.windows,
              'devices': jax.device_count(), 'rows': rows, 'write_s': round(write_s, 1),
              'decoder': pil_preprocess.resolve_decoder(config.data.decoder),
              'window_decode': pil_preprocess.resolve_window_decode(config.data.decoder),
              'train_resizer': pil_preprocess.resolve_resizer(config.data.train_resizer,
                                                              config.data.resize_method),
              # The loaders here must not need it (the GPU machine has none).
              'tensorflow_imported': 'tensorflow' in sys.modules,
              'env': common.environment()}
    if FLAGS.json:
        common.report(result, True)
    else:
        print(f"{FLAGS.images} JPEGs, batch {config.batch_size}, {result['image_size']} px, "
              f"{jax.device_count()} device(s); median of {FLAGS.windows} windows of "
              f"{FLAGS.steps} steps")
        print(common.format_table(rows, ['loader', 'images_per_sec', 'input_wait_fraction',
                                         'vs_synthetic']))


if __name__ == '__main__':
    common.define_flags(steps_default=10, windows_default=4)
    cli.run(main)
