"""The TensorFlow recipes and augmentations against independent references (PIL, geometry)."""

import numpy as np
import pytest
from PIL import Image, ImageEnhance, ImageOps

import configs.base

tf = pytest.importorskip('tensorflow')

from resnet_flax.data import augment, preprocess  # noqa: E402  (imports TensorFlow)

GREY = (128, 128, 128)
BILINEAR = Image.Resampling.BILINEAR


@pytest.fixture(scope='module')
def smooth_image():
    """A smooth random RGB image (so resampling differences stay small), 48 x 64."""
    small = np.random.default_rng(0).random((6, 8, 3)) * 255
    return np.asarray(Image.fromarray(small.astype(np.uint8)).resize((64, 48),
                                                                       Image.Resampling.BICUBIC))


def difference(ours, reference):
    ours, reference = np.asarray(ours, np.int32), np.asarray(reference, np.int32)
    assert ours.shape == reference.shape
    return np.abs(ours - reference)


@pytest.mark.parametrize('op, level, reference', [
    (augment._equalize, 0.0, ImageOps.equalize),
    (augment._autocontrast, 0.0, ImageOps.autocontrast),
    (augment._solarize, 0.5, lambda im: ImageOps.solarize(im, 128)),
    (augment._posterize, 0.5, lambda im: ImageOps.posterize(im, 6)),
])
def test_histogram_ops_match_pil_exactly(smooth_image, op, level, reference):
    ours = op(tf.constant(smooth_image), tf.constant(level))
    assert difference(ours, reference(Image.fromarray(smooth_image))).max() == 0


@pytest.mark.parametrize('op, level, enhancer, border_tolerance', [
    (augment._color, 0.5, ImageEnhance.Color, 1),
    (augment._contrast, 0.5, ImageEnhance.Contrast, 1),
    (augment._brightness, -0.5, ImageEnhance.Brightness, 1),
    (augment._sharpness, 0.5, ImageEnhance.Sharpness, 255),  # PIL leaves the border alone
])
def test_enhance_ops_match_pil(smooth_image, op, level, enhancer, border_tolerance):
    ours = op(tf.constant(smooth_image), tf.constant(level))
    reference = enhancer(Image.fromarray(smooth_image)).enhance(1 + 0.9 * level)
    diff = difference(ours, reference)
    assert diff[1:-1, 1:-1].max() <= 1 and diff.max() <= border_tolerance


@pytest.mark.parametrize('op, pil_transform', [
    (augment._rotate, lambda im: im.rotate(30, resample=BILINEAR, fillcolor=GREY)),
    (augment._shear_x, lambda im: im.transform(im.size, Image.Transform.AFFINE,
                                               (1, 0.3, 0, 0, 1, 0), BILINEAR, fillcolor=GREY)),
    (augment._translate_x, lambda im: im.transform(im.size, Image.Transform.AFFINE,
                                                   (1, 0, -0.45 * 64, 0, 1, 0), BILINEAR,
                                                   fillcolor=GREY)),
])
def test_geometric_ops_at_full_magnitude_match_pil(smooth_image, op, pil_transform):
    ours = op(tf.constant(smooth_image), tf.constant(1.0))
    diff = difference(ours, pil_transform(Image.fromarray(smooth_image)))
    assert diff.mean() < 2.5  # edge pixels interpolate against the fill differently


@pytest.mark.parametrize('name', [pytest.param('randaugment', marks=pytest.mark.slow),
                                  'trivialaugment'])
def test_auto_augment_keeps_shape_and_dtype_and_is_seeded(smooth_image, name):
    cfg = configs.base.get_config().data
    cfg.auto_augment = name
    fn = tf.function(lambda image, seed: augment.apply(image, seed, cfg))
    image = tf.constant(smooth_image)
    outputs = [fn(image, tf.constant([7, i], tf.int64)).numpy() for i in range(40)]
    assert all(o.shape == smooth_image.shape and o.dtype == np.uint8 for o in outputs)
    np.testing.assert_array_equal(outputs[3], fn(image, tf.constant([7, 3], tf.int64)).numpy())
    assert len({o.tobytes() for o in outputs}) > 20  # the draws differ between examples


def test_inception_windows_cover_the_configured_area_and_aspect():
    shape = tf.constant([375, 500])
    windows = np.stack([preprocess.inception_window(
        shape, tf.constant([1, i], tf.int64), (0.08, 1.0), (3 / 4, 4 / 3)).numpy()
        for i in range(300)])
    top, left, height, width = windows.T
    assert (top >= 0).all() and (left >= 0).all()
    assert (top + height <= 375).all() and (left + width <= 500).all()
    area = height * width / (375 * 500)
    aspect = width / height
    sampled = area < 1  # the whole image is the fallback after 10 failed draws
    assert sampled.mean() > 0.9
    assert (area[sampled] >= 0.08 - 0.01).all()
    assert (aspect[sampled] > 3 / 4 - 0.05).all() and (aspect[sampled] < 4 / 3 + 0.05).all()
    assert area[sampled].min() < 0.15 and area[sampled].max() > 0.85  # spans the range


def test_center_window_is_resize_256_then_centre_crop_224():
    """Resizing the short side to 256 and cropping 224 keeps the central 224/256 square."""
    top, left, height, width = preprocess.center_window(tf.constant([375, 500]), 0.875).numpy()
    side = int(375 * 0.875)
    assert (height, width) == (side, side)
    # The crop is centred: equal margins up to one pixel.
    assert abs(top - (375 - top - height)) <= 1 and abs(left - (500 - left - width)) <= 1


def test_pad_crop_is_a_shift_of_the_zero_padded_image(smooth_image):
    image = tf.constant(smooth_image[:32, :32])
    padded = np.pad(smooth_image[:32, :32], ((4, 4), (4, 4), (0, 0)))
    offsets = set()
    for i in range(30):
        out = preprocess.pad_crop(image, tf.constant([3, i], tf.int64), 4).numpy()
        found = [(y, x) for y in range(9) for x in range(9)
                 if np.array_equal(out, padded[y:y + 32, x:x + 32])]
        assert found
        offsets.add(found[0])
    assert len(offsets) > 10
