"""run_config: a workdir's config.json written by older code still loads (new fields default)."""

from __future__ import annotations

import json

from configs import digits
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
