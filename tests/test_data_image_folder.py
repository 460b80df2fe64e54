"""The image-folder source on generated files: formats, corrupt files, splits, shares, order."""

import itertools

import numpy as np
import pytest
from PIL import Image

import configs.base
from resnet_flax import data

pytest.importorskip('tensorflow')

from resnet_flax.data import image_folder  # noqa: E402

CLASSES = ('ant', 'bee', 'cat')
PER_CLASS = 6


def _save_rgb(path, rng, size=(20, 24)):
    Image.fromarray((rng.random((*size, 3)) * 255).astype(np.uint8)).save(path)


@pytest.fixture(scope='module')
def pool(tmp_path_factory):
    """ROOT/CLASS/*: 6 good JPEGs per class plus the awkward files below."""
    root = tmp_path_factory.mktemp('pool')
    rng = np.random.default_rng(0)
    for name in CLASSES:
        (root / name).mkdir()
        for i in range(PER_CLASS):
            _save_rgb(root / name / f'{i}.jpg', rng, size=(20 + i, 24))
    gray = (rng.random((16, 16)) * 255).astype(np.uint8)
    Image.fromarray(gray).save(root / 'ant' / 'gray.png')
    Image.fromarray((rng.random((16, 16, 4)) * 255).astype(np.uint8)).save(root / 'bee' / 'a.png')
    _save_rgb(root / 'cat' / 'scan.tiff', rng)  # TensorFlow cannot decode TIFF: PIL does
    (root / 'cat' / 'broken.jpg').write_bytes(b'this is not a JPEG')
    whole = (root / 'cat' / '0.jpg').read_bytes()
    (root / 'cat' / 'truncated.jpg').write_bytes(whole[:len(whole) // 2])
    (root / 'bee' / 'notes.txt').write_text('not an image, not counted')
    return root


def folder_config(root, **overrides):
    cfg = configs.base.get_config().data
    cfg.update(dataset='image_folder', data_dir=str(root), image_size=16, holdout_fraction=0.25,
               threadpool_size=2)
    cfg.update(overrides)
    return cfg


def eval_images(cfg, split=None, batch=4, **kwargs):
    """All eval batches of one process."""
    return list(data.eval_batches(cfg, global_batch_size=batch, split=split, **kwargs))


def test_corrupt_files_are_skipped_and_counted(pool):
    found = image_folder.index(folder_config(pool))
    assert sorted(p.rsplit('/', 1)[-1] for p in found.skipped) == ['broken.jpg', 'truncated.jpg']
    info = data.get_info(folder_config(pool))
    good = len(CLASSES) * PER_CLASS + 3  # + gray.png, a.png, scan.tiff
    assert info.num_train_examples + info.num_eval_examples == good
    assert info.num_classes == 3 and info.label_names == CLASSES


def test_holdout_is_a_fixed_stratified_fraction(pool):
    cfg = folder_config(pool)
    found = image_folder.index(cfg)
    held, kept = found.splits['test'], found.splits['train']
    assert not set(held.paths) & set(kept.paths)
    for label in range(3):
        total = np.sum(held.labels == label) + np.sum(kept.labels == label)
        assert np.sum(held.labels == label) == round(0.25 * total)
    again = image_folder._index.__wrapped__(str(pool), 'train', 'test', 0.25, 0, True, 2)
    assert again.splits['test'].paths == held.paths  # the same files every run


def difference(ours, reference):
    return np.abs(np.asarray(ours, np.float32) - np.asarray(reference, np.float32))


def test_grayscale_alpha_and_tiff_become_rgb(pool):
    # antialias: PIL's resize filters, and these images are pure noise.
    cfg = folder_config(pool, eval_crop='resize', holdout_fraction=0.0, antialias=True)
    cfg.eval_split = 'train'  # read everything, deterministically
    batches = eval_images(cfg, split='train', batch=64)
    found = image_folder.index(cfg).splits['train']
    images = batches[0]['image'][batches[0]['mask']]
    assert images.shape[1:] == (16, 16, 3)
    for name in ('gray.png', 'a.png', 'scan.tiff'):
        position = [p.endswith(name) for p in found.paths].index(True)
        with Image.open(found.paths[position]) as original:
            reference = original.convert('RGB').resize((16, 16), Image.Resampling.BILINEAR)
        if name == 'gray.png':
            np.testing.assert_array_equal(images[position][..., 0], images[position][..., 2])
        assert difference(images[position], reference).mean() < 6


def test_split_folders_with_train_and_val(tmp_path):
    rng = np.random.default_rng(1)
    for split, count in (('train', 4), ('val', 2)):
        for name in ('x', 'y'):
            (tmp_path / split / name).mkdir(parents=True)
            for i in range(count):
                _save_rgb(tmp_path / split / name / f'{i}.png', rng)
    cfg = folder_config(tmp_path, holdout_fraction=0.0, eval_split='val')
    info = data.get_info(cfg)
    assert (info.num_train_examples, info.num_eval_examples, info.num_classes) == (8, 4, 2)
    batches = eval_images(cfg, batch=3)
    assert sum(int(b['mask'].sum()) for b in batches) == 4


@pytest.mark.parametrize('layout, needle', [
    ({}, 'has 0 class folder'),
    ({'only': 2}, 'has 1 class folder'),
])
def test_empty_or_single_class_folder_fails_in_one_line(tmp_path, layout, needle):
    if 'only' in layout:
        (tmp_path / 'only').mkdir()
        _save_rgb(tmp_path / 'only' / '0.jpg', np.random.default_rng(0))
    with pytest.raises(ValueError, match=needle) as error:
        data.get_info(folder_config(tmp_path))
    assert '\n' not in str(error.value)


def test_missing_eval_split_says_how_to_fix(pool):
    with pytest.raises(ValueError, match='holdout_fraction'):
        data.get_info(folder_config(pool, holdout_fraction=0.0))


def test_train_batches_shapes_order_and_resume(pool):
    cfg = folder_config(pool)  # inception crop: the draws must be reproduced
    steps_per_epoch = data.get_info(cfg).num_train_examples // 4
    full = list(itertools.islice(data.train_batches(cfg, global_batch_size=4, seed=3),
                                 steps_per_epoch + 2))
    assert full[0]['image'].shape == (4, 16, 16, 3) and full[0]['image'].dtype == np.uint8
    assert full[0]['label'].dtype == np.int32
    start = steps_per_epoch - 1  # the resumed run crosses an epoch boundary
    resumed = list(itertools.islice(
        data.train_batches(cfg, global_batch_size=4, seed=3, start_step=start), 3))
    for a, b in zip(full[start:], resumed, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def test_process_slices_form_the_single_process_global_batch(pool):
    cfg = folder_config(pool, train_crop='none', random_flip=False)
    whole = next(data.train_batches(cfg, global_batch_size=6, seed=0))
    parts = [next(data.train_batches(cfg, global_batch_size=6, seed=0, process_index=p,
                                     process_count=3)) for p in range(3)]
    np.testing.assert_array_equal(np.concatenate([p['image'] for p in parts]), whole['image'])
    np.testing.assert_array_equal(np.concatenate([p['label'] for p in parts]), whole['label'])


@pytest.mark.parametrize('process_count', [2, 3])
def test_eval_mask_counts_each_example_once(pool, process_count):
    cfg = folder_config(pool)
    single = eval_images(cfg, batch=8)
    reference = np.concatenate([b['image'][b['mask']] for b in single])
    per_process = [eval_images(cfg, batch=2 * process_count, process_index=p,
                               process_count=process_count) for p in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1
    masked = np.concatenate([b['image'][b['mask']] for bs in per_process for b in bs])
    assert len(masked) == len(reference)
    key = lambda images: sorted(im.tobytes() for im in images)
    assert key(masked) == key(reference)
