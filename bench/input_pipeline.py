"""Input pipeline throughput: images/s per CPU core, every loader on the same JPEG files.

    python -m bench.input_pipeline --images=320 --batch=32 --repeats=3 --train_passes=4 --json
    python -m bench.input_pipeline --match='store256 train 176'   # a subset, to iterate

Writes `--images` generated JPEGs of ImageNet-like sizes (500 wide, 333-500 high, ~110 KB at
quality 90, like the average ILSVRC2012 file) into an image folder, copies them into a
prepared store (`resnet_flax.data.prepare`, longest side `--store_side`, JPEG q90), then
times in one process, alternating, one pass over the files for each (loader, recipe):
- tf: `resnet_flax.data.train_batches` / `eval_batches` with data.loader='tf' on the raw
  JPEGs (tf.data: decode fused with the inception / centre crop, resize, batch, numpy);
- grain-DECODER: the same calls with data.loader='grain' and each available decoder, on the
  raw JPEGs and on the prepared store (train at `--image_size` and `--low_res_size`), train
  crops resized by PIL (data.train_resizer='pil'); grain-DECODER+cv2: the train recipes
  again with OpenCV's resize (data.train_resizer='cv2'), where cv2 is installed; train crops
  of both loaders follow `--antialias` (data.antialias; False, the default, samples the
  bilinear without smoothing in both, one recipe);
- pil_loop: a plain Python loop with PIL (torchvision's RandomResizedCrop, or resize the
  short side to 256 and centre-crop 224, to float32 normalised): the reference.
Every loader decodes on `--threads` threads in this process (grain: num_workers=0), so the
process CPU time (time.process_time: every thread) is all of its work; per core = images
per CPU-second, which other load on the host does not dilute. The fastest of `--repeats`
alternating runs is kept, and the median beside it. bytes_per_image_to_device is what one
example of the batch the loader yields weighs (image and label as they would cross to the
device).
"""

from __future__ import annotations

import functools
import importlib.util
import itertools
import json
import math
import os
import random
import re
import tempfile
import time
from pathlib import Path

import numpy as np
from absl import app, flags
from PIL import Image

import configs.base
from bench import jpeg_files
from resnet_flax import data
from resnet_flax.data import info as info_lib
from resnet_flax.data import prepare

FLAGS = flags.FLAGS
flags.DEFINE_integer('images', 256, 'Generated JPEGs (the timed pass reads each once).')
flags.DEFINE_integer('batch', 32, 'Global batch size of our pipeline.')
flags.DEFINE_integer('image_size', 224, 'Train and eval crop size.')
flags.DEFINE_integer('low_res_size', 176, 'The low-resolution train size (FFCV, FixRes).')
flags.DEFINE_integer('store_side', 256, 'Longest side of the prepared store.')
flags.DEFINE_integer('threads', 0, 'Threads of the multi-core run; 0 = every core.')
flags.DEFINE_integer('repeats', 3, 'Alternating runs of each side; the fastest is kept.')
flags.DEFINE_integer('train_passes', 1, 'Passes over the files per timed train run of the '
                     'loaders (the train stream goes on into later epochs).')
flags.DEFINE_bool('antialias', False, 'data.antialias of every loader: smooth when a resize '
                  'shrinks (False: plain bilinear sampling, the flax and TF ResNet recipes).')
flags.DEFINE_float('target', 8000.0, 'Accelerator images/s to size the host for.')
flags.DEFINE_string('folder', '', 'Where to write the JPEGs; empty = a temporary folder.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')
flags.DEFINE_bool('stages', False, 'Instead of the loaders: each stage of a train example from '
                  'the store at --low_res_size, on one thread (microseconds per image).')
flags.DEFINE_string('match', '', "Only the cases whose 'LOADER SOURCE RECIPE' name this regular "
                    "expression finds, e.g. 'store256 train 176'; empty = all.")

WIDTH, HEIGHTS = jpeg_files.WIDTH, jpeg_files.HEIGHTS
write_jpegs = jpeg_files.write_jpegs


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
            'cpu': time.process_time() - cpu, 'bytes': size * size * 3 * 4 + 4}  # float32


# ---- the loaders: the real pipelines on the same files.

def pipeline_config(folder: Path, size: int, threads: int, loader: str = 'tf',
                    decoder: str = 'auto', dataset: str = 'image_folder',
                    resizer: str = 'pil'):
    cfg = configs.base.get_config().data
    cfg.update(dataset=dataset, data_dir=str(folder), image_size=size,
               holdout_fraction=0.0, eval_split='train', verify_images=False,
               threadpool_size=threads, num_parallel_calls=threads, loader=loader,
               decoder=decoder, train_resizer=resizer, num_workers=0,
               antialias=FLAGS.antialias)
    return cfg


def time_loader(cfg, recipe: str, batch: int, num_images: int, passes: int = 1) -> dict:
    """`passes` passes of the files (train: later epochs; eval: one) after one untimed batch
    (tracing, warm-up): images, wall and CPU seconds of the whole process (every loader thread
    included), bytes per example. More passes shrink the error of the batches prefetched
    before the clock starts and still in flight when it stops."""
    steps = num_images // batch * (passes if recipe == 'train' else 1)
    if recipe == 'train':
        batches = data.train_batches(cfg, global_batch_size=batch, seed=0)
    else:
        batches = data.eval_batches(cfg, global_batch_size=batch, split='train')
    first = next(batches)
    wall, cpu = time.perf_counter(), time.process_time()
    timed = sum(1 for _ in itertools.islice(batches, steps - 1))
    run = {'images': timed * batch, 'wall': time.perf_counter() - wall,
           'cpu': time.process_time() - cpu}
    close = getattr(batches, 'close', None)
    if close:
        close()
    run['bytes'] = sum(np.asarray(first[k]).nbytes for k in ('image', 'label')) // batch
    return run


def best(runs: list[dict], clock: str) -> float:
    """images per second of `clock` ('wall' or 'cpu'), best run."""
    return max(run['images'] / run[clock] for run in runs)


def median(runs: list[dict], clock: str) -> float:
    """images per second of `clock`, the median run (noise check on the best)."""
    return float(np.median([run['images'] / run[clock] for run in runs]))


def decoders(recipe: str) -> list[str]:
    """The decoders available here; libjpeg_window only for train (eval is simplejpeg's)."""
    from resnet_flax.data import jpeg_window

    found = ['pil', 'pil_draft']
    if importlib.util.find_spec('simplejpeg') is not None:
        found.append('simplejpeg')
    if recipe == 'train' and jpeg_window.available():
        found.append('libjpeg_window')
    return found


def grain_variants(recipe: str) -> list[tuple[str, str, str]]:
    """(loader name, decoder, train resizer): every decoder with PIL's resize, and on the
    train recipe each again with OpenCV's where it is installed (eval resizes with PIL)."""
    found = [(f'grain-{decoder}', decoder, 'pil') for decoder in decoders(recipe)]
    if recipe == 'train' and importlib.util.find_spec('cv2') is not None:
        found += [(f'grain-{decoder}+cv2', decoder, 'cv2') for decoder in decoders(recipe)]
    return found


def cases(folder: Path, store: Path, threads: int) -> list[tuple[str, str, str, object]]:
    """(loader, source, recipe, run()) of every measured combination."""
    size, low, batch = FLAGS.image_size, FLAGS.low_res_size, FLAGS.batch
    paths = sorted(folder.glob('*/*.jpg'))
    found = []
    for recipe in ('train', 'eval'):
        found.append(('pil_loop', 'jpeg', f'{recipe} {size}', functools.partial(
            time_reference, paths, recipe, size, batch)))
        if importlib.util.find_spec('tensorflow') is not None:
            found.append(('tf', 'jpeg', f'{recipe} {size}', functools.partial(
                time_loader, pipeline_config(folder, size, threads), recipe, batch, len(paths),
                FLAGS.train_passes)))
        for name, decoder, resizer in grain_variants(recipe):
            cfg = pipeline_config(folder, size, threads, 'grain', decoder, resizer=resizer)
            found.append((name, 'jpeg', f'{recipe} {size}', functools.partial(
                time_loader, cfg, recipe, batch, len(paths), FLAGS.train_passes)))
            sizes = (low, size) if recipe == 'train' else (size,)
            for crop in sizes:
                cfg = pipeline_config(store, crop, threads, 'grain', decoder, 'prepared',
                                      resizer)
                found.append((name, f'store{FLAGS.store_side}', f'{recipe} {crop}',
                              functools.partial(time_loader, cfg, recipe, batch,
                                                len(paths), FLAGS.train_passes)))
    return found


def measure(folder: Path, store: Path, threads: int) -> list[dict]:
    todo = [case for case in cases(folder, store, threads)
            if re.search(FLAGS.match, ' '.join(case[:3]))]
    if not todo:
        raise app.UsageError(f'--match={FLAGS.match!r} selects no case.')
    runs: dict[int, list[dict]] = {i: [] for i in range(len(todo))}
    for _ in range(FLAGS.repeats):  # alternate: every case once per round
        for i, (_, _, _, run) in enumerate(todo):
            runs[i].append(run())
    rows = []
    for i, (loader, source, recipe, _) in enumerate(todo):
        per_core = best(runs[i], 'cpu')
        rows.append({
            'loader': loader, 'source': source, 'recipe': f'imagenet {recipe}',
            'images_per_sec_per_core': round(per_core, 1),
            'images_per_sec_per_core_median': round(median(runs[i], 'cpu'), 1),
            'images_per_sec_wall': round(best(runs[i], 'wall'), 1),
            'bytes_per_image_to_device': runs[i][0]['bytes'],
            'cores_for_target': math.ceil(FLAGS.target / per_core),
        })
    return rows


def print_table(rows: list[dict], meta: dict) -> None:
    print(f"{meta['images']} JPEGs, mean {meta['mean_kb']:.0f} KB, {WIDTH} x {HEIGHTS}; store "
          f"{meta['store_side']} px, mean {meta['store_mean_kb']:.0f} KB; batch {meta['batch']}; "
          f"{meta['threads']} threads; {meta['cpu_count']} cores on this host (load average "
          f"{meta['load_average']:.1f} at start)")
    headers = list(rows[0])
    widths = [max(len(h), *(len(str(r[h])) for r in rows)) for h in headers]
    print('  '.join(h.ljust(w) for h, w in zip(headers, widths, strict=True)))
    for row in rows:
        print('  '.join(str(row[h]).ljust(w) for h, w in zip(headers, widths, strict=True)))
    print(f"per_core = images per CPU-second of the process (robust to other load); wall = "
          f"images/s; cores_for_target = ceil({FLAGS.target:.0f} / per_core).")


def write_store(folder: Path, out: Path) -> float:
    """The prepared store of `folder` (all of it as 'train'); mean KB per stored image."""
    cfg_json = json.dumps({'dataset': 'image_folder', 'data_dir': str(folder),
                           'train_split': 'train', 'eval_split': 'train',
                           'holdout_fraction': 0.0})
    info = prepare.prepare(cfg_json, ['train'], str(out), max_side=FLAGS.store_side,
                           quality=90, examples_per_shard=256, workers=1)
    size = sum(f.stat().st_size for f in (out / 'train').glob('*.array_record'))
    return size / info.splits['train'].num_examples / 1024


# ---- the stages of one train example from the store, on one thread (--stages).

def _cpu_us(fn, count: int, repeats: int = 5) -> float:
    """Best-of-`repeats` process CPU microseconds of fn(i) over i < count, per call."""
    best_time = math.inf
    for _ in range(repeats):
        start = time.process_time()
        for i in range(count):
            fn(i)
        best_time = min(best_time, time.process_time() - start)
    return round(best_time / count * 1e6, 1)


def stage_times(store: Path, size: int) -> dict[str, float]:
    """Microseconds per image of each stage, both resizers; the same boxes for every stage."""
    import dataclasses

    from resnet_flax.data import grain_source, jpeg_window
    from resnet_flax.data import pil_preprocess as pp

    cfg = pipeline_config(store, size, 1, 'grain', 'simplejpeg', 'prepared')
    source = grain_source.records(cfg, 'train')
    recipe = grain_source.recipe(cfg, grain_source.find(cfg))
    count = len(source)
    encoded = [source[i][0] for i in range(count)]
    rng = lambda i: random.Random(f'0/{grain_source.AUGMENT_STREAM}/0/{i}')  # noqa: E731
    shapes = [pp.image_shape(e, 'simplejpeg') for e in encoded]
    boxes = [pp.inception_box(shapes[i], rng(i), recipe.area_range, recipe.aspect_range)
             for i in range(count)]
    pixels = [pp.decode_array(encoded[i], boxes[i], size, 'simplejpeg', shapes[i])
              for i in range(count)]
    images = [Image.fromarray(p) for p in pixels]
    pil_box = lambda i: (boxes[i][0], boxes[i][1], boxes[i][0] + boxes[i][2],  # noqa: E731
                         boxes[i][1] + boxes[i][3])
    resized = [images[i].resize((size, size), Image.Resampling.BILINEAR, box=pil_box(i))
               for i in range(count)]
    out = np.zeros((size, size, 3), np.uint8)
    by = {name: dataclasses.replace(recipe, train_resizer=name, window_decode=False)
          for name in ('pil', 'cv2')}
    times = {
        'read (ArrayRecord)': _cpu_us(lambda i: source[i], count),
        'header + random.Random': _cpu_us(
            lambda i: (pp.image_shape(encoded[i], 'simplejpeg'), rng(i)), count),
        'decode (simplejpeg)': _cpu_us(
            lambda i: pp.decode_array(encoded[i], boxes[i], size, 'simplejpeg', shapes[i]),
            count),
        'to PIL (Image.fromarray)': _cpu_us(lambda i: Image.fromarray(pixels[i]), count),
        'resize (PIL bilinear)': _cpu_us(lambda i: images[i].resize(
            (size, size), Image.Resampling.BILINEAR, box=pil_box(i)), count),
        'to numpy (np.asarray)': _cpu_us(lambda i: np.asarray(resized[i]), count),
        'crop + resize (cv2, into the batch)': _cpu_us(lambda i: pp.cv2_window(
            pixels[i], shapes[i], boxes[i], size, recipe.resize_method, out, False), count),
        'crop + resize (cv2, into the batch, antialias)': _cpu_us(lambda i: pp.cv2_window(
            pixels[i], shapes[i], boxes[i], size, recipe.resize_method, out, True), count),
        'train_example, pil resizer': _cpu_us(
            lambda i: pp.train_example(encoded[i], rng(i), by['pil'], out), count),
        'train_example, cv2 resizer': _cpu_us(
            lambda i: pp.train_example(encoded[i], rng(i), by['cv2'], out), count),
    }
    if jpeg_window.available():  # the default where it builds: decode only the box
        window = dataclasses.replace(by['cv2'], window_decode=True)
        times['decode the box only (libjpeg_window, full scale)'] = _cpu_us(
            lambda i: jpeg_window.decode(encoded[i], boxes[i]), count)
        times['train_example, window + cv2'] = _cpu_us(
            lambda i: pp.train_example(encoded[i], rng(i), window, out), count)
    return times


def main(argv: list[str]) -> None:
    del argv
    threads = FLAGS.threads or os.cpu_count()
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(FLAGS.folder or scratch) / 'jpeg'
        mean_kb = write_jpegs(folder, FLAGS.images)
        store_kb = write_store(folder, Path(scratch) / 'store')
        meta = {'images': FLAGS.images, 'mean_kb': round(mean_kb, 1), 'batch': FLAGS.batch,
                'store_side': FLAGS.store_side, 'store_mean_kb': round(store_kb, 1),
                'cpu_count': os.cpu_count(), 'threads': threads,
                'load_average': os.getloadavg()[0], 'target_images_per_s': FLAGS.target,
                'antialias': FLAGS.antialias}
        if FLAGS.stages:
            stages = stage_times(Path(scratch) / 'store', FLAGS.low_res_size)
            print(json.dumps({'meta': meta, 'stages_us': stages}, indent=None if FLAGS.json
                             else 1))
            return
        rows = measure(folder, Path(scratch) / 'store', threads)
    if FLAGS.json:
        print(json.dumps({'meta': meta, 'records': rows}))
    else:
        print_table(rows, meta)


if __name__ == '__main__':
    app.run(main)
