"""Two SGD steps of the project's train step equal PyTorch's, in float64.

The reference is the plain torch.nn ResNet of torchvision's layout (`tests/torch_reference.py`)
with `torch.optim.SGD` (momentum 0.9, L2 weight decay on conv and linear weights only, as the
project's default `decay_norm_and_bias=False`) and `F.cross_entropy` with label smoothing. Ours
is `steps.train_step` with the optimizer `optim.create_optimizer` builds from a config, the
device-side normalisation and BN in training mode: the code the trainer jits. Both start from
the same weights (converted by `convert.from_torch_state_dict`) and see the same batches. In
float64 the only differences left are the order of sums, so the weights, the momentum and the
BN statistics must agree to about 1e-12: a wrong sign, scale, decay mask, momentum convention or
BN reduction would show at 1e-3 or more.

BN running variances differ by design: PyTorch keeps the unbiased batch variance, flax the
biased one (models.py); the test checks exactly that relation, n/(n-1), instead.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip('torch')

from resnet_flax import convert, device_augment, models, optim, steps  # noqa: E402
from resnet_flax.state import TrainState  # noqa: E402
from tests import torch_reference as ref  # noqa: E402 - needs torch
from tests.tiny import tiny_config  # noqa: E402

BATCH, SIZE, CLASSES = 8, 64, 10
LEARNING_RATE, MOMENTUM, WEIGHT_DECAY, LABEL_SMOOTHING = 0.01, 0.9, 5e-4, 0.1
MEAN_RGB, STD_RGB = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SMALL = dict(widths=(8, 16, 32, 64), stem_width=8)  # torchvision's layout, 1/8 of the width
SMALL_OVERRIDES = dict(stage_widths=(8, 16, 32, 64), stem_width=8)


def _config():
    config = tiny_config()
    config.batch_size = BATCH
    opt = config.optimizer
    opt.name, opt.momentum, opt.nesterov = 'sgd', MOMENTUM, False
    opt.weight_decay, opt.weight_decay_type, opt.decay_norm_and_bias = WEIGHT_DECAY, 'l2', False
    opt.schedule, opt.warmup_steps, opt.warmup_epochs = 'constant', 0, 0.0
    opt.learning_rate = LEARNING_RATE * opt.reference_batch_size / BATCH  # the peak: 0.01
    return config


def _batches(count: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(0)
    return [{'image': rng.integers(0, 256, (BATCH, SIZE, SIZE, 3), dtype=np.uint8),
             'label': rng.integers(0, CLASSES, BATCH).astype(np.int32)} for _ in range(count)]


def _torch_steps(model, batches, augment) -> tuple[list[float], dict[str, torch.Tensor]]:
    decayed = [p for p in model.parameters() if p.ndim > 1]  # conv and linear weights
    others = [p for p in model.parameters() if p.ndim <= 1]
    sgd = torch.optim.SGD([{'params': decayed, 'weight_decay': WEIGHT_DECAY},
                           {'params': others, 'weight_decay': 0.0}],
                          lr=LEARNING_RATE, momentum=MOMENTUM)
    model.train()
    losses = []
    # The float32 pixels the step normalises on the device (jitted: XLA fuses the multiply-add
    # into one rounding, so eager normalisation differs by an ulp), then float64.
    normalize = jax.jit(device_augment.normalize, static_argnums=1)
    for batch in batches:
        images = np.asarray(normalize(jnp.asarray(batch['image']), augment))
        x = torch.from_numpy(images.astype(np.float64).transpose(0, 3, 1, 2))
        loss = torch.nn.functional.cross_entropy(
            model(x), torch.from_numpy(batch['label'].astype(np.int64)),
            label_smoothing=LABEL_SMOOTHING)
        sgd.zero_grad()
        loss.backward()
        sgd.step()
        losses.append(float(loss.detach()))
    return losses, model.state_dict()


def _our_steps(name, variables, batches, config, augment) -> tuple[list[float], TrainState]:
    # float64 is no config choice (weights train in float32); the same module, in float64.
    model = models.create(name, num_classes=CLASSES, **SMALL_OVERRIDES).clone(
        dtype=jnp.float64, param_dtype=jnp.float64)
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables['params'])
    batch_stats = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables['batch_stats'])
    optimizer = optim.create_optimizer(config, steps_per_epoch=100)
    state = TrainState(step=jnp.int32(0), params=params, batch_stats=batch_stats,
                       opt_state=optimizer.init(params),
                       rng=jax.random.key_data(jax.random.key(0)))
    step = jax.jit(lambda state, batch: steps.train_step(
        state, batch, model=model, optimizer=optimizer,
        learning_rate_fn=optim.create_learning_rate_schedule(config, 100),
        cfg=steps.StepConfig(label_smoothing=LABEL_SMOOTHING, augment=augment)))
    losses = []
    for batch in batches:
        state, metrics = step(state, batch)
        losses.append(float(metrics['loss']))
    return losses, state


def _bn_sample_counts(torch_model, name) -> dict:
    """Each BN's number of values per channel (batch x height x width), in our layout."""
    counts = {}
    hooks = [module.register_forward_hook(
        lambda m, args, out, key=key: counts.__setitem__(key, args[0].numel() / args[0].shape[1]))
        for key, module in torch_model.named_modules() if isinstance(module, torch.nn.BatchNorm2d)]
    with torch.no_grad():
        torch_model.eval()(torch.zeros((BATCH, 3, SIZE, SIZE), dtype=torch.float64))
    for hook in hooks:
        hook.remove()
    state = dict(torch_model.state_dict())
    for key, count in counts.items():
        state[f'{key}.running_var'] = torch.full_like(state[f'{key}.running_var'], count)
    return convert.from_torch_state_dict(state, name, num_classes=CLASSES, dtype=np.float64,
                                         **SMALL_OVERRIDES)['batch_stats']


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_two_sgd_steps_equal_pytorch_in_float64(name):
    with jax.enable_x64(True):
        torch_model = ref.randomize(ref.build(name, num_classes=CLASSES, **SMALL)).double()
        with torch.no_grad():  # values float32 can hold, as the converted weights are
            for value in torch_model.state_dict().values():
                value.copy_(value.float().double())
        start = convert.from_torch_state_dict(torch_model.state_dict(), name,
                                              num_classes=CLASSES, dtype=np.float64,
                                              **SMALL_OVERRIDES)
        counts = _bn_sample_counts(torch_model, name)
        config = _config()
        augment = device_augment.AugmentConfig(mean_rgb=MEAN_RGB, std_rgb=STD_RGB)
        batches = _batches(2)
        ours_losses, ours = _our_steps(name, start, batches, config, augment)
        torch_losses, torch_state = _torch_steps(torch_model, batches, augment)
        theirs = convert.from_torch_state_dict(
            {k: v.numpy() for k, v in torch_state.items()}, name, num_classes=CLASSES,
            dtype=np.float64, **SMALL_OVERRIDES)

    np.testing.assert_allclose(ours_losses, torch_losses, rtol=1e-9)
    moved = jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(), ours.params,
                         start['params'])
    assert min(jax.tree.leaves(moved)) > 0  # every parameter took both steps
    for path, ours_leaf in jax.tree.leaves_with_path(ours.params):
        _assert_same_change(ours_leaf, _at(theirs['params'], path),
                            _at(start['params'], path), path)
    for path, ours_leaf in jax.tree.leaves_with_path(ours.batch_stats):
        theirs_leaf, before = _at(theirs['batch_stats'], path), _at(start['batch_stats'], path)
        if path[-1].key == 'var':
            # PyTorch averages in n/(n-1) x the biased batch variance: over two steps at
            # momentum 0.1, v = 0.81 v0 + 0.09 s1 + 0.1 s2 with each s scaled by it.
            kept, n = 0.81 * before, _at(counts, path)
            ours_leaf = kept + (np.asarray(ours_leaf) - kept) * n / (n - 1)
        _assert_same_change(ours_leaf, theirs_leaf, before, path)


def _assert_same_change(ours, theirs, before, path) -> None:
    """Two steps changed a leaf the same way, to 1e-8 of the change: float64 sums in another
    order (the second step amplifies the first's rounding), where a wrong convention differs
    by the change itself."""
    change = np.abs(theirs - before).max()
    difference = np.abs(np.asarray(ours) - theirs).max()
    assert difference <= 1e-8 * change + 1e-15, (jax.tree_util.keystr(path), difference, change)

def _at(tree, path):
    for key in path:
        tree = tree[key.key]
    return np.asarray(tree)

