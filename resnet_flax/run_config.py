"""A run's config in its workdir: written at each start, read back by eval.py, compared on resume.

`<workdir>/config.json` is the config of the newest start. When a resume starts with a different
config, the earlier one is kept as `config.until-step-<N>.json` (N: the step it trained to), so
the workdir tells which config trained which steps. Files are written whole (never appended),
through etils.epath, so gs:// workdirs work the same way.

A resume compares the new config with the saved one, field by field:
- the network (`config.model` as `models.resolve` reads it): a checkpoint of one network cannot
  continue as another, so any difference is refused;
- bookkeeping (`BOOKKEEPING_FIELDS`: when to log, evaluate and save, input throughput, how
  convolutions are computed, where a TFDS set is stored): changes nothing that is learned, so
  it is announced and goes ahead;
- everything else (schedule, optimizer, data and augmentation, batch size, the image folder or
  prepared store itself, ...) changes the training mid-run, so it needs
  `--config.allow_config_change=True`.

Some choices are made per machine ('auto' loader, JPEG decoder and train resizer: is
TensorFlow installed, does the JPEG window decoder build?). What they resolved to is recorded
in config.json under `RESOLVED_KEY`, and a resume where they resolve otherwise says so.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import flax.traverse_util
import ml_collections
from etils import epath

from resnet_flax import config_base, models

CONFIG_FILE = 'config.json'
# config.json's record of what the per-machine 'auto' choices resolved to (not a config field).
RESOLVED_KEY = '_resolved'

# Fields that change how a run is watched or fed, not what it learns.
BOOKKEEPING_FIELDS = frozenset({
    'allow_config_change', 'init_from', 'log_every_steps', 'eval_every_epochs',
    'eval_every_steps', 'eval_batch_size', 'checkpoint_every_steps', 'keep_checkpoints',
    'profile_start_step', 'profile_num_steps', 'halt_on_nan', 'debug_nan_at_step',
    'data.data_dir', 'data.download', 'data.cache', 'data.num_parallel_calls',
    'data.threadpool_size', 'data.prefetch_batches', 'data.ram_budget_gb',
    'data.processes_per_host', 'data.num_workers', 'data.shuffle_buffer_size',
    'data.verify_images', 'log_block_grad_norms', 'checkpoint_fallback', 'model.conv_impl',
})
# Where the data is stored, for sources whose directory is only a location (a TFDS data_dir);
# for these the directory is the data set itself, so another one is a training change.
_DATA_DIR_IS_DATASET = ('image_folder', 'prepared')
# Model fields that only matter when weights are first made: a resume may change them
# (with allow_config_change, like the seed).
_INIT_ONLY_MODEL_FIELDS = ('zero_init_last_bn',)
# Model fields that change only training, not what a checkpoint computes: eval may differ.
_TRAIN_ONLY_MODEL_FIELDS = ('dtype', 'param_dtype', 'bn_momentum', 'bn_group_size')
# Model fields that choose how the same network is computed (the same results to float
# rounding): never a different network, for resumes and eval alike.
_EXECUTION_MODEL_FIELDS = ('conv_impl',)


class ConfigChangeError(ValueError):
    """A resume or an evaluation with a config that does not fit the saved run."""


def read_saved(workdir: epath.PathLike) -> dict[str, Any] | None:
    """The saved config of `workdir` as plain JSON data, or None when there is none."""
    path = epath.Path(workdir) / CONFIG_FILE
    if not path.exists():
        return None
    try:
        saved = json.loads(path.read_text())
    except ValueError as error:
        raise ConfigChangeError(f'{path} is not valid JSON ({error}); restore it from '
                                'a config.until-step-*.json next to it or pass --config.') from None
    saved.pop(RESOLVED_KEY, None)
    return saved


def read_resolved(workdir: epath.PathLike) -> dict[str, str]:
    """What the 'auto' choices resolved to when `workdir`'s config.json was written ({} for
    config.json files from before this was recorded)."""
    path = epath.Path(workdir) / CONFIG_FILE
    try:
        return dict(json.loads(path.read_text()).get(RESOLVED_KEY, {}))
    except (FileNotFoundError, ValueError, AttributeError):
        return {}


def load(workdir: epath.PathLike) -> ml_collections.ConfigDict:
    """The config `workdir`'s run was started with, as a locked ConfigDict."""
    saved = read_saved(workdir)
    if saved is None:
        raise FileNotFoundError(f'{epath.Path(workdir) / CONFIG_FILE} does not exist, so the '
                                'config of that run is unknown; pass --config (and its overrides).')
    config = with_defaults(saved)
    config.lock()
    return config


def with_defaults(saved: Mapping[str, Any]) -> ml_collections.ConfigDict:
    """A saved config with the fields added to configs/base.py since it was written at their
    defaults, so runs of older code still evaluate, resume and report."""
    config = _base_config()
    fields = {key: value for key, value in dict(saved).items() if key != RESOLVED_KEY}
    with config.unlocked():
        config.update(_tuples(fields))
    return config


def _base_config() -> ml_collections.ConfigDict:
    """The defaults of configs/base.py (the one schema), from the package's own copy:
    resnet_flax/config_base.py is a link to it in a checkout, and the file itself in an
    installed wheel, so a non-editable install has every default too."""
    return config_base.get_config()


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples the configs use."""
    if isinstance(value, dict):
        return {key: _tuples(item) for key, item in value.items()}
    if isinstance(value, list):
        return tuple(_tuples(item) for item in value)
    return value


def _plain(config: ml_collections.ConfigDict | Mapping[str, Any]) -> dict[str, Any]:
    if hasattr(config, 'to_json_best_effort'):
        return json.loads(config.to_json_best_effort())
    return json.loads(json.dumps(dict(config), default=str))


def _dotted(tree: Mapping[str, Any]) -> dict[str, Any]:
    """{'model': {'depth': 50}} -> {'model.depth': 50}: the names --config.X flags use."""
    return flax.traverse_util.flatten_dict(dict(tree), sep='.')


def _network(model_fields: Mapping[str, Any], ignore: tuple[str, ...]) -> dict[str, Any]:
    known = {k: v for k, v in model_fields.items() if k in models.CONFIG_DEFAULTS}
    resolved = models.resolve(known)
    return {k: str(v) for k, v in resolved.items() if k not in ignore}


def _diff(names: list[str], saved: Mapping[str, Any], new: Mapping[str, Any]) -> str:
    return ', '.join(f'{name} {saved.get(name)!r} -> {new.get(name)!r}' for name in names)


def network_changes(saved_model: Mapping[str, Any], new_model: Mapping[str, Any],
                    ignore: tuple[str, ...] = _INIT_ONLY_MODEL_FIELDS) -> list[str]:
    """The `model.` fields whose difference changes the network, or [] for the same network
    (however it is spelled: depth=50 and block='' is block='bottleneck')."""
    saved_model, new_model = _plain(saved_model), _plain(new_model)
    if _network(saved_model, ignore) == _network(new_model, ignore):
        return []
    return sorted(f'model.{k}' for k in set(saved_model) | set(new_model)
                  if k not in ignore and saved_model.get(k) != new_model.get(k))


def check_same_network(saved_model: Mapping[str, Any], new_model: Mapping[str, Any],
                       where: str, fix: str,
                       ignore: tuple[str, ...] = _INIT_ONLY_MODEL_FIELDS + _EXECUTION_MODEL_FIELDS
                       ) -> None:
    """Raises a one-line ConfigChangeError when the two model sections build different nets."""
    changed = network_changes(saved_model, new_model, ignore)
    if changed:
        saved = _dotted({'model': _plain(saved_model)})
        new = _dotted({'model': _plain(new_model)})
        raise ConfigChangeError(f'{where} was written by another network '
                                f'({_diff(changed, saved, new)} here); {fix}')


def check_eval_model(saved_model: Mapping[str, Any], new_model: Mapping[str, Any],
                     where: str) -> None:
    """eval.py: the config's network must be the checkpoint's (dtype and other training-only
    fields may differ: evaluating in bfloat16 is fine)."""
    check_same_network(saved_model, new_model, where,
                       'leave out --config to use the saved one, or fix the model overrides.',
                       ignore=(_INIT_ONLY_MODEL_FIELDS + _TRAIN_ONLY_MODEL_FIELDS
                               + _EXECUTION_MODEL_FIELDS))


def _is_network_field(name: str) -> bool:
    """A `model.` field checked by `check_same_network` rather than by value."""
    return name.startswith('model.') and name[len('model.'):] not in (
        _INIT_ONLY_MODEL_FIELDS + _EXECUTION_MODEL_FIELDS)


def _is_training_change(name: str, config: ml_collections.ConfigDict) -> bool:
    if name == 'data.data_dir':  # an image folder or prepared store is the data set itself
        return config.data.dataset in _DATA_DIR_IS_DATASET
    return name not in BOOKKEEPING_FIELDS


def check_resume(workdir: epath.PathLike, config: ml_collections.ConfigDict,
                 step: int | None) -> str | None:
    """Compares `config` with the config saved in `workdir` before resuming from `step`.

    Raises ConfigChangeError for a different network, or for training changes without
    `config.allow_config_change`. Returns a one-line note of the changes that go ahead, or None.
    """
    saved = read_saved(workdir)
    if saved is None:
        return None
    where = f'--workdir={workdir}'
    check_same_network(saved.get('model', {}), config.model, f'The checkpoint in {where}',
                       'use the config that wrote it (its config.json) or a fresh --workdir.')
    saved_flat, new_flat = _dotted(saved), _dotted(_plain(config))
    # Fields only one side has come from a code update (a new field with its default); skip.
    changed = sorted(name for name in saved_flat.keys() & new_flat.keys()
                     if saved_flat[name] != new_flat[name] and not _is_network_field(name)
                     and name != 'allow_config_change')
    training = [name for name in changed if _is_training_change(name, config)]
    at = f' at step {step}' if step is not None else ''
    if training and not config.get('allow_config_change', False):
        raise ConfigChangeError(
            f'The run in {where} was saved{at} with another config: '
            f'{_diff(training, saved_flat, new_flat)}; to resume with the change pass '
            '--config.allow_config_change=True (the earlier config.json is kept), or use a '
            'fresh --workdir.')
    notes = [f'Config changed since step {step}: {_diff(changed, saved_flat, new_flat)}.'
             if changed else '', _resolved_changes(read_resolved(workdir), config, step)]
    return ' '.join(note for note in notes if note) or None


def resolved_choices(config: ml_collections.ConfigDict) -> dict[str, str]:
    """What this machine makes of the config's per-machine 'auto' choices:
    {'data.loader': 'tf', 'data.decoder': 'libjpeg_window', ...}, for the fields set to
    'auto' that the data set uses ({} for digits and synthetic data)."""
    from resnet_flax import data

    data_cfg = config.data
    if data_cfg.dataset in ('digits', 'synthetic'):
        return {}
    loader = data.loader(data_cfg)
    resolved = {'data.loader': loader} if data_cfg.get('loader', 'auto') == 'auto' else {}
    if loader == 'grain':
        from resnet_flax.data import pil_preprocess

        if data_cfg.get('decoder', 'auto') == 'auto':
            window = pil_preprocess.resolve_window_decode('auto')
            resolved['data.decoder'] = ('libjpeg_window' if window
                                        else pil_preprocess.resolve_decoder('auto'))
        if data_cfg.get('train_resizer', 'auto') == 'auto':
            resolved['data.train_resizer'] = pil_preprocess.resolve_resizer(
                'auto', data_cfg.resize_method)
    return resolved


def _resolved_changes(saved: Mapping[str, str], config: ml_collections.ConfigDict,
                      step: int | None) -> str:
    """A note when an 'auto' choice resolves here to another value than when the run was
    saved: the same config.json then reads, decodes or resizes its pixels another way."""
    here = resolved_choices(config)
    changed = sorted(name for name in saved.keys() & here.keys() if saved[name] != here[name])
    if not changed:
        return ''
    listed = ', '.join(f'{name}=auto was {saved[name]!r}, here {here[name]!r}'
                       for name in changed)
    fixes = ' '.join(f'--config.{name}={saved[name]}' for name in changed)
    return (f'Per-machine choices differ from the machine that trained to step {step} '
            f'({listed}): the pixels are made another way from here on; to keep them, pass '
            f'{fixes}.')


def save(workdir: epath.PathLike, config: ml_collections.ConfigDict, step: int) -> None:
    """Writes `config` as the workdir's config.json; a different earlier one is kept as
    config.until-step-<step>.json. Call on one process only."""
    workdir = epath.Path(workdir)
    path = workdir / CONFIG_FILE
    record = json.loads(config.to_json_best_effort())
    resolved = resolved_choices(config)
    if resolved:
        record[RESOLVED_KEY] = resolved
    text = json.dumps(record, indent=2) + '\n'
    if path.exists():
        previous = path.read_text()
        if previous == text:
            return
        _write(_free_name(workdir, f'config.until-step-{step}'), previous)
    _write(path, text)


def _free_name(workdir: epath.Path, stem: str) -> epath.Path:
    candidate, n = workdir / f'{stem}.json', 1
    while candidate.exists():
        n += 1
        candidate = workdir / f'{stem}-{n}.json'
    return candidate


def _write(path: epath.Path, text: str) -> None:
    """Whole-file write through a temporary name, so a kill never leaves half a config."""
    temporary = path.parent / f'{path.name}.tmp'
    temporary.write_text(text)
    temporary.replace(path)
