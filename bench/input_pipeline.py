"""Input pipeline throughput: images/s per CPU core for the ImageNet train and eval recipes.

    python -m bench.input_pipeline --images=256 --batch=32 --threads=0 --json

Writes `--images` generated JPEGs of ImageNet-like sizes (500 wide, 333-500 high, ~110 KB at
quality 90, like the average ILSVRC2012 file) into an image folder, then times, in one
process and on the same files:
- ours: `resnet_flax.data.train_batches` / `eval_batches` on that folder, i.e. the real
  tf.data pipeline (file read, JPEG decode fused with the inception / centre crop, resize to
  224, flip, normalise, batch, numpy), with a private thread pool of `--threads` (0 = every
  core);
- reference: a plain Python loop with PIL: decode the whole file, torchvision's
  RandomResizedCrop algorithm (or resize the short side to 256 and centre-crop 224), resize,
  flip, normalise, stack.
Runs alternate (reference, ours, reference, ...) `--repeats` times and the fastest of each is
kept, so machine noise hits both alike. Per core = images per CPU-second of the process
(time.process_time, all threads): other processes on the host do not dilute it, and idle or
spinning tf.data threads count against ours. Wall-clock images/s are shown too. The last
column is how many cores of our pipeline an accelerator eating 8,000 images/s would need.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

import configs.base
from resnet_flax import data
from resnet_flax.data import info as info_lib

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 256, 'Generated JPEGs (the timed pass reads each once).')
flags.DEFINE_integer('batch', 32, 'Global batch size of our pipeline.')
flags.DEFINE_integer('image_size', 224, 'Train and eval crop size.')
flags.DEFINE_integer('threads', 0, 'Threads of the multi-core run; 0 = every core.')
flags.DEFINE_integer('repeats', 3, 'Alternating runs of each side; the fastest is kept.')
flags.DEFINE_float('target', 8000.0, 'Accelerator images/s to size the host for.')
flags.DEFINE_string('folder', '', 'Where to write the JPEGs; empty = a temporary folder.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')

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


# ---- the reference: PIL in a plain Python loop (torchvision's recipe, written out).

MEAN = np.asarray(info_lib.IMAGENET_MEAN, np.float32)
STD = np.asarray(info_lib.IMAGENET_STD, np.float32)


def _random_resized_crop_box(width: int, height: int, rand: random.Random):
    """torchvision RandomResizedCrop.get_params: 10 tries, then the clamped central crop."""
    area = width * height
    log_ratio = (math.log(3 / 4), math.log(4 / 3))
    for _ in range(10):
        target = area * rand.uniform(0.08, 1.0)
        aspect = math.exp(rand.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            left, top = rand.randint(0, width - w), rand.randint(0, height - h)
            return left, top, left + w, top + h
    w, h = width, height
    if width / height < 3 / 4:
        h = round(w / (3 / 4))
    elif width / height > 4 / 3:
        w = round(h * (4 / 3))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h


def reference_train(path: Path, size: int, rand: random.Random) -> np.ndarray:
    with Image.open(path) as image:
        image = image.convert('RGB')
        box = _random_resized_crop_box(image.width, image.height, rand)
        image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    if rand.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return (np.asarray(image, np.float32) / 255 - MEAN) / STD


def reference_eval(path: Path, size: int) -> np.ndarray:
    resize = round(size / 0.875)
    with Image.open(path) as image:
        image = image.convert('RGB')
        scale = resize / min(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)),
                             Image.Resampling.BILINEAR)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        image = image.crop((left, top, left + size, top + size))
    return (np.asarray(image, np.float32) / 255 - MEAN) / STD


def time_reference(paths: list[Path], recipe: str, size: int, batch: int) -> dict:
    """The PIL loop over every file once, batched like ours: images, wall and CPU seconds."""
    rand = random.Random(0)
    wall, cpu = time.perf_counter(), time.process_time()
    for first in range(0, len(paths) - batch + 1, batch):
        chunk = paths[first:first + batch]
        if recipe == 'train':
            np.stack([reference_train(p, size, rand) for p in chunk])
        else:
            np.stack([reference_eval(p, size) for p in chunk])
    return {'images': len(paths) // batch * batch, 'wall': time.perf_counter() - wall,
            'cpu': time.process_time() - cpu}


# ---- ours: the real pipeline on the same files.

def pipeline_config(folder: Path, size: int, threads: int):
    cfg = configs.base.get_config().data
    cfg.update(dataset='image_folder', data_dir=str(folder), image_size=size,
               holdout_fraction=0.0, eval_split='train', verify_images=False,
               threadpool_size=threads, num_parallel_calls=threads)
    return cfg


def time_ours(folder: Path, recipe: str, size: int, batch: int, threads: int,
              num_images: int) -> dict:
    """One pass of the files after one untimed batch (tracing, warm-up): images, wall and
    CPU seconds of the whole process (every tf.data thread included)."""
    cfg = pipeline_config(folder, size, threads)
    steps = num_images // batch
    if recipe == 'train':
        batches = data.train_batches(cfg, global_batch_size=batch, seed=0)
    else:
        batches = data.eval_batches(cfg, global_batch_size=batch, split='train')
    next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    timed = sum(1 for _ in itertools.islice(batches, steps - 1))
    return {'images': timed * batch, 'wall': time.perf_counter() - wall,
            'cpu': time.process_time() - cpu}


def best(runs: list[dict], clock: str) -> float:
    """images per second of `clock` ('wall' or 'cpu'), best run."""
    return max(run['images'] / run[clock] for run in runs)


def measure(folder: Path, paths: list[Path], threads: int) -> list[dict]:
    size, batch = FLAGS.image_size, FLAGS.batch
    rows = []
    for recipe in ('train', 'eval'):
        reference, ours = [], []
        for _ in range(FLAGS.repeats):
            reference.append(time_reference(paths, recipe, size, batch))
            ours.append(time_ours(folder, recipe, size, batch, threads, len(paths)))
        per_core = best(ours, 'cpu')
        rows.append({
            'recipe': f'imagenet {recipe} {size}',
            'pil_loop_per_core': round(best(reference, 'cpu'), 1),
            'ours_per_core': round(per_core, 1),
            'ratio': round(per_core / best(reference, 'cpu'), 2),
            'pil_loop_wall': round(best(reference, 'wall'), 1),
            f'ours_wall_{threads}_threads': round(best(ours, 'wall'), 1),
            'cores_for_target': math.ceil(FLAGS.target / per_core),
        })
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"{meta['images']} JPEGs, mean {meta['mean_kb']:.0f} KB, {WIDTH} x {HEIGHTS}; "
          f"batch {meta['batch']}; {meta['cpu_count']} cores on this host "
          f"(load average {meta['load_average']:.1f} at start)")
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    print('  '.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print('  '.join(str(row[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(f"per_core = images per CPU-second of the process (robust to other load); wall = "
          f"images/s; ratio = ours / PIL per core; cores_for_target = "
          f"ceil({FLAGS.target:.0f} / ours_per_core).")


def main(argv: list[str]) -> None:
    del argv
    threads = FLAGS.threads or os.cpu_count()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(FLAGS.folder or scratch)
        mean_kb = write_jpegs(folder, FLAGS.images)
        paths = sorted(folder.glob('*/*.jpg'))
        meta = {'images': len(paths), 'mean_kb': round(mean_kb, 1), 'batch': FLAGS.batch,
                'cpu_count': os.cpu_count(), 'threads': threads,
                'load_average': os.getloadavg()[0], 'target_images_per_s': FLAGS.target}
        rows = measure(folder, paths, threads)
    if FLAGS.json:
        print(json.dumps({'meta': meta, 'rows': rows}, indent=2))
    else:
        print_table(rows, meta)


if __name__ == '__main__':
    app.run(main)
