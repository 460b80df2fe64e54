"""Parameters, multiply-accumulates and layers of a ResNet, per stage, by shape inference.

    python -m resnet_flax.summary resnet50
    python -m resnet_flax.summary --config=configs/resnet50.py --config.model.depth=101
    python -m resnet_flax.summary resnet50 --json
    python -m resnet_flax.summary resnet34 --config.model.shortcut=none   # = plain34
    python -m resnet_flax.summary --compare resnet18 resnet34 resnet50 resnet101

Nothing is computed on real data: the model is traced with `jax.eval_shape` while an
interceptor records the input and output shape of every conv and dense layer. MACs are exact
for those layers (kh * kw * C_in / groups per output element for a conv, C_in per output for a
dense layer) and, like the published figures, leave out BN, ReLU, pooling and the additions.
MACs are per image.

`layers` counts the numbered layers by the course notes' rule: the convs on the main path of
each block, the stem, and the final dense layer; projection shortcuts, BN, pooling and SE are
left out. The stem counts as one layer whether it is one 7x7 conv or the deep stem's three 3x3
convs, as the names do (ResNet-50-D has 50 layers); `weight_layers` counts every conv of the
deep stem (52 for ResNet-50-D), and equals `layers` otherwise.
"""

import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax import blocks, models

_BASE_CONFIG = Path(__file__).resolve().parents[1] / 'configs' / 'base.py'
_STAGE = re.compile(r'^stage(\d+)_block(\d+)$')


def _group(top_level_name: str) -> str:
    """The summary row a top-level submodule belongs to: 'stem', 'stageN' or 'head'."""
    if top_level_name.startswith('stem'):
        return 'stem'
    match = _STAGE.match(top_level_name)
    return f'stage{match.group(1)}' if match else 'head'


def _layer_macs(module: nn.Module, x_shape: tuple[int, ...], y_shape: tuple[int, ...]) -> int:
    outputs = math.prod(y_shape[1:])
    if isinstance(module, nn.Conv):
        taps = math.prod(module.kernel_size) * x_shape[-1] // module.feature_group_count
        return outputs * taps
    return outputs * x_shape[-1]  # nn.Dense


def trace(model: models.ResNet, image_size: int, channels: int = 3) -> dict[str, Any]:
    """Shapes of the model's variables and of every conv/dense/block call, for one image."""
    layers, block_calls = [], []

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        module = context.module
        if context.method_name == '__call__':
            if isinstance(module, (nn.Conv, nn.Dense)):
                layers.append(dict(path=module.path, kind=type(module).__name__,
                                   macs=_layer_macs(module, args[0].shape, out.shape)))
            elif isinstance(module, blocks.ResidualBlock):
                block_calls.append(dict(path=module.path, input_shape=tuple(args[0].shape[1:]),
                                        output_shape=tuple(out.shape[1:])))
        return out

    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    init = lambda rng, x: model.init(rng, x, train=False)
    with nn.intercept_methods(record):
        variables = jax.eval_shape(init, jax.random.key(0), images)
    return dict(variables=variables, layers=layers, blocks=block_calls)


def _size(tree: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def summarize(model: models.ResNet | str, image_size: int | None = None,
              name: str | None = None) -> dict[str, Any]:
    """Parameters, MACs and layers of a model (or a family member's name), per stage and total.

    Returns {'name', 'image_size', 'block', 'params', 'macs', 'layers', 'weight_layers',
    'batch_stats', 'output_shape', 'stages': [{'name', 'output_shape', 'blocks', 'params',
    'macs'}, ...]}, with rows 'stem', 'stage1'..'stageN' and 'head' (pool, dense, and the final
    BN of pre-activation nets). Shapes are (H, W, C) per image; `image_size` defaults to 32 for
    the CIFAR stem and 224 otherwise.
    """
    if isinstance(model, str):
        name = name or model
        model = models.create(model)
    if image_size is None:
        image_size = 32 if model.stem == 'cifar' else 224
    traced = trace(model, image_size)
    params = traced['variables']['params']

    rows: dict[str, dict[str, Any]] = {}
    row = lambda key: rows.setdefault(key, dict(name=key, output_shape=None, blocks=0, params=0,
                                                macs=0))
    row('stem')
    for key, subtree in params.items():
        row(_group(key))['params'] += _size(subtree)
    for layer in traced['layers']:
        row(_group(layer['path'][0]))['macs'] += layer['macs']
    for call in traced['blocks']:
        stage = row(_group(call['path'][0]))
        stage['blocks'] += 1
        stage['output_shape'] = call['output_shape']  # blocks run in order: the last one wins
    if traced['blocks']:
        rows['stem']['output_shape'] = traced['blocks'][0]['input_shape']
    row('head')['output_shape'] = (model.num_classes,)
    order = ['stem'] + sorted((k for k in rows if k.startswith('stage')),
                              key=lambda k: int(k[5:])) + ['head']

    main_convs = [layer for layer in traced['layers']
                  if _STAGE.match(layer['path'][0]) and layer['path'][-1].startswith('conv')]
    stem_convs = [layer for layer in traced['layers'] if layer['path'][0].startswith('stem_conv')]
    heads = [layer for layer in traced['layers'] if layer['path'][0] == 'head']
    return dict(
        name=name or f'{model.block} ResNet',
        image_size=image_size,
        block=model.block,
        params=_size(params),
        macs=sum(layer['macs'] for layer in traced['layers']),
        layers=len(main_convs) + min(len(stem_convs), 1) + len(heads),
        weight_layers=len(main_convs) + len(stem_convs) + len(heads),
        batch_stats=_size(traced['variables'].get('batch_stats', {})),
        output_shape=(model.num_classes,),
        stages=[rows[k] for k in order],
    )


# ---------------------------------------------------------------------------------------------
# Printing


def _millions(n: int) -> str:
    return f'{n / 1e6:,.2f}M'


def _giga(n: int) -> str:
    return f'{n / 1e9:,.3f}G'


def _table(header: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    cells = [list(header), *[list(r) for r in body]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    fmt = lambda r: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                              for i, (c, w) in enumerate(zip(r, widths, strict=True)))
    rule = '-' * len(fmt(header))
    return '\n'.join([fmt(header), rule, *[fmt(r) for r in cells[1:-1]], rule, fmt(cells[-1])])


def format_summary(s: dict[str, Any]) -> str:
    """The per-stage table of `summarize`'s result."""
    body = [[r['name'], 'x'.join(map(str, r['output_shape'] or ())), str(r['blocks'] or ''),
             f"{r['params']:,}", f"{r['macs']:,}"] for r in s['stages']]
    body.append(['total', '', str(sum(r['blocks'] for r in s['stages'])), f"{s['params']:,}",
                 f"{s['macs']:,}"])
    title = (f"{s['name']} at {s['image_size']}x{s['image_size']}: {_millions(s['params'])} "
             f"params, {_giga(s['macs'])} MACs, {s['layers']} layers "
             f"({s['weight_layers']} weight layers), {s['block']} blocks")
    return title + '\n' + _table(['stage', 'output', 'blocks', 'params', 'MACs'], body)


def format_comparison(summaries: Sequence[dict[str, Any]]) -> str:
    """Several models side by side: what each costs and what it spends its budget on."""
    header = ['model', 'block', 'layers', 'params', 'MACs', 'MACs/param', 'features']
    body = [[s['name'], s['block'], str(s['layers']), _millions(s['params']), _giga(s['macs']),
             f"{s['macs'] / s['params']:.0f}", str(s['stages'][-2]['output_shape'][-1])]
            for s in summaries]
    lines = _table(header, body).splitlines()
    del lines[-2]  # no totals row: every row is a model
    return '\n'.join(lines)


def main(argv: Sequence[str]) -> None:
    from absl import flags  # the CLI's dependencies stay out of the library import

    flag_values = flags.FLAGS
    if not flag_values['verbosity'].present:
        from resnet_flax import cli

        cli.quiet_logs()
    targets: list[tuple[str, models.ResNet, int | None]] = []
    config = flag_values.config
    overrides: dict[str, Any] = {}
    if config is not None and models.plain_zero_init_note(config.model):
        print(models.plain_zero_init_note(config.model), file=sys.stderr)
    if flag_values['config'].present:
        image_size = flag_values.image_size or config.data.get('image_size')
        targets.append((flag_values['config'].config_filename, models.from_config(config.model),
                        image_size))
    elif config is not None:  # --config.model.X=... without --config: change the named models
        overrides = {key: value for key, value in config.model.to_dict().items()
                     if value != models.CONFIG_DEFAULTS[key]}
    changed = ', '.join(f'{key}={value}' for key, value in overrides.items())
    for name in argv[1:]:
        label = f'{name} ({changed})' if changed else name
        targets.append((label, models.create(name, **overrides), flag_values.image_size))
    if not targets:
        raise ValueError('give a model name or --config; names: ' + ', '.join(models.names()))
    if len(targets) > 1 and not flag_values.compare:
        raise ValueError(f'{len(targets)} models given; add --compare to put them side by side')
    summaries = [summarize(model, size, name) for name, model, size in targets]
    if flag_values.json:
        print(json.dumps(summaries if flag_values.compare else summaries[0], indent=1))
    elif flag_values.compare:
        print(format_comparison(summaries))
    else:
        print(format_summary(summaries[0]))


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    # configs/base.py by default, so that --config.model.X=... can change a named model.
    base = _BASE_CONFIG
    config_flags.DEFINE_config_file('config', str(base) if base.exists() else None,
                                    'An experiment config file (its model).')
    flags.DEFINE_integer('image_size', None, 'Input size; default: the config, or 224 (32 CIFAR).')
    flags.DEFINE_bool('json', False, 'Print the summary as JSON.')
    flags.DEFINE_bool('compare', False, 'Put several models side by side.')


if __name__ == '__main__':
    from resnet_flax import cli

    # Before the flags are defined: a config flag with a default reads its overrides then.
    cli.check_config_path(sys.argv)
    cli.check_config_overrides(sys.argv, _BASE_CONFIG)
    _define_flags()
    cli.run(main, default_config=_BASE_CONFIG)
