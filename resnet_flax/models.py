"""The ResNet family: one `ResNet` module assembled from stages, built by name or from a config.

    model = models.create('resnet50', num_classes=1000)            # torchvision's ResNet-50
    model = models.create('resnet56')                               # CIFAR, 10 classes
    model = models.create('plain34')                                # no shortcuts (Fig. 4)
    model = models.from_config(config.model)                        # configs/base.py `model`
    variables = model.init(rng, images, train=False)                # NHWC float images
    logits, updates = model.apply(variables, images, train=True, mutable=['batch_stats'])

As a backbone (detection, segmentation, transfer)::

    maps = model.apply(variables, images, train=False, return_features=True)
    maps['stage1'], ..., maps['stage4']   # NHWC feature maps at strides 4, 8, 16, 32 (ImageNet
                                          # stem); also maps['stem'] and maps['logits']
    model, variables = models.replace_head(model, variables, num_classes=37, rng=key)

`replace_head` keeps every array but the head's (a fresh dense layer for the new class count);
a training run does the same from a checkpoint with `config.init_from`. Regularisers for
training: `drop_path_rate` (stochastic depth, rising linearly over the blocks; the train step
provides the 'drop_path' RNG stream) and `head_dropout_rate` (dropout before the head, the
'dropout' stream); both are the identity at eval.

Logits are float32 whatever lower `model.dtype` is (the pooling and the head run in float32,
for the loss); a float64 model (numerics checks under JAX_ENABLE_X64) stays float64.

Parameter tree (1:1 with torchvision's state dict; stages and blocks count from 1)::

    torchvision                          flax (params / batch_stats)
    conv1.weight [O,I,kh,kw]             stem_conv/kernel [kh,kw,I,O]
    bn1.{weight,bias}                    stem_bn/{scale,bias}
    bn1.{running_mean,running_var}       batch_stats stem_bn/{mean,var}
    layer{i}.{j}.conv{k}.weight          stage{i}_block{j+1}/conv{k}/kernel
    layer{i}.{j}.bn{k}.*                 stage{i}_block{j+1}/bn{k}/*
    layer{i}.{j}.downsample.0.weight     stage{i}_block{j+1}/proj_conv/kernel
    layer{i}.{j}.downsample.1.*          stage{i}_block{j+1}/proj_bn/*
    fc.weight [O,I], fc.bias             head/kernel [I,O], head/bias

BN running_var: torchvision keeps the unbiased variance, flax the biased one; at the sizes BN
sees the difference is negligible and is copied as is. Batch-norm `num_batches_tracked` has no
counterpart. Other names: the deep stem is `stem_conv{1,2,3}`/`stem_bn{1,2,3}` (timm's
`conv1.{0,3,6}`, `conv1.{1,4}`, `bn1`); SE is `.../se/reduce` and `.../se/expand` (Dense);
pre-activation nets end with `final_bn`, and their projection shortcuts have no `proj_bn`.

BN statistics: `nn.BatchNorm` under `jax.jit` with a batch-sharded input reduces over the
global batch (synchronised BN). `model.bn_group_size > 0` selects ghost BN instead, with
statistics over groups of that many examples (set it to the per-device batch for per-device BN).
"""

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from resnet_flax import blocks
from resnet_flax import conv as conv_lib

# The `model` section of configs/base.py, with the same defaults. The package does not import
# configs/, so the schema lives here too; tests check that the two agree.
CONFIG_DEFAULTS: dict[str, Any] = dict(
    family='imagenet', depth=50, num_classes=1000, block='', stage_sizes=(), stage_widths=(),
    stem='', stem_width=0, shortcut='', stride_placement='v1.5', preactivation=False,
    avg_down=False, zero_init_last_bn=False, width_multiplier=1.0, groups=1, base_width=64,
    se_ratio=0.0, dtype='float32', param_dtype='float32', bn_momentum=0.9, bn_epsilon=1e-5,
    bn_group_size=0, drop_path_rate=0.0, head_dropout_rate=0.0, conv_impl='auto',
    conv_im2col_max_mib=64.0,
)

IMAGENET_DEPTHS = {  # depth -> (block, blocks per stage), He et al. 2015 Table 1 (+ v2's 200)
    18: ('basic', (2, 2, 2, 2)),
    34: ('basic', (3, 4, 6, 3)),
    50: ('bottleneck', (3, 4, 6, 3)),
    101: ('bottleneck', (3, 4, 23, 3)),
    152: ('bottleneck', (3, 8, 36, 3)),
    200: ('bottleneck', (3, 24, 36, 3)),
}

FAMILIES = {  # what '' / () / 0 in the config resolve to
    'imagenet': dict(stage_widths=(64, 128, 256, 512), stem='imagenet', stem_width=64,
                     shortcut='B'),
    'cifar': dict(stage_widths=(16, 32, 64), stem='cifar', stem_width=16, shortcut='A'),
}

# Named members: the config fields that differ from CONFIG_DEFAULTS.
_CIFAR = dict(family='cifar', num_classes=10)
REGISTRY: dict[str, dict[str, Any]] = {
    **{f'resnet{d}': dict(depth=d) for d in IMAGENET_DEPTHS},
    **{f'resnet{d}': dict(_CIFAR, depth=d) for d in (20, 32, 44, 56, 110, 1202)},
    'resnet50d': dict(depth=50, stem='deep', avg_down=True),  # ResNet-D (He et al. 2019)
    'wide_resnet50_2': dict(depth=50, width_multiplier=2.0),
    'wide_resnet101_2': dict(depth=101, width_multiplier=2.0),
    'resnext50_32x4d': dict(depth=50, groups=32, base_width=4),
    'resnext101_32x8d': dict(depth=101, groups=32, base_width=8),
    # Plain networks (He et al. 2015, Fig. 4 and 6): the same layers without shortcuts.
    **{f'plain{d}': dict(depth=d, shortcut='none') for d in (18, 34)},
    **{f'plain{d}': dict(_CIFAR, depth=d, shortcut='none') for d in (20, 32, 44, 56, 110)},
}

DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}


class ResNet(nn.Module):
    """A residual network: stem, stages of residual blocks, global average pool, dense head.

    Fields are fully resolved (no family defaults); build it with `create` or `from_config`.
    Stage i > 1 downsamples by 2 in its first block. Block output widths are `stage_widths`
    times the expansion (4 for bottlenecks); see `block_widths` for the inner widths.
    """

    stage_sizes: Sequence[int]
    stage_widths: Sequence[int]
    num_classes: int
    block: str = 'bottleneck'
    stem: str = 'imagenet'
    stem_width: int = 64
    shortcut: str = 'B'
    stride_placement: str = 'v1.5'
    preactivation: bool = False
    avg_down: bool = False
    zero_init_last_bn: bool = False
    width_multiplier: float = 1.0
    groups: int = 1
    base_width: int = 64
    se_ratio: float = 0.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    bn_group_size: int = 0
    drop_path_rate: float = 0.0
    head_dropout_rate: float = 0.0
    conv_impl: str = 'auto'  # 'auto' | 'xla' | 'im2col'; see resnet_flax/conv.py
    conv_im2col_max_mib: float = 64.0  # 'auto': the largest im2col patch tensor of one layer

    def __post_init__(self) -> None:
        _validate(self)
        super().__post_init__()

    @property
    def expansion(self) -> int:
        return 4 if self.block == 'bottleneck' else 1

    def block_widths(self, stage_width: int) -> tuple[int, int]:
        """(output width, inner width) of the blocks of a stage with this base width."""
        if self.block == 'basic':  # Wide ResNet widens both 3x3 convs
            width = _exact_int(stage_width * self.width_multiplier,
                               'stage width x width_multiplier')
            return width, width
        per_group = stage_width * self.width_multiplier * self.base_width / 64
        per_group = _exact_int(per_group, 'stage width x width_multiplier x base_width / 64')
        return stage_width * self.expansion, per_group * self.groups

    def drop_path_rates(self) -> list[float]:
        """Stochastic depth rate of each block, in order: rising linearly from
        drop_path_rate / L for the first of L blocks to drop_path_rate for the last
        (Huang et al. 2016's linear decay of the survival probability)."""
        total = sum(self.stage_sizes)
        return [self.drop_path_rate * k / total for k in range(1, total + 1)]

    @nn.compact
    def __call__(self, x: jnp.ndarray, train: bool,
                 return_features: bool = False) -> jnp.ndarray | dict[str, jnp.ndarray]:
        """Logits; with `return_features`, a dict of the stem's and each stage's output
        ('stem', 'stage1', ..., 'logits'), NHWC in the model's dtype, for backbone users."""
        conv = functools.partial(nn.Conv, use_bias=False, kernel_init=blocks.conv_kernel_init,
                                 dtype=self.dtype, param_dtype=self.param_dtype)
        # on the CPU: GEMMs, not XLA's conv
        conv_fn = conv_lib.conv_function(self.conv_impl, self.conv_im2col_max_mib)
        if conv_fn is not None:
            conv = functools.partial(conv, conv_general_dilated=conv_fn)
        norm_kwargs = dict(use_running_average=not train, momentum=self.bn_momentum,
                           epsilon=self.bn_epsilon, dtype=self.dtype, param_dtype=self.param_dtype)
        if self.bn_group_size > 0:
            norm = functools.partial(blocks.GhostBatchNorm, group_size=self.bn_group_size,
                                     **norm_kwargs)
        else:
            norm = functools.partial(nn.BatchNorm, **norm_kwargs)
        act = nn.relu
        se = None
        if self.se_ratio > 0:
            se = functools.partial(blocks.SqueezeExcite, ratio=self.se_ratio, dtype=self.dtype,
                                   param_dtype=self.param_dtype)
        block_cls = blocks.block_class(self.block, self.preactivation)
        drop_rates = iter(self.drop_path_rates())

        x = jnp.asarray(x, self.dtype)
        x = blocks.stem(x, kind=self.stem, width=self.stem_width, conv=conv, norm=norm, act=act,
                        preactivation=self.preactivation)
        feature_maps = {'stem': x}
        stages = zip(self.stage_sizes, self.stage_widths, strict=True)
        for i, (size, width) in enumerate(stages, start=1):
            features, inner = self.block_widths(width)
            for j in range(1, size + 1):
                rate = next(drop_rates)
                drop_path = (functools.partial(blocks.DropPath, rate=rate, deterministic=not train)
                             if rate > 0 else None)
                x = block_cls(
                    features=features, inner_features=inner,
                    strides=2 if i > 1 and j == 1 else 1,
                    conv=conv, norm=norm, act=act, shortcut=self.shortcut,
                    avg_down=self.avg_down, zero_init_last_bn=self.zero_init_last_bn,
                    groups=self.groups, stride_placement=self.stride_placement, se=se,
                    drop_path=drop_path, name=f'stage{i}_block{j}')(x)
            feature_maps[f'stage{i}'] = x
        if self.preactivation:
            x = act(norm(name='final_bn')(x))
        head_dtype = jnp.promote_types(self.dtype, jnp.float32)
        x = jnp.mean(x.astype(head_dtype), axis=(1, 2))
        x = nn.Dropout(self.head_dropout_rate, deterministic=not train, name='head_dropout')(x)
        logits = classifier(self.num_classes, self.param_dtype, head_dtype)(x)
        return {**feature_maps, 'logits': logits} if return_features else logits


def classifier(num_classes: int, param_dtype: Any = jnp.float32,
               dtype: Any = jnp.float32) -> nn.Dense:
    """The head: a float32 dense layer on the pooled features (the `head` params)."""
    return nn.Dense(num_classes, dtype=dtype, param_dtype=param_dtype,
                    kernel_init=blocks.dense_kernel_init, name='head')


def replace_head(model: ResNet, variables: Mapping[str, Any], num_classes: int,
                 rng: jax.Array) -> tuple[ResNet, dict[str, Any]]:
    """`model` and its `variables` with a freshly initialised head for `num_classes` classes;
    every other array is kept as it is (the same objects). For a new task in memory; a run
    does the same from a checkpoint with `config.init_from`."""
    head = variables['params']['head']
    in_features = head['kernel'].shape[0]
    fresh = classifier(num_classes, model.param_dtype).init(
        rng, jnp.zeros((1, in_features), jnp.float32))['params']
    params = {**variables['params'], 'head': fresh}
    return model.clone(num_classes=num_classes), {**variables, 'params': params}


def _exact_int(value: float, what: str) -> int:
    if value != int(value) or value < 1:
        raise ValueError(f'{what} = {value} is not a positive whole number; choose '
                         'model.width_multiplier / model.base_width so that it divides evenly')
    return int(value)


def _choice(field: str, value: Any, valid: Sequence[Any]) -> None:
    if value not in valid:
        raise ValueError(f'model.{field}={value!r} is not valid; choose one of '
                         f'{", ".join(map(repr, valid))}')


def _validate(m: ResNet) -> None:
    """One-line ValueErrors for structures that cannot be built."""
    _choice('block', m.block, ('basic', 'bottleneck'))
    _choice('stem', m.stem, blocks.STEMS)
    _choice('shortcut', m.shortcut, blocks.SHORTCUTS)
    _choice('stride_placement', m.stride_placement, blocks.STRIDE_PLACEMENTS)
    _choice('conv_impl', m.conv_impl, conv_lib.CONV_IMPLS)
    sizes, widths = tuple(m.stage_sizes), tuple(m.stage_widths)
    if not sizes or len(sizes) != len(widths):
        raise ValueError(f'model.stage_widths {widths} must give one width per stage of '
                         f'model.stage_sizes {sizes} ({len(sizes)} stages)')
    if any(int(n) < 1 for n in sizes) or any(int(w) < 1 for w in widths):
        raise ValueError(f'stage sizes {sizes} and widths {widths} must be positive')
    if m.num_classes < 1:
        raise ValueError(f'model.num_classes={m.num_classes} must be >= 1')
    if m.groups < 1 or m.base_width < 1 or m.width_multiplier <= 0:
        raise ValueError(f'model.groups={m.groups}, base_width={m.base_width} and '
                         f'width_multiplier={m.width_multiplier} must be positive')
    if m.block == 'basic' and (m.groups != 1 or m.base_width != 64):
        raise ValueError(f'model.groups={m.groups} / base_width={m.base_width} apply to '
                         "bottleneck blocks only; use groups=1, base_width=64 with 'basic'")
    if m.shortcut == 'A' and m.block == 'bottleneck':
        raise ValueError("model.shortcut='A' (zero-padded identity) works with basic blocks "
                         "only; use 'B' or 'C' with bottleneck blocks")
    if m.shortcut == 'none' and m.zero_init_last_bn:
        raise ValueError("model.zero_init_last_bn=True with shortcut='none' makes every plain "
                         'block output zeros (there is no identity to pass x on); turn one off')
    if m.stem == 'deep' and m.stem_width % 2:
        raise ValueError(f'model.stem_width={m.stem_width} must be even for the deep stem')
    for field in ('drop_path_rate', 'head_dropout_rate'):
        if not 0 <= getattr(m, field) < 1:
            raise ValueError(f'model.{field}={getattr(m, field)} must be in [0, 1); 0 turns it off')
    if m.shortcut == 'none' and m.drop_path_rate > 0:
        raise ValueError("model.drop_path_rate > 0 with shortcut='none': a plain block has no "
                         'identity to fall back on when its branch is dropped; use a shortcut')
    if not 0 <= m.se_ratio < 1:
        raise ValueError(f'model.se_ratio={m.se_ratio} must be in [0, 1); 0 turns SE off')
    if m.bn_group_size < 0:
        raise ValueError(f'model.bn_group_size={m.bn_group_size} must be >= 0 (0 = global BN)')
    previous = m.stem_width
    for width in widths:
        features, _ = m.block_widths(width)  # raises if a width does not divide
        if m.shortcut == 'A' and features < previous:
            raise ValueError(f"model.shortcut='A' can only widen: stage width {features} < "
                             f'{previous}; use B or C, or non-decreasing widths')
        previous = features


def names() -> list[str]:
    """Every named member of the family."""
    return sorted(REGISTRY, key=lambda n: (REGISTRY[n].get('family', 'imagenet'), n))


def resolve(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A `model` config section (possibly partial) -> the keyword arguments of `ResNet`."""
    unknown = sorted(set(fields) - set(CONFIG_DEFAULTS))
    if unknown:
        raise ValueError(f'unknown model config field(s) {unknown}; valid: '
                         f'{", ".join(CONFIG_DEFAULTS)}')
    cfg = {**CONFIG_DEFAULTS, **fields}
    _choice('family', cfg['family'], tuple(FAMILIES))
    family = FAMILIES[cfg['family']]
    depth = int(cfg['depth'])
    block = cfg['block'] or ('bottleneck' if cfg['family'] == 'imagenet' and depth >= 50
                             else 'basic')
    sizes = tuple(int(n) for n in cfg['stage_sizes'])
    if not sizes and cfg['family'] == 'imagenet':
        if depth not in IMAGENET_DEPTHS:
            raise ValueError(f'model.depth={depth} has no ImageNet stage table; choose one of '
                             f'{", ".join(map(str, IMAGENET_DEPTHS))} or set model.stage_sizes')
        sizes = IMAGENET_DEPTHS[depth][1]
    elif not sizes:  # CIFAR: 6n+2 layers with basic blocks, 9n+2 with bottlenecks
        per_block = 2 if block == 'basic' else 3
        n, rest = divmod(depth - 2, 3 * per_block)
        if rest or n < 1:
            raise ValueError(f'model.depth={depth} is not a CIFAR depth for {block} blocks; use '
                             f'{3 * per_block}n+2 (e.g. {3 * per_block + 2}, '
                             f'{6 * per_block + 2}, ...)')
        sizes = (n,) * len(family['stage_widths'])
    widths = tuple(int(w) for w in cfg['stage_widths'])
    if not widths:  # family widths, doubling for any extra stages
        base = family['stage_widths'][0]
        widths = tuple(base * 2**i for i in range(len(sizes)))
    for key in ('dtype', 'param_dtype'):
        _choice(key, cfg[key], tuple(DTYPES))
    return dict(
        stage_sizes=sizes, stage_widths=widths, num_classes=int(cfg['num_classes']),
        block=block, stem=cfg['stem'] or family['stem'],
        stem_width=int(cfg['stem_width']) or family['stem_width'],
        shortcut=cfg['shortcut'] or family['shortcut'],
        stride_placement=cfg['stride_placement'], preactivation=bool(cfg['preactivation']),
        avg_down=bool(cfg['avg_down']), zero_init_last_bn=bool(cfg['zero_init_last_bn']),
        width_multiplier=float(cfg['width_multiplier']), groups=int(cfg['groups']),
        base_width=int(cfg['base_width']), se_ratio=float(cfg['se_ratio']),
        dtype=DTYPES[cfg['dtype']], param_dtype=DTYPES[cfg['param_dtype']],
        bn_momentum=float(cfg['bn_momentum']), bn_epsilon=float(cfg['bn_epsilon']),
        bn_group_size=int(cfg['bn_group_size']), drop_path_rate=float(cfg['drop_path_rate']),
        head_dropout_rate=float(cfg['head_dropout_rate']),
        conv_impl=str(cfg['conv_impl']), conv_im2col_max_mib=float(cfg['conv_im2col_max_mib']),
    )


def config_for(name: str, num_classes: int | None = None, **overrides: Any) -> dict[str, Any]:
    """The `model` config fields of a named member (with overrides), e.g. to write a config."""
    if name not in REGISTRY:
        raise ValueError(f'unknown model {name!r}; valid: {", ".join(names())}')
    fields = {**CONFIG_DEFAULTS, **REGISTRY[name], **overrides}
    if num_classes is not None:
        fields['num_classes'] = num_classes
    resolve(fields)  # fail early, with the config field names
    return fields


def create(name: str, num_classes: int | None = None, **overrides: Any) -> ResNet:
    """A named member of the family; `overrides` are `model` config fields (e.g. dtype='bfloat16',
    zero_init_last_bn=True). `num_classes=None` keeps the family's (1000 ImageNet, 10 CIFAR)."""
    return ResNet(**resolve(config_for(name, num_classes, **overrides)))


def plain_zero_init_note(model_cfg: Mapping[str, Any]) -> str | None:
    """The one line saying that a config's zero_init_last_bn is dropped for a plain net, or None.

    A recipe (configs/imagenet.py) turns zero-init on for its residual nets; overriding only
    `model.shortcut=none` for the plain-vs-residual ablation must not need a second override."""
    if model_cfg.get('shortcut') == 'none' and model_cfg.get('zero_init_last_bn'):
        return ("model.shortcut='none' builds a plain net, where zero_init_last_bn has nothing to "
                'act on (no identity path to start as): its blocks start with BN scale 1')
    return None


def from_config(model_cfg: Mapping[str, Any]) -> ResNet:
    """The model described by a config's `model` section (an ml_collections.ConfigDict).

    A plain net (`shortcut='none'`) ignores the section's `zero_init_last_bn`
    (`plain_zero_init_note` says why); `create` with both set is still an error."""
    fields = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
    if plain_zero_init_note(fields):
        fields['zero_init_last_bn'] = False
    return ResNet(**resolve(fields))


def describe(model: ResNet) -> dict[str, Any]:
    """The model's fields as plain data (dtypes by name), e.g. for logging."""
    out = {f.name: getattr(model, f.name) for f in dataclasses.fields(model)
           if f.name not in ('parent', 'name')}
    for key in ('dtype', 'param_dtype'):
        out[key] = jnp.dtype(out[key]).name
    return out
