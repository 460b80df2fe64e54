"""eval.py, prediction and fine-tuning, on real checkpoints written by the real trainer and by
the converter: metrics that match the training loop's, PyTorch weights end to end, init_from."""

from __future__ import annotations

import json
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest
from PIL import Image

from resnet_flax import (
    checkpoint,
    convert,
    data,
    device_augment,
    eval_checkpoint,
    finetune,
    metrics,
    models,
    optim,
    predict,
    sharding,
    train,
    weights,
)
from resnet_flax.data import info as info_lib
from resnet_flax.data import single_image
from resnet_flax.state import abstract_state, create_train_state
from tests.tiny import REPO, TINY_FLAGS, cpu_env, override_flags, run_script, tiny_config

EMA_DECAY = 0.9
# resnet18's blocks and stem, two stages of one block at 1/8 width: a torchvision-keyed net
# that converts by name and trains in seconds.
SMALL_TORCH = dict(layers=(1, 1), widths=(8, 16), stem_width=8)
SMALL_FIELDS = dict(stage_sizes=(1, 1), stage_widths=(8, 16), stem_width=8)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A tiny digits run with EMA: 6 steps, evaluated and checkpointed at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp('trained')
    train.train_and_evaluate(tiny_config(ema_decay=EMA_DECAY), str(workdir))
    return workdir


def _eval_records(workdir) -> dict[int, dict]:
    return {r['step']: r for r in metrics.read_metrics(workdir, 'eval')}


def _small_torch_net(num_classes: int, seed: int = 0):
    torch_reference = pytest.importorskip('tests.torch_reference')  # needs torch
    return torch_reference.randomize(
        torch_reference.build('resnet18', num_classes=num_classes, **SMALL_TORCH), seed)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result.stderr[-2000:]
    assert 'Traceback' not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith('Error: ')]
    assert len(errors) == 1, result.stderr[-2000:]
    return errors[0]


# ---------------------------------------------------------------------------------------------
# Evaluation


@pytest.mark.slow
def test_eval_json_reports_the_metrics_of_the_last_in_training_eval(trained):
    # Trained on one device, evaluated on two: the split is still counted exactly once.
    result = run_script('eval.py', ['--config=configs/digits.py',
                                    *override_flags(TINY_FLAGS), f'--workdir={trained}',
                                    '--json'], env=cpu_env(num_devices=2))
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    logged = _eval_records(trained)[6]
    assert reported['step'] == 6
    assert reported['num_examples'] == logged['num_examples'] == 360
    for name in ('loss', 'top1', 'top5'):
        assert reported[name] == pytest.approx(logged[name], abs=1e-6), name


@pytest.mark.slow
def test_eval_of_an_earlier_step_and_of_the_ema_weights_match_the_training_log(trained):
    logged = _eval_records(trained)
    step3 = eval_checkpoint.evaluate_checkpoint(tiny_config(ema_decay=EMA_DECAY), str(trained),
                                                step=3)
    ema6 = eval_checkpoint.evaluate_checkpoint(tiny_config(ema_decay=EMA_DECAY), str(trained),
                                               use_ema=True)
    assert step3['step'] == 3 and ema6['step'] == 6 and ema6['ema']
    for name in ('loss', 'top1', 'top5'):
        assert step3[name] == pytest.approx(logged[3][name], abs=1e-6)
        assert ema6[name] == pytest.approx(logged[6][f'ema_{name}'], abs=1e-6)
    assert ema6['loss'] != pytest.approx(logged[6]['loss'], abs=1e-4)  # really other weights


@pytest.mark.slow
def test_a_step_directory_evaluates_like_its_workdir(trained):
    config = tiny_config()
    by_step = eval_checkpoint.evaluate_checkpoint(
        config, str(trained / 'checkpoints' / '3'), split='train')
    by_workdir = eval_checkpoint.evaluate_checkpoint(config, str(trained), step=3, split='train')
    assert by_step['num_examples'] == 1437 and by_step['split'] == 'train'
    assert by_step['top1'] == by_workdir['top1'] and by_step['loss'] == by_workdir['loss']


@pytest.mark.slow
def test_best_step_is_the_one_with_the_highest_eval_top1(trained):
    logged = _eval_records(trained)
    best = max((3, 6), key=lambda s: (logged[s]['top1'], s))
    assert weights.locate(trained, 'best').step == best


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_checkpoint_is_a_one_line_error_from_eval_py(tmp_path):
    result = run_script('eval.py', ['--config=configs/digits.py',
                                    f'--checkpoint={tmp_path / "nothing"}'], check=False)
    assert _one_error_line(result).startswith(f'Error: No checkpoint at {tmp_path / "nothing"}')


@pytest.mark.slow
def test_bad_checkpoints_and_steps_are_one_line_errors(trained, tmp_path):
    wider = tiny_config(**{'model.stage_widths': (8, 32)})
    cases = [
        (lambda: eval_checkpoint.evaluate_checkpoint(wider, str(trained)),
         r'does not fit this model: params/stage2_block1/bn1/bias is \(16,\) there but '
         r'\(32,\) here; its model differs from the config in: '
         r'--config.model.stage_widths=\(8,16\)\.$'),
        (lambda: weights.locate(trained, 4), r'has no checkpoint of step 4; its steps: \[3, 6\]'),
        (lambda: weights.locate(trained, 'first'), "'first' is not a step number"),
        (lambda: weights.locate(tmp_path), 'holds no checkpoint'),
        (lambda: weights.locate(trained / 'checkpoints' / '3', 6), 'needs the workdir'),
        (lambda: eval_checkpoint.run(tiny_config(), workdir=str(trained), checkpoint='x',
                                     checkpoint_step='latest', split=None, use_ema=False,
                                     images=[], as_json=False), 'exactly one of'),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            call()
        assert '\n' not in str(error.value)


def test_non_image_file_is_a_one_line_error(tmp_path):
    text = tmp_path / 'notes.jpg'
    text.write_text('not an image\n')
    broken = tmp_path / 'broken.png'
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(broken)
    broken.write_bytes(broken.read_bytes()[:60])  # a PNG header with a truncated body
    for path, message in [(text, 'is not an image'), (broken, 'is a damaged image file'),
                          (tmp_path / 'absent.png', 'No image file at')]:
        with pytest.raises((ValueError, FileNotFoundError), match=message) as error:
            single_image.load_eval_image(str(path), tiny_config().data)
        assert '\n' not in str(error.value)


# ---------------------------------------------------------------------------------------------
# Prediction


def _digit_png(path, pixels: np.ndarray) -> None:
    """An 8x8 PNG of a digits image: 0..16 ink -> 0..255 (white strokes on black)."""
    Image.fromarray(np.round(pixels * 255).astype(np.uint8), mode='L').save(path)


@pytest.mark.slow
def test_digit_png_is_preprocessed_as_the_eval_split_and_predicted(trained, tmp_path):
    config = tiny_config()
    batch = next(data.eval_batches(config.data, global_batch_size=8))
    from resnet_flax.data import digits

    pixels = digits._split('test')[0][:8]
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f'digit{i}.png'))
        _digit_png(paths[-1], pixels[i])
    images = np.stack([single_image.load_eval_image(p, config.data) for p in paths])
    assert images.dtype == np.uint8
    # Only the PNG's 8-bit rounding differs: at most one uint8 level after upsampling.
    np.testing.assert_allclose(images.astype(float), batch['image'], atol=1)

    mesh = sharding.create_mesh()
    ckpt = weights.locate(trained)
    model, variables = eval_checkpoint.restore_model(config, ckpt, (16, 16, 3), mesh)
    normalised = device_augment.normalize(
        batch['image'], device_augment.AugmentConfig.normalization_only(config.data))
    expected = jax.nn.softmax(model.apply(variables, normalised, train=False))
    predictions = predict.predict_files(model, variables, paths, config.data, k=5)
    for prediction, row in zip(predictions, np.asarray(expected), strict=True):
        assert prediction.names[0] == str(int(row.argmax()))  # digits names its classes '0'..
        assert prediction.probabilities[0] == pytest.approx(row.max(), abs=0.02)
        assert list(prediction.probabilities) == sorted(prediction.probabilities, reverse=True)
    text = predictions[0].format()
    assert text.splitlines()[0] == paths[0] and len(text.splitlines()) == 6


def _image_folder(root, classes=('cat', 'dog', 'fish'), per_class=2, size=32, seed=0):
    rng = np.random.default_rng(seed)
    for split in ('train', 'test'):
        for name in classes:
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f'{i}.png')
    return root


@pytest.mark.slow
def test_convert_cli_then_eval_py_image_end_to_end(tmp_path):
    torch = pytest.importorskip('torch')
    from safetensors.torch import save_file

    net = _small_torch_net(num_classes=3)
    save_file(net.state_dict(), str(tmp_path / 'model.safetensors'))
    out = tmp_path / 'converted'
    overrides = [f'--override={k}={v}' for k, v in SMALL_FIELDS.items()]
    converted = subprocess.run(
        [sys.executable, '-m', 'resnet_flax.convert', '--name=resnet18',
         f'--weights={tmp_path / "model.safetensors"}', f'--out={out}', *overrides],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert converted.returncode == 0, converted.stderr[-3000:]
    assert f'Wrote {out}: resnet18 with 3 classes' in converted.stdout
    # The converter prints the model flags that rebuild the net; use them as printed.
    suggested = next(line for line in converted.stdout.splitlines()
                     if line.startswith('Evaluate it:'))
    model_flags = [f for f in suggested.split() if f.startswith('--config.model.')]

    root = _image_folder(tmp_path / 'pets')
    images = [root / 'test' / 'cat' / '0.png', root / 'test' / 'fish' / '1.png']
    result = run_script('eval.py', [
        '--config=configs/base.py', '--config.data.dataset=image_folder',
        f'--config.data.data_dir={root}', '--config.data.image_size=32',
        '--config.data.eval_crop=resize', *model_flags, f'--checkpoint={out}',
        # Converted weights get torchvision's resize-256-crop-224 unless told otherwise; this
        # test feeds 32x32 images as they are (tests/test_torchvision_eval.py covers the preset).
        '--config.data.eval_preset=native',
        *[f'--image={p}' for p in images], '--json'])
    reported = json.loads(result.stdout.strip().splitlines()[-1])

    # The reference: torch on the same pixels, normalised with ImageNet's statistics.
    mean, std = np.asarray(info_lib.IMAGENET_MEAN), np.asarray(info_lib.IMAGENET_STD)
    pixels = np.stack([np.asarray(Image.open(p), np.float32) / 255 for p in images])
    normalised = ((pixels - mean) / std).astype(np.float32).transpose(0, 3, 1, 2)
    with torch.no_grad():
        probabilities = torch.softmax(net(torch.from_numpy(normalised)), -1).numpy()
    names = ('cat', 'dog', 'fish')
    for prediction, path, row in zip(reported['predictions'], images, probabilities,
                                     strict=True):
        assert prediction['image'] == str(path)
        order = np.argsort(-row)
        assert [t['name'] for t in prediction['top']] == [names[i] for i in order]
        np.testing.assert_allclose([t['probability'] for t in prediction['top']], row[order],
                                   atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Fine-tuning


def _small_digits_config(**overrides):
    """Digits at 16x16 with the small resnet18-layout net (10 classes)."""
    fields = {f'model.{k}': v for k, v in SMALL_FIELDS.items()}
    return tiny_config(**{'model.family': 'imagenet', 'model.depth': 18, **fields, **overrides})


@pytest.fixture(scope='module')
def converted_1000(tmp_path_factory):
    """A checkpoint converted from a 1000-class torch net, and its converted variables."""
    out = tmp_path_factory.mktemp('converted') / 'resnet18'
    state_dict = _small_torch_net(num_classes=1000).state_dict()
    variables = convert.from_torch_state_dict(state_dict, 'resnet18', **SMALL_FIELDS)
    weights.save_converted(out, variables, {'name': 'resnet18'})
    return out, variables


def _flat(tree) -> dict[str, np.ndarray]:
    return {name: np.asarray(leaf)
            for name, leaf in flax.traverse_util.flatten_dict(tree, sep='/').items()}


@pytest.mark.slow
def test_init_from_a_1000_class_checkpoint_keeps_a_fresh_10_class_head(converted_1000, tmp_path,
                                                                       capsys):
    out, source = converted_1000
    # Learning rate 0: the run's parameters stay what init_from made them.
    config = _small_digits_config(init_from=str(out), num_train_steps=1, eval_every_steps=1,
                                  checkpoint_every_steps=1, **{'optimizer.learning_rate': 0.0,
                                                               'optimizer.warmup_steps': 0,
                                                               'optimizer.warmup_epochs': 0.0})
    train.train_and_evaluate(config, str(tmp_path))
    message = [line for line in capsys.readouterr().out.splitlines()
               if line.startswith('init_from')]
    assert len(message) == 1
    assert 'params/head/bias (10,) (checkpoint: (1000,))' in message[0]
    assert 'params/head/kernel (16, 10) (checkpoint: (16, 1000))' in message[0]

    model = models.from_config(config.model)
    info = data.get_info(config.data)
    optimizer = optim.create_optimizer(config, train.make_schedule(
        config, info.num_train_examples).steps_per_epoch)
    mesh = sharding.create_mesh()
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(tmp_path), read_only=True)
    state = checkpoint.restore_latest(manager, abstract_state(model, optimizer, info.image_shape,
                                                              False, mesh))
    fresh = create_train_state(model, optimizer, jax.random.PRNGKey(config.seed),
                               info.image_shape, False, mesh)
    got, expected = _flat(state.params), _flat(source['params'])
    for name, value in got.items():
        if name.startswith('head/'):
            np.testing.assert_array_equal(value, _flat(fresh.params)[name])
        else:
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    assert got['head/kernel'].shape == (16, 10)


@pytest.mark.slow
def test_init_from_a_train_workdir_loads_params_bn_statistics_and_ema(trained, capsys):
    config = tiny_config(ema_decay=0.99)
    model = models.from_config(config.model)
    optimizer = optim.create_optimizer(config, steps_per_epoch=10)
    state = create_train_state(model, optimizer, jax.random.PRNGKey(5), (16, 16, 3), True,
                               sharding.create_mesh())
    loaded = finetune.initialize_from(state, str(trained), optimizer)
    count = len(_flat(state.params)) + len(_flat(state.batch_stats))
    assert f'loaded all {count} arrays from {trained}' in capsys.readouterr().out

    # The newest checkpoint's raw weights, read by the trainer's own restore.
    info = data.get_info(config.data)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(trained), read_only=True)
    saved = checkpoint.restore_latest(manager, abstract_state(
        model, optimizer, info.image_shape, True, sharding.create_mesh()))
    for collection in ('params', 'batch_stats'):
        got, expected = _flat(getattr(loaded, collection)), _flat(getattr(saved, collection))
        assert got.keys() == expected.keys()
        for name, value in got.items():
            np.testing.assert_array_equal(value, expected[name], err_msg=name)
    # EMA restarts from the loaded weights, the optimizer state from scratch, the step at 0.
    jax.tree.map(np.testing.assert_array_equal, loaded.ema_params, loaded.params)
    jax.tree.map(np.testing.assert_array_equal, loaded.ema_batch_stats, loaded.batch_stats)
    jax.tree.map(np.testing.assert_array_equal, loaded.opt_state, optimizer.init(loaded.params))
    assert int(loaded.step) == 0
    for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(loaded), strict=True):
        assert after.sharding == before.sharding


def test_init_from_another_architecture_names_the_first_mismatch(converted_1000):
    out, _ = converted_1000
    config = _small_digits_config(**{'model.stage_widths': (8, 32)})
    model = models.from_config(config.model)
    optimizer = optim.create_optimizer(config, steps_per_epoch=10)
    # The shapes are all it compares before it refuses, so an abstract state will do.
    state = abstract_state(model, optimizer, (16, 16, 3), False, sharding.create_mesh())
    with pytest.raises(ValueError, match=r'params/stage2_block1/bn1/bias is \(16,\) there but '
                                         r'\(32,\) here') as error:
        finetune.initialize_from(state, str(out), optimizer)
    assert '\n' not in str(error.value)
    with pytest.raises(ValueError, match='has no EMA weights'):
        eval_checkpoint.evaluate_checkpoint(_small_digits_config(), str(out), use_ema=True)


def test_workdir_that_is_a_file_is_named_as_a_file(tmp_path):
    not_a_dir = tmp_path / 'run.txt'
    not_a_dir.write_text('notes\n')
    for call in (lambda: eval_checkpoint.saved_config(str(not_a_dir)),
                 lambda: eval_checkpoint.run(tiny_config(), workdir=str(not_a_dir),
                                             checkpoint=None, checkpoint_step='latest',
                                             split=None, use_ema=False, images=[],
                                             as_json=False)):
        with pytest.raises(ValueError, match=f'--workdir={not_a_dir} is a file, not a train '
                                             'workdir') as error:
            call()
        assert '\n' not in str(error.value)
    with pytest.raises(FileNotFoundError, match='does not exist'):
        eval_checkpoint.saved_config(str(tmp_path / 'absent'))


@pytest.mark.slow
def test_image_predictions_say_which_checkpoint_and_weights(trained, tmp_path, capsys):
    from resnet_flax.data import digits

    path = tmp_path / 'digit.png'
    _digit_png(path, digits._split('test')[0][0])
    for use_ema, weights_used in ((True, 'EMA weights'), (False, 'weights')):
        eval_checkpoint.run(tiny_config(ema_decay=EMA_DECAY), workdir=str(trained),
                            checkpoint=None, checkpoint_step='3', split=None, use_ema=use_ema,
                            images=[str(path)], as_json=False)
        first = capsys.readouterr().out.splitlines()[0]
        assert first == f"{trained / 'checkpoints' / '3'} (step 3, {weights_used})"


def test_an_eval_pass_that_takes_a_while_shows_a_progress_bar(monkeypatch, capsys):
    from resnet_flax import evaluate
    from resnet_flax.state import init_variables

    config = tiny_config(eval_batch_size=32)
    model = models.from_config(config.model)
    variables = init_variables(model, jax.random.PRNGKey(0), (16, 16, 3))
    mesh = sharding.create_mesh()
    eval_fn = evaluate.make_eval_fn(model, mesh,
                                    device_augment.AugmentConfig.from_config(config))
    monkeypatch.setattr(evaluate, 'EVAL_PROGRESS_DELAY_SEC', 1e9)  # no pass takes that long
    quick = evaluate.evaluate(eval_fn, variables, config, mesh)
    assert 'eval' not in capsys.readouterr().err  # shorter than the delay: nothing shown
    monkeypatch.setattr(evaluate, 'EVAL_PROGRESS_DELAY_SEC', 0.0)  # every pass "takes a while"
    shown = evaluate.evaluate(eval_fn, variables, config, mesh)
    assert shown == quick
    err = capsys.readouterr().err
    assert "eval 'test', batches of 32: 0batch" in err and 'batch/s' in err
