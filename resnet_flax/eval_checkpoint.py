"""What `eval.py` does: restore a checkpoint, then evaluate a split or predict image files.

    metrics = eval_checkpoint.evaluate_checkpoint(config, '/tmp/run', step='best')
    # {'loss', 'top1', 'top5', 'num_examples', 'step', 'split', 'ema', 'checkpoint'}

The model comes from `config.model` and must fit the checkpoint (a one-line error names the
first array that does not). Evaluation is `evaluate.evaluate`: exact, over every example of
the split, on all devices and processes, the same code the training loop evaluates with.
Weights converted from PyTorch are preprocessed as torchvision's eval transforms do
(`data.eval_preset`), unless the config chooses otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections
from etils import epath

from resnet_flax import data, evaluate, models, predict, run_config, sharding, weights
from resnet_flax.device_augment import AugmentConfig
from resnet_flax.state import init_variables

PyTree = Any


def _check_classes(config: ml_collections.ConfigDict, num_classes: int) -> None:
    if num_classes != config.model.num_classes:
        raise ValueError(
            f'config.model.num_classes={config.model.num_classes} but {config.data.dataset!r} '
            f'has {num_classes} classes; set --config.model.num_classes={num_classes}.'
        )


def saved_config(workdir: str | None) -> ml_collections.ConfigDict:
    """eval.py without --config: the config a train workdir saved."""
    if not workdir:
        raise ValueError('Pass --config=FILE (and its overrides); only a --workdir carries '
                         'the config of its run.')
    check_workdir(workdir)
    return run_config.load(workdir)


def check_workdir(workdir: str) -> None:
    """A --workdir that is a file, or missing, is named as such (not as a missing config.json)."""
    path = epath.Path(workdir)
    if path.is_file():
        raise ValueError(f'--workdir={workdir} is a file, not a train workdir; pass the '
                         'directory train.py wrote (or --checkpoint=PATH for a converted one).')
    if not path.exists():
        raise FileNotFoundError(f'--workdir={workdir} does not exist; pass the directory '
                                'train.py wrote.')


def restore_model(config: ml_collections.ConfigDict, ckpt: weights.Checkpoint,
                  image_shape: tuple[int, int, int], mesh: jax.sharding.Mesh,
                  use_ema: bool = False) -> tuple[Any, PyTree]:
    """(model, variables) with the checkpoint's weights, replicated over `mesh`."""
    model = models.from_config(config.model)
    shapes = jax.eval_shape(lambda: init_variables(model, jax.random.PRNGKey(0), image_shape))
    target = weights.abstract_like(
        {'params': shapes['params'], 'batch_stats': shapes.get('batch_stats', {})},
        sharding.replicated(mesh))
    variables = weights.load_variables(ckpt, target, use_ema, config.model)  # shapes first
    saved = weights.saved_model_fields(ckpt)
    if saved is not None and 'config' in ckpt.meta:  # a train checkpoint knows its network
        # Same shapes can still be another network (v1 vs v1.5 strides, BN epsilon, ...).
        run_config.check_eval_model(saved, config.model, f'Checkpoint {ckpt.description}')
    return model, variables


def with_eval_preset(config: ml_collections.ConfigDict,
                     ckpt: weights.Checkpoint) -> ml_collections.ConfigDict:
    """`config` with data.eval_preset resolved: an explicit choice stands; '' takes the one the
    checkpoint records ('torchvision' for weights converted from PyTorch), else 'native'."""
    if config.data.eval_preset:
        return config
    preset = ckpt.meta.get('eval_preset')
    if preset is None:  # converted before the preset was recorded
        converted = str(ckpt.meta.get('format', '')).startswith('resnet_flax.convert/')
        preset = 'torchvision' if converted else 'native'
    config = config.copy_and_resolve_references()
    config.data.eval_preset = preset
    return config


def evaluate_checkpoint(config: ml_collections.ConfigDict, path: str, *,
                        step: str | int = 'latest', split: str | None = None,
                        use_ema: bool = False) -> dict[str, Any]:
    """Loss, top-1 and top-5 of the checkpoint at `path` over the whole `split`."""
    info = data.get_info(config.data)  # a missing data set fails before the restore
    _check_classes(config, info.num_classes)
    sharding.check_batch_size(evaluate.eval_batch_size(config), 'eval_batch_size')
    ckpt = weights.locate(path, step, best_metric='ema_top1' if use_ema else 'top1')
    config = with_eval_preset(config, ckpt)
    mesh = sharding.create_mesh()
    model, variables = restore_model(config, ckpt, info.image_shape, mesh, use_ema)
    eval_fn = evaluate.make_eval_fn(model, mesh, AugmentConfig.from_config(config))
    results = evaluate.evaluate(eval_fn, variables, config, mesh, split)
    return {**results, 'step': ckpt.step, 'split': split or config.data.eval_split,
            'ema': use_ema, 'checkpoint': str(ckpt.directory)}


def predict_checkpoint(config: ml_collections.ConfigDict, path: str, images: Sequence[str], *,
                       step: str | int = 'latest', use_ema: bool = False,
                       k: int = 5) -> tuple[weights.Checkpoint, list[predict.Prediction]]:
    """The top-k classes of each image under the checkpoint at `path`. The data set itself
    need not be present: only its preprocessing and class names are used."""
    size = int(config.data.image_size)
    ckpt = weights.locate(path, step, best_metric='ema_top1' if use_ema else 'top1')
    config = with_eval_preset(config, ckpt)
    mesh = sharding.create_mesh()
    model, variables = restore_model(config, ckpt, (size, size, 3), mesh, use_ema)
    return ckpt, predict.predict_files(model, variables, images, config.data, k)


def run(config: ml_collections.ConfigDict, *, workdir: str | None, checkpoint: str | None,
        checkpoint_step: str, split: str | None, use_ema: bool, images: Sequence[str],
        as_json: bool, top_k: int = 5) -> None:
    """eval.py: checks the flags, evaluates or predicts, prints on process 0."""
    if bool(workdir) == bool(checkpoint):
        raise ValueError('Pass exactly one of --workdir=DIR (a train workdir; the step from '
                         '--checkpoint_step) or --checkpoint=PATH.')
    if checkpoint and checkpoint_step != 'latest':
        raise ValueError(f'--checkpoint_step={checkpoint_step} chooses a step of a --workdir; '
                         'with --checkpoint pass the step directory itself.')
    if workdir:
        check_workdir(workdir)
    path = workdir or checkpoint
    if images:
        ckpt, predictions = predict_checkpoint(config, path, images, step=checkpoint_step,
                                               use_ema=use_ema, k=top_k)
        output = {'step': ckpt.step, 'checkpoint': str(ckpt.directory), 'ema': use_ema,
                  'predictions': [p.as_dict() for p in predictions]}
        text = '\n'.join([describe_checkpoint(output), *(p.format() for p in predictions)])
    else:
        output = evaluate_checkpoint(config, path, step=checkpoint_step, split=split,
                                     use_ema=use_ema)
        text = format_metrics(output)
    if jax.process_index() == 0:
        print(json.dumps(output) if as_json else text, flush=True)


def describe_checkpoint(output: dict[str, Any]) -> str:
    """'/tmp/run/checkpoints/660 (step 660, EMA weights)': what a result was computed with."""
    weights_used = 'EMA weights' if output['ema'] else 'weights'
    step = f'step {output["step"]}' if output['step'] is not None else 'converted'
    return f'{output["checkpoint"]} ({step}, {weights_used})'


def format_metrics(metrics: dict[str, Any]) -> str:
    return (f'{describe_checkpoint(metrics)} on {metrics["split"]!r}: '
            f'loss {metrics["loss"]:.4f}, top1 {metrics["top1"]:.4f}, '
            f'top5 {metrics["top5"]:.4f} over {metrics["num_examples"]} examples')
