"""The training loop, on the tiny digits model: learning, resuming, sharding, failure modes."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_flax import (
    checkpoint,
    data,
    evaluate,
    models,
    optim,
    run_config,
    sharding,
    steps,
    train,
)
from resnet_flax.device_augment import AugmentConfig
from resnet_flax.state import abstract_state, create_train_state
from tests.tiny import (
    REPO,
    TINY_FLAGS,
    cpu_env,
    override_flags,
    run_script,
    tiny_config,
    train_losses,
)


def _restore_params(workdir: Path, config) -> dict:
    """The parameters of the newest checkpoint in `workdir`, on this process's devices."""
    mesh = sharding.create_mesh()
    model = models.from_config(config.model)
    info = data.get_info(config.data)
    steps_per_epoch = train.make_schedule(config, info.num_train_examples).steps_per_epoch
    optimizer = optim.create_optimizer(config, steps_per_epoch)
    target = abstract_state(model, optimizer, info.image_shape, config.ema_decay > 0, mesh)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    state = checkpoint.restore_latest(manager, target)
    manager.close()
    return jax.device_get(state)


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.slow
def test_loss_falls_on_learnable_data(tmp_path):
    config = tiny_config(num_train_steps=60, log_every_steps=5, eval_every_steps=60,
                         checkpoint_every_steps=60, **{'optimizer.learning_rate': 1.6})
    summary = train.train_and_evaluate(config, str(tmp_path))
    losses = train_losses(tmp_path)
    assert losses[60] < 0.6 * losses[5], losses
    assert summary['eval_top1'] > 0.5, summary
    assert summary['eval_num_examples'] == 360  # the whole test split, none dropped


@pytest.mark.slow
def test_metrics_jsonl_and_config_are_written(tmp_path):
    train.train_and_evaluate(tiny_config(), str(tmp_path))
    records = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
    train_records = [r for r in records if r['split'] == 'train']
    eval_records = [r for r in records if r['split'] == 'eval']
    assert [r['step'] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert {'loss', 'learning_rate', 'images_per_sec', 'top1',
            'input_wait_fraction'} <= set(train_records[0])
    assert all(0 <= r['input_wait_fraction'] <= 1 for r in train_records)
    assert [r['step'] for r in eval_records] == [3, 6]
    assert {'loss', 'top1', 'top5', 'num_examples'} <= set(eval_records[0])
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert saved['model']['stage_widths'] == [8, 16]
    assert any((tmp_path / 'tensorboard').iterdir())


@pytest.mark.slow
def test_resumed_run_matches_uninterrupted_run(tmp_path):
    # A constant rate, so that the 3-step run's schedule is a prefix of the 6-step run's.
    constant = {'optimizer.schedule': 'constant', 'optimizer.warmup_epochs': 0.0}
    straight = tiny_config(**constant)
    train.train_and_evaluate(straight, str(tmp_path / 'straight'))

    resumed_dir = str(tmp_path / 'resumed')
    train.train_and_evaluate(tiny_config(num_train_steps=3, **constant), resumed_dir)
    train.train_and_evaluate(tiny_config(allow_config_change=True, **constant), resumed_dir)

    assert train_losses(tmp_path / 'resumed') == pytest.approx(
        train_losses(tmp_path / 'straight'), rel=1e-6
    )
    _assert_trees_close(
        _restore_params(tmp_path / 'resumed', straight).params,
        _restore_params(tmp_path / 'straight', straight).params,
    )


def test_eval_counts_every_example_when_batches_do_not_divide_the_split(tmp_path):
    config = tiny_config(eval_batch_size=64)  # 360 = 5 * 64 + 40
    mesh = sharding.create_mesh()
    model = models.from_config(config.model)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 16, 16, 3), np.float32),
                           train=False)
    eval_fn = evaluate.make_eval_fn(model, mesh, AugmentConfig.from_config(config))
    result = evaluate.evaluate(eval_fn, variables, config, mesh)
    assert result['num_examples'] == 360
    # Same numbers from a plain, unbatched numpy pass over the split, normalised on the host.
    mean, std = data.normalization(config.data)
    images, labels = [], []
    for batch in data.eval_batches(config.data, global_batch_size=360, process_index=0,
                                   process_count=1):
        images.append(batch['image'][batch['mask']])
        labels.append(batch['label'][batch['mask']])
    normalised = (np.concatenate(images) / 255 - mean) / std
    logits = model.apply(variables, normalised.astype(np.float32), train=False)
    top1 = float(np.mean(np.argmax(logits, -1) == np.concatenate(labels)))
    assert result['top1'] == pytest.approx(top1, abs=1e-6)


@pytest.mark.slow
def test_nan_loss_stops_the_run_and_keeps_the_last_checkpoint(tmp_path):
    config = tiny_config(debug_nan_at_step=4, checkpoint_every_steps=2, eval_every_steps=100)
    with pytest.raises(train.NonFiniteLossError, match='last checkpoint \\(step 4\\) is intact'):
        train.train_and_evaluate(config, str(tmp_path))
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), read_only=True)
    assert manager.latest_step() == 4
    state = _restore_params(tmp_path, config)
    assert int(state.step) == 4
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))


@pytest.mark.slow
def test_incompatible_checkpoint_is_refused_and_kept(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=3), str(tmp_path))
    before = sorted(p.name for p in (tmp_path / 'checkpoints').iterdir())
    wider = tiny_config(**{'model.stage_widths': (8, 32)})
    with pytest.raises(run_config.ConfigChangeError, match=r'another network \(model.stage_wi'):
        train.train_and_evaluate(wider, str(tmp_path))
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert saved['model']['stage_widths'] == [8, 16]  # not overwritten
    # Without the saved config (a workdir of an older version), the arrays' shapes refuse it.
    (tmp_path / 'config.json').unlink()
    with pytest.raises(checkpoint.CheckpointMismatchError, match='does not fit this model'):
        train.train_and_evaluate(wider, str(tmp_path))
    assert sorted(p.name for p in (tmp_path / 'checkpoints').iterdir()) == before


@pytest.mark.parametrize(
    'overrides, message',
    [
        ({'batch_size': 30, 'grad_accum_steps': 4}, 'micro-batches'),
        ({'optimizer.name': 'adagrad'}, 'adagrad'),
        ({'optimizer.warmup_steps': 6}, 'warmup'),  # (num_classes is inferred from the data)
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message) as error:
        train.train_and_evaluate(tiny_config(**overrides), str(tmp_path))
    assert '\n' not in str(error.value)
    assert not (tmp_path / 'checkpoints').exists() or not any(
        (tmp_path / 'checkpoints').iterdir()
    )


def _accumulated_step(config, grad_accum_steps: int, learning_rate: float) -> tuple:
    """A fresh tiny train state, a batch of 32, and one train step over it in
    `grad_accum_steps` micro-batches: (model, state, batch, new state, metrics)."""
    model = models.from_config(config.model)
    optimizer = optim.create_optimizer(config, 44)
    mesh = sharding.create_mesh()
    state = create_train_state(model, optimizer, jax.random.PRNGKey(0), (16, 16, 3), False, mesh)
    batch = next(data.train_batches(config.data, global_batch_size=32, seed=0, process_index=0,
                                    process_count=1))
    new_state, metrics = steps.train_step(
        state, batch, model=model, optimizer=optimizer,
        learning_rate_fn=lambda step: learning_rate,
        cfg=steps.StepConfig(grad_accum_steps=grad_accum_steps),
        batch_sharding=sharding.batch_sharding(mesh))
    return model, state, batch, new_state, metrics


@pytest.mark.slow
def test_gradient_accumulation_averages_the_micro_batch_gradients():
    # Reference: the gradient of each micro-batch on its own, averaged, then one SGD update.
    config = tiny_config(**{'optimizer.momentum': 0.0, 'optimizer.weight_decay': 0.0,
                            'optimizer.schedule': 'constant', 'optimizer.warmup_steps': 0,
                            'optimizer.warmup_epochs': 0.0})
    model, state, batch, accumulated, metrics = _accumulated_step(config, 2, learning_rate=0.5)

    def loss_fn(params, micro):
        images = micro['image'] / 255.0  # the default StepConfig normalises with (0, 1)
        logits, _ = model.apply({'params': params, 'batch_stats': state.batch_stats},
                                images, train=True, mutable=['batch_stats'])
        return steps.cross_entropy(logits, micro['label'], 0.0).mean()

    micro_batches = [jax.tree.map(lambda x, i=i: x[i::2], batch) for i in range(2)]
    grads = [jax.grad(loss_fn)(state.params, micro) for micro in micro_batches]
    step_size = optim.create_learning_rate_schedule(config, 44)(0)
    assert step_size > 0
    expected = jax.tree.map(lambda p, g0, g1: p - step_size * (g0 + g1) / 2, state.params, *grads)
    _assert_trees_close(accumulated.params, expected, rtol=1e-4, atol=1e-6)
    expected_loss = np.mean([loss_fn(state.params, micro) for micro in micro_batches])
    assert float(metrics['loss']) == pytest.approx(float(expected_loss), rel=1e-5)


def _bn_inputs(model, variables, images) -> dict[tuple[str, ...], np.ndarray]:
    """The input of every BatchNorm in a train-mode forward pass, by module path."""
    import flax.linen as nn

    seen = {}

    def record(next_fun, args, kwargs, context):
        if isinstance(context.module, nn.BatchNorm) and context.method_name == '__call__':
            seen[context.module.path] = np.asarray(args[0], np.float64)
        return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
        model.apply(variables, images, train=True, mutable=['batch_stats'])
    return seen


@pytest.mark.slow
def test_gradient_accumulation_updates_bn_running_averages_once_per_micro_batch():
    # Reference, computed apart from the model's BN: each micro-batch's mean and biased variance
    # of every BN input, folded into the running averages k times in sequence.
    k, momentum = 4, 0.8
    config = tiny_config(**{'model.bn_momentum': momentum})
    model, state, batch, new_state, _ = _accumulated_step(config, k, learning_rate=0.1)

    import flax.traverse_util

    start = flax.traverse_util.flatten_dict(jax.device_get(state.batch_stats))
    got = flax.traverse_util.flatten_dict(jax.device_get(new_state.batch_stats))
    expected = {key: np.asarray(value, np.float64) for key, value in start.items()}
    images = batch['image'] / 255.0  # the default StepConfig normalises with (0, 1)
    for i in range(k):  # micro-batch i is every k-th example from i
        inputs = _bn_inputs(model, state.variables(), images[i::k])
        for path, x in inputs.items():
            mean, var = x.mean((0, 1, 2)), x.var((0, 1, 2))
            for name, stat in (('mean', mean), ('var', var)):
                expected[(*path, name)] = momentum * expected[(*path, name)] + (1 - momentum) * stat
    assert len(inputs) >= 4 and set(expected) == set(got)
    for key in got:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-4, atol=1e-5, err_msg=key)
    # Not the same as one update with the whole batch's statistics.
    whole = _bn_inputs(model, state.variables(), images)
    path = sorted(whole)[-1]
    one_update = momentum * start[(*path, 'var')] + (1 - momentum) * whole[path].var((0, 1, 2))
    assert np.abs(np.asarray(got[(*path, 'var')]) - one_update).max() > 1e-3


@pytest.mark.slow
def test_ema_weights_are_evaluated_alongside(tmp_path):
    summary = train.train_and_evaluate(tiny_config(ema_decay=0.5), str(tmp_path))
    assert 0.0 <= summary['eval_ema_top1'] <= 1.0
    assert summary['eval_ema_loss'] != summary['eval_loss']


# ---- Real subprocesses: several devices, several processes, signals.

@pytest.mark.slow
def test_eight_devices_match_one_device_and_restore_on_one(tmp_path):
    run_script('train.py', ['--config=configs/digits.py', f'--workdir={tmp_path / "d1"}',
                            *override_flags(TINY_FLAGS)], env=cpu_env(1))
    run_script('train.py', ['--config=configs/digits.py', f'--workdir={tmp_path / "d8"}',
                            *override_flags(TINY_FLAGS)], env=cpu_env(8))
    one, eight = train_losses(tmp_path / 'd1'), train_losses(tmp_path / 'd8')
    assert eight == pytest.approx(one, rel=1e-4)
    # The 8-device checkpoint restores here, on one device, to the same parameters.
    config = tiny_config()
    _assert_trees_close(_restore_params(tmp_path / 'd8', config).params,
                        _restore_params(tmp_path / 'd1', config).params, rtol=1e-4, atol=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_process_with_two_devices(tmp_path):
    flags = ['--config=configs/digits.py', *override_flags(TINY_FLAGS)]
    run_script('train.py', [*flags, f'--workdir={tmp_path / "single"}'], env=cpu_env(2))

    port = _free_port()
    procs = [
        subprocess.Popen(
            [sys.executable, str(REPO / 'train.py'), *flags, f'--workdir={tmp_path / "multi"}',
             f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
             f'--process_id={i}'],
            cwd=REPO, env=cpu_env(1), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (_, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert train_losses(tmp_path / 'multi') == pytest.approx(
        train_losses(tmp_path / 'single'), rel=1e-4
    )


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_that_resumes(tmp_path):
    flags = ['--config=configs/digits.py', f'--workdir={tmp_path}',
             *override_flags({**TINY_FLAGS, 'num_train_steps': 100000,
                              'checkpoint_every_steps': 100000, 'eval_every_steps': 100000})]
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *flags], cwd=REPO,
                            env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = tmp_path / 'metrics.jsonl'
    deadline = time.time() + 240
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 5):
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err[-3000:]
    match = [line for line in err.splitlines() if 'Preempted: saved a checkpoint at step' in line]
    assert match, err[-3000:]
    saved_step = int(match[0].split('at step ')[1].split(';')[0])
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), read_only=True)
    assert manager.latest_step() == saved_step >= 5

    resumed = run_script('train.py', [*flags[:2], *override_flags(
        {**TINY_FLAGS, 'num_train_steps': saved_step + 2, 'allow_config_change': True})])
    assert f'Resumed from step {saved_step}' in resumed.stderr


def test_unknown_config_file_is_a_one_line_error(tmp_path):
    result = run_script('train.py', ['--config=configs/resnet51.py', f'--workdir={tmp_path}'],
                        check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'no config file configs/resnet51.py' in lines[0]
    assert 'resnet50.py' in lines[0]  # names the configs that exist
    assert not any(tmp_path.iterdir())
