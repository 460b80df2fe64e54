"""One rule picks the default train and eval crops from the images' size, for TFDS sets, image
folders and prepared stores alike: CIFAR's (pad-and-crop, whole-image eval) up to 64 px,
ImageNet's (Inception crop, centre-crop eval) above; explicit settings win; a run says which
in one line. Real PNG and JPEG folders, read by both loaders."""

import importlib.util
import json

import numpy as np
import pytest
from PIL import Image

import configs.base
from resnet_flax import config_checks, data
from resnet_flax.data import grain_source, image_folder, prepare
from resnet_flax.data import info as info_lib

pytest.importorskip('grain')

CLASSES, PER_CLASS = 2, 6


def write_folder(root, side, suffix):
    """Class folders of side x side images (a digit-like stroke on noise), as a user who
    exported MNIST or CIFAR to files would have them."""
    rng = np.random.default_rng(side)
    for c in range(CLASSES):
        (root / f'class{c}').mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = (rng.random((side, side, 3)) * 60).astype(np.uint8)
            pixels[side // 4:3 * side // 4, side // 3 + c * side // 3 - 1] = 250
            Image.fromarray(pixels).save(root / f'class{c}' / f'{i}.{suffix}')
    return root


@pytest.fixture(scope='module')
def small_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('png28'), 28, 'png')


@pytest.fixture(scope='module')
def large_folder(tmp_path_factory):
    return write_folder(tmp_path_factory.mktemp('jpeg160'), 160, 'jpg')


def folder_config(root, loader='grain', **overrides):
    cfg = configs.base.get_config().data
    cfg.update(dataset='image_folder', data_dir=str(root), loader=loader, image_size=32,
               holdout_fraction=0.25, eval_split='validation', num_workers=0,
               threadpool_size=2)
    cfg.update(overrides)
    return cfg


def both_loaders(cfg) -> dict[str, tuple[str, str]]:
    """(train crop, eval crop) as each loader resolves them for `cfg` (an image folder is
    read by tf.data too where TensorFlow is installed; a prepared store by grain only)."""
    found = grain_source.recipe(cfg, grain_source.find(cfg))
    crops = {'grain': (found.train_crop, found.eval_crop)}
    if cfg.dataset == 'image_folder' and importlib.util.find_spec('tensorflow'):
        crops['tf'] = image_folder._recipes(cfg)  # noqa: SLF001 - the tf.data loader's choice
    return crops


def test_a_folder_of_28px_pngs_gets_the_cifar_recipe_in_both_loaders(small_folder):
    cfg = folder_config(small_folder)
    assert data.get_info(cfg).image_side == 28
    assert set(both_loaders(cfg).values()) == {('pad', 'resize')}


def test_a_folder_of_larger_images_gets_the_imagenet_recipe(large_folder):
    cfg = folder_config(large_folder)
    assert data.get_info(cfg).image_side == 160
    assert set(both_loaders(cfg).values()) == {('inception', 'center')}


def test_explicit_crops_win_over_the_rule(small_folder):
    cfg = folder_config(small_folder, train_crop='inception', eval_crop='center')
    assert set(both_loaders(cfg).values()) == {('inception', 'center')}
    cfg = folder_config(small_folder, train_crop='none')
    assert set(both_loaders(cfg).values()) == {('none', 'resize')}


def test_small_images_are_evaluated_whole_and_trained_with_padded_shifts(small_folder):
    """What the CIFAR recipe does to the pixels: eval is the whole image resized (nothing
    cut off), and train crops shift in black borders."""
    cfg = folder_config(small_folder, decoder='pil', random_flip=False)
    batch = next(data.eval_batches(cfg, global_batch_size=3))
    path = grain_source.records(cfg, 'validation').paths[0]
    with Image.open(path) as image:
        whole = np.asarray(image.convert('RGB').resize((32, 32), Image.Resampling.BILINEAR))
    np.testing.assert_array_equal(batch['image'][0], whole)
    train = next(data.train_batches(cfg, global_batch_size=6, seed=0))['image']
    black_rows = (train.max(axis=(2, 3)) == 0).sum(axis=1)
    black_cols = (train.max(axis=(1, 3)) == 0).sum(axis=1)
    assert (black_rows + black_cols > 0).mean() > 0.5 and max(black_rows.max(),
                                                              black_cols.max()) <= 8


def test_a_prepared_store_follows_its_stored_images(small_folder, large_folder, tmp_path):
    """The rule reads the stored images' size (recorded by prepare): 28 px PNGs stay 28 px;
    160 px photos stored at --max_side=96 are 96 px images to the loader."""
    for folder, max_side, expected in ((small_folder, 256, ('pad', 'resize')),
                                       (large_folder, 96, ('inception', 'center'))):
        cfg_json = json.dumps({'dataset': 'image_folder', 'data_dir': str(folder),
                               'train_split': 'train', 'eval_split': 'validation',
                               'holdout_fraction': 0.25})
        out = tmp_path / folder.name
        info = prepare.prepare(cfg_json, ['train', 'validation'], str(out), max_side=max_side,
                               quality=90, examples_per_shard=16, workers=1)
        assert info.image_side == min(max_side, 28 if folder == small_folder else 160)
        cfg = folder_config(out, dataset='prepared')
        assert both_loaders(cfg)['grain'] == expected


@pytest.mark.parametrize('side, recipe', [(28, 'CIFAR'), (64, 'CIFAR'), (65, 'ImageNet'),
                                          (None, 'ImageNet')])
def test_one_rule_by_size_for_every_source(side, recipe):
    """TFDS sets give their declared shape (None: variable size, e.g. imagenet2012)."""
    cfg = configs.base.get_config().data
    crops = info_lib.crops(cfg, side)
    assert crops == {'CIFAR': ('pad', 'resize'), 'ImageNet': ('inception', 'center')}[recipe]
    line = info_lib.describe_crops(cfg, side)
    assert f'the {recipe} recipe' in line and '\n' not in line


def test_a_run_says_which_recipe_in_one_line(small_folder):
    config = configs.base.get_config()
    config.data = folder_config(small_folder)
    config.batch_size, config.num_train_steps = 4, 20
    config.optimizer.warmup_epochs = 0.0
    _, _, notes = config_checks.resolve(config)
    said = [note for note in notes if note.startswith('data recipe:')]
    assert said == ["data recipe: train_crop='pad', eval_crop='resize': the CIFAR recipe for "
                    "images about 28 px (up to 64 px: CIFAR's); set --config.data.train_crop "
                    "/ --config.data.eval_crop to choose"]


def test_predicting_without_the_folder_applies_the_rule_to_the_image(small_folder, tmp_path):
    """Predict reads config.json where the training folder may be absent: a 28 px image is
    then evaluated whole (CIFAR's eval), as it would have been with the folder there."""
    pytest.importorskip('tensorflow')
    from resnet_flax.data import single_image

    path = next((small_folder / 'class0').iterdir())
    here = single_image.load_eval_image(str(path), folder_config(small_folder))
    elsewhere = single_image.load_eval_image(str(path), folder_config(tmp_path / 'gone'))
    np.testing.assert_array_equal(here, elsewhere)
    with Image.open(path) as image:
        whole = np.asarray(image.convert('RGB').resize((32, 32), Image.Resampling.BILINEAR),
                           float)
    assert np.abs(here - whole).mean() < 2  # tf.image.resize's bilinear against PIL's
