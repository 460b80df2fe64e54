"""The TFDS source on real builders: imagenet2012 prepared from tiny ILSVRC2012 archives, and
CIFAR-10 under tfds.testing.mock_data."""

import io
import itertools

import numpy as np
import pytest

import configs.base
from resnet_flax import data, device_augment
from resnet_flax.data import info as info_lib
from tests.imagenet_fixture import make_imagenet

tfds = pytest.importorskip('tensorflow_datasets')

NUM_CLASSES, TRAIN_PER_CLASS, VAL_PER_CLASS = 3, 4, 2
NUM_TRAIN, NUM_VAL = NUM_CLASSES * TRAIN_PER_CLASS, NUM_CLASSES * VAL_PER_CLASS


@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
    return make_imagenet(tmp_path_factory.mktemp('imagenet'), num_classes=NUM_CLASSES,
                         train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS,
                         image_size=(40, 48))


def imagenet_config(data_dir, **overrides):
    cfg = configs.base.get_config().data
    cfg.update(dataset='imagenet2012', data_dir=data_dir, eval_split='validation',
               image_size=24, shuffle_buffer_size=64, threadpool_size=2)
    cfg.update(overrides)
    return cfg


def take(iterator, n):
    return list(itertools.islice(iterator, n))


def train(cfg, n, **kwargs):
    return take(data.train_batches(cfg, **{'global_batch_size': 4, 'seed': 0, **kwargs}), n)


def fingerprints(images):
    """One hashable key per image, for set comparisons."""
    return [bytes(image) for image in images]


def test_imagenet_info_from_the_real_builder(imagenet_dir):
    info = data.get_info(imagenet_config(imagenet_dir))
    assert (info.num_train_examples, info.num_eval_examples) == (NUM_TRAIN, NUM_VAL)
    assert info.num_classes == 1000 and len(info.label_names) == 1000
    assert info.label_names[0] == 'n01440764'  # the first ImageNet synset
    assert info.image_shape == (24, 24, 3)


def test_imagenet_train_batches_shapes_dtypes_and_labels(imagenet_dir):
    cfg = imagenet_config(imagenet_dir)
    batches = train(cfg, 3)  # one epoch: 12 // 4 steps
    builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
    expected = sorted(int(ex['label']) for ex in tfds.as_numpy(builder.as_dataset('train')))
    assert sorted(np.concatenate([b['label'] for b in batches]).tolist()) == expected
    for batch in batches:
        assert batch['image'].shape == (4, 24, 24, 3) and batch['image'].dtype == np.uint8
        assert batch['label'].shape == (4,) and batch['label'].dtype == np.int32


def test_imagenet_eval_is_the_centre_crop_of_each_validation_image(imagenet_dir):
    """Compared with PIL: decode, centre square of 0.875 of the short side, resize."""
    from PIL import Image

    cfg = imagenet_config(imagenet_dir)
    batches = list(data.eval_batches(cfg, global_batch_size=4))
    assert all(b['image'].dtype == np.uint8 for b in batches)
    ours = np.concatenate([b['image'][b['mask']] for b in batches]).astype(np.float32)
    builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
    examples = builder.as_dataset('validation', decoders={'image': tfds.decode.SkipDecoding()})
    for image, example in zip(ours, tfds.as_numpy(examples), strict=True):
        with Image.open(io.BytesIO(example['image'])) as pil:
            side = int(0.875 * min(pil.size))
            left, top = (pil.width - side + 1) // 2, (pil.height - side + 1) // 2
            reference = pil.crop((left, top, left + side, top + side)).resize(
                (24, 24), Image.Resampling.BILINEAR)
        # Different JPEG decoders (libjpeg-turbo fast DCT vs PIL) and resamplers: close, not equal.
        assert np.abs(image - np.asarray(reference, np.float32)).mean() < 4


def test_imagenet_eval_transform_is_the_old_host_one_up_to_uint8_rounding(imagenet_dir):
    """The old pipeline normalised the float resize on the host; now the resize is rounded to
    uint8 (as PIL and torchvision do) and normalised with ImageNet statistics on the device."""
    from resnet_flax.data import preprocess

    cfg = imagenet_config(imagenet_dir)
    batch = next(data.eval_batches(cfg, global_batch_size=6))
    device = np.asarray(device_augment.normalize(
        batch['image'], device_augment.AugmentConfig.normalization_only(cfg)))
    builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
    examples = builder.as_dataset('validation', decoders={'image': tfds.decode.SkipDecoding()})
    mean, std = np.array(info_lib.IMAGENET_MEAN), np.array(info_lib.IMAGENET_STD)
    for ours, example in zip(device, tfds.as_numpy(examples), strict=True):
        old_float = preprocess.center_crop(
            example['image'], 24, crop_fraction=0.875, method='bilinear', antialias=False)
        old = (old_float.numpy() / 255 - mean) / std  # the old host normalisation
        assert np.abs(ours - old).max() <= 0.5 / 255 / std.min() + 1e-5


def test_same_seed_same_order_other_seed_differs(imagenet_dir):
    cfg = imagenet_config(imagenet_dir)
    first, again, other = train(cfg, 2), train(cfg, 2), train(cfg, 2, seed=1)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])
    assert not np.array_equal(first[0]['image'], other[0]['image'])


# Inside the first epoch, and inside the second; the random draws must be reproduced too.
@pytest.mark.parametrize('start_step, augment', [
    (2, {'mixup_alpha': 0.2, 'cutmix_alpha': 1.0}),
    pytest.param(4, {'auto_augment': 'trivialaugment'}, marks=pytest.mark.slow)])
def test_resumed_iterator_continues_where_it_stopped(imagenet_dir, start_step, augment):
    cfg = imagenet_config(imagenet_dir, **augment)
    full = train(cfg, start_step + 2)
    resumed = train(cfg, 2, start_step=start_step)
    for a, b in zip(full[start_step:], resumed, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])
        np.testing.assert_array_equal(a['label'], b['label'])


def test_cached_split_gives_the_same_batches(imagenet_dir):
    """The split has one shard, so shard shuffling is the identity: caching changes nothing."""
    plain = train(imagenet_config(imagenet_dir), 5)
    cached = train(imagenet_config(imagenet_dir, cache=True), 5)  # crosses an epoch boundary
    for a, b in zip(plain, cached, strict=True):
        np.testing.assert_array_equal(a['image'], b['image'])


def test_epochs_differ_in_order(imagenet_dir):
    cfg = imagenet_config(imagenet_dir, train_crop='none', random_flip=False)
    batches = train(cfg, 6)
    epoch0, epoch1 = (fingerprints(np.concatenate([b['image'] for b in batches[i:i + 3]]))
                      for i in (0, 3))
    assert sorted(epoch0) == sorted(epoch1) and epoch0 != epoch1


@pytest.mark.parametrize('process_count', [2, 3])
def test_train_shares_are_disjoint_and_cover_the_split(imagenet_dir, process_count):
    """Deterministic recipe, so every image can be recognised by its pixels."""
    cfg = imagenet_config(imagenet_dir, train_crop='none', random_flip=False,
                          eval_crop='resize')
    everything = fingerprints(np.concatenate(
        [b['image'] for b in data.eval_batches(cfg, global_batch_size=4, split='train')]))
    global_batch = 2 * process_count if process_count == 2 else process_count
    steps = NUM_TRAIN // global_batch
    seen = []
    for p in range(process_count):
        batches = train(cfg, steps, global_batch_size=global_batch, process_index=p,
                        process_count=process_count)
        seen.extend(fingerprints(np.concatenate([b['image'] for b in batches])))
    assert sorted(seen) == sorted(everything)  # disjoint (no repeats) and covering


@pytest.mark.parametrize('process_count, global_batch', [(1, 4), (2, 4), (3, 3), (3, 6)])
def test_eval_counts_each_example_once_across_processes(imagenet_dir, process_count,
                                                        global_batch):
    cfg = imagenet_config(imagenet_dir)
    single = np.concatenate([b['image'] for b in data.eval_batches(cfg, global_batch_size=6)])
    per_process = [list(data.eval_batches(cfg, global_batch_size=global_batch, process_index=p,
                                          process_count=process_count))
                   for p in range(process_count)]
    assert len({len(batches) for batches in per_process}) == 1
    batches = [b for process in per_process for b in process]
    assert all(b['image'].shape[0] == global_batch // process_count for b in batches)
    assert sum(int(b['mask'].sum()) for b in batches) == NUM_VAL
    masked = np.concatenate([b['image'][b['mask']] for b in batches])
    assert sorted(fingerprints(masked)) == sorted(fingerprints(single))
    padding = np.concatenate([b['image'][~b['mask']] for b in batches])
    assert not padding.any()


def test_unprepared_imagenet_says_where_and_how_in_one_line(tmp_path):
    cfg = imagenet_config(str(tmp_path / 'empty'))
    with pytest.raises(FileNotFoundError) as error:
        data.get_info(cfg)
    message = str(error.value)
    assert '\n' not in message
    assert str(tmp_path / 'empty' / 'imagenet2012') in message  # where TFDS looked
    assert 'ILSVRC2012_img_train.tar' in message and 'ILSVRC2012_img_val.tar' in message
    assert f'tfds build imagenet2012 --data_dir={tmp_path / "empty"}' in message


def test_unprepared_downloadable_set_says_how_to_build_it(tmp_path):
    cfg = imagenet_config(str(tmp_path), dataset='cifar10')  # download stays False
    with pytest.raises(FileNotFoundError,
                       match=f'tfds build cifar10 --data_dir={tmp_path}.*data.download=True'):
        data.get_info(cfg)


def test_unknown_dataset_and_split_fail_in_one_line(imagenet_dir):
    with pytest.raises(ValueError, match="'no_such_set' is neither") as error:
        data.get_info(imagenet_config(imagenet_dir, dataset='no_such_set'))
    assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match="no split 'test'.*'validation'"):
        data.get_info(imagenet_config(imagenet_dir, eval_split='test'))


# ---- CIFAR-10 under mock_data: the real builder's features, generated examples.

def cifar_config(**overrides):
    cfg = configs.base.get_config().data
    # download=True only reaches the mocked (no-op) download_and_prepare.
    cfg.update(dataset='cifar10', data_dir='/nonexistent', download=True, image_size=32,
               shuffle_buffer_size=64, threadpool_size=2)
    cfg.update(overrides)
    return cfg


@pytest.fixture()
def mock_cifar():
    with tfds.testing.mock_data(num_examples=20):
        builder = tfds.builder('cifar10')
        raw = [ex['image'] for ex in tfds.as_numpy(builder.as_dataset(split='train'))]
        yield np.stack(raw)


def test_cifar_mock_info_counts_the_examples(mock_cifar):
    info = data.get_info(cifar_config())
    assert (info.num_classes, info.num_train_examples, info.num_eval_examples) == (10, 20, 20)


def _crop(padded, y, x, flip):
    crop = padded[y:y + 32, x:x + 32]
    return crop[:, ::-1] if flip else crop


def test_cifar_train_is_a_pad4_crop_of_an_original(mock_cifar):
    batches = train(cifar_config(), 2, global_batch_size=8)
    originals = [np.pad(image, ((4, 4), (4, 4), (0, 0))) for image in mock_cifar]
    shifts_seen = set()
    for pixels in np.concatenate([b['image'] for b in batches]):
        # Never mirrored on the host: the random flip happens on the device.
        matches = [(y, x) for padded in originals for y in range(9) for x in range(9)
                   if np.array_equal(pixels, padded[y:y + 32, x:x + 32])]
        assert matches, 'not a padded crop of any example'
        shifts_seen.add(matches[0])
    assert len(shifts_seen) > 1


def test_cifar_eval_is_the_unchanged_image_normalised_exactly_as_before(mock_cifar):
    cfg = cifar_config()
    batch = next(data.eval_batches(cfg, global_batch_size=20))
    np.testing.assert_array_equal(batch['image'], mock_cifar)  # no resize: uint8 is lossless
    assert batch['mask'].all()
    augment = device_augment.AugmentConfig.normalization_only(cfg)
    assert augment.mean_rgb == pytest.approx(info_lib.CIFAR10_MEAN)
    mean, std = np.array(info_lib.CIFAR10_MEAN), np.array(info_lib.CIFAR10_STD)
    old = ((mock_cifar / 255 - mean) / std).astype(np.float32)  # the old host normalisation
    new = np.asarray(device_augment.normalize(batch['image'], augment))
    assert np.abs(new - old).max() < 1e-5


def test_an_epoch_with_fewer_batches_than_expected_ends_cleanly():
    from resnet_flax.data import tf_pipeline

    tf = pytest.importorskip('tensorflow')

    def make_epoch(epoch, skip):
        # Epoch 1 lost records: 2 batches instead of the expected 4.
        size = 2 if epoch == 1 else 4
        ds = tf.data.Dataset.range(size).map(lambda i: {'epoch': tf.fill([2], epoch), 'i': i + 0})
        return ds.skip(skip)

    batches = tf_pipeline.chain_epochs(make_epoch, first_epoch=0, first_offset=0,
                                       steps_per_epoch=4, lookahead=1)
    seen = [(int(b['epoch'][0]), int(b['i'])) for b in itertools.islice(batches, 10)]
    assert seen == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1),
                    (2, 0), (2, 1), (2, 2), (2, 3)]


@pytest.mark.slow
def test_tfrecords_need_array_record_for_grain_and_prepare_converts_them(imagenet_dir, tmp_path):
    import json

    from resnet_flax.data import prepare

    with pytest.raises(FileNotFoundError, match='--file_format=array_record'):
        data.get_info(imagenet_config(imagenet_dir, loader='grain'))
    cfg_json = json.dumps({'dataset': 'imagenet2012', 'data_dir': imagenet_dir,
                           'train_split': 'train', 'eval_split': 'validation',
                           'holdout_fraction': 0.0})
    info = prepare.prepare(cfg_json, ['train', 'validation'], str(tmp_path), max_side=256,
                           quality=90, examples_per_shard=5, workers=1)
    assert {k: v.num_examples for k, v in info.splits.items()} == {
        'train': NUM_TRAIN, 'validation': NUM_VAL}
    stored = imagenet_config(str(tmp_path), dataset='prepared', loader='grain')
    labels = [b['label'][b['mask']] for b in data.eval_batches(stored, global_batch_size=4)]
    builder = tfds.builder('imagenet2012', data_dir=imagenet_dir)
    expected = [int(ex['label']) for ex in tfds.as_numpy(builder.as_dataset('validation'))]
    assert np.concatenate(labels).tolist() == expected


def test_config_checks_infer_classes_and_the_only_eval_split_from_the_builder(imagenet_dir):
    from resnet_flax import config_checks

    config = configs.base.get_config()  # eval_split='test'
    config.data.update(dataset='imagenet2012', data_dir=imagenet_dir, image_size=24)
    config.update(batch_size=4, num_train_steps=2)
    config.model.num_classes = 10
    config.optimizer.warmup_epochs = 0.0
    adapted, info, notes = config_checks.resolve(config)
    # The builder's ClassLabel has all 1000 classes (the fixture's images use a few).
    assert (adapted.model.num_classes, adapted.data.eval_split) == (1000, 'validation')
    assert info.num_eval_examples == NUM_VAL
    assert len(notes) == 3 and "evaluating on 'validation'" in notes[0]
    assert 'has 1000 classes: using 1000' in notes[1]
    # imagenet2012 declares no image size: the ImageNet recipe, said in the third line.
    assert notes[2].startswith("data recipe: train_crop='inception', eval_crop='center': the "
                               'ImageNet recipe for image size not declared')
    assert (config.model.num_classes, config.data.eval_split) == (10, 'test')  # a copy
