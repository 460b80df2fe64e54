"""Building blocks of the ResNet family: stems, shortcuts, residual blocks, SE, ghost BatchNorm.

Every block receives ready-made `conv`, `norm` and `act` callables (functools.partials built once
by `models.ResNet`), so a block reads like the paper: conv, norm, act, conv, norm, add, act.
`shortcut='none'` builds the paper's plain networks from the same blocks: no shortcut, no addition.
Blocks name their submodules explicitly (`conv1`, `bn1`, ..., `proj_conv`, `proj_bn`, `se`);
`models.py` documents how these names map onto torchvision's state dict.

Convolutions pad symmetrically by kernel_size // 2 (as torchvision does), not 'SAME', so that
imported PyTorch weights see exactly the same pixels.
"""

import math
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

ModuleDef = Any

SHORTCUTS = ('A', 'B', 'C', 'identity', 'none')
STEMS = ('imagenet', 'cifar', 'deep')
STRIDE_PLACEMENTS = ('v1', 'v1.5')

def conv_kernel_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """He et al. 2015 "fan_out" normal init for convs, as torchvision does (untruncated normal).

    The same numbers as `nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')`, drawn as a
    flat vector and reshaped: XLA:CPU takes seconds to compile some 4-D draws (8 s for a
    3x3x8x16 kernel) and well under one for the flat one.
    """
    kh_kw, fan_out = math.prod(shape[:-2]), shape[-1]
    std = jnp.sqrt(2.0 / (kh_kw * fan_out)).astype(dtype)
    return (jax.random.normal(key, (math.prod(shape),), dtype) * std).reshape(shape)


def dense_kernel_init(key: jax.Array, shape: tuple[int, ...],
                      dtype: Any = jnp.float32) -> jax.Array:
    """LeCun normal truncated at 2 std, flax's `nn.Dense` default, drawn flat for the same reason.

    The same numbers as `nn.initializers.lecun_normal()`; 0.8796... is the standard deviation
    of a standard normal truncated to (-2, 2).
    """
    variance = jnp.array(1.0 / math.prod(shape[:-1]), dtype=dtype)
    std = jnp.sqrt(variance) / jnp.array(0.87962566103423978, dtype)
    flat = jax.random.truncated_normal(key, -2, 2, (math.prod(shape),), dtype)
    return (flat * std).reshape(shape)


def padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Symmetric padding that keeps the spatial size at stride 1 (torchvision's k // 2)."""
    p = kernel_size // 2
    return ((p, p), (p, p))


# ---------------------------------------------------------------------------------------------
# Normalisation


class GhostBatchNorm(nn.Module):
    """BatchNorm whose training statistics come from groups of `group_size` examples.

    Same variables as `nn.BatchNorm` (params `scale`, `bias`; batch_stats `mean`, `var`), so the
    two are interchangeable in a checkpoint. Statistics are computed in float32. The running
    averages move towards the mean over groups of the per-group mean and (biased) variance.
    """

    group_size: int
    use_running_average: bool | None = None
    momentum: float = 0.9
    epsilon: float = 1e-5
    dtype: Any = None
    param_dtype: Any = jnp.float32
    scale_init: Callable = nn.initializers.ones
    bias_init: Callable = nn.initializers.zeros

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool | None = None) -> jnp.ndarray:
        use_running_average = nn.merge_param(
            'use_running_average', self.use_running_average, use_running_average)
        features = x.shape[-1]
        ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
        ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
        scale = self.param('scale', self.scale_init, (features,), self.param_dtype)
        bias = self.param('bias', self.bias_init, (features,), self.param_dtype)
        xf = x.astype(jnp.float32)
        if use_running_average:
            y = (xf - ra_mean.value) * jnp.reciprocal(jnp.sqrt(ra_var.value + self.epsilon))
        else:
            batch = x.shape[0]
            if batch % self.group_size:
                raise ValueError(f'ghost BatchNorm: batch size {batch} is not divisible by '
                                 f'model.bn_group_size={self.group_size}; use a divisor of it.')
            groups = xf.reshape(batch // self.group_size, self.group_size, *x.shape[1:])
            axes = tuple(range(1, groups.ndim - 1))
            mean = groups.mean(axes, keepdims=True)
            var = jnp.square(groups - mean).mean(axes, keepdims=True)
            y = ((groups - mean) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))).reshape(x.shape)
            if not self.is_initializing():
                m = self.momentum
                ra_mean.value = m * ra_mean.value + (1 - m) * mean.reshape(-1, features).mean(0)
                ra_var.value = m * ra_var.value + (1 - m) * var.reshape(-1, features).mean(0)
        y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
        return y.astype(self.dtype or x.dtype)


class DropPath(nn.Module):
    """Stochastic depth (Huang et al. 2016), per example: in training each example's residual
    branch is dropped with probability `rate` and kept ones are scaled by 1/(1 - rate), so the
    expected output is unchanged; at eval (`deterministic`) the branch passes unchanged. Draws
    from the 'drop_path' RNG stream."""

    rate: float
    deterministic: bool

    @nn.compact
    def __call__(self, branch: jnp.ndarray) -> jnp.ndarray:
        if self.deterministic or self.rate == 0:
            return branch
        keep = 1.0 - self.rate
        shape = (branch.shape[0],) + (1,) * (branch.ndim - 1)  # one draw per example
        kept = jax.random.bernoulli(self.make_rng('drop_path'), keep, shape)
        return jnp.where(kept, branch / keep, 0).astype(branch.dtype)


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al. 2018): pool, reduce, ReLU, expand, sigmoid gate."""

    ratio: float
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        features = x.shape[-1]
        reduced = max(1, round(features * self.ratio))
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=self.param_dtype,
                                         kernel_init=dense_kernel_init, name=name)
        s = jnp.mean(x.astype(jnp.float32), axis=(1, 2), keepdims=True).astype(self.dtype)
        s = nn.relu(dense(reduced, 'reduce')(s))
        s = nn.sigmoid(dense(features, 'expand')(s))
        return x * s.astype(x.dtype)


# ---------------------------------------------------------------------------------------------
# Stems


def stem(x: jnp.ndarray, *, kind: str, width: int, conv: ModuleDef, norm: ModuleDef,
         act: Callable, preactivation: bool = False) -> jnp.ndarray:
    """The layers before the first stage; call inside a compact module.

    imagenet: 7x7/2 conv, BN, ReLU, 3x3/2 max-pool (x4 smaller). cifar: 3x3/1 conv, BN, ReLU.
    deep (ResNet-C/D): three 3x3 convs of width/2, width/2, width (the first strided), each with
    BN and ReLU, then the max-pool. With pre-activation blocks the BN-ReLU after the stem's last
    conv is left out: the first block's pre-activation provides it (as in ResNet v2).
    """
    if kind == 'imagenet':
        x = conv(width, (7, 7), strides=(2, 2), padding=padding(7), name='stem_conv')(x)
        if not preactivation:
            x = act(norm(name='stem_bn')(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding(3))
    if kind == 'cifar':
        x = conv(width, (3, 3), padding=padding(3), name='stem_conv')(x)
        return x if preactivation else act(norm(name='stem_bn')(x))
    if kind == 'deep':
        widths = (width // 2, width // 2, width)
        for i, w in enumerate(widths, start=1):
            strides = (2, 2) if i == 1 else (1, 1)
            x = conv(w, (3, 3), strides=strides, padding=padding(3), name=f'stem_conv{i}')(x)
            if i < len(widths) or not preactivation:
                x = act(norm(name=f'stem_bn{i}')(x))
        return nn.max_pool(x, (3, 3), strides=(2, 2), padding=padding(3))
    raise ValueError(f'unknown stem {kind!r}; valid: {", ".join(STEMS)}')


# ---------------------------------------------------------------------------------------------
# Shortcuts


def needs_projection(kind: str, in_features: int, out_features: int, strides: int) -> bool:
    """Option B projects only where the shape changes, C in every block, A (and 'none') never."""
    if kind in ('A', 'identity', 'none'):
        return False
    if kind == 'C':
        return True
    return strides != 1 or in_features != out_features


def shortcut(x: jnp.ndarray, *, features: int, strides: int, kind: str, conv: ModuleDef,
             norm: ModuleDef | None, avg_down: bool = False) -> jnp.ndarray | None:
    """The identity path of a block; call inside the block's compact method.

    none: no path at all (None): the block is a plain network's, H(x) = F(x).
    identity: x itself, and an error where the block changes shape (the lesson's question).
    A: parameter-free; strided identity with the extra channels zero-padded (He et al., CIFAR).
    B/C: a 1x1 conv with the block's stride, then BN (`proj_conv`, `proj_bn`); with `avg_down`
    (ResNet-D) a 2x2 average pool does the downsampling and the conv has stride 1.
    `norm=None` leaves out `proj_bn` (pre-activation blocks project the normalised input).
    """
    if kind == 'none':
        return None
    in_features = x.shape[-1]
    if kind == 'identity' and (strides != 1 or features != in_features):
        raise ValueError(
            f'An identity shortcut cannot add the block input {tuple(x.shape[1:])} to its output '
            f'(stride {strides}, {in_features}->{features} channels): F(x) and x differ in shape; '
            "use model.shortcut='B' (1x1 projection) or 'A' (zero-padded identity)."
        )
    if kind == 'A':
        if strides > 1:
            x = x[:, ::strides, ::strides, :]
        if features > in_features:
            x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, features - in_features)))
        return x
    if not needs_projection(kind, in_features, features, strides):
        return x
    if avg_down and strides > 1:
        window = (strides, strides)
        x = nn.avg_pool(x, window, strides=window, padding='SAME', count_include_pad=False)
        strides = 1
    x = conv(features, (1, 1), strides=(strides, strides), name='proj_conv')(x)
    return x if norm is None else norm(name='proj_bn')(x)


# ---------------------------------------------------------------------------------------------
# Residual blocks


class ResidualBlock(nn.Module):
    """Fields shared by every block. `features` is the block's output width, `inner_features`
    the width of its inner (3x3) convs; `strides` downsamples when > 1."""

    features: int
    inner_features: int
    strides: int
    conv: ModuleDef
    norm: ModuleDef
    act: Callable
    shortcut: str = 'B'
    avg_down: bool = False
    zero_init_last_bn: bool = False
    groups: int = 1
    stride_placement: str = 'v1.5'
    se: ModuleDef | None = None  # a SqueezeExcite partial, or None
    drop_path: ModuleDef | None = None  # a DropPath partial (its rate set), or None

    def last_norm(self, name: str) -> nn.Module:
        init = nn.initializers.zeros if self.zero_init_last_bn else nn.initializers.ones
        return self.norm(scale_init=init, name=name)

    def excite(self, y: jnp.ndarray) -> jnp.ndarray:
        return y if self.se is None else self.se(name='se')(y)

    def add(self, residual_branch: jnp.ndarray, identity: jnp.ndarray | None) -> jnp.ndarray:
        """H(x) = F(x) + x; a plain block (shortcut='none') has no x to add: H(x) = F(x).
        With stochastic depth, F(x) of some examples is dropped in training: H(x) = x."""
        if identity is None:
            return residual_branch
        if self.drop_path is not None:
            residual_branch = self.drop_path(name='drop_path')(residual_branch)
        return residual_branch + identity


class BasicBlock(ResidualBlock):
    """Two 3x3 convs (ResNet-18/34, CIFAR nets): conv-BN-ReLU, conv-BN, add, ReLU."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = self.strides
        residual = shortcut(x, features=self.features, strides=s, kind=self.shortcut,
                            conv=self.conv, norm=self.norm, avg_down=self.avg_down)
        y = self.conv(self.inner_features, (3, 3), strides=(s, s), padding=padding(3),
                      name='conv1')(x)
        y = self.act(self.norm(name='bn1')(y))
        y = self.conv(self.features, (3, 3), padding=padding(3), name='conv2')(y)
        y = self.excite(self.last_norm('bn2')(y))
        return self.act(self.add(y, residual))


class BottleneckBlock(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand; BN after each conv, ReLU after add.

    The stride of a downsampling block sits on the first 1x1 conv ('v1', the paper) or on the 3x3
    conv ('v1.5', torchvision/NVIDIA/flax: more MACs, ~0.5% better top-1).
    """

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = (self.strides, self.strides)
        s1, s2 = (s, (1, 1)) if self.stride_placement == 'v1' else ((1, 1), s)
        residual = shortcut(x, features=self.features, strides=self.strides, kind=self.shortcut,
                            conv=self.conv, norm=self.norm, avg_down=self.avg_down)
        y = self.conv(self.inner_features, (1, 1), strides=s1, name='conv1')(x)
        y = self.act(self.norm(name='bn1')(y))
        y = self.conv(self.inner_features, (3, 3), strides=s2, padding=padding(3),
                      feature_group_count=self.groups, name='conv2')(y)
        y = self.act(self.norm(name='bn2')(y))
        y = self.conv(self.features, (1, 1), name='conv3')(y)
        y = self.excite(self.last_norm('bn3')(y))
        return self.act(self.add(y, residual))


class PreActBlock(ResidualBlock):
    """Helpers for pre-activation (ResNet v2) blocks: BN-ReLU before each conv, nothing after
    the addition. A projection shortcut sees the pre-activated input and has no BN. There is no
    last BN, so `zero_init_last_bn` zero-initialises the last conv instead: same effect, the
    residual branch starts at zero and the block is the identity."""

    def preact_shortcut(self, x: jnp.ndarray, x_preact: jnp.ndarray) -> jnp.ndarray | None:
        projecting = needs_projection(self.shortcut, x.shape[-1], self.features, self.strides)
        return shortcut(x_preact if projecting else x, features=self.features,
                        strides=self.strides, kind=self.shortcut, conv=self.conv, norm=None,
                        avg_down=self.avg_down)

    def last_conv(self, features: int, kernel: int, name: str) -> nn.Module:
        if self.zero_init_last_bn:
            return self.conv(features, (kernel, kernel), padding=padding(kernel), name=name,
                             kernel_init=nn.initializers.zeros)
        return self.conv(features, (kernel, kernel), padding=padding(kernel), name=name)


class PreActBasicBlock(PreActBlock):
    """BN-ReLU-conv3x3, BN-ReLU-conv3x3, add (He et al. 2016, "Identity mappings")."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = self.strides
        y = self.act(self.norm(name='bn1')(x))
        residual = self.preact_shortcut(x, y)
        y = self.conv(self.inner_features, (3, 3), strides=(s, s), padding=padding(3),
                      name='conv1')(y)
        y = self.act(self.norm(name='bn2')(y))
        y = self.last_conv(self.features, 3, 'conv2')(y)
        return self.add(self.excite(y), residual)


class PreActBottleneckBlock(PreActBlock):
    """BN-ReLU-conv1x1, BN-ReLU-conv3x3, BN-ReLU-conv1x1, add."""

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        s = (self.strides, self.strides)
        s1, s2 = (s, (1, 1)) if self.stride_placement == 'v1' else ((1, 1), s)
        y = self.act(self.norm(name='bn1')(x))
        residual = self.preact_shortcut(x, y)
        y = self.conv(self.inner_features, (1, 1), strides=s1, name='conv1')(y)
        y = self.act(self.norm(name='bn2')(y))
        y = self.conv(self.inner_features, (3, 3), strides=s2, padding=padding(3),
                      feature_group_count=self.groups, name='conv2')(y)
        y = self.act(self.norm(name='bn3')(y))
        y = self.last_conv(self.features, 1, 'conv3')(y)
        return self.add(self.excite(y), residual)


def block_class(block: str, preactivation: bool) -> type[ResidualBlock]:
    """The block module for a block type ('basic' | 'bottleneck')."""
    table = {('basic', False): BasicBlock, ('bottleneck', False): BottleneckBlock,
             ('basic', True): PreActBasicBlock, ('bottleneck', True): PreActBottleneckBlock}
    if (block, preactivation) not in table:
        raise ValueError(f'unknown block {block!r}; valid: basic, bottleneck')
    return table[block, preactivation]
