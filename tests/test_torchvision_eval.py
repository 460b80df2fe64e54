"""Converted PyTorch weights, evaluated as torchvision evaluates them, on real JPEG files.

torchvision is not installed here (PyPI's build does not load beside this torch), so the
reference is built from PIL directly, following torchvision's documented eval transforms
`Resize(256) + CenterCrop(224) + ToTensor() + Normalize(mean, std)` on a PIL image:
- Resize(256) on a PIL image is `Image.resize` with `Image.BILINEAR` (antialiased when it
  shrinks), the short side to 256 and the long one to int(256 * long / short);
- CenterCrop(224) cuts at (round((h - 224) / 2), round((w - 224) / 2));
- ToTensor divides by 255, Normalize subtracts ImageNet's mean and divides by its std;
- the file is opened as torchvision's ImageFolder does: `Image.open(path).convert('RGB')`,
  which decodes JPEGs with libjpeg's accurate integer IDCT.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image

import configs.resnet18
from resnet_flax import eval_checkpoint, weights
from resnet_flax.data import imagenet_classes, single_image
from resnet_flax.data import info as info_lib

MEAN = np.asarray(info_lib.IMAGENET_MEAN, np.float32)
STD = np.asarray(info_lib.IMAGENET_STD, np.float32)
# (height, width, PIL mode, JPEG quality, chroma subsampling): landscape and portrait, very
# long, square, smaller than the crop (upsampled), short side already 256 (not resized), odd
# sizes whose crop offsets end in .5, grayscale, 4:4:4 and 4:2:0 chroma.
JPEGS = [(300, 400, 'RGB', 90, 2), (480, 321, 'RGB', 95, 0), (257, 1000, 'RGB', 75, 2),
         (224, 224, 'RGB', 90, 2), (199, 333, 'RGB', 90, 1), (256, 301, 'RGB', 90, 2),
         (1024, 767, 'RGB', 85, 2), (375, 500, 'L', 90, 2)]
# One uint8 level of PIL's rounding between its two resize passes, in normalised units.
BOUND = 1.01 / 255 / float(STD.min())
SMALL_FIELDS = {'stage_widths': (8, 16, 32, 64), 'stem_width': 8}


def _picture(height: int, width: int, seed: int) -> np.ndarray:
    """Smooth shapes, edges and noise: what a resize filter and a JPEG coder both notice."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    waves = [np.sin(x / rng.uniform(5, 40) + c) * np.cos(y / rng.uniform(5, 40) - c)
             for c in range(3)]
    image = 128 + 90 * np.stack(waves, axis=-1)
    cy, cx = height * rng.uniform(0.3, 0.7), width * rng.uniform(0.3, 0.7)
    r = min(height, width) / 4
    image[(y - cy) ** 2 + (x - cx) ** 2 < r**2] = rng.uniform(0, 255, 3)
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope='module')
def jpegs(tmp_path_factory) -> list:
    folder = tmp_path_factory.mktemp('jpegs')
    paths = []
    for i, (height, width, mode, quality, subsampling) in enumerate(JPEGS):
        image = Image.fromarray(_picture(height, width, seed=i)).convert(mode)
        path = folder / f'{i}_{width}x{height}_{mode}.jpg'
        image.save(path, 'JPEG', quality=quality, subsampling=subsampling)
        paths.append(path)
    return paths


def _torchvision_reference(path) -> np.ndarray:
    """float32 [224, 224, 3]: Resize(256) + CenterCrop(224) + ToTensor + Normalize, with PIL."""
    image = Image.open(path).convert('RGB')
    width, height = image.size
    short = min(width, height)
    size = (int(256 * width / short), int(256 * height / short))  # the short side is 256
    if size != image.size:
        image = image.resize(size, Image.BILINEAR)
    top, left = round((size[1] - 224) / 2.0), round((size[0] - 224) / 2.0)
    crop = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return (crop - MEAN) / STD


def _data_config(preset: str):
    config = configs.resnet18.get_config()
    config.data.eval_preset = preset
    return config.data


def _ours(path, data_cfg) -> np.ndarray:
    """Our eval preprocessing of one file, normalised with ImageNet's statistics."""
    image = single_image.load_eval_image(str(path), data_cfg)
    if image.dtype == np.uint8:
        return (image.astype(np.float32) / 255.0 - MEAN) / STD
    return image


def test_torchvision_preset_matches_torchvision_eval_transforms(jpegs):
    differences, native = [], []
    for path in jpegs:
        expected = _torchvision_reference(path)
        got = _ours(path, _data_config('torchvision'))
        assert got.shape == expected.shape == (224, 224, 3)
        differences.append(float(np.abs(got - expected).max()))
        native.append(float(np.abs(_ours(path, _data_config('native')) - expected).max()))
    print(f'torchvision preset vs reference: max |difference| {max(differences):.4f} '
          f'(bound {BOUND:.4f}); native recipe: max |difference| {min(native):.3f} or more')
    assert max(differences) <= BOUND, differences
    # The native recipe (fast IDCT, no antialiasing, TF's crop window) is far off, so the
    # bound above is not one any preprocessing would meet.
    assert min(native) > 5 * BOUND, native


@pytest.mark.slow
@pytest.mark.parametrize('loader', ['tf', 'grain'])
def test_eval_batches_of_both_loaders_follow_the_preset(jpegs, tmp_path, loader):
    import shutil

    from resnet_flax import data

    for split in ('train', 'val'):  # an image folder: SPLIT/CLASS/*.jpg, two classes
        for i, path in enumerate(jpegs):
            folder = tmp_path / split / f'class{i % 2}'
            folder.mkdir(parents=True, exist_ok=True)
            shutil.copy(path, folder / path.name)
    cfg = _data_config('torchvision')
    cfg.update(dataset='image_folder', data_dir=str(tmp_path), eval_split='val',
               loader=loader, threadpool_size=2)
    images = [image for batch in data.eval_batches(cfg, global_batch_size=4)
              for image, mask in zip(batch['image'], batch['mask'], strict=True) if mask]
    references = [_torchvision_reference(path) for path in jpegs]
    matched = set()
    for image in images:
        image = np.asarray(image)
        if image.dtype == np.uint8:
            image = (image.astype(np.float32) / 255.0 - MEAN) / STD
        distances = [float(np.abs(image - ref).max()) for ref in references]
        matched.add(int(np.argmin(distances)))
        assert min(distances) <= BOUND, (loader, min(distances))
    assert matched == set(range(len(jpegs)))  # each file once


def test_converted_checkpoints_choose_the_torchvision_preset():
    config = configs.resnet18.get_config()
    converted = weights.Checkpoint(None, None, {'format': 'resnet_flax.convert/1',
                                                'eval_preset': 'torchvision'})
    older = weights.Checkpoint(None, None, {'format': 'resnet_flax.convert/1'})
    trained = weights.Checkpoint(None, 10, {'config': '{}'})
    for ckpt, preset in ((converted, 'torchvision'), (older, 'torchvision'),
                         (trained, 'native')):
        assert eval_checkpoint.with_eval_preset(config, ckpt).data.eval_preset == preset
    assert config.data.eval_preset == ''  # the caller's config is left alone
    config.data.eval_preset = 'native'  # an explicit choice stands
    assert eval_checkpoint.with_eval_preset(config, converted).data.eval_preset == 'native'


@pytest.mark.slow
def test_image_flag_on_converted_weights_prints_torchs_top5_by_name(jpegs, tmp_path, capsys):
    torch = pytest.importorskip('torch')
    from resnet_flax import convert
    from tests import torch_reference as ref

    net = ref.randomize(ref.build('resnet18', widths=SMALL_FIELDS['stage_widths'],
                                  stem_width=SMALL_FIELDS['stem_width']), seed=3)
    torch.save(net.state_dict(), tmp_path / 'resnet18.pth')
    convert.convert_file(str(tmp_path / 'resnet18.pth'), str(tmp_path / 'converted'),
                         'resnet18', **SMALL_FIELDS)
    config = configs.resnet18.get_config()
    config.model.stage_widths, config.model.stem_width = SMALL_FIELDS.values()
    config.model.dtype = 'float32'  # as torch computes: the comparison is of preprocessing

    eval_checkpoint.run(config, workdir=None, checkpoint=str(tmp_path / 'converted'),
                        checkpoint_step='latest', split=None, use_ema=False,
                        images=[str(p) for p in jpegs], as_json=False)
    printed = capsys.readouterr().out
    assert not re.search(r'\bn\d{8}\b', printed)  # no WordNet ids
    ours = _printed_names(printed, len(jpegs))

    reference = np.stack([_torchvision_reference(p) for p in jpegs]).transpose(0, 3, 1, 2)
    with torch.no_grad():
        logits = net(torch.from_numpy(reference)).numpy()
    names = imagenet_classes.names()
    agree = 0
    for path, row in zip(jpegs, logits, strict=True):
        expected = [names[c] for c in np.argsort(-row)[:5]]
        agree += ours[str(path)] == expected
        assert ours[str(path)] == expected, (path, ours[str(path)], expected)
    print(f'top-5 (in order) equal to torch on {agree}/{len(jpegs)} images')


def _printed_names(text: str, count: int) -> dict[str, list[str]]:
    """{image path: its top-k names} from eval.py's text output (after its first line, which
    names the checkpoint and weights used)."""
    found, current = {}, None
    for line in text.splitlines()[1:]:
        match = re.match(r'\s+\d+\. (.+?)\s+\d\.\d{4}$', line)
        if match and current is not None:
            found[current].append(match.group(1))
        elif line.strip():
            current = line.strip()
            found[current] = []
    assert len(found) == count, text
    return found
