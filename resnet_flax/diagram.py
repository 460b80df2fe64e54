"""Pictures of a ResNet drawn from the model itself: its blocks and its stage layout.

    python -m resnet_flax.diagram resnet50 --out resnet50.png
    python -m resnet_flax.diagram resnet18 --out resnet18.png --svg
    python -m resnet_flax.diagram --config=configs/digits.py --config.model.shortcut=B --out b.png
    python -m resnet_flax.diagram resnet50 --text

Nothing is typed by hand. The model's forward pass is traced with `jax.make_jaxpr` on abstract
inputs (no compute), and every box is an operation of that trace: a conv's kernel, stride,
groups and output channels come from the convolution itself, BN and SE from the flax module that
ran, ReLU, pooling, subsampling and zero-padding from the primitives between modules. The
shortcut is read from the dataflow: the two inputs of a block's addition are followed back to the
block's input, and an input that reaches the addition untouched is an identity shortcut.
Shapes are per image (H, W, C).
"""

from __future__ import annotations

import dataclasses
import math
import re
import textwrap
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.extend.core as jex
import jax.numpy as jnp

from resnet_flax import blocks, models, summary

_BLOCK = re.compile(r'^stage(\d+)_block(\d+)$')

# Primitives that only reshape, cast or finish another op (a pool's division); they join the op
# before them instead of getting a box of their own.
_HELPERS = {'convert_element_type', 'broadcast_in_dim', 'div', 'reshape', 'squeeze',
            'expand_dims', 'copy', 'copy_p', 'transpose'}
_ACTIVATIONS = {'relu': 'ReLU', 'max': 'ReLU', 'gelu': 'GELU', 'silu': 'SiLU', 'swish': 'SiLU',
                'sigmoid': 'sigmoid', 'tanh': 'tanh', 'elu': 'ELU', 'leaky_relu': 'leaky ReLU'}
_NORMS = {'BatchNorm': 'BN', 'GhostBatchNorm': 'ghost BN', 'LayerNorm': 'LN', 'GroupNorm': 'GN'}


@dataclasses.dataclass(frozen=True)
class Op:
    """One box of a drawing: a module call (conv, BN, SE, dense) or a primitive between them."""

    kind: str  # conv | norm | act | se | pool | subsample | pad | add | mean | dense | other
    label: str  # what the drawing prints, e.g. '3x3 conv, 64, /2'
    name: str  # the flax module's name ('conv1') or the primitive's
    out_shape: tuple[int, ...]
    params: int  # parameters of the module (0 for a primitive)


@dataclasses.dataclass(frozen=True)
class Block:
    """A residual block as traced: output = after(main(x) + shortcut(x))."""

    name: str  # 'stage2_block1'
    module: str  # the block's class, e.g. 'BottleneckBlock'
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    main: tuple[Op, ...]  # the residual branch F(x), in order
    shortcut: tuple[Op, ...]  # () is the identity
    after: tuple[Op, ...]  # after the addition (ReLU for post-activation blocks)
    shortcut_from: str  # 'input', or the main-path op whose output the shortcut takes
    params: int

    @property
    def shortcut_kind(self) -> str:
        kinds = {op.kind for op in self.shortcut}
        if 'conv' in kinds:
            return 'projection'
        return 'zero-padded identity' if 'pad' in kinds else 'identity'

    @property
    def channels(self) -> tuple[int, ...]:
        """Output channels of the main path's convs, e.g. (64, 64, 256)."""
        return tuple(op.out_shape[-1] for op in self.main if op.kind == 'conv')

    @property
    def stride(self) -> int:
        return self.in_shape[0] // self.out_shape[0]


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    blocks: tuple[Block, ...]

    @property
    def out_shape(self) -> tuple[int, ...]:
        return self.blocks[-1].out_shape


@dataclasses.dataclass(frozen=True)
class Network:
    """What the drawings show: the stem, the stages of blocks and the head, with shapes."""

    name: str
    input_shape: tuple[int, ...]
    stem: tuple[Op, ...]
    stages: tuple[Stage, ...]
    head: tuple[Op, ...]
    stage_costs: tuple[dict[str, Any], ...]  # summary.summarize's rows for the stages

    @property
    def stem_shape(self) -> tuple[int, ...]:
        return self.stages[0].blocks[0].in_shape

    @property
    def blocks(self) -> tuple[Block, ...]:
        return tuple(b for stage in self.stages for b in stage.blocks)

    def block(self, name: str) -> Block:
        for b in self.blocks:
            if b.name == name:
                return b
        raise ValueError(f'no block {name!r} in {self.name}; valid: '
                         f'{", ".join(b.name for b in self.blocks)}')


# ---------------------------------------------------------------------------------------------
# Tracing


@dataclasses.dataclass
class _RawOp:
    path: tuple[str, ...]  # the module's path, or the scope of a primitive
    kind: str
    eqns: list[int]
    is_module: bool


def _module_path(eqn: Any) -> tuple[str, ...]:
    """('stage1_block1', 'conv1') from the name stack 'ResNet/stage1_block1/conv1'.

    Flax names the scope of a module call after the module; the first entry is the top-level
    module, and 'name.method' entries are method scopes inside a module (not modules)."""
    parts = str(eqn.source_info.name_stack).split('/')[1:]
    return tuple(p for p in parts if p and '.' not in p)


def _call_name(eqn: Any) -> str:
    """The function a call primitive wraps ('relu', 'pad'), or the primitive's name."""
    name = eqn.params.get('name')
    if name:
        return str(name).lstrip('_')
    for key in ('call_jaxpr', 'jaxpr', 'fun_jaxpr'):
        inner = eqn.params.get(key)
        inner = getattr(inner, 'jaxpr', inner)
        if inner is not None and getattr(inner, 'eqns', None):
            return _call_name(inner.eqns[0])
    return eqn.primitive.name


def _primitive_kind(eqn: Any) -> str | None:
    """The kind of a primitive between modules; None for helpers that join the previous op."""
    prim = eqn.primitive.name
    if prim in _HELPERS:
        return None
    if prim in ('custom_jvp_call', 'custom_vjp_call', 'jit', 'pjit', 'closed_call'):
        name = _call_name(eqn)
        if name in _ACTIVATIONS:
            return 'act'
        return 'pad' if name == 'pad' else f'other:{name}'
    if prim == 'max' and any(isinstance(v, jex.Literal) for v in eqn.invars):
        return 'act'
    return {'slice': 'subsample', 'gather': 'subsample', 'pad': 'pad', 'add': 'add',
            'reduce_window_max': 'pool:max', 'reduce_window_sum': 'pool:avg',
            'reduce_sum': 'mean'}.get(prim, f'other:{prim}')


def _group(eqns: Sequence[Any], paths: Sequence[tuple[str, ...]], scope: tuple[str, ...],
           modules: dict[tuple[str, ...], str], indices: Sequence[int]) -> list[_RawOp]:
    """The ops directly inside `scope`, in program order: one per submodule call, one per
    primitive between them. `indices` are the eqns to look at (those under the scope)."""
    ops: list[_RawOp] = []
    depth = len(scope)
    for i in indices:
        eqn, path = eqns[i], paths[i]
        if path[:depth] != scope:
            continue
        if len(path) > depth:  # inside a submodule: one op per consecutive call
            child = path[:depth + 1]
            if ops and ops[-1].is_module and ops[-1].path == child:
                ops[-1].eqns.append(i)
            else:
                ops.append(_RawOp(child, modules.get(child, 'module'), [i], True))
            continue
        kind = _primitive_kind(eqn)
        previous = ops[-1] if ops else None
        if kind is None:  # a helper joins the op before it
            if previous is not None:
                previous.eqns.append(i)
            continue
        if kind == 'pool:avg' and previous is not None and previous.kind == kind \
                and not previous.is_module:  # the second half: counting the window's pixels
            previous.eqns.append(i)
            continue
        ops.append(_RawOp(scope, kind, [i], False))
    return ops


def _shape(var: Any) -> tuple[int, ...]:
    return tuple(var.aval.shape[1:])


def _param_count(variables: Any, path: tuple[str, ...]) -> int:
    tree = variables.get('params', {})
    for key in path:
        if key not in tree:
            return 0
        tree = tree[key]
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def _label(raw: _RawOp, eqns: Sequence[Any]) -> str:
    first, last = eqns[raw.eqns[0]], eqns[raw.eqns[-1]]
    kind = raw.kind
    if kind == 'Conv' or kind == 'ConvGeneral':
        conv = next(eqns[i] for i in raw.eqns if eqns[i].primitive.name == 'conv_general_dilated')
        kh, kw, _, out = conv.invars[1].aval.shape
        stride = max(conv.params['window_strides'])
        groups = conv.params['feature_group_count']
        return (f'{kh}x{kw} conv, {out}' + (f', /{stride}' if stride > 1 else '')
                + (f', {groups} groups' if groups > 1 else ''))
    if kind in _NORMS:
        return _NORMS[kind]
    if kind == 'SqueezeExcite':
        return 'SE'
    if kind == 'Dense':
        return f'dense, {_shape(last.outvars[0])[-1]}'
    if kind == 'act':
        return _ACTIVATIONS.get(_call_name(first), _call_name(first))
    if kind.startswith('pool:'):
        window = first.params['window_dimensions'][1:3]
        stride = max(first.params['window_strides'])
        return f'{window[0]}x{window[1]} {kind[5:]} pool' + (f', /{stride}' if stride > 1 else '')
    if kind == 'subsample':
        stride = max(first.params.get('strides') or (1,))
        return f'subsample, /{stride}' if stride > 1 else 'slice'
    if kind == 'pad':
        return f'zero-pad {first.invars[0].aval.shape[-1]}→{_shape(last.outvars[0])[-1]}'
    if kind == 'mean':
        return 'global avg pool'
    if kind == 'add':
        return '+'
    return kind.split(':')[-1]


def _op(raw: _RawOp, eqns: Sequence[Any], variables: Any) -> Op:
    kind = raw.kind
    if raw.is_module:
        kind = ('conv' if kind in ('Conv', 'ConvGeneral') else 'norm' if kind in _NORMS
                else 'se' if kind == 'SqueezeExcite' else 'dense' if kind == 'Dense'
                else 'other')
    elif kind.startswith('pool:'):
        kind = 'pool'
    elif kind.startswith('other:'):
        kind = 'other'
    out = eqns[raw.eqns[-1]].outvars[0]
    return Op(kind=kind, label=_label(raw, eqns), name=raw.path[-1] if raw.is_module else
              eqns[raw.eqns[0]].primitive.name, out_shape=_shape(out),
              params=_param_count(variables, raw.path) if raw.is_module else 0)


def _ancestors(var: Any, producers: dict[Any, int], eqns: Sequence[Any]) -> set[int]:
    """The eqns (inside the block) that `var` is computed from."""
    seen: set[int] = set()
    stack = [var]
    while stack:
        v = stack.pop()
        if isinstance(v, jex.Literal) or v not in producers or producers[v] in seen:
            continue
        seen.add(producers[v])
        stack.extend(eqns[producers[v]].invars)
    return seen


def _block(name: str, module: str, shapes: tuple[tuple[int, ...], tuple[int, ...]],
           eqns: Sequence[Any], paths: Sequence[tuple[str, ...]], inside: Sequence[int],
           modules: dict[tuple[str, ...], str], variables: Any) -> Block:
    """One block from the eqns `inside` it: its ops, split into main path and shortcut."""
    scope = (name,)
    raw_ops = _group(eqns, paths, scope, modules, inside)
    adds = [k for k, r in enumerate(raw_ops) if r.kind == 'add']
    if not adds:
        raise ValueError(f'block {name} ({module}) has no residual addition to draw')
    split = adds[-1]
    add_eqn = eqns[raw_ops[split].eqns[0]]
    producers = {v: i for i in inside for v in eqns[i].outvars}
    branches = [_ancestors(v, producers, eqns) for v in add_eqn.invars[:2]]
    convs = [sum(eqns[i].primitive.name == 'conv_general_dilated' for i in b) for b in branches]
    main_set, short_set = branches if (convs[0], len(branches[0])) >= (convs[1],
                                                                        len(branches[1])) \
        else branches[::-1]
    short_only = short_set - main_set
    main, shortcut, shared = [], [], []
    for raw in raw_ops[:split]:
        op = _op(raw, eqns, variables)
        if set(raw.eqns) <= short_only:
            shortcut.append(op)
        else:
            main.append(op)
            if set(raw.eqns) & short_set:
                shared.append(op)
    after = [_op(raw, eqns, variables) for raw in raw_ops[split + 1:]]
    return Block(name=name, module=module, in_shape=shapes[0], out_shape=shapes[1],
                 main=tuple(main), shortcut=tuple(shortcut), after=tuple(after),
                 shortcut_from=shared[-1].label if shared else 'input',
                 params=_param_count(variables, scope))


def trace(model: models.ResNet, image_size: int | None = None, name: str | None = None,
          channels: int = 3) -> Network:
    """The network's stem, blocks (with their layers and shortcuts) and head, with shapes.

    `image_size` defaults to 32 for the CIFAR stem and 224 otherwise (as the summary does)."""
    if image_size is None:
        image_size = 32 if model.stem == 'cifar' else 224
    # Convolutions are read from the jaxpr: draw XLA's conv, not the CPU's GEMM form of it.
    model = model.clone(conv_impl='xla')
    images = jax.ShapeDtypeStruct((1, image_size, image_size, channels), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    modules: dict[tuple[str, ...], str] = {}
    block_shapes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def record(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == '__call__':
            module = context.module
            modules[tuple(module.path)] = type(module).__name__
            if isinstance(module, blocks.ResidualBlock):
                block_shapes[module.name] = (tuple(args[0].shape[1:]), tuple(out.shape[1:]))
        return out

    with nn.intercept_methods(record):
        closed = jax.make_jaxpr(lambda v, x: model.apply(v, x, train=False))(variables, images)
    eqns = closed.jaxpr.eqns
    paths = [_module_path(eqn) for eqn in eqns]

    by_child: dict[str, list[int]] = {}
    for i, path in enumerate(paths):
        by_child.setdefault(path[0] if path else '', []).append(i)
    top = _group(eqns, paths, (), modules, range(len(eqns)))
    block_positions = [k for k, r in enumerate(top) if r.is_module and _BLOCK.match(r.path[0])]
    if not block_positions:
        raise ValueError(f'{name or "the model"} has no stageN_blockM blocks to draw')
    first, last = block_positions[0], block_positions[-1]
    stages: dict[int, list[Block]] = {}
    for raw in top[first:last + 1]:
        block_name = raw.path[0]
        match = _BLOCK.match(block_name)
        stages.setdefault(int(match.group(1)), []).append(
            _block(block_name, raw.kind, block_shapes[block_name], eqns, paths,
                   by_child[block_name], modules, variables))
    costs = summary.summarize(model, image_size)['stages']
    return Network(
        name=name or f'{model.block} ResNet',
        input_shape=(image_size, image_size, channels),
        stem=tuple(_op(r, eqns, variables) for r in top[:first]),
        stages=tuple(Stage(f'stage{i}', tuple(b)) for i, b in sorted(stages.items())),
        head=tuple(_op(r, eqns, variables) for r in top[last + 1:]),
        stage_costs=tuple(row for row in costs if row['name'].startswith('stage')),
    )


def pick_blocks(network: Network) -> tuple[Block, ...]:
    """The blocks worth drawing: the first one whose shortcut is the identity, and the first
    that downsamples (stride 2, so its shortcut must adapt). Either may be missing."""
    identity = next((b for b in network.blocks if b.shortcut_kind == 'identity'), None)
    strided = next((b for b in network.blocks if b.stride > 1), None)
    chosen = [b for b in (identity, strided) if b is not None]
    return tuple(chosen) or network.blocks[:1]


# ---------------------------------------------------------------------------------------------
# Text


def _dims(shape: Sequence[int]) -> str:
    return 'x'.join(map(str, shape))


def stage_label(stage: Stage) -> str:
    """'3 x BottleneckBlock [64, 64, 256]': the widths of the stage's last block."""
    return (f'{len(stage.blocks)} x {stage.blocks[-1].module} '
            f'[{", ".join(map(str, stage.blocks[-1].channels))}]')


def format_block(block: Block) -> str:
    """A block's layers in order, one line per branch."""
    shortcut = ' | '.join(op.label for op in block.shortcut) or 'identity'
    if block.shortcut_from != 'input':
        shortcut += f' (taken after {block.shortcut_from})'
    lines = [f'{block.name} ({block.module}): {_dims(block.in_shape)} -> '
             f'{_dims(block.out_shape)}, {block.params:,} params, shortcut: '
             f'{block.shortcut_kind}',
             '  main:     ' + ' | '.join(op.label for op in block.main),
             '  shortcut: ' + shortcut,
             '  then:     ' + ' | '.join(['+', *(op.label for op in block.after)])]
    return '\n'.join(lines)


def format_network(network: Network) -> str:
    """The stage layout: what each part is made of, and the shape it outputs."""
    rows = [('input', '', _dims(network.input_shape)),
            ('stem', ' · '.join(op.label for op in network.stem), _dims(network.stem_shape))]
    for stage in network.stages:
        rows.append((stage.name, stage_label(stage), _dims(stage.out_shape)))
    rows.append(('head', ' · '.join(op.label for op in network.head),
                 _dims(network.head[-1].out_shape) if network.head else ''))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return '\n'.join(f'{a.ljust(widths[0])}  {b.ljust(widths[1])}  {c}'.rstrip()
                     for a, b, c in rows)


# ---------------------------------------------------------------------------------------------
# Drawing (matplotlib, Agg)

_COLOURS = {'conv': '#9ecae1', 'norm': '#fdd0a2', 'act': '#c7e9c0', 'se': '#dadaeb',
            'pool': '#fee391', 'subsample': '#fee391', 'pad': '#fee391', 'mean': '#fee391',
            'dense': '#d9d9d9', 'other': '#f0f0f0'}
_ROW = 0.75  # vertical distance between boxes
_BOX_H = 0.5


def _box(ax: Any, x: float, y: float, width: float, text: str, colour: str,
         fontsize: float = 9) -> None:
    from matplotlib import patches

    ax.add_patch(patches.FancyBboxPatch((x - width / 2, y - _BOX_H / 2), width, _BOX_H,
                                boxstyle='round,pad=0.02,rounding_size=0.08', facecolor=colour,
                                edgecolor='#404040', linewidth=0.8))
    ax.text(x, y, text, ha='center', va='center', fontsize=fontsize)


def _arrow(ax: Any, start: tuple[float, float], end: tuple[float, float]) -> None:
    ax.annotate('', xy=end, xytext=start,
                arrowprops=dict(arrowstyle='-|>', color='#404040', lw=0.9, shrinkA=0,
                                shrinkB=0))


def _line(ax: Any, xs: Sequence[float], ys: Sequence[float]) -> None:
    ax.plot(xs, ys, color='#404040', lw=0.9, solid_capstyle='butt')


# Block drawings: the main path down the left column, the shortcut down the right.
_MAIN_X, _SHORTCUT_X, _BOX_W = 0.0, 1.9, 1.7
_SHAPE_OPS = ('conv', 'pool', 'subsample', 'pad')  # ops whose output shape is written beside


def draw_block(ax: Any, block: Block) -> None:
    """The block top to bottom: input, main path (left), shortcut (right), +, output."""
    ax.text(_MAIN_X, 0.0, f'in {_dims(block.in_shape)}', ha='center', va='center', fontsize=9,
            fontweight='bold')
    fork = -0.35
    ys = [fork - 0.5 - k * _ROW for k in range(len(block.main))]
    add_y = (ys[-1] if ys else fork) - 0.85
    _line(ax, [_MAIN_X, _MAIN_X], [-0.2, fork])
    bottom = _draw_ops(ax, _MAIN_X, block.main, ys, fork, shapes_on='left')
    _arrow(ax, (_MAIN_X, bottom), (_MAIN_X, add_y + 0.18))
    _draw_shortcut(ax, block, fork, ys, add_y)
    _draw_sum(ax, _MAIN_X, add_y)

    after_ys, oy = [], add_y
    for _ in block.after:
        oy -= _ROW
        after_ys.append(oy)
    bottom = _draw_ops(ax, _MAIN_X, block.after, after_ys, add_y - 0.18, shapes_on='')
    end = oy - 0.75
    _arrow(ax, (_MAIN_X, bottom), (_MAIN_X, end + 0.15))
    ax.text(_MAIN_X, end, f'out {_dims(block.out_shape)}', ha='center', va='center', fontsize=9,
            fontweight='bold')
    ax.set_title(f'{block.name}: {block.module}\n{block.params:,} params, shortcut: '
                 f'{block.shortcut_kind}', fontsize=10)
    ax.set_xlim(-1.6, 3.6)
    ax.set_ylim(end - 0.4, 0.4)
    ax.axis('off')


def _draw_ops(ax: Any, x: float, ops: Sequence[Op], ys: Sequence[float], top: float,
              shapes_on: str) -> float:
    """A column of boxes at `ys`, each with an arrow from the one above (the first from `top`),
    output shapes written on the `shapes_on` side ('left', 'right' or '' for none). Returns
    the bottom of the last box."""
    previous = top
    for op, oy in zip(ops, ys, strict=True):
        _arrow(ax, (x, previous), (x, oy + _BOX_H / 2))
        _box(ax, x, oy, _BOX_W, op.label, _COLOURS.get(op.kind, '#f0f0f0'))
        if shapes_on and op.kind in _SHAPE_OPS:
            text_x = x - _BOX_W / 2 - 0.08 if shapes_on == 'left' else x + _BOX_W / 2 + 0.08
            ax.text(text_x, oy, _dims(op.out_shape), ha='right' if shapes_on == 'left' else 'left',
                    va='center', fontsize=7, color='#606060')
        previous = oy - _BOX_H / 2
    return previous


def _draw_shortcut(ax: Any, block: Block, fork: float, main_ys: Sequence[float],
                   add_y: float) -> None:
    """From the fork (or from the shared op it taps), down the right, into the +."""
    start = fork
    if block.shortcut_from != 'input':
        tapped = [op.label for op in block.main].index(block.shortcut_from)
        start = main_ys[tapped] - _BOX_H / 2 - 0.1
    _line(ax, [_MAIN_X, _SHORTCUT_X], [start, start])
    if block.shortcut:
        mid = (start + add_y) / 2
        ys = [mid + (len(block.shortcut) - 1) * _ROW / 2 - k * _ROW
              for k in range(len(block.shortcut))]
        bottom = _draw_ops(ax, _SHORTCUT_X, block.shortcut, ys, start, shapes_on='right')
        _line(ax, [_SHORTCUT_X, _SHORTCUT_X], [bottom, add_y])
    else:
        _line(ax, [_SHORTCUT_X, _SHORTCUT_X], [start, add_y])
        ax.text(_SHORTCUT_X + 0.08, (start + add_y) / 2, 'identity', rotation=90, ha='left',
                va='center', fontsize=9, style='italic')
    _arrow(ax, (_SHORTCUT_X, add_y), (_MAIN_X + 0.18, add_y))


def _draw_sum(ax: Any, x: float, y: float) -> None:
    from matplotlib import patches

    ax.add_patch(patches.Circle((x, y), 0.18, facecolor='white', edgecolor='#404040', lw=0.9))
    ax.text(x, y, '+', ha='center', va='center', fontsize=12)


def _millions(n: int) -> str:
    return f'{n / 1e6:.2f}M' if n >= 1e5 else f'{n:,}'


def draw_layout(ax: Any, network: Network) -> None:
    """The stage layout, input to logits, with the output shape of each part on the right."""
    from matplotlib import patches

    stem = textwrap.fill(' · '.join(op.label for op in network.stem), 60)
    head = textwrap.fill(' · '.join(op.label for op in network.head), 60)
    rows = [('input', '', _dims(network.input_shape), '#ffffff'),
            ('stem', stem, _dims(network.stem_shape), '#9ecae1')]
    for stage, cost in zip(network.stages, network.stage_costs, strict=True):
        first = stage.blocks[0]
        detail = f'{stage_label(stage)}\nblock 1: '
        detail += f'/{first.stride}, ' if first.stride > 1 else ''
        detail += f'{first.shortcut_kind} shortcut · {_millions(cost["params"])} params, '
        detail += f'{cost["macs"] / 1e6:,.1f}M MACs'
        rows.append((stage.name, detail, _dims(stage.out_shape), '#c6dbef'))
    rows.append(('head', head, _dims(network.head[-1].out_shape) if network.head else '',
                 '#d9d9d9'))
    width, step, height = 4.4, 1.05, 0.7
    for k, (title, text, shape, colour) in enumerate(rows):
        y = -k * step
        if k:
            _arrow(ax, (0, y + step - height / 2), (0, y + height / 2))
        if title == 'input':
            ax.text(0, y, f'input {shape}', ha='center', va='center', fontsize=9,
                    fontweight='bold')
            continue
        ax.add_patch(patches.FancyBboxPatch((-width / 2, y - height / 2), width, height,
                                    boxstyle='round,pad=0.02,rounding_size=0.08',
                                    facecolor=colour, edgecolor='#404040', linewidth=0.8))
        ax.text(-width / 2 + 0.1, y, title, ha='left', va='center', fontsize=9,
                fontweight='bold')
        ax.text(-width / 2 + 0.85, y, text, ha='left', va='center', fontsize=7.5)
        ax.text(width / 2 + 0.15, y, shape, ha='left', va='center', fontsize=9,
                fontweight='bold', color='#08519c')
    ax.set_title(f'{network.name}: stage layout\n(shape after each part, per image)',
                 fontsize=10)
    ax.set_xlim(-width / 2 - 0.1, width / 2 + 1.6)
    ax.set_ylim(-(len(rows) - 1) * step - 0.5, 0.5)
    ax.axis('off')


def figure(network: Network, block_names: Sequence[str] = (), layout: bool = True) -> Any:
    """A matplotlib Figure: the chosen blocks (default `pick_blocks`) and the stage layout."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    chosen = tuple(network.block(n) for n in block_names) or pick_blocks(network)
    rows = max(len(b.main) + len(b.after) for b in chosen)
    height = max(4.5, 1.2 + 0.56 * (rows + 3))
    widths = [4.6] * len(chosen) + ([6.4] if layout else [])
    fig = Figure(figsize=(sum(widths), height))
    axes = fig.subplots(1, len(widths), gridspec_kw=dict(width_ratios=widths), squeeze=False)[0]
    for ax, block in zip(axes, chosen, strict=False):
        draw_block(ax, block)
    if layout:
        draw_layout(axes[-1], network)
    fig.suptitle(network.name, fontsize=12, fontweight='bold')
    fig.tight_layout()
    return fig


def labels(fig: Any) -> list[str]:
    """Every text drawn in a figure (for tests and for checking what a picture says)."""
    found = [t.get_text() for t in fig.texts]
    for ax in fig.axes:
        found += [t.get_text() for t in ax.texts] + [ax.get_title()]
    return found


def save(fig: Any, path: str, svg: bool = False, dpi: int = 100) -> str:
    """Writes PNG (or SVG) without timestamps, so an unchanged model gives identical bytes."""
    from etils import epath

    out = epath.Path(path)
    if svg and out.suffix != '.svg':
        out = out.with_suffix('.svg')
    out.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib

    # Text stays text in SVG (searchable, smaller); fixed ids and no date keep it reproducible.
    rc = {'svg.hashsalt': 'resnet-flax', 'svg.fonttype': 'none'}
    with matplotlib.rc_context(rc), out.open('wb') as f:
        if out.suffix == '.svg':
            fig.savefig(f, format='svg', metadata={'Date': None})
        else:
            fig.savefig(f, format='png', dpi=dpi, metadata={'Software': None})
    return str(out)


# ---------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str]) -> None:
    from absl import flags

    flag_values = flags.FLAGS
    names = list(argv[1:])
    if flag_values.config is not None:
        if names:
            raise ValueError(f'give a model name or --config, not both (got {names[0]!r})')
        config = flag_values.config
        model = models.from_config(config.model)
        title = flag_values['config'].config_filename
        image_size = flag_values.image_size or config.data.get('image_size')
    elif len(names) == 1:
        model, title, image_size = models.create(names[0]), names[0], flag_values.image_size
    else:
        raise ValueError('give one model name or --config; names: ' + ', '.join(models.names()))
    network = trace(model, image_size or None, flag_values.title or title)
    if flag_values.text:
        chosen = [network.block(n) for n in flag_values.blocks] or pick_blocks(network)
        texts = [format_network(network)] if flag_values.layout else []
        print('\n\n'.join(texts + [format_block(block) for block in chosen]))
    if flag_values.out:
        fig = figure(network, flag_values.blocks, flag_values.layout)
        path = save(fig, flag_values.out, flag_values.svg)
        print(f'wrote {path}')
    elif not flag_values.text:
        raise ValueError('nothing to do: give --out FILE.png (or .svg) and/or --text')


def _define_flags() -> None:
    from absl import flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file('config', None, 'An experiment config file (its model).')
    flags.DEFINE_string('out', '', 'Where to write the picture: FILE.png or FILE.svg.')
    flags.DEFINE_bool('svg', False, 'Write SVG (the --out suffix becomes .svg).')
    flags.DEFINE_integer('image_size', None, 'Input size; default: the config, or 224 (32 CIFAR).')
    flags.DEFINE_list('blocks', [], 'Blocks to draw, e.g. stage1_block1,stage2_block1; default: '
                      'the first identity block and the first downsampling block.')
    flags.DEFINE_bool('layout', True, 'Draw the stage layout next to the blocks (--nolayout: '
                      'blocks only).')
    flags.DEFINE_string('title', '', 'Title of the picture; default: the name or config file.')
    flags.DEFINE_bool('text', False, 'Also print what is drawn as text.')


if __name__ == '__main__':
    from resnet_flax import cli

    _define_flags()
    cli.run(main)
