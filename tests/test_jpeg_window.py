"""The JPEG window decoder (resnet_flax/data/jpeg_window.c), compiled here as users get it:
its pixels against TensorFlow's decode_and_crop_jpeg and simplejpeg's scaled decode, its
refusals, the train crops it feeds, and the one-line errors where it cannot be built."""

import io
import random
import subprocess

import numpy as np
import pytest
from PIL import Image

from resnet_flax.data import jpeg_window, pil_preprocess
from tests.tiny import grain_recipe

SIZE = (203, 157)  # not a multiple of any iMCU, so every window meets a partial block


def encoded_jpeg(mode='RGB', seed=0, size=SIZE, **save):
    """A smooth colour field plus grain (photo-like DCT content), encoded by PIL."""
    rng = np.random.default_rng(seed)
    width, height = size
    coarse = Image.fromarray((rng.random((6, 8, 3)) * 255).astype(np.uint8))
    field = np.asarray(coarse.resize(size, Image.Resampling.BICUBIC), float)
    pixels = np.clip(field + rng.normal(0, 6, (height, width, 3)), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(out, format='JPEG', quality=90, **save)
    return out.getvalue()


def random_windows(width, height, count, seed=0):
    rng = random.Random(seed)
    windows = [(0, 0, width, height), (width - 1, height - 1, 1, 1), (0, height - 9, width, 9)]
    for _ in range(count):
        w, h = rng.randint(1, width), rng.randint(1, height)
        windows.append((rng.randint(0, width - w), rng.randint(0, height - h), w, h))
    return windows


@pytest.fixture(scope='module')
def built():
    if not jpeg_window.available():
        pytest.skip('the JPEG window decoder cannot be built here (no cc or jpeglib.h)')


JPEGS = {
    '4:2:0': dict(),
    '4:4:4': dict(subsampling=0),
    '4:2:2': dict(subsampling=1),
    'grayscale': dict(mode='L'),
    'progressive': dict(progressive=True),
}


@pytest.mark.parametrize('kind', sorted(JPEGS))
@pytest.mark.usefixtures('built')
def test_windows_are_tf_decode_and_crop_jpeg_bit_for_bit(kind):
    """tf.data's train decode (decode_and_crop_jpeg, INTEGER_FAST) is the reference: the
    same libjpeg calls, written independently in C++ inside TensorFlow."""
    tf = pytest.importorskip('tensorflow')
    encoded = encoded_jpeg(**JPEGS[kind])
    for left, top, width, height in random_windows(*SIZE, count=12):
        ours = jpeg_window.decode(encoded, (left, top, width, height))
        reference = tf.io.decode_and_crop_jpeg(encoded, [top, left, height, width], channels=3,
                                               dct_method='INTEGER_FAST').numpy()
        assert ours.shape == (height, width, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, reference)


@pytest.mark.parametrize('factor', [2, 4, 8])
@pytest.mark.usefixtures('built')
def test_scaled_windows_are_windows_of_simplejpegs_scaled_decode(factor):
    simplejpeg = pytest.importorskip('simplejpeg')
    encoded = encoded_jpeg(seed=factor)
    whole = simplejpeg.decode_jpeg(encoded, colorspace='RGB', fastdct=True,
                                   min_width=-(-SIZE[0] // factor),
                                   min_height=-(-SIZE[1] // factor))
    height, width = whole.shape[:2]
    assert (width, height) == (-(-SIZE[0] // factor), -(-SIZE[1] // factor))
    for left, top, w, h in random_windows(width, height, count=8, seed=factor):
        ours = jpeg_window.decode(encoded, (left, top, w, h), factor)
        np.testing.assert_array_equal(ours, whole[top:top + h, left:left + w])


@pytest.mark.usefixtures('built')
def test_refused_files_and_windows_return_none_and_the_process_goes_on():
    """libjpeg's errors and warnings come back as None (the loader then decodes the whole
    image as before): CMYK, a file cut before the window's rows, bytes that are no JPEG, a
    window outside the image."""
    encoded = encoded_jpeg()
    cut = encoded[:len(encoded) // 3]
    assert jpeg_window.decode(encoded_jpeg(mode='CMYK'), (0, 0, 8, 8)) is None
    assert jpeg_window.decode(cut, (0, SIZE[1] - 8, 8, 8)) is None
    assert jpeg_window.decode(b'\xff\xd8\xff' + bytes(200), (0, 0, 1, 1)) is None
    assert jpeg_window.decode(encoded, (SIZE[0] - 4, 0, 8, 8)) is None
    assert jpeg_window.decode(encoded, (0, 0, 8, 8)).shape == (8, 8, 3)


@pytest.mark.usefixtures('built')
def test_train_example_falls_back_to_the_whole_decode_for_cmyk():
    recipe = grain_recipe(window_decode=True)
    cmyk = encoded_jpeg(mode='CMYK', size=(96, 80))
    image = pil_preprocess.train_example(cmyk, random.Random(0), recipe)
    expected = pil_preprocess.train_example(cmyk, random.Random(0),
                                            grain_recipe(window_decode=False))
    np.testing.assert_array_equal(image, expected)


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty cache and the per-process memo cleared (and cleared again after)."""
    monkeypatch.setenv('RESNET_FLAX_CACHE', str(tmp_path / 'cache'))
    jpeg_window.library.cache_clear()
    jpeg_window.available.cache_clear()
    yield tmp_path
    jpeg_window.library.cache_clear()
    jpeg_window.available.cache_clear()


@pytest.mark.usefixtures('built')
def test_builds_into_the_cache_once(fresh_build):
    path = jpeg_window.build()
    assert path.parent == fresh_build / 'cache' and path.suffix == '.so'
    stamp = path.stat().st_mtime_ns
    assert jpeg_window.build() == path and path.stat().st_mtime_ns == stamp
    assert jpeg_window.available()


@pytest.mark.parametrize('compiler, cache, says', [
    ('/nonexistent/cc', None, 'no C compiler'),
    ('false', None, 'could not compile'),
    (None, 'a file', 'cannot write the JPEG window decoder to'),
])
def test_where_it_cannot_build_auto_decodes_whole_images_and_the_name_says_why(
        fresh_build, monkeypatch, compiler, cache, says):
    if compiler:
        monkeypatch.setenv('CC', compiler)
    if cache:  # a cache path under a plain file: no folder can be made there
        (fresh_build / 'file').write_text('not a folder')
        monkeypatch.setenv('RESNET_FLAX_CACHE', str(fresh_build / 'file' / 'cache'))
    assert not jpeg_window.available()
    assert pil_preprocess.resolve_window_decode('auto') is False
    with pytest.raises(ValueError, match=f"data.decoder='libjpeg_window': {says}") as error:
        pil_preprocess.resolve_window_decode('libjpeg_window')
    assert '\n' not in str(error.value)


def _decodes_here() -> None:
    """The decoder loaded by this process decodes a real JPEG as PIL's window says."""
    encoded = encoded_jpeg()
    window = jpeg_window.decode(encoded, (0, 0, 16, 16))
    assert window is not None and window.shape == (16, 16, 3)


@pytest.mark.usefixtures('built')
@pytest.mark.parametrize('stale', ['truncated', 'another library'])
def test_a_stale_or_foreign_library_at_the_cached_path_is_rebuilt(fresh_build, stale):
    """What a home shared with another machine leaves there: bytes that do not load, or a
    library without the decoder's function; the process rebuilds it once and goes on."""
    path = jpeg_window._library_path()  # noqa: SLF001 - the path the cache would use
    path.parent.mkdir(mode=0o700, parents=True)
    if stale == 'truncated':
        path.write_bytes(b'\x7fELF' + bytes(64))
    else:
        source = fresh_build / 'other.c'
        source.write_text('int something_else(void) { return 1; }\n')
        subprocess.run([*jpeg_window.compiler(), '-shared', '-fPIC', '-o', str(path),
                        str(source)], check=True)
    before = path.read_bytes()
    _decodes_here()
    assert path.read_bytes() != before


@pytest.mark.usefixtures('built')
def test_a_cached_file_others_can_write_is_rebuilt_before_loading(fresh_build):
    path = jpeg_window.build()
    path.write_bytes(b'replaced by someone else')
    path.chmod(0o666)
    assert jpeg_window.build() == path and path.read_bytes()[:4] == b'\x7fELF'
    assert not path.stat().st_mode & 0o022


@pytest.mark.parametrize('mode', [0o777, 0o775])
def test_a_cache_folder_others_can_write_is_refused_in_one_line(fresh_build, mode):
    folder = fresh_build / 'cache'
    folder.mkdir()
    folder.chmod(mode)
    assert not jpeg_window.available()
    assert pil_preprocess.resolve_window_decode('auto') is False
    with pytest.raises(ValueError, match='others who can write it') as error:
        pil_preprocess.resolve_window_decode('libjpeg_window')
    assert '\n' not in str(error.value) and 'RESNET_FLAX_CACHE' in str(error.value)
    assert not list(folder.iterdir())  # nothing built, nothing loaded from there


@pytest.mark.usefixtures('built')
@pytest.mark.parametrize('cc', ['env cc', 'cc -O1'])
def test_cc_with_arguments_builds_its_own_library(fresh_build, monkeypatch, cc):
    """`CC='ccache gcc'` is a launcher plus the compiler; `env` launches as ccache does."""
    plain = jpeg_window._library_path()  # noqa: SLF001
    monkeypatch.setenv('CC', cc)
    assert jpeg_window._library_path() != plain  # noqa: SLF001 - another compiler command
    assert jpeg_window.build().exists()
    _decodes_here()
