"""The im2col convolution (resnet_flax/conv.py) is XLA's convolution, values and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_flax import conv, models

NHWC = ('NHWC', 'HWIO', 'NHWC')


@pytest.mark.parametrize('kernel, stride, pad, size, channels', [
    (3, 1, 1, 6, 5),   # a basic block's 3x3
    (3, 2, 1, 7, 4),   # strided, odd size (the last row and column are not reached)
    (1, 2, 0, 6, 3),   # a projection shortcut
    pytest.param(7, 2, 3, 9, 3, marks=pytest.mark.slow),  # the ImageNet stem (9 s here)
    (3, 1, 1, 1, 8),   # a 1x1 feature map, where XLA:CPU's conv is slowest
])
def test_im2col_matches_xla_convolution_and_its_gradients(kernel, stride, pad, size, channels):
    rng = np.random.default_rng(0)  # NumPy: XLA:CPU compiles some 4-D jax.random draws slowly
    x = jnp.asarray(rng.standard_normal((2, size, size, channels), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, channels, 6), np.float32))
    pads = ((pad, pad), (pad, pad))
    cotangent = jnp.asarray(rng.standard_normal(2 * size * size * 6, np.float32))

    def loss(fn, x, w):
        y = fn(x, w, (stride, stride), pads, dimension_numbers=NHWC)
        return jnp.sum(y * cotangent[:y.size].reshape(y.shape)), y

    (_, want), want_grads = jax.value_and_grad(
        lambda x, w: loss(lax.conv_general_dilated, x, w), (0, 1), has_aux=True)(x, w)
    (_, got), got_grads = jax.value_and_grad(
        lambda x, w: loss(conv.conv_general_dilated, x, w), (0, 1), has_aux=True)(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for g, w_ in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-4)


def test_unsupported_convolutions_go_to_xla_unchanged():
    x = jnp.ones((1, 5, 5, 4))
    w = jnp.ones((3, 3, 2, 4))  # two groups
    got = conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                    feature_group_count=2)
    want = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                    feature_group_count=2)
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_conv_impl_selects_the_computation_not_the_result():
    images = jnp.asarray(np.random.default_rng(1).standard_normal((2, 16, 16, 3), np.float32))
    variables, outputs, convs = None, {}, {}
    for impl in conv.CONV_IMPLS:
        model = models.create('resnet18', num_classes=5, stage_sizes=(1, 1),
                              stage_widths=(16, 64), stem_width=8, conv_impl=impl)
        apply = jax.jit(lambda v, x, m=model: m.apply(v, x, train=False))
        if variables is None:
            variables = jax.jit(lambda x, m=model: m.init(jax.random.PRNGKey(0), x,
                                                          train=False))(images)
        convs[impl] = apply.lower(variables, images).as_text().count('stablehlo.convolution')
        if impl != 'auto':
            outputs[impl] = apply(variables, images)
    # im2col: all but the two 1x1 projections, which flax pads 'SAME' (a string): XLA keeps them.
    assert convs['xla'] == 7 and convs['im2col'] == 2
    assert convs['auto'] == 6  # on the CPU, only stage 2's second conv has >= 64 inputs
    np.testing.assert_allclose(outputs['im2col'], outputs['xla'], rtol=1e-4, atol=1e-4)


def test_unknown_conv_impl_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"model.conv_impl='cudnn' is not valid"):
        models.create('resnet18', conv_impl='cudnn')
