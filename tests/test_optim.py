"""Optimizers and schedules from the config: each one works, decay masks, schedule shapes."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import configs.base
from resnet_flax import optim

STEPS_PER_EPOCH = 10


def make_config(batch_size=256, num_epochs=90.0, num_train_steps=-1, **opt_fields):
    """The base config with a constant rate and no warmup unless the test says otherwise."""
    config = configs.base.get_config()
    config.batch_size = batch_size
    config.num_epochs = num_epochs
    config.num_train_steps = num_train_steps
    config.optimizer.schedule = 'constant'
    config.optimizer.warmup_epochs = 0.0
    config.optimizer.update(opt_fields)
    return config


def make_params():
    """A BN-like parameter tree: conv kernel, BN scale/bias, dense kernel and bias."""
    keys = jax.random.split(jax.random.key(0), 5)
    return {
        'conv': {'kernel': jax.random.normal(keys[0], (3, 3, 2, 4))},
        'bn': {
            'scale': 1.0 + 0.1 * jax.random.normal(keys[1], (4,)),
            'bias': 0.1 * jax.random.normal(keys[2], (4,)),
        },
        'dense': {
            'kernel': jax.random.normal(keys[3], (4, 3)),
            'bias': 0.1 * jax.random.normal(keys[4], (3,)),
        },
    }


TARGET = jax.tree.map(lambda p: jnp.full_like(p, 0.5), make_params())


def quadratic_loss(params):
    sq = jax.tree.map(lambda p, t: jnp.sum((p - t) ** 2), params, TARGET)
    return 0.5 * sum(jax.tree.leaves(sq))


def run(tx, params, grad_fn, num_steps):
    state = tx.init(params)
    for _ in range(num_steps):
        updates, state = tx.update(grad_fn(params), state, params)
        params = optax.apply_updates(params, updates)
    return params


def assert_trees_close(a, b, **tol):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, **tol), a, b)


# ---- Each optimizer works.


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
@pytest.mark.parametrize('decay_type', ['l2', 'decoupled'])
def test_each_optimizer_reduces_a_quadratic_loss(name, decay_type):
    # LARS steps trust_coefficient * |w| per unit rate, so it needs a larger rate.
    learning_rate = {'sgd': 0.05, 'lars': 1.0, 'lamb': 0.05, 'adamw': 0.05}[name]
    config = make_config(
        name=name, learning_rate=learning_rate, weight_decay=1e-3, weight_decay_type=decay_type,
        trust_coefficient=0.02,
    )
    tx = optim.create_optimizer(config, STEPS_PER_EPOCH)
    params = make_params()
    grad = jax.jit(jax.grad(quadratic_loss))
    one_step = run(tx, params, grad, 1)
    many_steps = run(tx, params, grad, 30)
    assert quadratic_loss(one_step) < quadratic_loss(params)
    assert quadratic_loss(many_steps) < 0.5 * quadratic_loss(params)


def test_the_optimizer_uses_the_schedule_step_by_step():
    config = make_config(
        name='sgd', momentum=0.0, weight_decay=0.0, schedule='cosine', warmup_steps=3,
        num_train_steps=10,
    )
    schedule = optim.create_learning_rate_schedule(config, STEPS_PER_EPOCH)
    tx = optim.create_optimizer(config, STEPS_PER_EPOCH)
    params = {'w': jnp.zeros(2)}
    state = tx.init(params)
    for step in range(10):
        updates, state = tx.update({'w': jnp.ones(2)}, state, params)
        np.testing.assert_allclose(updates['w'], -schedule(step) * np.ones(2), rtol=1e-6)


# ---- Weight decay and its mask.


def test_weight_decay_mask_skips_norm_and_bias():
    mask = optim.weight_decay_mask(make_params())
    assert mask == {
        'conv': {'kernel': True},
        'bn': {'scale': False, 'bias': False},
        'dense': {'kernel': True, 'bias': False},
    }
    abstract = jax.eval_shape(make_params)
    assert optim.weight_decay_mask(abstract) == mask


def test_weight_decay_mask_on_a_flax_model():
    class Tiny(nn.Module):
        @nn.compact
        def __call__(self, x):
            x = nn.Conv(4, (3, 3), use_bias=False, name='conv')(x)
            x = nn.BatchNorm(use_running_average=True, name='bn')(x)
            return nn.Dense(3, name='head')(x.mean(axis=(1, 2)))

    variables = jax.eval_shape(Tiny().init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
    mask = optim.weight_decay_mask(variables['params'])
    assert mask == {
        'conv': {'kernel': True},
        'bn': {'scale': False, 'bias': False},
        'head': {'kernel': True, 'bias': False},
    }


def _norms(params):
    return jax.tree.map(lambda p: float(jnp.linalg.norm(p)), params)


@pytest.mark.parametrize('name', optim.OPTIMIZERS)
@pytest.mark.parametrize('decay_type', ['l2', 'decoupled'])
def test_masked_weight_decay_leaves_norm_and_bias_untouched(name, decay_type):
    config = make_config(
        name=name, learning_rate=0.1, weight_decay=0.1, weight_decay_type=decay_type,
        trust_coefficient=0.1,
    )
    params = make_params()
    zero_grad = lambda p: jax.tree.map(jnp.zeros_like, p)
    after = run(optim.create_optimizer(config, STEPS_PER_EPOCH), params, zero_grad, 3)
    before_norms, after_norms = _norms(params), _norms(after)
    for group, leaf in [('conv', 'kernel'), ('dense', 'kernel')]:
        assert after_norms[group][leaf] < 0.999 * before_norms[group][leaf]
    for group, leaf in [('bn', 'scale'), ('bn', 'bias'), ('dense', 'bias')]:
        np.testing.assert_array_equal(after[group][leaf], params[group][leaf])

    config.optimizer.decay_norm_and_bias = True
    after_all = run(optim.create_optimizer(config, STEPS_PER_EPOCH), params, zero_grad, 3)
    after_all_norms = _norms(after_all)
    for group, leaf in [('bn', 'scale'), ('bn', 'bias'), ('dense', 'bias')]:
        assert after_all_norms[group][leaf] < 0.999 * before_norms[group][leaf]


def reference_sgd(params, num_steps, *, lr, mu, nesterov, wd, decay_type):
    """PyTorch-style SGD with momentum, written out by hand, with a kernels-only decay.

    l2: the decay joins the gradient before momentum (torch.optim.SGD's weight_decay).
    decoupled: it is added to the momentum direction, then scaled by the rate (SGDW).
    """
    params = jax.tree.map(np.asarray, params)
    flat, treedef = jax.tree.flatten(params)
    velocity = [np.zeros_like(p) for p in flat]
    grad = jax.grad(quadratic_loss)
    for _ in range(num_steps):
        grads = jax.tree.leaves(grad(jax.tree.unflatten(treedef, flat)))
        new_flat = []
        for p, g, i in zip(flat, grads, range(len(flat)), strict=True):
            decay = wd * p if p.ndim > 1 else np.zeros_like(p)
            g = np.asarray(g) + (decay if decay_type == 'l2' else 0.0)
            velocity[i] = mu * velocity[i] + g
            direction = g + mu * velocity[i] if nesterov else velocity[i]
            if decay_type == 'decoupled':
                direction = direction + decay
            new_flat.append(p - lr * direction)
        flat = new_flat
    return jax.tree.unflatten(treedef, flat)


@pytest.mark.parametrize('nesterov', [False, True])
@pytest.mark.parametrize('decay_type', ['l2', 'decoupled'])
def test_sgd_weight_decay_matches_a_hand_written_reference(decay_type, nesterov):
    lr, mu, wd = 0.1, 0.9, 0.05
    config = make_config(
        name='sgd', learning_rate=lr, momentum=mu, nesterov=nesterov, weight_decay=wd,
        weight_decay_type=decay_type,
    )
    params = make_params()
    ours = run(optim.create_optimizer(config, STEPS_PER_EPOCH), params,
               jax.grad(quadratic_loss), 5)
    reference = reference_sgd(params, 5, lr=lr, mu=mu, nesterov=nesterov, wd=wd,
                              decay_type=decay_type)
    assert_trees_close(ours, reference, rtol=1e-5, atol=1e-6)


def test_l2_and_decoupled_decay_differ_through_momentum():
    params = make_params()
    results = {}
    for decay_type in ('l2', 'decoupled'):
        config = make_config(name='sgd', learning_rate=0.1, weight_decay=0.05,
                             weight_decay_type=decay_type)
        results[decay_type] = run(optim.create_optimizer(config, STEPS_PER_EPOCH), params,
                                  jax.grad(quadratic_loss), 3)
    # The first step is the same for both; after that l2's decay has built up in the momentum.
    kernel_gap = np.abs(results['l2']['conv']['kernel'] - results['decoupled']['conv']['kernel'])
    assert kernel_gap.max() > 1e-3
    np.testing.assert_array_equal(results['l2']['bn']['scale'], results['decoupled']['bn']['scale'])


def test_sgd_defaults_to_l2_and_adamw_to_decoupled():
    params = make_params()
    for name, expected in [('sgd', 'l2'), ('adamw', 'decoupled')]:
        default = make_config(name=name, weight_decay=0.05)
        explicit = make_config(name=name, weight_decay=0.05, weight_decay_type=expected)
        got = [run(optim.create_optimizer(c, STEPS_PER_EPOCH), params,
                   jax.grad(quadratic_loss), 3) for c in (default, explicit)]
        assert_trees_close(got[0], got[1], rtol=0, atol=0)


# ---- Agreement with optax's own aliases at a constant rate (a second implementation).


def test_adamw_matches_optax_adamw():
    config = make_config(name='adamw', learning_rate=0.01, weight_decay=0.05, b1=0.8,
                         b2=0.99, eps=1e-7)
    reference = optax.adamw(0.01, b1=0.8, b2=0.99, eps=1e-7, weight_decay=0.05,
                            mask=optim.weight_decay_mask)
    params = make_params()
    grad = jax.grad(quadratic_loss)
    assert_trees_close(run(optim.create_optimizer(config, STEPS_PER_EPOCH), params, grad, 5),
                       run(reference, params, grad, 5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('nesterov', [False, True])
def test_lars_matches_optax_lars(nesterov):
    config = make_config(name='lars', learning_rate=0.5, weight_decay=0.01, momentum=0.9,
                         nesterov=nesterov, trust_coefficient=0.02)
    reference = optax.lars(0.5, weight_decay=0.01, weight_decay_mask=optim.weight_decay_mask,
                           trust_coefficient=0.02, trust_ratio_mask=optim.weight_decay_mask,
                           momentum=0.9, nesterov=nesterov)
    params = make_params()
    grad = jax.grad(quadratic_loss)
    assert_trees_close(run(optim.create_optimizer(config, STEPS_PER_EPOCH), params, grad, 5),
                       run(reference, params, grad, 5), rtol=1e-5, atol=1e-6)


def test_lamb_matches_optax_lamb_when_nothing_is_masked():
    # optax.lamb applies the trust ratio to every parameter, so switch our masks off.
    config = make_config(name='lamb', learning_rate=0.01, weight_decay=0.05, eps=1e-6,
                         decay_norm_and_bias=True, adapt_norm_and_bias=True)
    reference = optax.lamb(0.01, eps=1e-6, weight_decay=0.05)
    params = make_params()
    grad = jax.grad(quadratic_loss)
    assert_trees_close(run(optim.create_optimizer(config, STEPS_PER_EPOCH), params, grad, 5),
                       run(reference, params, grad, 5), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['lars', 'lamb'])
def test_trust_ratio_skips_norm_and_bias(name):
    # With the trust ratio off for 1-D parameters, their step is the plain (momentum / Adam)
    # step, the same as in AdamW / SGD with the same settings.
    plain = 'sgd' if name == 'lars' else 'adamw'
    params = make_params()
    grad = jax.grad(quadratic_loss)
    steps = [run(optim.create_optimizer(make_config(name=n, learning_rate=0.1, weight_decay=0.0),
                                        STEPS_PER_EPOCH), params, grad, 3) for n in (name, plain)]
    for group, leaf in [('bn', 'scale'), ('bn', 'bias'), ('dense', 'bias')]:
        np.testing.assert_allclose(steps[0][group][leaf], steps[1][group][leaf], rtol=1e-6)
    assert np.abs(steps[0]['conv']['kernel'] - steps[1]['conv']['kernel']).max() > 1e-3


# ---- Gradient clipping.


def test_clipping_limits_the_update_norm():
    config = make_config(name='sgd', learning_rate=1.0, momentum=0.0, weight_decay=0.0,
                         grad_clip_norm=0.5)
    tx = optim.create_optimizer(config, STEPS_PER_EPOCH)
    params = make_params()
    big = jax.tree.map(lambda p: 100.0 * jnp.ones_like(p), params)
    small = jax.tree.map(lambda p: 1e-3 * jnp.ones_like(p), params)
    for grads, expected_norm in [(big, 0.5), (small, float(optax.global_norm(small)))]:
        updates, _ = tx.update(grads, tx.init(params), params)
        np.testing.assert_allclose(optax.global_norm(updates), expected_norm, rtol=1e-5)

    config.optimizer.grad_clip_norm = 0.0  # off
    tx = optim.create_optimizer(config, STEPS_PER_EPOCH)
    updates, _ = tx.update(big, tx.init(params), params)
    np.testing.assert_allclose(optax.global_norm(updates), optax.global_norm(big), rtol=1e-5)


# ---- Schedules.


def schedule_values(config, steps):
    schedule = optim.create_learning_rate_schedule(config, STEPS_PER_EPOCH)
    return np.array([float(schedule(s)) for s in steps])


def test_warmup_is_linear_and_reaches_the_peak_at_its_end():
    config = make_config(learning_rate=0.1, schedule='cosine', warmup_epochs=2.0)
    warmup = 2 * STEPS_PER_EPOCH
    values = schedule_values(config, range(warmup + 1))
    np.testing.assert_allclose(values, 0.1 * np.arange(warmup + 1) / warmup, rtol=1e-6,
                               atol=1e-9)
    config.optimizer.warmup_steps = 7  # overrides warmup_epochs
    np.testing.assert_allclose(schedule_values(config, [3, 7]), [0.1 * 3 / 7, 0.1], rtol=1e-6)


@pytest.mark.parametrize('end_factor', [0.0, 0.1])
def test_cosine_follows_the_formula_and_ends_at_the_end_factor(end_factor):
    config = make_config(learning_rate=0.2, num_epochs=10.0, schedule='cosine',
                         warmup_epochs=1.0, end_learning_rate_factor=end_factor)
    warmup, total = STEPS_PER_EPOCH, 10 * STEPS_PER_EPOCH
    steps = list(range(warmup, total + 1, 5))
    expected = [
        0.2 * (end_factor + (1 - end_factor) * 0.5 * (1 + math.cos(math.pi * (s - warmup)
                                                                   / (total - warmup))))
        for s in steps
    ]
    np.testing.assert_allclose(schedule_values(config, steps), expected, rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(schedule_values(config, [total]), [0.2 * end_factor], atol=1e-8)


def test_step_decay_divides_by_ten_exactly_at_the_given_epochs():
    config = make_config(learning_rate=0.1, schedule='step', warmup_epochs=5.0,
                         step_epochs=(30, 60, 80))
    boundaries = {30: 0.01, 60: 0.001, 80: 0.0001}
    for epoch, after in boundaries.items():
        step = epoch * STEPS_PER_EPOCH
        before, at = schedule_values(config, [step - 1, step])
        np.testing.assert_allclose([before, at], [after * 10, after], rtol=1e-5)
    np.testing.assert_allclose(schedule_values(config, [5 * STEPS_PER_EPOCH, 899]),
                               [0.1, 0.0001], rtol=1e-5)


@pytest.mark.parametrize('power', [1.0, 2.0])
def test_polynomial_decay_shape(power):
    config = make_config(learning_rate=0.1, num_epochs=10.0, schedule='polynomial',
                         warmup_epochs=2.0, polynomial_power=power,
                         end_learning_rate_factor=0.01)
    warmup, total = 2 * STEPS_PER_EPOCH, 10 * STEPS_PER_EPOCH
    steps = [warmup, 40, 60, total, total + 10]
    expected = [0.001 + (0.1 - 0.001) * (1 - min(s - warmup, total - warmup)
                                         / (total - warmup)) ** power for s in steps]
    np.testing.assert_allclose(schedule_values(config, steps), expected, rtol=1e-5)


def test_constant_schedule_holds_the_peak_after_warmup():
    config = make_config(learning_rate=0.1, schedule='constant', warmup_steps=4)
    np.testing.assert_allclose(schedule_values(config, [4, 100, 899]), [0.1] * 3, rtol=1e-6)


@pytest.mark.parametrize(('batch_size', 'reference', 'peak'),
                         [(256, 256, 0.1), (1024, 256, 0.4), (128, 256, 0.05), (1024, 1024, 0.1)])
def test_peak_rate_scales_linearly_with_the_batch(batch_size, reference, peak):
    config = make_config(batch_size=batch_size, learning_rate=0.1,
                         reference_batch_size=reference)
    assert optim.peak_learning_rate(config) == pytest.approx(peak)
    np.testing.assert_allclose(schedule_values(config, [0, 50]), [peak, peak], rtol=1e-6)


def test_num_train_steps_overrides_num_epochs():
    config = make_config(num_epochs=90.0, num_train_steps=50, schedule='cosine',
                         warmup_steps=5)
    assert optim.total_train_steps(config, STEPS_PER_EPOCH) == 50
    np.testing.assert_allclose(schedule_values(config, [50]), [0.0], atol=1e-9)
    config.num_train_steps = -1
    assert optim.total_train_steps(config, STEPS_PER_EPOCH) == 900


@pytest.mark.parametrize(('num_epochs', 'examples', 'batch_size', 'total'), [
    (2.1, 30, 10, 7),  # 6.3 steps: round() said 6, the loop ran 7
    (0.3, 100, 10, 3),  # 0.3 * 10 is 3.0000000000000004 in floats: still 3 steps
    (1.5, 64, 8, 12),
])
def test_loop_and_learning_rate_schedule_end_at_the_same_step(num_epochs, examples, batch_size,
                                                               total):
    from resnet_flax import train

    config = make_config(batch_size=batch_size, num_epochs=num_epochs, schedule='cosine',
                         warmup_steps=1)
    loop = train.make_schedule(config, examples)
    assert loop.total_steps == total
    lr = optim.create_learning_rate_schedule(config, loop.steps_per_epoch)
    # The cosine reaches 0 exactly at the loop's last step, not one step early or late.
    assert float(lr(total - 1)) > 1e-6
    assert float(lr(total)) == pytest.approx(0.0, abs=1e-9)


# ---- Bad input: one line that names the bad value and the choices.


@pytest.mark.parametrize(('field', 'value', 'choice'), [
    ('name', 'adagrad', 'lamb'),
    ('schedule', 'exponential', 'polynomial'),
    ('weight_decay_type', 'l1', 'decoupled'),
])
def test_unknown_choices_give_a_one_line_error(field, value, choice):
    config = make_config(**{field: value})
    with pytest.raises(ValueError) as info:
        optim.create_optimizer(config, STEPS_PER_EPOCH)
    message = str(info.value)
    assert '\n' not in message and repr(value) in message and choice in message


def test_warmup_longer_than_training_is_an_error():
    config = make_config(num_train_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match='warmup') as info:
        optim.create_learning_rate_schedule(config, STEPS_PER_EPOCH)
    assert '\n' not in str(info.value)
