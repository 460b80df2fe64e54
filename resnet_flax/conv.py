"""Convolution as one matrix product (a GEMM), for XLA:CPU.

The same function as `jax.lax.conv_general_dilated` for every convolution a ResNet here builds
except grouped ones (2-D, NHWC inputs, HWIO kernels, any padding spelling: 'SAME', 'VALID' or
explicit pairs, any stride, no dilation, one group); any other call (ResNeXt's grouped 3x3,
dilation, other layouts) goes to `lax.conv_general_dilated` unchanged.

    1x1 kernel (any stride):  out = x_padded[:, ::s, ::s, :] @ kernel[0, 0]    # no patches
    kh x kw kernel (im2col):  patches[b, y, x, (i, j, c)] = x_padded[b, s*y + i, s*x + j, c]
                              out = patches @ kernel.reshape(kh*kw*c_in, c_out)

Why: XLA:CPU runs convolutions through its own kernels, which are very slow on the small
feature maps of a ResNet's last stages (a 3x3 conv on 2x2 or 1x1 maps with 256-512 channels took
6-12x as long as this formulation; BENCHMARKS.md, section 10), while a GEMM goes to a tuned
library. Autodiff then turns the backward pass into GEMMs too: the input gradient is
dy @ kernel^T scattered back by the slices' transposes (pads and adds), and the kernel gradient
is patches^T @ dy (both 2-D, see `pixels_times_kernel`), instead of a convolution whose window
spans the whole activation. Results agree with XLA's convolution to float rounding (the sums
run in another order).

The cost is memory: the patches of each kh x kw conv (kh*kw times its input) are kept for the
backward pass (a 1x1 conv keeps at most its input). So `'auto'` takes im2col only for layers whose
patch tensor is at most `model.conv_im2col_max_mib`, and only on the CPU: on GPUs and TPUs the
model keeps XLA's convolution (cuDNN, the TPU's MXU), and an explicit `'im2col'` there logs a
warning. See `models.ResNet.conv_impl` and BENCHMARKS.md (issue 23).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging
from jax import lax

CONV_IMPLS = ('auto', 'xla', 'im2col')

# 'auto' on the CPU: im2col for kh x kw convs with at least this many input channels, XLA's conv
# for the thin early layers, where XLA's conv measured as fast or faster (BENCHMARKS.md,
# section 10). 1x1 convs make no patches and always take the GEMM.
AUTO_MIN_CHANNELS = 64
MIB = 2**20

Padding = Sequence[tuple[int, int]]


def conv_function(conv_impl: str, im2col_max_mib: float) -> Callable | None:
    """The `conv_general_dilated` for `flax.linen.Conv`, or None for XLA's own.

    'xla': XLA's convolution. 'im2col': every ungrouped, undilated conv as a GEMM, on any
    backend (on a GPU or TPU with a warning: it is slower there and keeps kh*kw x the
    activations). 'auto': on the CPU backend, every 1x1 conv as a GEMM, and im2col for the
    kh x kw convs with >= AUTO_MIN_CHANNELS input channels whose patch tensor (batch x output
    pixels x kh*kw*C_in elements) is at most `im2col_max_mib` MiB; XLA's conv for the rest, and
    everywhere on other backends.
    """
    if conv_impl not in CONV_IMPLS:
        raise ValueError(f'model.conv_impl={conv_impl!r} is not valid; choose one of '
                         f'{", ".join(map(repr, CONV_IMPLS))}')
    if im2col_max_mib < 0:
        raise ValueError(f'model.conv_im2col_max_mib={im2col_max_mib} must be >= 0 (MiB of '
                         "one layer's im2col patches that conv_impl='auto' may keep)")
    backend = jax.default_backend()
    if conv_impl == 'im2col':
        if backend != 'cpu':
            # Once per trace of the model (init, train step, eval step), not per step.
            logging.warning("model.conv_impl='im2col' on %s: convolutions run as GEMMs, slower "
                            "than XLA's and keeping kh*kw x each input; use 'auto' or 'xla' "
                            'there.', backend)
        return conv_general_dilated
    if conv_impl == 'auto' and backend == 'cpu':
        return functools.partial(conv_general_dilated, min_channels=AUTO_MIN_CHANNELS,
                                 max_patch_bytes=int(im2col_max_mib * MIB))
    return None


def conv_general_dilated(lhs: jax.Array, rhs: jax.Array, window_strides: Sequence[int],
                         padding: str | Padding,
                         lhs_dilation: Sequence[int] | None = None,
                         rhs_dilation: Sequence[int] | None = None,
                         dimension_numbers: Any = None,  # as lax's: None, 3 strings, or the tuple
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision: Any = None, preferred_element_type: Any = None, *,
                         min_channels: int = 1, max_patch_bytes: int | None = None) -> jax.Array:
    """`lax.conv_general_dilated`, as one matrix product where supported; a kh x kw conv only
    when its input has >= `min_channels` channels and its patches take <= `max_patch_bytes`."""
    pads = None
    if _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers,
                      feature_group_count, batch_group_count):
        pads = explicit_padding(lhs.shape, rhs.shape, window_strides, padding)
    if pads is None or not takes_gemm(lhs.shape, rhs.shape, window_strides, pads,
                                      jnp.dtype(lhs.dtype).itemsize, min_channels,
                                      max_patch_bytes):
        return lax.conv_general_dilated(
            lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
            feature_group_count, batch_group_count, precision, preferred_element_type)
    patches = im2col(lhs, rhs.shape[:2], tuple(window_strides), pads)
    return pixels_times_kernel(patches, rhs.reshape(-1, rhs.shape[-1]), precision,
                               preferred_element_type)


def pixels_times_kernel(patches: jax.Array, kernel: jax.Array, precision: Any = None,
                        preferred_element_type: Any = None) -> jax.Array:
    """[B, H, W, K] patches @ [K, C_out] kernel, as one 2-D matrix product over B*H*W rows.

    Written in 2-D so that the kernel gradient is one 2-D product contracting the rows of both
    operands (patches^T @ dy), which XLA:CPU runs on the operands as they lie. With the
    4-D product (an einsum over b, h, w), XLA:CPU wrote dy transposed first: a second, strided
    copy of every conv's output gradient (BN's backward computed twice), 12% of ResNet-50's
    step at 112 px (BENCHMARKS.md, section 14).
    """
    rows = patches.reshape(-1, patches.shape[-1])
    out = jnp.dot(rows, kernel, precision=precision,
                  preferred_element_type=preferred_element_type)
    return out.reshape(*patches.shape[:-1], kernel.shape[-1])


def _is_plain_nhwc(lhs: jax.Array, rhs: jax.Array, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count: int, batch_group_count: int) -> bool:
    """True for the layouts and options `conv_general_dilated` computes as a GEMM."""
    if lhs.ndim != 4 or dimension_numbers is None:
        return False
    nhwc = lax.conv_dimension_numbers(lhs.shape, rhs.shape, ('NHWC', 'HWIO', 'NHWC'))
    if lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != nhwc:
        return False
    ones = lambda v: v is None or all(int(d) == 1 for d in v)
    return (ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
            and batch_group_count == 1)


def explicit_padding(lhs_shape: Sequence[int], rhs_shape: Sequence[int],
                     strides: Sequence[int], padding: str | Padding) -> Padding | None:
    """((top, bottom), (left, right)) for any padding lax accepts ('SAME', 'SAME_LOWER', 'VALID'
    or pairs), resolved as lax resolves it; None for negative (cropping) pads."""
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return None if any(p < 0 for pair in pads for p in pair) else pads


def patch_bytes(lhs_shape: Sequence[int], rhs_shape: Sequence[int], strides: Sequence[int],
                pads: Padding, itemsize: int) -> int:
    """Bytes of a conv's im2col patches: batch x output pixels x kh*kw*C_in elements."""
    (kh, kw), (sh, sw) = rhs_shape[:2], strides
    (top, bottom), (left, right) = pads
    out_h = (lhs_shape[1] + top + bottom - kh) // sh + 1
    out_w = (lhs_shape[2] + left + right - kw) // sw + 1
    return lhs_shape[0] * out_h * out_w * kh * kw * lhs_shape[3] * itemsize


def takes_gemm(lhs_shape: Sequence[int], rhs_shape: Sequence[int], strides: Sequence[int],
               pads: Padding, itemsize: int, min_channels: int,
               max_patch_bytes: int | None) -> bool:
    """Whether a plain NHWC conv runs as a GEMM: always for 1x1 kernels (no patches: the GEMM
    reads the input, strided), and for kh x kw ones with enough channels and few enough bytes."""
    if tuple(rhs_shape[:2]) == (1, 1):
        return True
    if lhs_shape[3] < min_channels:
        return False
    return max_patch_bytes is None or patch_bytes(
        lhs_shape, rhs_shape, strides, pads, itemsize) <= max_patch_bytes


def im2col(x: jax.Array, kernel_size: Sequence[int], strides: Sequence[int],
           padding: Padding) -> jax.Array:
    """[B, H_out, W_out, kh*kw*C]: each output pixel's receptive field, taps outer, channels
    inner (the order of an HWIO kernel reshaped to [kh*kw*C, C_out]). For a 1x1 kernel, the
    (padded, strided) input itself."""
    (kh, kw), (sh, sw) = kernel_size, strides
    (top, bottom), (left, right) = padding
    if top or bottom or left or right:
        x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out_h = (x.shape[1] - kh) // sh + 1
    out_w = (x.shape[2] - kw) // sw + 1
    taps = [x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw, :]
            for i in range(kh) for j in range(kw)]
    return taps[0] if len(taps) == 1 else jnp.concatenate(taps, axis=-1)
