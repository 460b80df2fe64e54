"""Research switches and diagnostics: per-block gradient norms, stochastic depth, head dropout,
the backbone API (feature maps per stage, a replaceable head)."""

from __future__ import annotations

import functools
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from resnet_flax import blocks, models, steps, sweep, train
from resnet_flax.state import TrainState
from tests.tiny import tiny_config


def _train_records(workdir) -> list[dict]:
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['split'] == 'train']


@pytest.mark.slow
def test_block_grad_norms_are_logged_make_up_the_global_norm_and_are_plotted(tmp_path):
    run_dir = tmp_path / 'plain' / 'seed0'  # a sweep directory of one variant and one seed
    train.train_and_evaluate(tiny_config(log_block_grad_norms=True, num_train_steps=3,
                                         eval_every_steps=3, **{'model.shortcut': 'none'}),
                             str(run_dir))
    records = _train_records(run_dir)
    names = {k[len('grad_norm/'):] for k in records[0] if k.startswith('grad_norm/')}
    assert names == {'stem_conv', 'stem_bn', 'stage1_block1', 'stage2_block1', 'head'}
    for record in records:  # one step per logging window: the norms of the same gradient
        norms = [record[f'grad_norm/{name}'] for name in names]
        assert all(n > 0 for n in norms)
        assert math.sqrt(sum(n * n for n in norms)) == pytest.approx(record['grad_norm'],
                                                                      rel=1e-5)
    result = sweep.report(tmp_path)
    [row] = result['rows']
    blocks_in_order = ['grad_norm/stage1_block1', 'grad_norm/stage2_block1']
    assert row['grad_norms']['first'] == [records[0][k] for k in blocks_in_order]
    assert row['grad_norms']['mean'] == pytest.approx(
        [sum(r[k] for r in records) / len(records) for k in blocks_in_order])
    assert row['train_top1_mean'] == records[-1]['top1']
    assert result['files']['grad_norms.png'].read_bytes()[:4] == b'\x89PNG'


@pytest.mark.slow
def test_block_grad_norms_are_off_by_default(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2), str(tmp_path))
    assert not [k for k in _train_records(tmp_path)[0] if k.startswith('grad_norm/')]


# ---- Stochastic depth and head dropout --------------------------------------------------------


def _tiny(**overrides) -> models.ResNet:
    defaults = dict(num_classes=5, stage_sizes=(2, 1), stage_widths=(8, 16), stem_width=8)
    return models.create('resnet18', **{**defaults, **overrides})


def _images(batch: int = 8) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).standard_normal((batch, 16, 16, 3), np.float32))


def test_drop_path_keeps_whole_examples_at_the_survival_rate_and_rescales_them():
    rate, batch = 0.3, 4000
    branch = jnp.ones((batch, 2, 2, 3))
    out = blocks.DropPath(rate=rate, deterministic=False).apply(
        {}, branch, rngs={'drop_path': jax.random.key(1)})
    per_example = np.asarray(out).reshape(batch, -1)
    kept = per_example[:, 0] != 0
    assert (per_example == per_example[:, :1]).all()  # all of an example, or none of it
    np.testing.assert_allclose(per_example[kept], 1 / (1 - rate), rtol=1e-6)
    # Survival 0.7 within 4 binomial standard deviations (0.029 at 4000 examples).
    assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / batch)
    assert np.asarray(out).mean() == pytest.approx(1.0, abs=0.05)  # the expectation is kept


def test_drop_path_rates_rise_linearly_to_the_last_block():
    model = _tiny(drop_path_rate=0.3)
    assert model.drop_path_rates() == pytest.approx([0.1, 0.2, 0.3])
    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, blocks.DropPath):
            seen[context.module.path[0]] = context.module.rate
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.init({'params': jax.random.key(0), 'drop_path': jax.random.key(1)}, _images(),
                   train=True)
    assert seen == pytest.approx({'stage1_block1': 0.1, 'stage1_block2': 0.2,
                                  'stage2_block1': 0.3})


@pytest.mark.parametrize('field', ['drop_path_rate', 'head_dropout_rate'])
def test_drop_path_and_head_dropout_are_the_identity_at_eval_and_random_in_training(field):
    x = _images()
    plain = _tiny()
    dropping = _tiny(**{field: 0.5})
    variables = plain.init(jax.random.key(0), x, train=False)
    # Same variables: neither switch adds parameters.
    assert jax.tree.structure(dropping.init(jax.random.key(0), x, train=False)) == \
        jax.tree.structure(variables)
    np.testing.assert_array_equal(dropping.apply(variables, x, train=False),
                                  plain.apply(variables, x, train=False))

    def train_logits(model, seed):
        rngs = {'dropout': jax.random.key(seed), 'drop_path': jax.random.key(seed + 100)}
        logits, _ = model.apply(variables, x, train=True, mutable=['batch_stats'], rngs=rngs)
        return np.asarray(logits)

    np.testing.assert_array_equal(train_logits(dropping, 1), train_logits(dropping, 1))
    assert not np.allclose(train_logits(dropping, 1), train_logits(dropping, 2))
    assert not np.allclose(train_logits(dropping, 1), train_logits(plain, 1))
    np.testing.assert_array_equal(train_logits(plain, 1), train_logits(plain, 2))


@pytest.mark.slow
def test_train_step_randomness_is_a_function_of_seed_and_step():
    model = _tiny(drop_path_rate=0.5, head_dropout_rate=0.5)
    x = _images()
    variables = model.init(jax.random.key(0), x, train=False)
    optimizer = optax.sgd(0.1)
    state = TrainState(step=jnp.array(3), params=variables['params'],
                       batch_stats=variables['batch_stats'],
                       opt_state=optimizer.init(variables['params']),
                       rng=jax.random.PRNGKey(7))
    step = jax.jit(functools.partial(steps.train_step, model=model, optimizer=optimizer,
                                     learning_rate_fn=lambda s: 0.1, cfg=steps.StepConfig()))
    pixels = jax.random.randint(jax.random.key(3), (8, 16, 16, 3), 0, 256)
    batch = {'image': pixels.astype(jnp.uint8), 'label': jnp.arange(8) % 5}  # as the loaders send
    loss = lambda s: float(step(s, batch)[1]['loss'])
    assert loss(state) == loss(state)
    assert loss(state) != loss(state.replace(step=jnp.array(4)))
    assert loss(state) != loss(state.replace(rng=jax.random.PRNGKey(8)))


# ---- Backbone API ----------------------------------------------------------------------------


def test_return_features_gives_every_stages_feature_map():
    model = models.create('resnet50')
    images = jnp.zeros((2, 224, 224, 3))
    init = lambda: model.init(jax.random.key(0), images, train=False)
    variables = jax.eval_shape(init)
    features = jax.eval_shape(
        lambda v: model.apply(v, images, train=False, return_features=True), variables)
    shapes = {name: f.shape for name, f in features.items()}
    assert shapes == {'stem': (2, 56, 56, 64), 'stage1': (2, 56, 56, 256),
                      'stage2': (2, 28, 28, 512), 'stage3': (2, 14, 14, 1024),
                      'stage4': (2, 7, 7, 2048), 'logits': (2, 1000)}


def test_features_and_logits_agree_with_the_plain_call():
    model = _tiny()
    x = _images()
    variables = model.init(jax.random.key(0), x, train=False)
    features = model.apply(variables, x, train=False, return_features=True)
    np.testing.assert_array_equal(features['logits'], model.apply(variables, x, train=False))
    assert set(features) == {'stem', 'stage1', 'stage2', 'logits'}
    assert features['stage2'].shape == (8, 2, 2, 16)  # 16x16 / 4 (stem) / 2


def test_replace_head_keeps_the_body_and_fits_a_new_class_count():
    model = _tiny()
    x = _images()
    variables = model.init(jax.random.key(0), x, train=False)
    new_model, new_vars = models.replace_head(model, variables, 3, jax.random.key(5))
    assert new_model.num_classes == 3
    assert new_vars['params']['head']['kernel'].shape == (16, 3)
    for name in variables['params']:
        if name != 'head':
            assert new_vars['params'][name] is variables['params'][name]
    assert new_vars['batch_stats'] is variables['batch_stats']
    before = model.apply(variables, x, train=False, return_features=True)
    after = new_model.apply(new_vars, x, train=False, return_features=True)
    np.testing.assert_array_equal(after['stage2'], before['stage2'])
    assert after['logits'].shape == (8, 3)
    # The new head is the model's own: a fresh model of 3 classes has the same variable tree.
    fresh = new_model.init(jax.random.key(0), x, train=False)
    assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, new_vars)


@pytest.mark.parametrize('overrides, match', [
    (dict(drop_path_rate=1.0), r'drop_path_rate=1.0 must be in \[0, 1\)'),
    (dict(head_dropout_rate=-0.1), r'head_dropout_rate=-0.1 must be in \[0, 1\)'),
    (dict(drop_path_rate=0.1, shortcut='none'), 'a plain block has no identity'),
])
def test_bad_rates_are_one_line_errors(overrides, match):
    with pytest.raises(ValueError, match=match) as error:
        _tiny(**overrides)
    assert '\n' not in str(error.value)
