"""PyTorch weights -> ours: logits equal a torch.nn ResNet built as torchvision builds it.

The reference (`tests/torch_reference.py`) has random weights and random BN statistics and runs
in eval mode; the converted weights must give the same logits within 1e-4 (float32).
"""

from __future__ import annotations

import sys

import jax
import numpy as np
import pytest

from resnet_flax import convert, models

torch = pytest.importorskip('torch')

from tests import torch_reference as ref  # noqa: E402 - needs torch

IMAGE_SIZE = 64  # small images keep the CPU time low; every layer still downsamples
TOLERANCE = 1e-4
# A net of resnet18's layout at 1/8 of the width, for the file and error tests.
SMALL = dict(widths=(8, 16, 32, 64), stem_width=8)
SMALL_OVERRIDES = dict(stage_widths=(8, 16, 32, 64), stem_width=8)


def _images(batch: int = 2, size: int = IMAGE_SIZE, seed: int = 0) -> np.ndarray:
    """NCHW float32, as torch wants them."""
    return np.random.default_rng(seed).standard_normal((batch, 3, size, size)).astype(np.float32)


def _torch_logits(model, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(images)).numpy()


def _our_logits(name: str, variables, images: np.ndarray, **overrides) -> np.ndarray:
    num_classes = variables['params']['head']['bias'].shape[0]
    model = models.create(name, num_classes=num_classes, **overrides)
    apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
    return np.asarray(apply(variables, images.transpose(0, 2, 3, 1)))  # NCHW -> NHWC


def _assert_same_logits(name, torch_model, **overrides):
    images = _images()
    expected = _torch_logits(torch_model, images)
    variables = convert.from_torch_state_dict(torch_model.state_dict(), name, **overrides)
    got = _our_logits(name, variables, images, **overrides)
    assert expected.std() > 0.05  # logits that differ between classes and images
    difference = float(np.abs(got - expected).max())
    print(f'{name}: max |logit difference| {difference:.3g} (logits up to '
          f'{np.abs(expected).max():.3g})')
    assert difference < TOLERANCE, difference
    np.testing.assert_array_equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize('name', [pytest.param('resnet18', marks=pytest.mark.slow), 'resnet50'])
def test_logits_match_torchvision_resnet(name):
    _assert_same_logits(name, ref.randomize(ref.build(name)))


@pytest.mark.parametrize('name, torch_kwargs, overrides', [
    # Same block layout as the full nets, narrower stages to keep the test fast.
    ('resnext50_32x4d', dict(widths=(16, 32, 64, 128), stem_width=16),
     dict(stage_widths=(16, 32, 64, 128), stem_width=16)),
    pytest.param('wide_resnet50_2', dict(widths=(8, 16, 32, 64), stem_width=8),
                 dict(stage_widths=(8, 16, 32, 64), stem_width=8), marks=pytest.mark.slow),
    pytest.param('resnet50d', dict(widths=(8, 16, 32, 64), stem_width=16),
                 dict(stage_widths=(8, 16, 32, 64), stem_width=16), marks=pytest.mark.slow),
])
def test_grouped_wide_and_resnet_d_logits_match_torch(name, torch_kwargs, overrides):
    _assert_same_logits(name, ref.randomize(ref.build(name, **torch_kwargs)), **overrides)


def test_numpy_arrays_convert_like_torch_tensors():
    model = ref.randomize(ref.build('resnet18', **SMALL))
    tensors = model.state_dict()
    arrays = {key: value.numpy() for key, value in tensors.items()}
    from_tensors = convert.from_torch_state_dict(tensors, 'resnet18', **SMALL_OVERRIDES)
    from_arrays = convert.from_torch_state_dict(arrays, 'resnet18', **SMALL_OVERRIDES)
    jax.tree.map(np.testing.assert_array_equal, from_tensors, from_arrays)


def test_safetensors_round_trip_without_torch(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    model = ref.randomize(ref.build('resnet18', **SMALL))
    path = tmp_path / 'model.safetensors'
    save_file(model.state_dict(), str(path))
    monkeypatch.setitem(sys.modules, 'torch', None)  # any `import torch` now fails
    loaded = convert.load_state_dict(str(path))
    monkeypatch.undo()
    expected = model.state_dict()
    assert sorted(loaded) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_array_equal(loaded[key], value.numpy())
    from_file = convert.from_torch_state_dict(loaded, 'resnet18', **SMALL_OVERRIDES)
    from_memory = convert.from_torch_state_dict(expected, 'resnet18', **SMALL_OVERRIDES)
    jax.tree.map(np.testing.assert_array_equal, from_file, from_memory)


def test_pth_reads_plain_wrapped_and_data_parallel_state_dicts(tmp_path):
    state_dict = ref.randomize(ref.build('resnet18', **SMALL)).state_dict()
    plain, wrapped = tmp_path / 'plain.pth', tmp_path / 'wrapped.pth'
    torch.save(state_dict, plain)
    # A training checkpoint of a DataParallel model: {'state_dict': {'module.conv1.weight': ..}}
    torch.save({'epoch': 3, 'state_dict': {f'module.{k}': v for k, v in state_dict.items()}},
               wrapped)
    for path in (plain, wrapped):
        loaded = convert.load_state_dict(str(path))
        assert sorted(loaded) == sorted(state_dict)
        np.testing.assert_array_equal(loaded['layer2.0.downsample.0.weight'],
                                      state_dict['layer2.0.downsample.0.weight'].numpy())


CALLS: list[str] = []


def _record(text: str) -> None:
    CALLS.append(text)


class _Payload:
    """Unpickling this would call _record: the loader must refuse it."""

    def __reduce__(self):
        return (_record, ('unpickled code ran',))


def test_pth_with_pickled_code_is_refused_without_running_it(tmp_path):
    path = tmp_path / 'evil.pth'
    torch.save({'conv1.weight': torch.zeros(2), 'payload': _Payload()}, path)
    with pytest.raises(ValueError, match='weights_only=True') as error:
        convert.load_state_dict(str(path))
    assert '\n' not in str(error.value)
    assert CALLS == []


def test_missing_and_unexpected_keys_are_named_in_one_line():
    state_dict = dict(ref.randomize(ref.build('resnet18', **SMALL)).state_dict())
    del state_dict['layer3.1.bn2.running_var']
    state_dict['layer5.0.conv1.weight'] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        convert.from_torch_state_dict(state_dict, 'resnet18', **SMALL_OVERRIDES)
    message = str(error.value)
    assert 'missing 1 key(s) layer3.1.bn2.running_var' in message
    assert 'unexpected 1 key(s) layer5.0.conv1.weight' in message
    assert '\n' not in message


def test_another_architecture_is_a_one_line_error():
    state_dict = ref.randomize(ref.build('resnet18', **SMALL)).state_dict()
    with pytest.raises(ValueError, match=r'missing \d+ key\(s\) .*layer1\.2\.') as error:
        convert.from_torch_state_dict(state_dict, 'resnet34', **SMALL_OVERRIDES)
    assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match=r'conv1\.weight has shape \(8, 3, 7, 7\) but '
                                         r'resnet18 needs \(64, 3, 7, 7\)') as error:
        convert.from_torch_state_dict(state_dict, 'resnet18')  # full width expected
    assert '\n' not in str(error.value)


def test_unknown_name_and_format_are_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'resnet51'"):
        convert.from_torch_state_dict({}, 'resnet51')
    (tmp_path / 'weights.h5').write_bytes(b'\x89HDF')
    with pytest.raises(ValueError, match="unknown weights format '.h5'"):
        convert.load_state_dict(str(tmp_path / 'weights.h5'))
    with pytest.raises(FileNotFoundError, match='No weights file'):
        convert.load_state_dict(str(tmp_path / 'missing.safetensors'))
