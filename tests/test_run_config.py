"""run_config: a workdir's config.json written by older code still loads (new fields default)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from configs import base, digits
from resnet_flax import run_config, sweep


def _saved_by_older_code(tmp_path, dropped: dict[str, tuple[str, ...]]):
    config = digits.get_config()
    config.num_train_steps = 7
    saved = json.loads(config.to_json_best_effort())
    for section, names in dropped.items():
        for name in names:
            del (saved[section] if section else saved)[name]
    (tmp_path / 'config.json').write_text(json.dumps(saved))
    return config


def test_fields_added_since_a_run_was_saved_take_their_defaults(tmp_path):
    original = _saved_by_older_code(
        tmp_path, {'data': ('eval_preset', 'loader'), 'model': ('drop_path_rate',),
                   '': ('allow_config_change',)})
    loaded = run_config.load(tmp_path)
    base = run_config.with_defaults({})
    assert loaded.data.eval_preset == base.data.eval_preset
    assert loaded.data.loader == base.data.loader
    assert loaded.model.drop_path_rate == base.model.drop_path_rate
    # What the run saved wins over the defaults.
    assert loaded.num_train_steps == 7
    assert loaded.model.to_dict() == original.model.to_dict()
    assert loaded.data.image_size == original.data.image_size


def test_sweep_report_reads_the_final_step_of_an_older_run(tmp_path):
    _saved_by_older_code(tmp_path, {'data': ('eval_preset',)})
    saved = json.loads((tmp_path / 'config.json').read_text())
    assert sweep.final_step(run_config.with_defaults(saved)) == 7


# ---- What a resume compares (issue 22, section 2).

def _saved_run(tmp_path, config):
    run_config.save(tmp_path, config, 0)
    return tmp_path


def test_conv_impl_is_how_the_network_is_computed_not_another_network(tmp_path):
    """Another conv_impl changes no parameter: a resume goes ahead with a note, without
    allow_config_change, and eval and the checkpoint's own check accept it."""
    from resnet_flax import checkpoint

    saved = digits.get_config()
    saved.model.conv_impl = 'xla'
    _saved_run(tmp_path, saved)
    resumed = digits.get_config()
    resumed.model.conv_impl = 'im2col'
    note = run_config.check_resume(tmp_path, resumed, 7)
    assert note == "Config changed since step 7: model.conv_impl 'xla' -> 'im2col'."
    run_config.check_eval_model(saved.model, resumed.model, 'Checkpoint X')
    checkpoint.check_network({'config': saved.to_json_best_effort()}, resumed.model, 'X')
    # A real network change next to it is still refused.
    resumed.model.bn_epsilon = 1e-3
    with pytest.raises(run_config.ConfigChangeError, match='another network.*bn_epsilon'):
        run_config.check_resume(tmp_path, resumed, 7)


@pytest.mark.parametrize('dataset, is_the_data', [('image_folder', True), ('prepared', True),
                                                  ('cifar10', False)])
def test_another_data_dir_is_a_training_change_where_it_is_the_data_set(
        tmp_path, dataset, is_the_data):
    saved = digits.get_config()
    saved.data.dataset, saved.data.data_dir = dataset, '/data/one'
    _saved_run(tmp_path, saved)
    resumed = digits.get_config()
    resumed.data.dataset, resumed.data.data_dir = dataset, '/data/two'
    if is_the_data:
        with pytest.raises(run_config.ConfigChangeError,
                           match="data.data_dir '/data/one' -> '/data/two'.*allow_config_change"):
            run_config.check_resume(tmp_path, resumed, 7)
        resumed.allow_config_change = True
    # A TFDS data_dir is only where the same set is stored: a note.
    note = run_config.check_resume(tmp_path, resumed, 7)
    assert "data.data_dir '/data/one' -> '/data/two'" in note


def test_what_auto_resolved_to_is_recorded_and_a_change_is_announced(tmp_path):
    config = digits.get_config()
    config.data.dataset, config.data.data_dir = 'image_folder', '/data/one'
    here = run_config.resolved_choices(config)
    assert set(here) >= {'data.loader'} and here['data.loader'] in ('tf', 'grain')
    _saved_run(tmp_path, config)
    assert run_config.read_resolved(tmp_path) == here
    assert run_config.RESOLVED_KEY not in run_config.read_saved(tmp_path)
    assert run_config.load(tmp_path).to_dict() == run_config.with_defaults(
        json.loads(config.to_json_best_effort())).to_dict()
    assert run_config.check_resume(tmp_path, config, 7) is None  # same machine: silent

    # The run was saved on a machine where 'auto' chose the other loader.
    other = 'grain' if here['data.loader'] == 'tf' else 'tf'
    record = json.loads((tmp_path / 'config.json').read_text())
    record[run_config.RESOLVED_KEY] = {'data.loader': other}
    (tmp_path / 'config.json').write_text(json.dumps(record))
    note = run_config.check_resume(tmp_path, config, 7)
    assert (f"data.loader=auto was {other!r}, here {here['data.loader']!r}" in note
            and f'--config.data.loader={other}' in note), note
    # Digits and synthetic data have no per-machine choices.
    assert run_config.resolved_choices(digits.get_config()) == {}


@pytest.mark.slow
def test_a_non_editable_install_has_every_default(tmp_path):
    """`pip install` (not -e) of the package, imported from elsewhere: with_defaults must
    still know every field of configs/base.py (it used to read that file from the checkout
    and silently got an empty config)."""
    from tests.tiny import REPO

    source, target = tmp_path / 'source', tmp_path / 'site'
    (source / 'configs').mkdir(parents=True)
    for name in ('pyproject.toml', 'README.md'):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / 'resnet_flax', source / 'resnet_flax', symlinks=True,
                    ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(REPO / 'configs' / 'base.py', source / 'configs' / 'base.py')
    subprocess.run([sys.executable, '-m', 'pip', 'install', '--quiet', '--no-deps',
                    '--no-build-isolation', '--target', str(target), str(source)],
                   check=True, capture_output=True, timeout=600)
    script = ('import json, resnet_flax\nfrom resnet_flax import run_config\n'
              'print(json.dumps([resnet_flax.__file__, run_config.with_defaults({}).to_dict()]))')
    env = {**os.environ, 'PYTHONPATH': str(target), 'JAX_PLATFORMS': 'cpu'}
    result = subprocess.run([sys.executable, '-c', script], cwd=tmp_path, env=env, check=True,
                            capture_output=True, text=True, timeout=300)
    where, defaults = json.loads(result.stdout.splitlines()[-1])
    assert where.startswith(str(target))
    assert defaults == json.loads(json.dumps(base.get_config().to_dict()))
