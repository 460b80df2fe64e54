"""docs/lesson.md is what docs/build_lesson.py makes of the code: no drift, no missing picture."""

import difflib
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / 'docs'


def load_builder():
    spec = importlib.util.spec_from_file_location('build_lesson', DOCS / 'build_lesson.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_committed_lesson_matches_a_fresh_build(tmp_path):
    out = tmp_path / 'lesson.md'
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    result = subprocess.run([sys.executable, str(DOCS / 'build_lesson.py'), f'--out={out}',
                             '--no-images'], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    committed = (DOCS / 'lesson.md').read_text().splitlines(keepends=True)
    fresh = out.read_text().splitlines(keepends=True)
    diff = ''.join(list(difflib.unified_diff(committed, fresh, 'docs/lesson.md (committed)',
                                             'docs/lesson.md (from the code now)'))[:80])
    assert committed == fresh, ('docs/lesson.md has drifted from the code; run '
                                f'`python docs/build_lesson.py` and commit the result:\n{diff}')


def test_every_picture_of_the_lesson_exists_and_is_small():
    lesson = (DOCS / 'lesson.md').read_text()
    pictures = re.findall(r'<img src="([^"]+)"', lesson)
    assert len(pictures) >= 4
    for picture in pictures:
        path = DOCS / picture
        assert path.exists(), f'{picture} is referenced by lesson.md but missing'
        assert path.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
        assert 10_000 < path.stat().st_size < 150_000, picture
    # ...and every picture command of the lesson writes one of them.
    written = re.findall(r'--out (docs/img/\S+\.png)', lesson)
    assert sorted(f'docs/{p}' for p in pictures) == sorted(written)


def test_stored_measurements_cover_the_scripts_protocol():
    builder = load_builder()
    results = json.loads((DOCS / 'lesson_results.json').read_text())
    assert results['protocol'] == builder._plain(builder.PROTOCOL)
    assert results['experiments'] == builder._plain(builder.EXPERIMENTS)
    for group, experiments in builder.EXPERIMENTS.items():
        for name in experiments:
            seeds = sorted(run['seed'] for run in results['runs'][group][name])
            assert seeds == builder.PROTOCOL['seeds'][group], (group, name)
            assert all(0 <= run['top1'] <= 1 for run in results['runs'][group][name])
            assert results['throughput'][f'{group}/{name}']['images_per_sec'] > 0


def test_measurement_configs_are_the_quick_start_with_the_experiments_model():
    from configs import digits

    builder = load_builder()
    quick = digits.get_config()
    config = builder.experiment_config({'depth': 20, 'block': 'bottleneck'}, seed=1)
    assert config.model.depth == 20 and config.model.block == 'bottleneck'
    assert config.seed == 1 and config.data.image_size == builder.PROTOCOL['image_size']
    assert config.num_epochs == builder.PROTOCOL['num_epochs']
    assert config.optimizer == quick.optimizer and config.batch_size == quick.batch_size


def test_lesson_quotes_the_stored_degradation_runs():
    from configs.ablations import degradation

    builder = load_builder()
    stored = json.loads(builder.DEGRADATION.read_text())
    assert stored['sweep'] == builder.DEGRADATION_SWEEP == 'configs/ablations/degradation.py'
    assert {r['depth'] for r in stored['runs']} == set(degradation.DEPTHS)
    assert {r['plain'] for r in stored['runs']} == {True, False}
    lesson = (DOCS / 'lesson.md').read_text()
    table, _ = builder._degradation_table(stored['runs'])
    assert table in lesson
    assert builder._grad_norm_table(stored['runs']) in lesson
    plain56 = [r for r in stored['runs'] if r['variant'] == 'plain56' and r['finished']]
    resnet56 = [r for r in stored['runs'] if r['variant'] == 'resnet56' and r['finished']]
    # What the page says in words: the deep plain net trains far worse than the residual one.
    assert min(r['train_loss'] for r in plain56) > 10 * max(r['train_loss'] for r in resnet56)
