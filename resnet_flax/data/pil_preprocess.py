"""Per-example image recipes without TensorFlow: decode, crop, resize to uint8 (numpy + PIL).

The TF-free twin of preprocess.py, for the grain loader. Every recipe returns uint8
[size, size, 3]; flips, normalisation and mixing happen on the device. Random choices come
from a `random.Random` keyed by (seed, epoch, position) (grain_source.py), so they survive a
resume.

- ImageNet train: a random crop covering `area_range` of the image with aspect ratio in
  `aspect_range`, drawn as tf.image.sample_distorted_bounding_box draws it (the tf.data
  loader's sampler: 10 tries of a uniform aspect and a uniform height, then the whole
  image), resized to `size`.
- ImageNet eval: the central square covering `crop_fraction` of the short side (the window
  preprocess.center_window picks), resized to `size`.
- CIFAR: resize to `size` if needed, zero-pad `padding` pixels, random crop back.
- torchvision's eval (data.eval_preset='torchvision', for weights converted from PyTorch):
  PIL decodes the whole file, resizes the short side (bilinear) and centre-crops, as
  torchvision's Resize + CenterCrop do on PIL images.

Decoders (data.decoder), all giving RGB uint8 (grayscale replicated, alpha dropped):
- 'pil': decode the whole file, then crop and resize in one PIL call;
- 'pil_draft': JPEGs decode at a reduced scale (1/2, 1/4 or 1/8, libjpeg's DCT scaling)
  when the crop is at least that much larger than `size`: what a 500 px photo cropped to
  224 needs;
- 'simplejpeg': libjpeg-turbo through simplejpeg, with the same reduced-scale decode;
- 'libjpeg_window': train crops decode only their window (jpeg_window.py, compiled here on
  first use; the pixels of tf.data's decode_and_crop_jpeg, bit for bit), at the same
  reduced scales; everything else as 'simplejpeg' (or 'pil_draft' without it);
- 'auto': 'libjpeg_window' where it builds, else 'simplejpeg' where it is installed, else
  'pil_draft'.
Non-JPEG files and JPEGs libjpeg-turbo cannot take (CMYK) are decoded by PIL; the libjpeg-
turbo decoders use the fast integer DCT, as the tf.data decoder does (INTEGER_FAST). Eval
resizes with PIL's filter named by data.resize_method ('bilinear' by default; 'area' is PIL's
box filter, ~1.5x faster when downscaling), which smooths when downscaling (as
data.antialias=True in TF): the reduced-scale decoders differ from 'pil' by a few grey levels,
not in content.

Train crops may instead be resized by OpenCV (data.train_resizer='cv2'; 'auto' picks it where
cv2 is installed): its SIMD resize is ~5x PIL's, the largest single cost of a train example
from a prepared store (BENCHMARKS.md section 7). It resizes a view of the decoded array
straight into the batch.

Train crops follow data.antialias, as the tf.data pipeline does:
- False (the default, the flax and TF ResNet recipes): plain bilinear (or bicubic) sampling,
  tf.image.resize(antialias=False)'s; OpenCV's INTER_LINEAR, or PIL's EXTENT transform,
  which samples without a filter (but is ~1.4x slower than PIL's smoothed resize). Within a
  grey level of TF on the same box.
- True: smoothed when shrinking; PIL's filters, or OpenCV's INTER_AREA (an area average)
  when either side shrinks by more than 1.1x: within half a grey level of PIL's bilinear on
  average. ~3.5x the resize time of False with OpenCV.
Eval always resizes with PIL's filters: its numbers on a checkpoint must not move.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import math
import random

import numpy as np
from PIL import Image

from resnet_flax.data import jpeg_window

DECODERS = ('auto', 'pil', 'pil_draft', 'simplejpeg', 'libjpeg_window')
RESIZERS = ('auto', 'pil', 'cv2')
# data.resize_method (tf.image.resize's names) -> PIL's filter.
FILTERS = {'bilinear': Image.Resampling.BILINEAR, 'bicubic': Image.Resampling.BICUBIC,
           'area': Image.Resampling.BOX, 'nearest': Image.Resampling.NEAREST,
           'lanczos3': Image.Resampling.LANCZOS, 'lanczos5': Image.Resampling.LANCZOS}
# data.resize_method names OpenCV can follow (train_resizer='cv2'); the lanczos ones are PIL's.
CV2_METHODS = ('bilinear', 'bicubic', 'area', 'nearest')
SHRINK_AREA = 1.1  # train_resizer='cv2' shrinks crops larger than this x size by area average
JPEG_MAGIC = b'\xff\xd8\xff'
CHANNELS = 3
INCEPTION_ATTEMPTS = 10  # tf.data's max_attempts (preprocess.inception_window)
# What decoding a file that is not a readable image raises: PIL's errors for corrupt, cut or
# unknown files, and its decompression-bomb refusal (over Image.MAX_IMAGE_PIXELS), which is
# not an OSError. The loaders skip and count such files rather than stop.
UNREADABLE = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError)

Box = tuple[int, int, int, int]  # left, top, width, height


def resize_filter(method: str) -> Image.Resampling:
    if method not in FILTERS:
        raise ValueError(f'data.resize_method={method!r}: the grain loader resizes with PIL, '
                         f'which has {sorted(FILTERS)}.')
    return FILTERS[method]


def resolve_decoder(name: str) -> str:
    """The whole-image decoder `name` stands for here ('auto' and 'libjpeg_window': simplejpeg
    where installed, else pil_draft); a one-line error for unknown or missing ones."""
    if name not in DECODERS:
        raise ValueError(f'data.decoder={name!r} is not one of {DECODERS}.')
    has_simplejpeg = importlib.util.find_spec('simplejpeg') is not None
    if name in ('auto', 'libjpeg_window'):
        return 'simplejpeg' if has_simplejpeg else 'pil_draft'
    if name == 'simplejpeg' and not has_simplejpeg:
        raise ValueError("data.decoder='simplejpeg' but simplejpeg is not installed: "
                         "pip install simplejpeg, or use data.decoder='pil_draft'.")
    return name


def resolve_window_decode(name: str) -> bool:
    """Whether train crops decode only their window (jpeg_window.py): 'libjpeg_window' always
    (a one-line error where it can't be built), 'auto' where it can, else never."""
    if name == 'libjpeg_window':
        try:
            jpeg_window.library()
        except jpeg_window.BuildError as error:
            raise ValueError(f"data.decoder='libjpeg_window': {error} Or use "
                             "data.decoder='auto'.") from None
        return True
    return name == 'auto' and jpeg_window.available()


def resolve_resizer(name: str, method: str) -> str:
    """The train resizer 'auto' stands for: 'cv2' where OpenCV is installed and has the
    method, else 'pil'; a one-line error for unknown, missing or unable ones."""
    if name not in RESIZERS:
        raise ValueError(f'data.train_resizer={name!r} is not one of {RESIZERS}.')
    has_cv2 = importlib.util.find_spec('cv2') is not None
    if name == 'auto':
        return 'cv2' if has_cv2 and method in CV2_METHODS else 'pil'
    if name == 'cv2' and not has_cv2:
        raise ValueError("data.train_resizer='cv2' but OpenCV is not installed: pip install "
                         "opencv-python-headless, or use data.train_resizer='pil'.")
    if name == 'cv2' and method not in CV2_METHODS:
        raise ValueError(f"data.train_resizer='cv2' has no data.resize_method={method!r} (it "
                         f"has {CV2_METHODS}): use data.train_resizer='pil'.")
    return name


def is_jpeg(encoded: bytes) -> bool:
    return encoded[:3] == JPEG_MAGIC


def _open(encoded: bytes) -> Image.Image:
    return Image.open(io.BytesIO(encoded))


def image_shape(encoded: bytes, decoder: str) -> tuple[int, int]:
    """(width, height) from the header, without decoding the pixels."""
    if decoder == 'simplejpeg' and is_jpeg(encoded):
        import simplejpeg

        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(encoded)
            return width, height
        except ValueError:
            pass  # PIL reads what libjpeg-turbo's header parser refuses
    with _open(encoded) as image:
        return image.size


def _min_decoded(shape: tuple[int, int], box: Box, size: int) -> tuple[int, int]:
    """The smallest decoded (width, height) that keeps the crop at least `size` on each side."""
    width, height = shape
    return (math.ceil(width * size / max(box[2], 1)), math.ceil(height * size / max(box[3], 1)))


def _halving_factor(shape: tuple[int, int], box: Box, size: int) -> int:
    """The largest of the reductions 1, 2, 4, 8 that keeps the crop at least `size`:
    libjpeg-turbo has SIMD code for these, and its other scales (7/8 to 3/8), which
    simplejpeg picks for the smallest fit, decode slower than 1/1."""
    min_width, min_height = _min_decoded(shape, box, size)
    room = min(shape[0] // min_width, shape[1] // min_height)
    return next(f for f in (8, 4, 2, 1) if f <= max(room, 1))


def _decoded_at(shape: tuple[int, int], factor: int) -> tuple[int, int]:
    """The (width, height) libjpeg decodes at scale 1/factor (it rounds up)."""
    return math.ceil(shape[0] / factor), math.ceil(shape[1] / factor)


def _halving_decoded(shape: tuple[int, int], box: Box, size: int) -> tuple[int, int]:
    return _decoded_at(shape, _halving_factor(shape, box, size))


def _scaled(box: Box, factor_x: float, factor_y: float) -> tuple[float, float, float, float]:
    """PIL's (left, top, right, bottom) of `box` in an image scaled by the factors."""
    left, top, width, height = box
    return (left * factor_x, top * factor_y, (left + width) * factor_x,
            (top + height) * factor_y)


# PIL's transform samples with these filters without smoothing (tf.image.resize's
# antialias=False); PIL's other filters always smooth when shrinking.
UNFILTERED = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def _resize(image: Image.Image, box, size: int, method: Image.Resampling,
            antialias: bool = True) -> np.ndarray:
    if antialias or method not in UNFILTERED:
        return np.asarray(image.resize((size, size), method, box=box), np.uint8)
    return np.asarray(image.transform((size, size), Image.Transform.EXTENT, box, method),
                      np.uint8)


def _pil_window(encoded: bytes, box: Box, size: int, reduce: bool,
                method: Image.Resampling, antialias: bool) -> np.ndarray:
    with _open(encoded) as image:
        width, height = image.size
        if reduce and image.format == 'JPEG':
            image.draft('RGB', _min_decoded((width, height), box, size))
        rgb = image.convert('RGB')
    return _resize(rgb, _scaled(box, rgb.width / width, rgb.height / height), size, method,
                   antialias)


def _simplejpeg_pixels(encoded: bytes, min_size: tuple[int, int]) -> np.ndarray | None:
    """uint8 [H, W, 3] decoded by simplejpeg at the smallest scale of at least `min_size`
    (width, height); None where libjpeg-turbo will not convert it (CMYK...): PIL's turn."""
    import simplejpeg

    try:
        return simplejpeg.decode_jpeg(encoded, colorspace='RGB', fastdct=True,
                                      min_width=min_size[0], min_height=min_size[1])
    except ValueError:
        return None


def _simplejpeg_window(encoded: bytes, shape: tuple[int, int], box: Box, size: int,
                       method: Image.Resampling, halving: bool,
                       antialias: bool) -> np.ndarray | None:
    pixels = _simplejpeg_pixels(
        encoded, (_halving_decoded if halving else _min_decoded)(shape, box, size))
    if pixels is None:
        return None
    image = Image.fromarray(pixels)
    return _resize(image, _scaled(box, image.width / shape[0], image.height / shape[1]), size,
                   method, antialias)


def decode_array(encoded: bytes, box: Box, size: int, decoder: str,
                 shape: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3]: the whole image, decoded at the smallest of the scales 1, 1/2, 1/4,
    1/8 that keeps `box` at least `size` on each side (the full scale with decoder 'pil')."""
    if decoder == 'simplejpeg' and is_jpeg(encoded):
        pixels = _simplejpeg_pixels(encoded, _halving_decoded(shape, box, size))
        if pixels is not None:
            return pixels
    with _open(encoded) as image:
        if decoder != 'pil' and image.format == 'JPEG':  # draft: 1/2, 1/4, 1/8 only
            image.draft('RGB', _min_decoded(shape, box, size))
        return np.asarray(image.convert('RGB'))


@functools.cache
def _cv2():
    import cv2

    cv2.setNumThreads(1)  # the loader's threads and workers are the parallelism (budget.py)
    return cv2


def _snapped(box: Box, shape: tuple[int, int],
             decoded: tuple[int, int]) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of `box` (in `shape`'s pixels) in an image decoded at
    `decoded` (width, height), snapped to whole pixels, at least one wide and high."""
    width, height = decoded
    left, top, right, bottom = (round(v) for v in _scaled(box, width / shape[0],
                                                          height / shape[1]))
    left, top = min(left, width - 1), min(top, height - 1)
    return left, top, min(max(right, left + 1), width), min(max(bottom, top + 1), height)


def _cv2_flag(cv2, method: str, crop: tuple[int, int], size: int, antialias: bool) -> int:
    """OpenCV's interpolation: the method, as tf.image.resize samples without antialias; with
    antialias, an area average when either side shrinks by more than SHRINK_AREA, which
    smooths as PIL's filters do (INTER_LINEAR is 2-3x further from PIL's bilinear at 1.3-2x;
    below 1.1x it is as close, at a third of INTER_AREA's cost)."""
    if method == 'nearest':
        return cv2.INTER_NEAREST
    if method == 'area' or (antialias and max(crop) > SHRINK_AREA * size):
        return cv2.INTER_AREA
    return cv2.INTER_CUBIC if method == 'bicubic' else cv2.INTER_LINEAR


def cv2_window(pixels: np.ndarray, shape: tuple[int, int], box: Box, size: int, method: str,
               out: np.ndarray | None = None, antialias: bool = True) -> np.ndarray:
    """uint8 [size, size, 3]: `box` (in the original `shape`'s pixels) of the decoded
    `pixels`, resized by OpenCV into `out` when given. The box snaps to whole decoded pixels."""
    cv2 = _cv2()
    height, width = pixels.shape[:2]
    left, top, right, bottom = _snapped(box, shape, (width, height))
    crop = pixels[top:bottom, left:right]
    flag = _cv2_flag(cv2, method, (right - left, bottom - top), size, antialias)
    resized = cv2.resize(crop, (size, size), dst=out, interpolation=flag)
    if out is not None and resized is not out:  # cv2 declined the buffer (not contiguous)
        out[...] = resized
        return out
    return resized


def decode_window(encoded: bytes, box: Box, size: int, decoder: str,
                  shape: tuple[int, int] | None = None,
                  method: Image.Resampling = Image.Resampling.BILINEAR,
                  halving: bool = False, antialias: bool = True) -> np.ndarray:
    """uint8 [size, size, 3]: the `box` of the image, resized. `decoder` is resolved.
    `halving` keeps simplejpeg to its fast scales (train; eval keeps the smallest fit);
    `antialias` False samples without smoothing (train with data.antialias=False)."""
    if decoder == 'simplejpeg' and is_jpeg(encoded):
        found = _simplejpeg_window(encoded, shape or image_shape(encoded, decoder), box, size,
                                   method, halving, antialias)
        if found is not None:
            return found
    return _pil_window(encoded, box, size, decoder != 'pil', method, antialias)


def _tf_crop_try(width: int, height: int, area_range, aspect: float,
                 rng: random.Random) -> Box | None:
    """One attempt of TF's sampler at `aspect` (width / height): a height drawn uniformly
    among the whole numbers whose crop area fits `area_range`, the width rounded from it, then
    an offset; None where rounding leaves no crop inside the constraints."""
    min_area, max_area = (a * width * height for a in area_range)
    crop_h = round(math.sqrt(min_area / aspect))
    max_h = round(math.sqrt(max_area / aspect))
    if round(max_h * aspect) > width:  # the tallest crop whose rounded width still fits
        max_h = int((width + 0.5 - 1e-7) / aspect)
        if round(max_h * aspect) > width:
            max_h -= 1
    max_h = min(max_h, height)
    crop_h = min(crop_h, max_h)
    if crop_h < max_h:
        crop_h += rng.randint(0, max_h - crop_h)
    crop_w = round(crop_h * aspect)
    if crop_w * crop_h < min_area:  # rounding fell short: one pixel taller
        crop_h += 1
        crop_w = round(crop_h * aspect)
    if crop_w * crop_h > max_area:  # or over: one pixel shorter
        crop_h -= 1
        crop_w = round(crop_h * aspect)
    area = crop_w * crop_h
    if not (min_area <= area <= max_area and 0 < crop_w <= width and 0 < crop_h <= height):
        return None
    # TF draws offsets in [0, side - crop), so a smaller crop never touches the far edge.
    top = rng.randrange(height - crop_h) if crop_h < height else 0
    left = rng.randrange(width - crop_w) if crop_w < width else 0
    return left, top, crop_w, crop_h


def inception_box(shape: tuple[int, int], rng: random.Random, area_range,
                  aspect_range, max_attempts: int = INCEPTION_ATTEMPTS) -> Box:
    """A random crop of `area_range` of the area, aspect (width / height) in `aspect_range`,
    drawn as tf.image.sample_distorted_bounding_box draws it (the tf.data loader's sampler,
    and the flax and TF ResNet recipes'): up to `max_attempts` aspects drawn uniformly (not
    log-uniformly, as torchvision does), each giving a uniform height, then the whole image.
    Its boxes follow TF's distribution, not its random stream (tests/test_data_grain.py)."""
    width, height = shape
    for _ in range(max_attempts):
        aspect = rng.uniform(aspect_range[0], aspect_range[1])
        box = _tf_crop_try(width, height, area_range, aspect, rng)
        # TF's overlap test against the whole image: the crop covers >= area_range[0] of it.
        if box is not None and box[2] * box[3] >= max(area_range[0] * width * height, 1):
            return box
    return 0, 0, width, height


def center_box(shape: tuple[int, int], crop_fraction: float) -> Box:
    """The central square covering `crop_fraction` of the short side (as center_window)."""
    width, height = shape
    side = max(int(min(width, height) * crop_fraction), 1)
    return (width - side + 1) // 2, (height - side + 1) // 2, side, side


def whole_box(shape: tuple[int, int]) -> Box:
    return 0, 0, shape[0], shape[1]


def pad_crop(image: np.ndarray, rng: random.Random, padding: int) -> np.ndarray:
    """Zero-pads (black) and crops back to the same size at a random offset."""
    if padding == 0:
        return image
    height, width = image.shape[:2]
    top, left = rng.randint(0, 2 * padding), rng.randint(0, 2 * padding)
    padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
    return padded[top:top + height, left:left + width]


def _into(out: np.ndarray | None, image: np.ndarray) -> np.ndarray:
    if out is None:
        return image
    out[...] = image
    return out


def _window_only(encoded: bytes, shape: tuple[int, int], box: Box,
                 size: int) -> np.ndarray | None:
    """uint8 [h, w, 3]: only `box` decoded (jpeg_window.py), at _halving_factor's scale;
    None where libjpeg refuses the file (the whole image is decoded instead)."""
    factor = _halving_factor(shape, box, size)
    left, top, right, bottom = _snapped(box, shape, _decoded_at(shape, factor))
    return jpeg_window.decode(encoded, (left, top, right - left, bottom - top), factor)


def _resize_whole(pixels: np.ndarray, size: int, recipe,
                  out: np.ndarray | None) -> np.ndarray:
    """uint8 [S, S, 3]: all of `pixels` resized by the recipe's train_resizer."""
    height, width = pixels.shape[:2]
    if recipe.train_resizer == 'cv2':
        return cv2_window(pixels, (width, height), whole_box((width, height)), size,
                          recipe.resize_method, out, recipe.antialias)
    return _into(out, _resize(Image.fromarray(pixels), (0, 0, width, height), size,
                              resize_filter(recipe.resize_method), recipe.antialias))


def train_window(encoded: bytes, box: Box, shape: tuple[int, int], recipe,
                 out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [S, S, 3]: `box` of a train image, resized by the recipe's train_resizer; only
    the box decoded where the recipe has window_decode."""
    size, decoder = recipe.image_size, recipe.decoder
    if recipe.window_decode and is_jpeg(encoded):
        pixels = _window_only(encoded, shape, box, size)
        if pixels is not None:
            return _resize_whole(pixels, size, recipe, out)
    if recipe.train_resizer == 'cv2':
        pixels = decode_array(encoded, box, size, decoder, shape)
        return cv2_window(pixels, shape, box, size, recipe.resize_method, out, recipe.antialias)
    return _into(out, decode_window(encoded, box, size, decoder, shape,
                                    resize_filter(recipe.resize_method), halving=True,
                                    antialias=recipe.antialias))


def train_example(encoded: bytes, rng: random.Random, recipe,
                  out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [S, S, 3] of one train example (written into `out` when given); `recipe` is a
    Recipe (grain_source.py)."""
    shape = image_shape(encoded, recipe.decoder)
    if recipe.train_crop == 'inception':
        box = inception_box(shape, rng, recipe.area_range, recipe.aspect_range)
    else:
        box = whole_box(shape)
    if recipe.train_crop == 'pad' and recipe.crop_padding:
        image = train_window(encoded, box, shape, recipe)
        return _into(out, pad_crop(image, rng, recipe.crop_padding))
    return train_window(encoded, box, shape, recipe, out)


def torchvision_center_crop(encoded: bytes, size: int, resize_size: int) -> np.ndarray:
    """uint8 [size, size, 3]: torchvision's eval transforms on a PIL image, Resize(resize_size)
    (the short side, bilinear, antialiased) then CenterCrop(size); the whole file decoded
    with PIL's accurate IDCT."""
    with _open(encoded) as image:
        rgb = image.convert('RGB')
    width, height = rgb.size
    short = min(width, height)
    new = (int(resize_size * width / short), int(resize_size * height / short))
    if new != rgb.size:
        rgb = rgb.resize(new, Image.Resampling.BILINEAR)
    top, left = round((new[1] - size) / 2), round((new[0] - size) / 2)
    return np.asarray(rgb.crop((left, top, left + size, top + size)), np.uint8)


def eval_example(encoded: bytes, recipe) -> np.ndarray:
    """uint8 [S_eval, S_eval, 3]: the centre crop, or the whole image resized; or
    torchvision's Resize + CenterCrop (data.eval_preset='torchvision')."""
    if recipe.eval_preset == 'torchvision':
        resize_size = round(recipe.eval_image_size / recipe.eval_crop_fraction)
        return torchvision_center_crop(encoded, recipe.eval_image_size, resize_size)
    shape = image_shape(encoded, recipe.decoder)
    if recipe.eval_crop == 'center':
        box = center_box(shape, recipe.eval_crop_fraction)
    else:
        box = whole_box(shape)
    return decode_window(encoded, box, recipe.eval_image_size, recipe.decoder, shape,
                         resize_filter(recipe.resize_method))
