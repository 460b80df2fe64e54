"""Adapting a config to its data, before anything compiles: what the data makes obvious is
inferred and announced, everything else that cannot work is named in one error.

Inferred (each announced in one line):
- `model.num_classes` from the data set's class count, unless a checkpoint in the workdir
  was trained with another head (that run cannot continue as another network);
- `data.eval_split` when the configured split does not exist and exactly one other split does.
Announced too: the train and eval crops, which follow the images' size unless set
(`info.crops`: one rule for TFDS sets, image folders and prepared stores).

Everything else that would fail later (the device split of the batch, the network's own rules,
a batch larger than the train set, a warmup as long as the whole run, ...) is collected and
raised as one ValueError, so adapting a config to a new data set takes one failed run, not one
per field. A smoke run on synthetic data is told how long each eval will take.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import ml_collections
from etils import epath

from resnet_flax import data, models, optim, run_config
from resnet_flax.data import info as info_lib


class ConfigProblems(ValueError):
    """One or more settings that cannot work with this data or on these devices."""


def _problem(check: Callable[[], object], problems: list[str]) -> None:
    try:
        check()
    except ValueError as error:
        problems.append(str(error).rstrip('.'))


def _infer_eval_split(config, problems: list[str], notes: list[str]) -> bool:
    """Adapts data.eval_split where obvious; False when no usable eval split was found."""
    data_cfg = config.data
    splits = data.split_names(data_cfg)
    wanted = data_cfg.eval_split
    if splits is None or wanted in splits or any(c in wanted for c in '[+'):
        return True  # not listable, present, or TFDS split syntax: the source checks it
    others = sorted(s for s in splits if s != data_cfg.train_split)
    if len(others) == 1:
        data_cfg.eval_split = others[0]
        notes.append(f'config.data.eval_split={wanted!r} but {_name(data_cfg)} has no such '
                     f'split; evaluating on {others[0]!r}, its only other split (set '
                     f'--config.data.eval_split={others[0]} to silence this)')
        return True
    if others:
        problems.append(f'data.eval_split={wanted!r} is not a split of {_name(data_cfg)}; '
                        f'choose one of {others} with --config.data.eval_split=NAME')
    else:
        fix = ('--config.data.holdout_fraction=0.1 to hold out 10% of the train images'
               if data_cfg.dataset == 'image_folder' else
               f"a train slice, e.g. --config.data.eval_split='{data_cfg.train_split}[99%:]'")
        problems.append(f'{_name(data_cfg)} has no split besides {data_cfg.train_split!r} to '
                        f'evaluate on; set {fix}')
    return False


def _name(data_cfg) -> str:
    if data_cfg.dataset == 'image_folder':
        return f'the image folder {data_cfg.data_dir}'
    return repr(data_cfg.dataset)


def _saved_num_classes(workdir: epath.Path | None) -> int | None:
    """The head size of the run saved in `workdir` when it has checkpoints, else None."""
    if workdir is None:
        return None
    from resnet_flax import checkpoint

    if not any(checkpoint.checkpoint_dir(workdir).glob('[0-9]*')):
        return None
    saved = run_config.read_saved(workdir) or {}
    return saved.get('model', {}).get('num_classes')


def _infer_num_classes(config, info, workdir, problems: list[str], notes: list[str]) -> None:
    have, wanted = info.num_classes, config.model.num_classes
    if have == wanted:
        return
    saved = _saved_num_classes(workdir)
    where = _name(config.data)
    if saved is not None and saved != have:
        problems.append(f'the checkpoint in --workdir={workdir} has a {saved}-class head but '
                        f'{where} has {have} classes; use a fresh --workdir (with '
                        f'--config.init_from to start from those weights)')
        return
    config.model.num_classes = have
    notes.append(f'config.model.num_classes={wanted} but {where} has {have} classes: using '
                 f'{have} (set --config.model.num_classes={have} to silence this)')


def _check_run_length(config, info, problems: list[str]) -> None:
    if config.batch_size > info.num_train_examples:
        problems.append(f'batch_size={config.batch_size} is larger than the train split '
                        f'({info.num_train_examples} examples); lower --config.batch_size')
        return
    steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
    try:
        total = optim.total_train_steps(config, steps_per_epoch)
    except ValueError as error:
        problems.append(str(error))
        return
    opt = config.optimizer
    warmup = opt.warmup_steps if opt.warmup_steps > 0 else round(
        opt.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        name = 'warmup_steps' if opt.warmup_steps > 0 else 'warmup_epochs'
        value = opt.warmup_steps if opt.warmup_steps > 0 else opt.warmup_epochs
        fix = (f'--config.optimizer.warmup_steps={total // 10}' if total >= 10 else
               '--config.optimizer.warmup_steps=0 --config.optimizer.warmup_epochs=0')
        problems.append(f'optimizer.{name}={value} means {warmup} warmup steps, not fewer '
                        f'than the whole run ({total} steps); set e.g. {fix}')


def _note_synthetic_eval(config, info, notes: list[str]) -> None:
    """Synthetic data keeps ImageNet's 50,000 eval images: a smoke run of a few steps would
    spend minutes in each eval without saying why."""
    if config.data.dataset != 'synthetic':
        return
    from resnet_flax import evaluate

    batch = evaluate.eval_batch_size(config)
    eval_steps = -(-info.num_eval_examples // batch)
    steps_per_epoch = max(1, info.num_train_examples // config.batch_size)
    try:
        train_steps = optim.total_train_steps(config, steps_per_epoch)
    except ValueError:
        return  # named by _check_run_length
    if eval_steps > train_steps:
        notes.append(f'each eval reads {info.num_eval_examples:,} synthetic examples '
                     f'({eval_steps:,} batches of {batch}), more steps than the whole run '
                     f'({train_steps}); --config.data.synthetic_num_eval_examples=N shortens it')


def _check_model(config, problems: list[str], notes: list[str]) -> None:
    """The network's own rules (models._validate), so that they join the one error."""
    note = models.plain_zero_init_note(config.model)
    if note:
        notes.append(note)
    _problem(lambda: models.from_config(config.model), problems)


def resolve(config: ml_collections.ConfigDict, workdir: epath.PathLike | None = None,
            device_checks: Callable[[ml_collections.ConfigDict], None] | None = None,
            ) -> tuple[ml_collections.ConfigDict, info_lib.DatasetInfo, list[str]]:
    """(the config adapted to its data, the data set's info, one announcement per inference).

    Raises ConfigProblems naming every problem found. `device_checks(config)` runs the
    trainer's own checks (batch split over devices, dtypes) so their failures join the list.
    """
    config = copy.deepcopy(config)
    workdir = epath.Path(workdir) if workdir is not None else None
    problems, notes = [], []
    if device_checks is not None:
        _problem(lambda: device_checks(config), problems)
    _check_model(config, problems, notes)
    try:
        info_lib.validate(config.data)
        probe = config.data
        if not _infer_eval_split(config, problems, notes):
            # Read the train split alone, so the checks below still run.
            probe = copy.deepcopy(config.data)
            probe.eval_split = probe.train_split
        info = data.get_info(probe)
    except (ValueError, FileNotFoundError) as error:
        _raise(problems + [str(error).rstrip('.')])
    _infer_num_classes(config, info, workdir, problems, notes)
    if config.data.dataset not in ('digits', 'synthetic'):  # they have their own recipes
        notes.append(info_lib.describe_crops(config.data, info.image_side))
    _check_run_length(config, info, problems)
    _note_synthetic_eval(config, info, notes)
    if problems:
        _raise(problems)
    return config, info, notes


def _raise(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigProblems(problems[0] + '.')
    listed = '; '.join(f'({i}) {p}' for i, p in enumerate(problems, 1))
    raise ConfigProblems(f'{len(problems)} config problems: {listed}.')
