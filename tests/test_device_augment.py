"""The device part of the input recipe: normalisation as the old host one, flips and
Mixup/CutMix deterministic per (seed, step) and independent of the device count."""

import dataclasses
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import device_augment
from resnet_flax.data import info as info_lib
from tests.tiny import REPO, cpu_env

IMAGENET = device_augment.AugmentConfig(mean_rgb=info_lib.IMAGENET_MEAN,
                                        std_rgb=info_lib.IMAGENET_STD)


def uint8_batch(n=8, size=12, seed=0):
    rng = np.random.default_rng(seed)
    return {'image': rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8),
            'label': rng.integers(0, 5, n).astype(np.int32)}


def train_batch(batch, step, cfg):
    out = jax.jit(device_augment.train_batch, static_argnums=2)(batch, step, cfg)
    return {k: np.asarray(v) for k, v in out.items()}


def test_normalisation_equals_the_old_host_normalisation():
    batch = uint8_batch()
    old = ((batch['image'] / 255.0 - np.array(info_lib.IMAGENET_MEAN))
           / np.array(info_lib.IMAGENET_STD)).astype(np.float32)
    new = np.asarray(jax.jit(device_augment.normalize, static_argnums=1)(batch['image'], IMAGENET))
    assert new.dtype == np.float32
    assert np.abs(new - old).max() < 1e-5


def test_float_images_are_refused_in_one_line():
    with pytest.raises(TypeError, match='uint8') as error:
        device_augment.normalize(jnp.zeros((1, 4, 4, 3), jnp.float32), IMAGENET)
    assert '\n' not in str(error.value)


def test_flip_mirrors_some_examples_and_keeps_the_others():
    batch = uint8_batch(n=32)
    cfg = dataclasses.replace(IMAGENET, random_flip=True)
    out = train_batch(batch, 0, cfg)['image']
    plain = np.asarray(device_augment.normalize(batch['image'], cfg))
    mirrored = [np.allclose(o, p[:, ::-1], atol=1e-6) for o, p in zip(out, plain, strict=True)]
    kept = [np.allclose(o, p, atol=1e-6) for o, p in zip(out, plain, strict=True)]
    assert all(m or k for m, k in zip(mirrored, kept, strict=True))
    assert 4 < sum(mirrored) < 28


MIXES = [{'mixup_alpha': 0.4}, {'cutmix_alpha': 1.0}, {'mixup_alpha': 0.2, 'cutmix_alpha': 1.0}]


@pytest.mark.slow  # two compiles of Mixup+CutMix: 14 s here
@pytest.mark.parametrize('mix', MIXES[2:])  # both: the per-batch choice is drawn too
def test_draws_are_a_pure_function_of_seed_and_step(mix):
    batch = uint8_batch()
    cfg = dataclasses.replace(IMAGENET, random_flip=True, num_classes=5, seed=3, **mix)
    first, again = train_batch(batch, 7, cfg), train_batch(batch, 7, cfg)
    for key in ('image', 'label'):
        np.testing.assert_array_equal(first[key], again[key])
    for other in (train_batch(batch, 8, cfg), train_batch(batch, 7, dataclasses.replace(cfg,
                                                                                        seed=4))):
        assert not np.array_equal(first['image'], other['image'])


@pytest.mark.parametrize('mix', MIXES[:2])
def test_mixing_pairs_neighbours_and_weights_labels_by_what_was_kept(mix):
    batch = uint8_batch(n=6)
    cfg = dataclasses.replace(IMAGENET, num_classes=5, **mix)
    out = train_batch(batch, 1, cfg)
    images = np.asarray(device_augment.normalize(batch['image'], cfg))
    swap = [1, 0, 3, 2, 5, 4]
    partner = images[swap]
    one_hot = np.eye(5, dtype=np.float32)[batch['label']]
    assert out['label'].shape == (6, 5) and out['label'].dtype == np.float32
    np.testing.assert_allclose(out['label'].sum(axis=1), 1, rtol=1e-6)
    # lam from an example whose partner has another label.
    i = int(np.argmax(batch['label'] != batch['label'][swap]))
    lam = out['label'][i, batch['label'][i]]
    np.testing.assert_allclose(out['label'], lam * one_hot + (1 - lam) * one_hot[swap], atol=1e-6)
    if 'mixup_alpha' in mix:
        np.testing.assert_allclose(out['image'], lam * images + (1 - lam) * partner, atol=1e-5)
    else:  # every pixel is the example's or its partner's; the label weight is the area
        own = np.isclose(out['image'], images, atol=1e-5)
        theirs = np.isclose(out['image'], partner, atol=1e-5)
        assert np.all(own | theirs)
        from_partner = np.all(theirs, axis=(0, 3)) & ~np.all(own, axis=(0, 3))  # [H, W]
        assert abs(from_partner.mean() - (1 - lam)) < 1e-6


def test_odd_batch_keeps_its_last_example_as_its_own_partner():
    x = jnp.arange(5)
    np.testing.assert_array_equal(device_augment.partners(x), [1, 0, 3, 2, 4])


DEVICE_COUNT_SCRIPT = '''
import dataclasses, jax, numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from resnet_flax import device_augment
from resnet_flax.data import info as info_lib
assert jax.device_count() == 8
rng = np.random.default_rng(0)
batch = {'image': rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8),
         'label': rng.integers(0, 10, 16).astype(np.int32)}
outs = []
for mix in ({'mixup_alpha': 0.4}, {'cutmix_alpha': 1.0}):
    cfg = device_augment.AugmentConfig(mean_rgb=info_lib.IMAGENET_MEAN,
                                       std_rgb=info_lib.IMAGENET_STD, seed=5, random_flip=True,
                                       num_classes=10, **mix)
    results = []
    for n in (1, 2, 8):
        mesh = jax.make_mesh((n,), ('data',), devices=jax.devices()[:n])
        sharded = jax.device_put(batch, NamedSharding(mesh, PartitionSpec('data')))
        out = jax.jit(device_augment.train_batch, static_argnums=2)(sharded, 11, cfg)
        results.append({k: np.asarray(v) for k, v in out.items()})
    for other in results[1:]:  # the same draws; the float arithmetic may differ by an ulp
        for key in ('image', 'label'):
            np.testing.assert_allclose(results[0][key], other[key], rtol=0, atol=1e-6)
print('same on 1, 2 and 8 devices')
'''


@pytest.mark.slow
def test_augmentation_does_not_depend_on_the_device_count():
    result = subprocess.run([sys.executable, '-c', DEVICE_COUNT_SCRIPT], cwd=REPO,
                            env=cpu_env(8), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'same on 1, 2 and 8 devices' in result.stdout
