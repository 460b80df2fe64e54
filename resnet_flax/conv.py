"""Convolution as one matrix product over image patches (im2col), for XLA:CPU.

The same function as `jax.lax.conv_general_dilated` for the convolutions this project builds
(2-D, NHWC inputs, HWIO kernels, explicit padding, no dilation, one group); any other call goes
to `lax.conv_general_dilated` unchanged.

    patches[b, y, x, (i, j, c)] = x_padded[b, s*y + i, s*x + j, c]      # kh*kw strided slices
    out = patches @ kernel.reshape(kh*kw*c_in, c_out)                   # one GEMM

Why: XLA:CPU runs convolutions through its own kernels, which are very slow on the small
feature maps of a ResNet's last stages (a 3x3 conv on 2x2 or 1x1 maps with 256-512 channels took
6-12x as long as this formulation; BENCHMARKS.md, section 10), while a GEMM goes to a tuned
library. Autodiff then turns the backward pass into GEMMs too: the input gradient is
dy @ kernel^T scattered back by the slices' transposes (pads and adds), and the kernel gradient
is patches^T @ dy, instead of a convolution whose window spans the whole activation. Results
agree with XLA's convolution to float rounding (the sums run in another order).

The cost is memory: the patches of each kh x kw conv (kh*kw times its input) are kept for the
backward pass. That is fine on a CPU at the batch sizes a CPU trains; on GPUs and TPUs the
model keeps XLA's convolution (cuDNN, the TPU's MXU), see `models.ResNet.conv_impl`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'im2col')

# 'auto' on the CPU: im2col for convs with at least this many input channels, XLA's conv for the
# thin early layers, where XLA's conv measured as fast or faster (BENCHMARKS.md, section 10).
AUTO_MIN_CHANNELS = 64


def conv_function(conv_impl: str) -> Callable | None:
    """The `conv_general_dilated` for `flax.linen.Conv`, or None for XLA's own.

    'xla': XLA's convolution. 'im2col': every supported conv as a GEMM. 'auto': on the CPU
    backend, the convs with >= AUTO_MIN_CHANNELS input channels as GEMMs; elsewhere 'xla'.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'model.conv_impl={conv_impl!r} is not valid; choose one of '
                         f'{", ".join(map(repr, CONV_IMPLS))}')
    if conv_impl == 'im2col':
        return conv_general_dilated
    if conv_impl == 'auto' and jax.default_backend() == 'cpu':
        return functools.partial(conv_general_dilated, min_channels=AUTO_MIN_CHANNELS)
    return None


def _is_plain_nhwc(lhs: jax.Array, rhs: jax.Array, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count: int, batch_group_count: int) -> bool:
    """True for the convolutions `conv_general_dilated` below computes as a GEMM."""
    if lhs.ndim != 4 or dimension_numbers is None or isinstance(padding, str):
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return False
    ones = lambda v: v is None or all(int(d) == 1 for d in v)
    return (ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
            and batch_group_count == 1)


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Sequence[tuple[int, int]],
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,  # as lax's: None, 3 strings, or the tuple
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None, *,
                         min_channels: int = 1) -> jax.Array:
    """`lax.conv_general_dilated`, as im2col and one matrix product where supported and the
    input has at least `min_channels` channels."""
    if not _is_plain_nhwc(lhs, rhs, padding, lhs_dilation, rhs_dilation, dimension_numbers,
                          feature_group_count, batch_group_count) or lhs.shape[-1] < min_channels:
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    patches = im2col(lhs, rhs.shape[:2], tuple(window_strides), padding)
    kernel = rhs.reshape(-1, rhs.shape[-1])
    return jnp.einsum('bhwk,ko->bhwo', patches, kernel, precision=precision,
                      preferred_element_type=preferred_element_type)


def im2col(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
           padding: Sequence[tuple[int, int]]) -> jax.Array:
    """[B, H_out, W_out, kh*kw*C]: each output pixel's receptive field, taps outer, channels
    inner (the order of an HWIO kernel reshaped to [kh*kw*C, C_out])."""
    (kh, kw), (sh, sw) = kernel_size, strides
    (top, bottom), (left, right) = padding
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    taps = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
