"""Mixed precision: float32 weights only, and float16 trains with a dynamic loss scale.

The float16 steps run the real train step on the tiny digits model (XLA:CPU computes float16,
slowly, so the model stays tiny and the step compiles once for all the cases here).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_flax import data, models, optim, precision, sharding, steps, train
from resnet_flax.state import create_train_state
from tests.tiny import tiny_config


def _setup(dtype: str):
    config = tiny_config(**{'model.dtype': dtype, 'optimizer.momentum': 0.0,
                            'optimizer.weight_decay': 0.0, 'optimizer.schedule': 'constant',
                            'optimizer.warmup_steps': 0, 'optimizer.warmup_epochs': 0.0})
    model = models.from_config(config.model)
    optimizer = optim.create_optimizer(config, 44)
    mesh = sharding.create_mesh()
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), (16, 16, 3), False, mesh)
    step = jax.jit(functools.partial(
        steps.train_step, model=model, optimizer=optimizer, learning_rate_fn=lambda s: 0.1,
        cfg=steps.StepConfig(), batch_sharding=sharding.batch_sharding(mesh)))
    return state, step


@pytest.fixture(scope='module')
def batch():
    config = tiny_config()
    return next(data.train_batches(config.data, global_batch_size=32, seed=0, process_index=0,
                                   process_count=1))


@pytest.fixture(scope='module')
def float16():
    return _setup('float16')


def _assert_same_tree(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_param_dtype_other_than_float32_is_refused(tmp_path):
    config = tiny_config(**{'model.param_dtype': 'bfloat16', 'model.dtype': 'bfloat16'})
    with pytest.raises(ValueError, match="param_dtype='bfloat16'.*'float32'") as error:
        train.train_and_evaluate(config, str(tmp_path))
    assert '\n' not in str(error.value)


def test_only_float16_carries_a_loss_scale():
    for dtype, has_scale in (('float16', True), ('float32', False), ('bfloat16', False)):
        model = models.from_config(tiny_config(**{'model.dtype': dtype}).model)
        shapes = jax.eval_shape(lambda m=model: create_train_state(
            m, optim.create_optimizer(tiny_config(), 44), jax.random.PRNGKey(0), (16, 16, 3),
            False, sharding.create_mesh()))
        assert (shapes.loss_scale is not None) == has_scale, dtype


@pytest.mark.slow
def test_float16_step_with_loss_scaling_follows_the_float32_step(float16, batch):
    state16, step16 = float16
    state32, step32 = _setup('float32')
    _assert_same_tree(state16.params, state32.params)  # same float32 weights to start
    assert float(state16.loss_scale.scale) == precision.INITIAL_SCALE
    new16, metrics16 = step16(state16, batch)
    new32, metrics32 = step32(state32, batch)
    assert float(metrics16['skipped_updates']) == 0.0
    assert float(metrics16['loss_scale']) == precision.INITIAL_SCALE
    assert float(metrics16['loss']) == pytest.approx(float(metrics32['loss']), rel=1e-2)
    assert float(metrics16['grad_norm']) == pytest.approx(float(metrics32['grad_norm']), rel=3e-2)
    # The weight updates agree to float16's precision: the gradients were unscaled.
    update16 = jax.tree.map(jnp.subtract, new16.params, state16.params)
    update32 = jax.tree.map(jnp.subtract, new32.params, state32.params)
    difference = optax_norm(jax.tree.map(jnp.subtract, update16, update32))
    assert difference < 0.05 * optax_norm(update32), (difference, optax_norm(update32))
    assert int(new16.loss_scale.good_steps) == 1


def optax_norm(tree) -> float:
    return float(jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(tree))))


@pytest.mark.slow
def test_overflowing_step_changes_nothing_and_halves_the_scale(float16, batch):
    state, step = float16
    huge = precision.LossScale(scale=jnp.asarray(2.0**40, jnp.float32),
                               good_steps=jnp.asarray(7, jnp.int32))
    state = state.replace(loss_scale=huge)
    new, metrics = step(state, batch)
    assert float(metrics['skipped_updates']) == 1.0 and float(metrics['grad_norm']) == 0.0
    assert np.isfinite(float(metrics['loss']))  # the loss itself was fine: only the scale
    _assert_same_tree((new.params, new.batch_stats), (state.params, state.batch_stats))
    # The optimizer state is kept too, but for the schedule's count: it keeps pace with step.
    _assert_same_tree(_without_schedule_counts(new.opt_state),
                      _without_schedule_counts(state.opt_state))
    assert _schedule_counts(new.opt_state) == [int(state.step) + 1]
    assert int(new.step) == int(state.step) + 1
    assert float(new.loss_scale.scale) == 2.0**39 and int(new.loss_scale.good_steps) == 0


def _is_schedule(node) -> bool:
    return isinstance(node, optax.ScaleByScheduleState)


def _schedule_counts(opt_state) -> list[int]:
    return [int(n.count) for n in jax.tree.leaves(opt_state, is_leaf=_is_schedule)
            if _is_schedule(n)]


def _without_schedule_counts(opt_state):
    return [n for n in jax.tree.leaves(opt_state, is_leaf=_is_schedule) if not _is_schedule(n)]


@pytest.mark.slow
def test_after_a_skipped_step_the_applied_rate_is_the_logged_rate(batch):
    """Warmup from 0: the rate of step 0 is 0, of step 1 is peak / 5. Step 0 overflows and is
    skipped; step 1 then logs peak / 5 and must apply it. (With the schedule's count left
    behind, step 1 applied the rate of step 0, 0, and the weights did not move.)"""
    config = tiny_config(**{'model.dtype': 'float16', 'optimizer.momentum': 0.0,
                            'optimizer.weight_decay': 0.0, 'optimizer.schedule': 'constant',
                            'optimizer.warmup_steps': 5})
    model = models.from_config(config.model)
    optimizer = optim.create_optimizer(config, 44)
    learning_rate_fn = optim.create_learning_rate_schedule(config, 44)
    mesh = sharding.create_mesh()
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), (16, 16, 3), False, mesh)
    step = jax.jit(functools.partial(
        steps.train_step, model=model, optimizer=optimizer, learning_rate_fn=learning_rate_fn,
        cfg=steps.StepConfig(), batch_sharding=sharding.batch_sharding(mesh)))
    huge = precision.LossScale(scale=jnp.asarray(2.0**40, jnp.float32),
                               good_steps=jnp.asarray(0, jnp.int32))
    skipped, metrics = step(state.replace(loss_scale=huge), batch)
    assert float(metrics['skipped_updates']) == 1.0
    applied, metrics = step(skipped.replace(loss_scale=precision.LossScale.create()), batch)
    assert float(metrics['skipped_updates']) == 0.0
    assert float(learning_rate_fn(0)) == 0.0 and float(learning_rate_fn(1)) > 0.0
    assert float(metrics['learning_rate']) == pytest.approx(float(learning_rate_fn(1)))
    # SGD without momentum or decay: the update is -rate * gradient; the gradient of step 1 is
    # the grad_norm logged, so the applied rate is |update| / grad_norm.
    update = optax_norm(jax.tree.map(jnp.subtract, applied.params, skipped.params))
    assert update / float(metrics['grad_norm']) == pytest.approx(
        float(metrics['learning_rate']), rel=1e-3)
    assert _schedule_counts(applied.opt_state) == [int(applied.step)] == [2]


@pytest.mark.slow
def test_scale_doubles_after_growth_interval_finite_steps(float16, batch):
    state, step = float16
    almost = precision.LossScale(scale=jnp.asarray(256.0, jnp.float32),
                                 good_steps=jnp.asarray(precision.GROWTH_INTERVAL - 1, jnp.int32))
    new, metrics = step(state.replace(loss_scale=almost), batch)
    assert float(metrics['skipped_updates']) == 0.0
    assert float(new.loss_scale.scale) == 512.0 and int(new.loss_scale.good_steps) == 0
    assert float(optax_norm(jax.tree.map(jnp.subtract, new.params, state.params))) > 0


def test_adjust_never_drops_the_scale_below_one():
    low = precision.LossScale(scale=jnp.asarray(1.0), good_steps=jnp.asarray(3))
    assert float(precision.adjust(low, jnp.asarray(False)).scale) == 1.0
    assert int(precision.adjust(low, jnp.asarray(True)).good_steps) == 4
