"""The numpy sources (digits, synthetic): order, resume, process shares, eval masks, values."""

import itertools
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

import configs.base
from resnet_flax import data, device_augment


def digits_config(**overrides):
    cfg = configs.base.get_config().data
    cfg.dataset = 'digits'
    cfg.image_size = 16
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def train(cfg, n, **kwargs):
    kwargs = {'global_batch_size': 64, 'seed': 0, **kwargs}
    return take(data.train_batches(cfg, **kwargs), n)


def test_digits_info_matches_sklearn():
    info = data.get_info(digits_config())
    assert info.num_classes == 10
    assert info.num_train_examples + info.num_eval_examples == len(load_digits().target) == 1797
    assert info.num_eval_examples == 360
    assert info.image_shape == (16, 16, 3)


def test_digits_train_epoch_is_the_first_1437_images():
    cfg = digits_config()
    (batch,) = train(cfg, 1, global_batch_size=1437)
    expected = load_digits().target[:1437]
    np.testing.assert_array_equal(np.sort(batch['label']), np.sort(expected))


def test_digits_are_uint8_and_the_device_normalisation_standardises_them():
    cfg = digits_config()
    (batch,) = train(cfg, 1, global_batch_size=1437)
    assert batch['image'].shape == (1437, 16, 16, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32
    # The default normalisation is the train split's statistics: standard over it, up to the
    # rounding to uint8 levels.
    normalised = np.asarray(device_augment.normalize(
        batch['image'], device_augment.AugmentConfig.normalization_only(cfg)))
    assert abs(normalised.mean()) < 2e-3 and abs(normalised.std() - 1) < 2e-3
    # Grayscale replicated: the three channels are equal.
    np.testing.assert_array_equal(batch['image'][..., 0], batch['image'][..., 2])
    test = [b for b in data.eval_batches(cfg, global_batch_size=100)]
    assert all(b['image'].dtype == np.uint8 for b in test)


def test_digits_ink_levels_map_to_uint8_faithfully():
    # At 8 px there is no resampling: ink v in 0..16 becomes round(v * 255 / 16), 16 -> 255.
    batch = next(data.eval_batches(digits_config(image_size=8), global_batch_size=360))
    ink = load_digits().images[1437:]
    np.testing.assert_array_equal(batch['image'][..., 0], np.round(ink * 255 / 16))
    levels = np.unique(batch['image'])
    assert levels[0] == 0 and levels[-1] == 255 and len(levels) == len(np.unique(ink))


def test_digits_upsampling_matches_pil_bilinear():
    cfg = digits_config(image_size=32)
    batch = next(data.eval_batches(cfg, global_batch_size=8))
    originals = load_digits().images[1437:1445] / 16
    for ours, original in zip(batch['image'][..., 0], originals, strict=True):
        pil = Image.fromarray(original.astype(np.float32), mode='F').resize(
            (32, 32), Image.Resampling.BILINEAR)
        np.testing.assert_allclose(ours / 255, np.asarray(pil), atol=0.5 / 255 + 1e-5)


def test_same_seed_same_order_and_other_seed_differs():
    cfg = digits_config()
    first, again, other = train(cfg, 3), train(cfg, 3), train(cfg, 3, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
    assert not np.array_equal(first[0]['label'], other[0]['label'])


@pytest.mark.parametrize('start_step', [1, 22, 45])  # 22 steps per epoch: inside and across
def test_resumed_iterator_continues_where_it_stopped(start_step):
    cfg = digits_config(train_crop='pad')  # random shifts too must be reproduced
    full = train(cfg, start_step + 3)
    resumed = train(cfg, 3, start_step=start_step)
    for a, b in zip(full[start_step:], resumed, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def test_epochs_are_permutations_and_differ():
    cfg = digits_config(image_size=8)
    per_epoch = 1437 // 100
    batches = train(cfg, 2 * per_epoch, global_batch_size=100)
    epochs = [np.concatenate([b['image'] for b in batches[e * per_epoch:(e + 1) * per_epoch]])
              for e in range(2)]
    # No image repeats inside an epoch (the digits set has a few duplicate images: allow them).
    distinct = len(np.unique(epochs[0].reshape(len(epochs[0]), -1), axis=0))
    assert distinct >= len(epochs[0]) - 5
    assert not np.array_equal(epochs[0][:100], epochs[1][:100])


@pytest.mark.parametrize('process_count', [2, 3])
def test_process_slices_are_disjoint_and_form_the_global_batch(process_count):
    cfg = digits_config()
    whole = train(cfg, 2, global_batch_size=60)
    shares = [train(cfg, 2, global_batch_size=60, process_index=p, process_count=process_count)
              for p in range(process_count)]
    for step in range(2):
        parts = [s[step] for s in shares]
        assert all(len(p['label']) == 60 // process_count for p in parts)
        np.testing.assert_array_equal(
            np.concatenate([p['image'] for p in parts]), whole[step]['image'])


def _rows(images):
    return sorted(map(bytes, images.reshape(len(images), -1)))


@pytest.mark.parametrize('process_count', [1, 2, 3])
def test_eval_mask_counts_each_example_once(process_count):
    cfg = digits_config(image_size=8)
    global_batch = 42 * process_count  # 360 is no multiple of it
    per_process = [list(data.eval_batches(cfg, global_batch_size=global_batch,
                                          process_index=p, process_count=process_count))
                   for p in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1  # same count everywhere
    masked = [b for batches in per_process for b in batches]
    assert all(b['mask'].dtype == bool for b in masked)
    assert sum(int(b['mask'].sum()) for b in masked) == 360
    images = np.concatenate([b['image'][b['mask']][..., 0] for b in masked])
    expected = np.round(load_digits().images[1437:] * 255 / 16).astype(np.uint8)
    # bilinear 8 -> 8 is the identity, so the masked images are exactly the test split.
    assert _rows(images) == _rows(expected)


def test_pad_crop_shifts_digits_without_flipping():
    cfg = digits_config(image_size=8, train_crop='pad', crop_padding=2)
    plain = digits_config(image_size=8)
    shifted, = train(cfg, 1, global_batch_size=32)
    original, = train(plain, 1, global_batch_size=32)
    np.testing.assert_array_equal(shifted['label'], original['label'])
    for moved, image in zip(shifted['image'][..., 0], original['image'][..., 0], strict=True):
        padded = np.pad(image, 2)
        assert any(np.array_equal(moved, padded[y:y + 8, x:x + 8])
                   for y in range(5) for x in range(5))


def test_mixing_leaves_host_batches_alone():
    # Mixup/CutMix run on the device: the host still sends uint8 images and int32 labels.
    mixed, = train(digits_config(mixup_alpha=0.4, cutmix_alpha=1.0), 1)
    plain, = train(digits_config(), 1)
    assert mixed['label'].dtype == np.int32
    np.testing.assert_array_equal(mixed['image'], plain['image'])


def test_synthetic_shapes_and_sizes():
    cfg = configs.base.get_config().data
    cfg.update(dataset='synthetic', image_size=24, synthetic_num_classes=7,
               synthetic_num_train_examples=100, synthetic_num_eval_examples=10)
    info = data.get_info(cfg)
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (7, 100, 10)
    batch, = train(cfg, 1, global_batch_size=8, process_index=1, process_count=2)
    assert batch['image'].shape == (4, 24, 24, 3) and batch['image'].dtype == np.uint8
    assert batch['label'].dtype == np.int32 and batch['label'].max() < 7
    evals = list(data.eval_batches(cfg, global_batch_size=8))
    assert sum(int(b['mask'].sum()) for b in evals) == 10


@pytest.mark.parametrize('overrides, needle', [
    ({'train_crop': 'random'}, 'data.train_crop'),
    ({'train_crop': 'inception'}, 'digits'),
    ({'eval_split': 'validation'}, "'validation'"),
    ({'mean_rgb': (0.5,)}, 'data.mean_rgb'),
    ({'dataset': ''}, 'data.dataset'),
])
def test_bad_config_fails_early_in_one_line(overrides, needle):
    with pytest.raises(ValueError, match=needle) as error:
        data.get_info(digits_config(**overrides))
    assert '\n' not in str(error.value)


def test_global_batch_must_split_over_processes():
    with pytest.raises(ValueError, match='multiple of process_count=3'):
        data.train_batches(digits_config(), global_batch_size=64, seed=0, process_count=3)


def test_numpy_sources_do_not_import_tensorflow():
    code = (
        'import sys, configs.base\n'
        'from resnet_flax import data\n'
        'cfg = configs.base.get_config().data\n'
        'cfg.image_size = 8\n'
        'for name in ("digits", "synthetic"):\n'
        '    cfg.dataset = name\n'
        '    data.get_info(cfg)\n'
        '    next(data.train_batches(cfg, global_batch_size=4, seed=0))\n'
        '    next(data.eval_batches(cfg, global_batch_size=4))\n'
        'assert "tensorflow" not in sys.modules, "tensorflow was imported"\n'
    )
    subprocess.run([sys.executable, '-c', code], check=True)
