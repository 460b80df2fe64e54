"""Adapting a config to a new image folder through the real command line: what the data makes
obvious (its class count, its only eval split) is used and announced in one line; everything
else is named in one error, before anything is written to the workdir."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.tiny import TINY_FLAGS, cpu_env, override_flags, run_script

CLASSES = ('ant', 'bee', 'cat')
FLAGS = {**TINY_FLAGS, 'data.dataset': 'image_folder', 'batch_size': 8, 'num_train_steps': 2,
         'eval_every_steps': 2, 'checkpoint_every_steps': 2, 'log_every_steps': 2}


def _folder(root: Path, splits: dict[str, int]) -> Path:
    """ROOT/<split>/<class>/*.png: `count` tiny images per class in each split."""
    rng = np.random.default_rng(0)
    for split, count in splits.items():
        for label, name in enumerate(CLASSES):
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (12, 12, 3)) + 80 * label
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f'{i}.png')
    return root


def _train(workdir: Path, data_dir: Path, *extra: str, check: bool = True):
    return run_script('train.py', [f'--workdir={workdir}', '--config=configs/digits.py',
                                   f'--config.data.data_dir={data_dir}',
                                   *override_flags(FLAGS), *extra],
                      env=cpu_env(), timeout=600, check=check)


def _lines(stderr: str, text: str) -> list[str]:
    return [line for line in stderr.splitlines() if text in line]


@pytest.mark.slow
def test_class_count_is_inferred_announced_saved_and_resumed(tmp_path):
    data_dir = _folder(tmp_path / 'folder', {'train': 8, 'test': 2})
    workdir = tmp_path / 'run'
    command = ('--config.checkpoint_every_steps=1',)  # checkpoints at steps 1 and 2
    first = _train(workdir, data_dir, *command)  # configs/digits.py says 10 classes
    announced = _lines(first.stderr, 'config.model.num_classes=10')
    assert len(announced) == 1, first.stderr[-3000:]
    assert 'has 3 classes: using 3' in announced[0]
    assert '--config.model.num_classes=3' in announced[0]
    saved = json.loads((workdir / 'config.json').read_text())
    assert saved['model']['num_classes'] == 3  # the config saved is the one that trained

    # As if killed before the last save: the same command resumes from step 1 (the saved
    # config is this command's, inference included: no refusal, no config change).
    shutil.rmtree(workdir / 'checkpoints' / '2')
    again = _train(workdir, data_dir, *command)
    assert 'Resumed from step 1' in again.stderr, again.stderr[-3000:]
    assert len(_lines(again.stderr, 'using 3')) == 1
    assert 'Config changed' not in again.stderr
    assert not list(workdir.glob('config.until-step-*.json'))
    assert (workdir / 'checkpoints' / '2').is_dir()


@pytest.mark.slow
def test_the_only_other_split_folder_is_the_eval_split(tmp_path):
    data_dir = _folder(tmp_path / 'folder', {'train': 8, 'val': 2})
    workdir = tmp_path / 'run'
    result = _train(workdir, data_dir, '--config.model.num_classes=3')
    announced = _lines(result.stderr, "config.data.eval_split='test'")
    assert len(announced) == 1, result.stderr[-3000:]
    assert "evaluating on 'val'" in announced[0]
    assert not _lines(result.stderr, 'num_classes')  # set right: nothing to announce
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert any(r['split'] == 'eval' and r['step'] == 2 for r in records)
    assert json.loads((workdir / 'config.json').read_text())['data']['eval_split'] == 'val'


def test_every_problem_is_named_in_one_error_and_nothing_is_written(tmp_path):
    data_dir = _folder(tmp_path / 'folder', {'train': 4, 'val': 1, 'test': 1})
    workdir = tmp_path / 'run'
    result = _train(workdir, data_dir, '--config.data.eval_split=validation',
                    '--config.optimizer.warmup_steps=5', check=False)
    assert result.returncode != 0
    assert 'Traceback' not in result.stderr, result.stderr[-3000:]
    error = [line for line in result.stderr.splitlines() if line.strip()][-1]
    assert error.startswith('Error: 2 config problems'), error
    assert "data.eval_split='validation'" in error and "['test', 'val']" in error
    assert 'optimizer.warmup_steps=5' in error and 'whole run (2 steps)' in error
    assert '--config.optimizer.warmup_steps=0 --config.optimizer.warmup_epochs=0' in error
    assert not workdir.exists()  # failed before the workdir was made: nothing half-written


def test_a_folder_without_eval_images_and_a_too_large_batch_are_one_error(tmp_path):
    from configs import digits
    from resnet_flax import config_checks

    root = tmp_path / 'folder'
    _folder(root, {'train': 2})
    config = digits.get_config()
    config.data.update(dataset='image_folder', data_dir=str(root / 'train'), image_size=16)
    config.batch_size = 8  # 6 images
    with pytest.raises(config_checks.ConfigProblems) as error:
        config_checks.resolve(config)
    message = str(error.value)
    assert message.startswith('2 config problems') and '\n' not in message
    assert '--config.data.holdout_fraction=0.1' in message
    assert 'batch_size=8 is larger than the train split (6 examples)' in message
    # With images held out, the folder and this batch size fit: the held-out split is the eval.
    config.data.holdout_fraction = 0.5
    config.batch_size = 2
    config.optimizer.warmup_steps = 1
    adapted, info, notes = config_checks.resolve(config)
    assert (info.num_train_examples, info.num_eval_examples) == (3, 3)
    assert adapted.model.num_classes == 3 and len(notes) == 2
    assert notes[1].startswith('data recipe:')  # the crops for its images' size
