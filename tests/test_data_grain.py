"""The TensorFlow-free grain loader on real files: a generated image folder, a prepared
store written by `resnet_flax.data.prepare`, and imagenet2012 prepared as ArrayRecord by the
real TFDS builder."""

import itertools
import json
import math
import random
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import configs.base
from resnet_flax import data
from resnet_flax.data import grain_source, pil_preprocess, prepare, store
from tests.tiny import REPO, grain_recipe

pytest.importorskip('grain')

NUM_CLASSES, PER_CLASS = 3, 8


def write_folder(root, *, per_class=PER_CLASS, sizes=((48, 40), (40, 56), (64, 48)), seed=0):
    """Smooth colour fields plus grain, one hue per class, assorted sizes (JPEG and a PNG)."""
    rng = np.random.default_rng(seed)
    for c in range(NUM_CLASSES):
        folder = root / f'class{c}'
        folder.mkdir(parents=True)
        for i in range(per_class):
            width, height = sizes[i % len(sizes)]
            coarse = Image.fromarray((rng.random((3, 4, 3)) * 120 + 60 * c).astype(np.uint8))
            field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), float)
            pixels = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
            suffix = 'png' if i == per_class - 1 else 'jpg'
            Image.fromarray(pixels).save(folder / f'{i:03d}.{suffix}', quality=95)
    return root


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('folder'))


def folder_config(root, **overrides):
    cfg = configs.base.get_config().data
    cfg.update(dataset='image_folder', data_dir=str(root), loader='grain', image_size=16,
               holdout_fraction=0.25, eval_split='validation', num_workers=0,
               threadpool_size=2)
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def train(cfg, n, **kwargs):
    return take(data.train_batches(cfg, **{'global_batch_size': 6, 'seed': 0, **kwargs}), n)


def test_train_batches_are_uint8_crops_and_an_epoch_covers_the_split(folder):
    cfg = folder_config(folder)
    info = data.get_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples) == (18, 6)
    batches = train(cfg, 3)  # one epoch: 18 // 6
    for batch in batches:
        assert batch['image'].shape == (6, 16, 16, 3) and batch['image'].dtype == np.uint8
        assert batch['label'].shape == (6,) and batch['label'].dtype == np.int32
    labels = np.concatenate([b['label'] for b in batches])
    assert np.bincount(labels, minlength=NUM_CLASSES).tolist() == [6, 6, 6]


@pytest.mark.parametrize('resizer', ['pil', 'cv2'])
def test_order_and_crops_are_a_function_of_the_seed(folder, resizer):
    if resizer == 'cv2':
        pytest.importorskip('cv2')
    cfg = folder_config(folder, train_resizer=resizer)
    first, again, other = train(cfg, 4), train(cfg, 4), train(cfg, 4, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
    assert any(not np.array_equal(a['image'], b['image'])
               for a, b in zip(first, other, strict=True))


@pytest.mark.parametrize('resizer', ['pil', 'cv2'])
def test_resume_at_any_step_continues_the_same_stream(folder, resizer):
    """Across an epoch boundary (3 steps per epoch), without the skipped batches."""
    if resizer == 'cv2':
        pytest.importorskip('cv2')
    cfg = folder_config(folder, train_resizer=resizer)
    whole = train(cfg, 7)
    for start in (2, 3, 5):
        resumed = train(cfg, 7 - start, start_step=start)
        for a, b in zip(whole[start:], resumed, strict=True):
            np.testing.assert_array_equal(a['image'], b['image'])
            np.testing.assert_array_equal(a['label'], b['label'])


def test_two_processes_split_each_global_batch(folder):
    cfg = folder_config(folder)
    whole = train(cfg, 3)
    halves = [train(cfg, 3, process_index=p, process_count=2) for p in range(2)]
    for step, batch in enumerate(whole):
        joined = np.concatenate([halves[0][step]['image'], halves[1][step]['image']])
        np.testing.assert_array_equal(joined, batch['image'])


@pytest.mark.parametrize('global_batch', [4, 6])
def test_eval_sees_every_example_once_over_two_processes(folder, global_batch):
    cfg = folder_config(folder, holdout_fraction=0.0, eval_split='train')  # 24 images
    passes = [list(data.eval_batches(cfg, global_batch_size=global_batch, process_index=p,
                                     process_count=2)) for p in range(2)]
    assert len(passes[0]) == len(passes[1]) == -(-24 // global_batch)
    kept = [(b['image'][b['mask']], b['label'][b['mask']]) for p in passes for b in p]
    images = np.concatenate([k[0] for k in kept])
    assert len(images) == 24
    assert len({bytes(image) for image in images}) == 24  # each image exactly once
    assert np.bincount(np.concatenate([k[1] for k in kept])).tolist() == [PER_CLASS] * 3
    padding = np.concatenate([b['image'][~b['mask']] for p in passes for b in p])
    assert not padding.any()


def test_eval_is_the_centre_crop_at_the_eval_size(folder):
    """Low-resolution training: train at 16, evaluate at 24, the centre 0.875 of the short side."""
    cfg = folder_config(folder, eval_image_size=24, decoder='pil', eval_crop='center')
    batch = next(data.eval_batches(cfg, global_batch_size=6))
    assert batch['image'].shape == (6, 24, 24, 3)
    path = grain_source.records(cfg, 'validation').paths[0]
    with Image.open(path) as image:
        side = int(0.875 * min(image.size))
        left, top = (image.width - side + 1) // 2, (image.height - side + 1) // 2
        expected = image.convert('RGB').resize(
            (24, 24), Image.Resampling.BILINEAR, box=(left, top, left + side, top + side))
    np.testing.assert_array_equal(batch['image'][0], np.asarray(expected))


@pytest.mark.parametrize('decoder', ['pil_draft', 'simplejpeg'])
def test_reduced_scale_decoders_agree_with_full_decode(tmp_path, decoder):
    """500 px photos cropped to 64: the DCT-scaled decodes differ by a few grey levels."""
    if decoder == 'simplejpeg':
        pytest.importorskip('simplejpeg')
    root = write_folder(tmp_path, per_class=2, sizes=((500, 375),))
    cfg = folder_config(root, holdout_fraction=0.0, eval_split='train', image_size=64)
    reference = next(data.eval_batches(cfg.copy_and_resolve_references(), global_batch_size=6))
    cfg.decoder = decoder
    ours = next(data.eval_batches(cfg, global_batch_size=6))
    difference = np.abs(ours['image'].astype(float) - reference['image'])
    assert difference.mean() < 3 and np.percentile(difference, 99) < 16
    np.testing.assert_array_equal(ours['label'], reference['label'])


def photo_jpeg(width, height, seed=0) -> bytes:
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize((width, height), Image.Resampling.BICUBIC), float)
    pixels = np.clip(field + rng.normal(0, 6, field.shape), 0, 255).astype(np.uint8)
    out = pil_preprocess.io.BytesIO()
    Image.fromarray(pixels).save(out, format='JPEG', quality=90)
    return out.getvalue()


@pytest.mark.parametrize('decoder', ['pil', 'pil_draft', 'simplejpeg'])
def test_cv2_train_crops_match_pil_within_a_grey_level(decoder):
    """data.antialias=True, the same Inception boxes (same rng draws), enlarged and shrunk (a
    256 px store image and a 500 px photo at 64 and 176 px): OpenCV's resize stays near PIL's
    bilinear."""
    pytest.importorskip('cv2')
    if decoder == 'simplejpeg':
        pytest.importorskip('simplejpeg')
    differences = []
    for (width, height), size in (((256, 192), 176), ((500, 375), 64), ((500, 375), 176)):
        encoded = photo_jpeg(width, height, seed=size)
        for seed in range(12):
            pil, cv2_ = (grain_recipe(decoder=decoder, image_size=size, train_resizer=r,
                                      antialias=True) for r in ('pil', 'cv2'))
            reference = pil_preprocess.train_example(encoded, random.Random(seed), pil)
            out = np.zeros((size, size, 3), np.uint8)
            ours = pil_preprocess.train_example(encoded, random.Random(seed), cv2_, out)
            assert ours is out and ours.dtype == np.uint8 and ours.shape == (size, size, 3)
            differences.append(np.abs(ours.astype(float) - reference).ravel())
    difference = np.concatenate(differences)
    # Measured 0.46 and 3 grey levels; INTER_LINEAR when shrinking (aliasing) gives 0.7 and 4-5.
    assert difference.mean() < 0.6 and np.percentile(difference, 99) < 4


@pytest.mark.parametrize('window_decode', [False, True])
@pytest.mark.parametrize('resizer', ['cv2', 'pil'])
def test_unfiltered_train_crops_match_tf_data_on_the_same_box(resizer, window_decode):
    """data.antialias=False (the default): grain's train crop of a box is tf.data's, TF's
    fast-IDCT decode, slice and tf.image.resize(antialias=False), within rounding: the two
    loaders follow one recipe, decoding the whole image or only the window. Crops of a 256 px
    store image (at 176) and a 500 px photo (at 224) that decode at full scale, shrunk and
    enlarged."""
    tf = pytest.importorskip('tensorflow')
    pytest.importorskip('simplejpeg')
    if resizer == 'cv2':
        pytest.importorskip('cv2')
    from resnet_flax.data import jpeg_window, preprocess

    if window_decode and not jpeg_window.available():
        pytest.skip('the JPEG window decoder cannot be built here')

    differences = []
    for (width, height), size in (((256, 192), 176), ((500, 375), 224)):
        encoded = photo_jpeg(width, height, seed=size)
        recipe = grain_recipe(image_size=size, train_resizer=resizer, antialias=False,
                              window_decode=window_decode)
        for seed in range(12):
            left, top, crop_w, crop_h = box = pil_preprocess.inception_box(
                (width, height), random.Random(seed), recipe.area_range, recipe.aspect_range)
            assert pil_preprocess._halving_decoded((width, height), box, size) == (width, height)
            window = tf.io.decode_and_crop_jpeg(encoded, [top, left, crop_h, crop_w],
                                                channels=3, dct_method='INTEGER_FAST')
            reference = preprocess.to_uint8(preprocess.resize(window, size, 'bilinear', False))
            ours = pil_preprocess.train_example(encoded, random.Random(seed), recipe)
            differences.append(np.abs(ours.astype(float) - reference.numpy()).ravel())
    difference = np.concatenate(differences)
    # Measured: mean 0.12 (OpenCV), 0.50 (PIL's EXTENT transform); at most 1 decoding the
    # window (TF's pixels), 6 decoding the whole (the crop's edge column is upsampled from
    # its neighbours, which TF's window decode does not see).
    assert difference.mean() < (0.2 if resizer == 'cv2' else 0.6)
    assert np.percentile(difference, 99) <= 1 and difference.max() <= (1 if window_decode else 8)


def test_train_decodes_only_at_the_fast_scales():
    """simplejpeg's 7/8 .. 3/8 scales decode slower than the whole image: train decodes at
    1, 1/2, 1/4 or 1/8, the largest that keeps the crop at least the output size."""
    pytest.importorskip('simplejpeg')
    encoded = photo_jpeg(500, 376)
    for crop, size, expected in ((400, 220, (500, 376)), (400, 176, (250, 188)),
                                 (260, 64, (125, 94)), (200, 64, (250, 188)),
                                 (130, 64, (250, 188)), (40, 4, (63, 47))):
        for decoder in ('simplejpeg', 'pil_draft'):
            pixels = pil_preprocess.decode_array(encoded, (0, 0, crop, crop), size, decoder,
                                                 (500, 376))
            assert pixels.shape == (*expected[::-1], 3), (crop, size, decoder)
            assert crop * expected[0] / 500 >= size - 1
    full = pil_preprocess.decode_array(encoded, (0, 0, 20, 20), 64, 'pil', (500, 376))
    assert full.shape == (376, 500, 3)


def test_train_batches_fill_whole_batches_and_eval_pads_with_zeros(folder):
    """Each grain element is a whole batch, written into preallocated arrays."""
    cfg = folder_config(folder, holdout_fraction=0.0, eval_split='train')  # 24 images
    batch = next(data.train_batches(cfg, global_batch_size=6, seed=0))
    assert batch['image'].flags.c_contiguous and batch['image'].any(axis=(1, 2, 3)).all()
    last = list(data.eval_batches(cfg, global_batch_size=10))[-1]  # 4 real, 6 padding
    assert last['mask'].tolist() == [True] * 4 + [False] * 6
    assert last['image'][:4].any(axis=(1, 2, 3)).all() and not last['image'][4:].any()
    assert not last['label'][4:].any()


def test_inception_box_stays_inside_and_covers_the_area_range():
    rng = random.Random(0)
    for _ in range(200):
        left, top, width, height = pil_preprocess.inception_box(
            (500, 375), rng, (0.08, 1.0), (3 / 4, 4 / 3))
        assert left >= 0 and left + width <= 500 and top >= 0 and top + height <= 375
        assert 0.07 * 500 * 375 <= width * height <= 500 * 375


BOX_DRAWS = 3000
INCEPTION = dict(area_range=(0.08, 1.0), aspect_range=(3 / 4, 4 / 3))


def tf_data_boxes(shape, count):
    """(left, top, width, height) [4, count] from the tf.data loader's own sampler
    (preprocess.inception_window: tf.image.stateless_sample_distorted_bounding_box)."""
    tf = pytest.importorskip('tensorflow')
    from resnet_flax.data import preprocess

    size = tf.constant([shape[1], shape[0]])

    @tf.function
    def draw(seeds):
        return tf.map_fn(lambda seed: preprocess.inception_window(
            size, seed, INCEPTION['area_range'], INCEPTION['aspect_range']),
            seeds, fn_output_signature=tf.int32)

    seeds = tf.stack([tf.range(count, dtype=tf.int64), tf.fill([count], tf.constant(
        7, tf.int64))], axis=1)
    top, left, height, width = draw(seeds).numpy().T
    return np.stack([left, top, width, height])


def grain_boxes(shape, count, sampler=None):
    sampler = sampler or pil_preprocess.inception_box
    return np.array([sampler(shape, random.Random(f'ks/{i}'), INCEPTION['area_range'],
                             INCEPTION['aspect_range']) for i in range(count)]).T


def torchvision_box(shape, rng, area_range, aspect_range):
    """The grain loader's sampler before it followed TF's (torchvision's RandomResizedCrop:
    uniform area, log-uniform aspect), kept to show the test below tells them apart."""
    width, height = shape
    for _ in range(10):
        target = width * height * rng.uniform(*area_range)
        aspect = math.exp(rng.uniform(math.log(aspect_range[0]), math.log(aspect_range[1])))
        crop_w, crop_h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < crop_w <= width and 0 < crop_h <= height:
            return rng.randint(0, width - crop_w), rng.randint(0, height - crop_h), crop_w, crop_h
    return 0, 0, width, height


def box_statistics(boxes, shape):
    left, top, width, height = boxes
    return {'area': width * height / (shape[0] * shape[1]), 'aspect': width / height,
            'left': left / shape[0], 'top': top / shape[1]}


@pytest.mark.parametrize('shape', [(500, 375), (1000, 120), (28, 28)])
def test_both_loaders_draw_inception_crops_from_one_distribution(shape):
    """A two-sample Kolmogorov-Smirnov test per box statistic, on 3,000 boxes from each
    loader's sampler (fixed seeds, so the p-values are fixed too): the grain loader's must
    be indistinguishable from tf.data's, and the torchvision-style sampler it had before
    (mean area 0.43 against 0.37 on 500x375) must be told apart."""
    stats = pytest.importorskip('scipy.stats')
    reference = box_statistics(tf_data_boxes(shape, BOX_DRAWS), shape)
    ours = box_statistics(grain_boxes(shape, BOX_DRAWS), shape)
    before = box_statistics(grain_boxes(shape, BOX_DRAWS, torchvision_box), shape)
    for name, values in reference.items():
        assert stats.ks_2samp(values, ours[name]).pvalue > 0.01, name
    assert stats.ks_2samp(reference['area'], before['area']).pvalue < 1e-6


def test_cifar_pad_crop_shifts_in_black_borders():
    image = np.full((8, 8, 3), 200, np.uint8)
    crops = [pil_preprocess.pad_crop(image, random.Random(s), 4) for s in range(20)]
    assert all(c.shape == image.shape for c in crops)
    assert any((c == 0).any() for c in crops) and any((c == 200).all() for c in crops)


def test_bad_choices_fail_with_one_line(folder):
    with pytest.raises(ValueError, match="data.decoder='turbo' is not one of"):
        next(data.train_batches(folder_config(folder, decoder='turbo'), global_batch_size=6,
                                seed=0))
    with pytest.raises(ValueError, match="data.train_resizer='skimage' is not one of"):
        next(data.train_batches(folder_config(folder, train_resizer='skimage'),
                                global_batch_size=6, seed=0))
    if pytest.importorskip('cv2'):
        with pytest.raises(ValueError, match="has no data.resize_method='lanczos3'"):
            next(data.train_batches(folder_config(folder, train_resizer='cv2',
                                                  resize_method='lanczos3'),
                                    global_batch_size=6, seed=0))
    with pytest.raises(ValueError, match="data.loader='ffcv' is not one of"):
        data.get_info(folder_config(folder, loader='ffcv'))
    with pytest.raises(ValueError, match="data.loader='tf'"):
        next(data.train_batches(folder_config(folder, auto_augment='randaugment'),
                                global_batch_size=6, seed=0))
    with pytest.raises(FileNotFoundError, match='resnet_flax.data.prepare'):
        data.get_info(folder_config(folder, dataset='prepared'))


def test_bad_recipe_choices_are_refused_before_the_run_writes_anything(folder, tmp_path):
    """The config checks (train.py's first step) read get_info, which resolves the recipe."""
    from resnet_flax import config_checks

    for field, value, says in (('decoder', 'turbo', "data.decoder='turbo' is not one of"),
                               ('train_resizer', 'skimage', "train_resizer='skimage' is not"),
                               ('auto_augment', 'randaugment', "set data.loader='tf'")):
        config = configs.base.get_config()
        config.data = folder_config(folder, **{field: value})
        with pytest.raises(config_checks.ConfigProblems, match=says):
            config_checks.resolve(config, tmp_path / 'run')
    assert not (tmp_path / 'run').exists()


def test_dali_when_absent_is_a_one_line_error(folder):
    from resnet_flax.data import dali_source

    if dali_source.available():
        pytest.skip('DALI is installed here')
    with pytest.raises(ValueError, match="data.loader='dali' needs NVIDIA DALI"):
        data.get_info(folder_config(folder, loader='dali'))


def bomb_folder(root):
    """A small folder plus one 1500x1500 PNG (a few KB): over PIL's decompression-bomb limit
    once the test lowers Image.MAX_IMAGE_PIXELS to 1e6 (PIL refuses above twice the limit)."""
    write_folder(root, per_class=4)
    Image.new('RGB', (1500, 1500), (90, 30, 200)).save(root / 'class0' / 'huge.png')
    return root


def test_an_image_over_pils_bomb_limit_is_skipped_and_counted_when_indexed(tmp_path,
                                                                           monkeypatch):
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000_000)
    cfg = folder_config(bomb_folder(tmp_path / 'folder'), holdout_fraction=0.0,
                        eval_split='train')
    info = data.get_info(cfg)
    assert info.num_skipped_examples == 1 and info.num_train_examples == NUM_CLASSES * 4


def test_an_image_that_fails_to_decode_in_the_loader_is_skipped_not_fatal(tmp_path,
                                                                        monkeypatch):
    """The index read the PNG's header under the default limit (as TFDS sets and stores are
    never indexed); decoding then meets PIL's DecompressionBombError, which is no OSError.
    Train batches take the next record in its place; eval masks it out."""
    cfg = folder_config(bomb_folder(tmp_path / 'folder'), holdout_fraction=0.0,
                        eval_split='train', train_crop='none', random_flip=False)
    info = data.get_info(cfg)
    total = NUM_CLASSES * 4 + 1
    assert info.num_skipped_examples == 0 and info.num_train_examples == total
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000_000)
    huge = grain_source.records(cfg, 'train').paths.index(str(tmp_path / 'folder' / 'class0' /
                                                               'huge.png'))
    batches = train(cfg, 2 * (total // 6) + 1, global_batch_size=6)
    assert all(b['image'].shape == (6, 16, 16, 3) for b in batches)
    assert ('train', huge) in grain_source._UNREADABLE  # noqa: SLF001 - what was logged
    evaluated = take(data.eval_batches(cfg, global_batch_size=4), 99)
    masks = np.concatenate([b['mask'] for b in evaluated])
    assert masks.sum() == total - 1 and not masks[huge]


def test_prepare_skips_and_counts_an_image_over_the_bomb_limit(tmp_path, monkeypatch):
    root = bomb_folder(tmp_path / 'folder')
    cfg_json = json.dumps({'dataset': 'image_folder', 'data_dir': str(root),
                           'train_split': 'train', 'eval_split': 'validation',
                           'holdout_fraction': 0.0})
    assert prepare._split_size(cfg_json, 'train') == NUM_CLASSES * 4 + 1  # noqa: SLF001
    monkeypatch.setattr(Image, 'MAX_IMAGE_PIXELS', 1_000_000)  # decoding now refuses it
    info = prepare.prepare(cfg_json, ['train'], str(tmp_path / 'store'), max_side=32,
                           quality=90, examples_per_shard=8, workers=1)
    assert info.splits['train'].num_examples == NUM_CLASSES * 4
    sidecars = sorted((tmp_path / 'store' / 'train').glob('*.json'))
    assert sum(json.loads(p.read_text())['skipped'] for p in sidecars) == 1


def test_prepare_round_trip_and_rerun_skips_written_shards(folder, tmp_path):
    cfg_json = prepare.json.dumps({'dataset': 'image_folder', 'data_dir': str(folder),
                                   'train_split': 'train', 'eval_split': 'validation',
                                   'holdout_fraction': 0.25})
    out = tmp_path / 'store'
    info = prepare.prepare(cfg_json, ['train', 'validation'], str(out), max_side=32,
                           quality=90, examples_per_shard=5, workers=1)
    assert {k: v.num_examples for k, v in info.splits.items()} == {'train': 18, 'validation': 6}
    assert len(info.splits['train'].shards) == 4
    assert store.read_info(out) == info
    first_shard = out / 'train' / info.splits['train'].shards[0]
    stamp = first_shard.stat().st_mtime_ns
    prepare.prepare(cfg_json, ['train', 'validation'], str(out), max_side=32, quality=90,
                    examples_per_shard=5, workers=1)
    assert first_shard.stat().st_mtime_ns == stamp  # not rewritten

    raw = folder_config(folder, eval_image_size=24)
    stored = folder_config(out, dataset='prepared', eval_image_size=24)
    assert data.get_info(stored).label_names == data.get_info(raw).label_names
    ours = next(data.eval_batches(stored, global_batch_size=6))
    theirs = next(data.eval_batches(raw, global_batch_size=6))
    np.testing.assert_array_equal(ours['label'], theirs['label'])
    # The stored copy is the original shrunk to 32 px and re-encoded: the same pictures,
    # far closer to their originals than to the other images.
    own = np.abs(ours['image'].astype(float) - theirs['image']).mean()
    others = np.abs(ours['image'].astype(float) - np.roll(theirs['image'], 1, axis=0)).mean()
    assert own < 16 and own < others / 3
    for image_bytes, _ in (grain_source.records(stored, 'train')[i] for i in range(18)):
        with Image.open(pil_preprocess.io.BytesIO(image_bytes)) as image:
            assert max(image.size) <= 32 and image.format == 'JPEG'


@pytest.mark.parametrize('changed', [{'max_side': 24}, {'quality': 70}])
def test_prepare_rerun_with_other_settings_is_refused_in_one_line(folder, tmp_path, changed):
    """Reusing the finished shards would mix two sizes or qualities under one store.json."""
    cfg_json = json.dumps({'dataset': 'image_folder', 'data_dir': str(folder),
                           'train_split': 'train', 'eval_split': 'validation',
                           'holdout_fraction': 0.25})
    out = tmp_path / 'store'
    first = dict(max_side=32, quality=90, examples_per_shard=8, workers=1)
    prepare.prepare(cfg_json, ['train'], str(out), **first)
    before = {p.name: p.read_bytes() for p in (out / 'train').iterdir()}
    with pytest.raises(ValueError, match='one store cannot mix them') as error:
        prepare.prepare(cfg_json, ['train', 'validation'], str(out), **{**first, **changed})
    assert '\n' not in str(error.value) and f'delete {out}' in str(error.value)
    assert {p.name: p.read_bytes() for p in (out / 'train').iterdir()} == before
    assert not (out / 'validation').exists()
    # The same settings add the other split, and store.json lists both runs' splits.
    info = prepare.prepare(cfg_json, ['validation'], str(out), **first)
    assert store.read_info(out) == info and sorted(info.splits) == ['train', 'validation']
    assert info.image_side == 32  # 40-64 px originals shrunk to at most 32


@pytest.mark.slow  # a fresh interpreter importing grain and jax: ~10 s on 2 cores
def test_grain_loader_imports_no_tensorflow(folder, tmp_path):
    code = (
        'import sys, configs.base\n'
        'from resnet_flax import data\n'
        'cfg = configs.base.get_config().data\n'
        f'cfg.update(dataset="image_folder", data_dir={str(folder)!r}, loader="grain",\n'
        '           image_size=8, holdout_fraction=0.25, num_workers=0)\n'
        'data.get_info(cfg)\n'
        'next(data.train_batches(cfg, global_batch_size=6, seed=0))\n'
        'next(data.eval_batches(cfg, global_batch_size=6))\n'
        'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches(folder):
    cfg = folder_config(folder)
    threads = train(cfg, 4)
    cfg.num_workers = 2
    workers = train(cfg, 4)
    for a, b in zip(threads, workers, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])


# ---- imagenet2012 prepared as ArrayRecord by the real TFDS builder.

@pytest.fixture(scope='module')
def imagenet_array_record(tmp_path_factory):
    pytest.importorskip('tensorflow_datasets')
    from tests.imagenet_fixture import make_imagenet

    return make_imagenet(tmp_path_factory.mktemp('imagenet_ar'), num_classes=3,
                         train_per_class=4, val_per_class=2, file_format='array_record')


def imagenet_config(data_dir, **overrides):
    cfg = configs.base.get_config().data
    cfg.update(dataset='imagenet2012', data_dir=data_dir, loader='grain', image_size=16,
               eval_split='validation', num_workers=0, threadpool_size=2)
    cfg.update(overrides)
    return cfg


@pytest.mark.slow
def test_tfds_array_record_train_and_exact_eval_without_tensorflow(imagenet_array_record):
    cfg = imagenet_config(imagenet_array_record)
    info = data.get_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (12, 6, 1000)
    labels = np.concatenate([b['label'] for b in train(cfg, 3, global_batch_size=4)])
    source = grain_source.records(cfg, 'train')
    assert sorted(labels.tolist()) == sorted(source[i][1] for i in range(12))
    passes = [list(data.eval_batches(cfg, global_batch_size=4, process_index=p,
                                     process_count=2)) for p in range(2)]
    masked = np.concatenate([b['label'][b['mask']] for p in passes for b in p])
    validation = grain_source.records(cfg, 'validation')
    assert sorted(masked.tolist()) == sorted(validation[i][1] for i in range(6))
    code = (
        'import sys, configs.base\n'
        'from resnet_flax import data\n'
        'cfg = configs.base.get_config().data\n'
        f'cfg.update(dataset="imagenet2012", data_dir={imagenet_array_record!r},\n'
        '           loader="grain", image_size=8, eval_split="validation", num_workers=0)\n'
        'next(data.train_batches(cfg, global_batch_size=4, seed=0))\n'
        'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True, cwd=REPO)


@pytest.mark.slow
def test_prepare_from_tfds_array_record(imagenet_array_record, tmp_path):
    cfg_json = prepare.json.dumps({'dataset': 'imagenet2012', 'data_dir': imagenet_array_record,
                                   'train_split': 'train', 'eval_split': 'validation',
                                   'holdout_fraction': 0.0})
    info = prepare.prepare(cfg_json, ['train', 'validation'], str(tmp_path), max_side=256,
                           quality=90, examples_per_shard=8, workers=1)
    assert info.splits['validation'].num_examples == 6 and len(info.classes) == 1000
    # One recipe on both sides: the default follows the images' size, which the store records
    # and this TFDS set does not declare.
    stored = imagenet_config(str(tmp_path), dataset='prepared', train_crop='inception')
    direct = imagenet_config(imagenet_array_record, train_crop='inception')
    # Images under max_side keep their bytes: the same batches, bit for bit.
    for a, b in zip(train(stored, 3, global_batch_size=4), train(direct, 3, global_batch_size=4),
                    strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
