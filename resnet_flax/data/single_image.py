"""One image file through a data set's EVAL preprocessing, for prediction; and class names.

    image = single_image.load_eval_image('cat.jpg', config.data)  # uint8 [S, S, 3]
    names = single_image.label_names(config.data)

Each source's own recipe is reused, so an image is seen exactly as the eval split sees it:
- TFDS data sets and image folders: the tf.data eval example function (centre crop or resize)
  of `tf_pipeline`, with the crop the source would choose.
  A TFDS data set need not be prepared: its builder knows the classes and image size.
- digits: the image becomes grayscale, is averaged down to the data set's 8x8 and scaled to
  [0, 1] (white = 1: the data set counts ink, so pass bright strokes on a dark background),
  then upsampled and rounded to uint8 as the eval split is.
- synthetic data has no image format: an error.

Images come back uint8, as eval batches do; normalisation is the model side's job
(`data.normalization` gives the statistics, `device_augment.normalize` applies them).
Files any PIL format can open are accepted; a file that is not an image is a one-line error.
TensorFlow is imported only for the TFDS and image-folder sources.
"""

from __future__ import annotations

import io

import ml_collections
import numpy as np
from etils import epath

from resnet_flax.data import imagenet_classes
from resnet_flax.data import info as info_lib

DIGITS_SIDE = 8


def read_image_bytes(path: str) -> tuple[bytes, str]:
    """(file bytes, PIL format name); raises a one-line error for a missing or non-image file."""
    from PIL import Image, UnidentifiedImageError

    file = epath.Path(path)
    if not file.is_file():
        raise FileNotFoundError(f'No image file at {path}.')
    encoded = file.read_bytes()
    try:
        with Image.open(io.BytesIO(encoded)) as image:
            image_format = image.format or ''
            image.load()  # a truncated or corrupt body fails here, not only a bad header
    except Image.DecompressionBombError as error:  # not an OSError: PIL's size limit
        raise ValueError(f'{path} is too large to decode safely ({error}); shrink it, or '
                         'raise PIL.Image.MAX_IMAGE_PIXELS if you trust it.') from None
    except UnidentifiedImageError:
        raise ValueError(f'{path} is not an image: PIL knows no image format with its contents; '
                         'pass a JPEG, PNG, GIF, BMP, WEBP or TIFF file.') from None
    except (OSError, SyntaxError, ValueError) as error:  # known format, broken contents
        reason = str(error).splitlines()[0][:120] if str(error) else type(error).__name__
        raise ValueError(f'{path} is a damaged image file ({reason}); pass an intact JPEG, '
                         'PNG, GIF, BMP, WEBP or TIFF file.') from None
    return encoded, image_format


def load_eval_image(path: str, data_cfg: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [image_size, image_size, 3], preprocessed as `data_cfg`'s eval split is."""
    info_lib.validate(data_cfg)
    encoded, image_format = read_image_bytes(path)
    if data_cfg.dataset == 'digits':
        return _digits_image(encoded, data_cfg)
    if data_cfg.dataset == 'synthetic':
        raise ValueError("data.dataset='synthetic' has no image preprocessing to apply to "
                         f'{path}; predict with the config of the data set the model learned.')
    from resnet_flax.data import image_folder

    if image_format not in image_folder.TF_FORMATS:
        encoded = image_folder._pil_to_png(encoded)  # as the folder source does for TIFF etc.
    from resnet_flax.data import tf_pipeline

    example_fn = tf_pipeline.eval_example_fn(data_cfg, _eval_crop(data_cfg, encoded))
    try:
        image, _ = example_fn(tf_pipeline.tf.constant(encoded), tf_pipeline.tf.constant(0))
    except tf_pipeline.tf.errors.OpError as error:
        raise ValueError(f'{path} could not be decoded ({error.message.splitlines()[0][:120]})'
                         ) from None
    return np.asarray(image, np.uint8)


def _eval_crop(data_cfg, encoded: bytes) -> str:
    """The eval crop the image-folder or TFDS source chooses; for a folder that is not here
    (predicting elsewhere), the same rule applied to this image's size."""
    if data_cfg.dataset == 'image_folder':
        from PIL import Image

        from resnet_flax.data import image_folder

        try:
            return image_folder._recipes(data_cfg)[1]
        except (FileNotFoundError, ValueError):
            with Image.open(io.BytesIO(encoded)) as image:
                return info_lib.crops(data_cfg, max(image.size))[1]
    from resnet_flax.data import tfds_source

    return tfds_source.recipes(data_cfg, _tfds_builder(data_cfg))[1]


def _tfds_builder(data_cfg):
    """The TFDS builder, prepared or not: its info alone gives classes, sizes and the name."""
    from resnet_flax.data import tfds_source

    try:
        return tfds_source.builder(data_cfg)
    except FileNotFoundError:
        import tensorflow_datasets as tfds

        return tfds.builder(data_cfg.dataset, data_dir=data_cfg.data_dir)


def _digits_image(encoded: bytes, data_cfg) -> np.ndarray:
    from PIL import Image

    from resnet_flax.data import digits

    with Image.open(io.BytesIO(encoded)) as image:
        small = image.convert('L').resize((DIGITS_SIDE, DIGITS_SIDE), Image.Resampling.BOX)
    pixels = np.asarray(small, np.float32) / 255.0
    matrix = digits._resize_matrix(DIGITS_SIDE, int(data_cfg.image_size))
    big = digits.to_uint8(matrix @ pixels @ matrix.T)
    return np.repeat(big[..., None], info_lib.CHANNELS, axis=-1)


def label_names(data_cfg: ml_collections.ConfigDict) -> tuple[str, ...]:
    """Class names of the data set, () when it has none (synthetic). ImageNet's WordNet ids
    (imagenet2012, or image folders named by them) become their short names ('tench')."""
    if data_cfg.dataset in info_lib.BUILT_IN:
        from resnet_flax import data

        return imagenet_classes.readable(data.get_info(data_cfg).label_names)
    from resnet_flax.data import tfds_source

    found = _tfds_builder(data_cfg)
    _, label_key = tfds_source._keys(found)
    return imagenet_classes.readable(found.info.features[label_key].names)
