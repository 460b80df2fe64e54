"""End to end on ImageNet's real TFDS builder: tiny hand-made ILSVRC2012 archives, then the
README's main command (`train.py --config=configs/resnet50.py`) and `eval.py`, no network."""

from __future__ import annotations

import json

import pytest

from tests.imagenet_fixture import make_imagenet
from tests.tiny import override_flags, run_script, train_losses

pytestmark = pytest.mark.slow


def test_resnet50_trains_and_evaluates_on_the_imagenet2012_builder(tmp_path):
    data_dir = make_imagenet(tmp_path / 'imagenet', num_classes=3, train_per_class=4,
                             val_per_class=3, image_size=(40, 48))
    workdir = tmp_path / 'run'
    overrides = {
        'data.data_dir': data_dir,
        'data.image_size': 32,
        'data.shuffle_buffer_size': 16,
        'batch_size': 4,
        'num_train_steps': 3,
        'optimizer.warmup_steps': 1,
        'log_every_steps': 1,
        'eval_every_steps': 3,
        'checkpoint_every_steps': 3,
    }
    run_script('train.py', ['--config=configs/resnet50.py', f'--workdir={workdir}',
                            *override_flags(overrides)], timeout=600)

    assert sorted(train_losses(workdir)) == [1, 2, 3]
    evals = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    last_eval = [r for r in evals if r['split'] == 'eval'][-1]
    assert last_eval['num_examples'] == 9  # 3 classes x 3 validation images, none dropped

    result = run_script('eval.py', ['--config=configs/resnet50.py', f'--workdir={workdir}',
                                    '--json', *override_flags(overrides)], timeout=600)
    reported = json.loads(result.stdout.strip().splitlines()[-1])
    assert reported['step'] == 3
    assert reported['num_examples'] == 9
    assert reported['top1'] == pytest.approx(last_eval['top1'], abs=1e-6)
    assert reported['loss'] == pytest.approx(last_eval['loss'], rel=1e-4)
