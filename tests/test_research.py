"""Research switches and diagnostics: per-block gradient norms, stochastic depth, head dropout,
the backbone API (feature maps per stage, a replaceable head)."""

from __future__ import annotations

import json
import math

import pytest

from resnet_flax import train
from tests.tiny import tiny_config


def _train_records(workdir) -> list[dict]:
    lines = (workdir / 'metrics.jsonl').read_text().splitlines()
    return [r for r in map(json.loads, lines) if r['split'] == 'train']


def test_block_grad_norms_are_logged_and_make_up_the_global_norm(tmp_path):
    train.train_and_evaluate(tiny_config(log_block_grad_norms=True, num_train_steps=3,
                                         eval_every_steps=3), str(tmp_path))
    records = _train_records(tmp_path)
    names = {k[len('grad_norm/'):] for k in records[0] if k.startswith('grad_norm/')}
    assert names == {'stem_conv', 'stem_bn', 'stage1_block1', 'stage2_block1', 'head'}
    for record in records:  # one step per logging window: the norms of the same gradient
        blocks = [record[f'grad_norm/{name}'] for name in names]
        assert all(b > 0 for b in blocks)
        assert math.sqrt(sum(b * b for b in blocks)) == pytest.approx(record['grad_norm'],
                                                                       rel=1e-5)


def test_block_grad_norms_are_off_by_default(tmp_path):
    train.train_and_evaluate(tiny_config(num_train_steps=2, eval_every_steps=2), str(tmp_path))
    assert not [k for k in _train_records(tmp_path)[0] if k.startswith('grad_norm/')]
