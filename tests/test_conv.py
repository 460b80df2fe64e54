"""The GEMM convolution (resnet_flax/conv.py) is XLA's convolution, values and gradients, and
takes the GEMM path where `model.conv_impl` says it does."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from resnet_flax import conv, models

NHWC = ('NHWC', 'HWIO', 'NHWC')


def _convs_in(fn, *args) -> int:
    """How many XLA convolutions the traced function holds (nested jaxprs included)."""
    return str(jax.make_jaxpr(fn)(*args)).count('conv_general_dilated')


def _check_against_xla(kernel, stride, pads, size, channels, fn=conv.conv_general_dilated):
    rng = np.random.default_rng(0)  # NumPy: XLA:CPU compiles some 4-D jax.random draws slowly
    x = jnp.asarray(rng.standard_normal((2, size, size, channels), np.float32))
    w = jnp.asarray(rng.standard_normal((kernel, kernel, channels, 6), np.float32))
    cotangent = jnp.asarray(rng.standard_normal(2 * (size + 2) ** 2 * 6, np.float32))

    def loss(conv_fn, x, w):
        y = conv_fn(x, w, (stride, stride), pads, dimension_numbers=NHWC)
        return jnp.sum(y * cotangent[:y.size].reshape(y.shape)), y

    def value_and_grads(conv_fn):
        return jax.value_and_grad(lambda x, w: loss(conv_fn, x, w), (0, 1), has_aux=True)

    (_, want), want_grads = value_and_grads(lax.conv_general_dilated)(x, w)
    (_, got), got_grads = value_and_grads(fn)(x, w)
    assert got.shape == want.shape
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
    for g, w_ in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(g, w_, rtol=1e-5, atol=1e-4)
    return _convs_in(value_and_grads(fn), x, w)


@pytest.mark.parametrize('kernel, stride, pad, size, channels', [
    (3, 1, 1, 6, 5),   # a basic block's 3x3
    (3, 2, 1, 7, 4),   # strided, odd size (the last row and column are not reached)
    pytest.param(7, 2, 3, 9, 3, marks=pytest.mark.slow),  # the ImageNet stem (9 s here)
    (3, 1, 1, 1, 8),   # a 1x1 feature map, where XLA:CPU's conv is slowest
])
def test_im2col_matches_xla_convolution_and_its_gradients(kernel, stride, pad, size, channels):
    assert _check_against_xla(kernel, stride, ((pad, pad), (pad, pad)), size, channels) == 0


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('padding', ['SAME', 'VALID', ((0, 0), (0, 0)), ((1, 0), (0, 1))])
def test_1x1_conv_is_a_matrix_product_for_every_padding_spelling(stride, padding):
    # flax passes padding='SAME' as a string for its default; an odd size leaves a strided 1x1
    # conv's last row unread, and the explicit pairs pad with zeros first.
    assert _check_against_xla(1, stride, padding, 5, 3) == 0


@pytest.mark.parametrize('padding', ['SAME', 'SAME_LOWER'])
def test_string_padding_of_a_3x3_conv_is_resolved_as_lax_resolves_it(padding):
    assert _check_against_xla(3, 2, padding, 6, 3) == 0  # even size: SAME pads (0, 1)


@pytest.mark.skipif(jax.default_backend() != 'cpu', reason="checks XLA:CPU's compiled step")
@pytest.mark.parametrize('kernel, c_in, c_out', [(1, 8, 32), (3, 16, 8)])
def test_kernel_gradient_reads_the_output_gradient_as_it_lies(kernel, c_in, c_out):
    # The kernel gradient patches^T @ dy contracts the pixel rows of both operands. Written as a
    # 4-D einsum, XLA:CPU first wrote dy transposed ([c_out, pixels]: a strided copy of every
    # conv's output gradient, BN's backward fused in twice); the 2-D product reads it in place.
    x = jnp.ones((2, 6, 6, c_in))
    w = jnp.ones((kernel, kernel, c_in, c_out))

    def loss(x, w, scale):
        y = conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC)
        y = (y - jnp.mean(y, (0, 1, 2))) * scale  # dy comes out of a fusion, as BN's backward
        return jnp.sum(jnp.maximum(y, 0) ** 2)

    hlo = jax.jit(jax.grad(loss, (0, 1))).lower(x, w, jnp.ones(c_out)).compile().as_text()
    entry = hlo[hlo.index('ENTRY'):]
    assert f'f32[{c_out},{x.size // c_in}]' not in entry  # no transposed copy of dy
    # ... and one product contracting the leading (pixel) dimension of both operands.
    assert re.search(r' dot\(.*lhs_contracting_dims=\{0\}, rhs_contracting_dims=\{0\}', entry)


def test_unsupported_convolutions_go_to_xla_unchanged():
    x = jnp.ones((1, 5, 5, 4))
    w = jnp.ones((3, 3, 2, 4))  # two groups
    got = conv.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                    feature_group_count=2)
    want = lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=NHWC,
                                    feature_group_count=2)
    np.testing.assert_array_equal(got, want)


def test_auto_keeps_a_layer_on_xla_when_its_patches_exceed_the_budget():
    x = jnp.zeros((2, 10, 10, 64), jnp.float32)
    w = jnp.zeros((3, 3, 64, 8), jnp.float32)
    patch_mib = 2 * 10 * 10 * 9 * 64 * 4 / 2**20  # batch x output pixels x kh*kw*C_in floats
    fits = conv.conv_function('auto', im2col_max_mib=patch_mib)
    too_big = conv.conv_function('auto', im2col_max_mib=0.999 * patch_mib)
    call = lambda fn: (lambda x, w: fn(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC))
    assert _convs_in(call(fits), x, w) == 0
    assert _convs_in(call(too_big), x, w) == 1
    assert _convs_in(call(conv.conv_function('im2col', 0.0)), x, w) == 0  # asked for: no budget
    # A 1x1 conv makes no patches: a GEMM whatever the budget.
    assert _convs_in(call(conv.conv_function('auto', 0.0)), x, w[:1, :1]) == 0


def test_im2col_is_never_chosen_off_the_cpu_unasked(monkeypatch, caplog):
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert conv.conv_function('auto', 64.0) is None and conv.conv_function('xla', 64.0) is None
    assert conv.conv_function('im2col', 64.0) is conv.conv_general_dilated
    assert "model.conv_impl='im2col' on gpu" in caplog.text


def _resnet50_convs(conv_impl: str, grad: bool) -> int:
    model = models.create('resnet50', num_classes=10, conv_impl=conv_impl)
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    apply = lambda v, x: jnp.sum(model.apply(v, x, train=False))
    return _convs_in(jax.grad(apply) if grad else apply, variables, images)


@pytest.mark.slow
def test_every_resnet50_conv_takes_the_gemm_path():
    assert _resnet50_convs('xla', grad=False) == 53  # 1 stem + 16 blocks x 3 + 4 projections
    assert _resnet50_convs('im2col', grad=True) == 0  # forward and both gradients
    assert _resnet50_convs('auto', grad=False) == 1  # on the CPU: all but the 3-channel stem


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
    assert convs['xla'] == 7 and convs['im2col'] == 0
    # auto on the CPU: both 1x1 projections and stage 2's second 3x3 (64 inputs) as GEMMs.
    assert convs['auto'] == 4
    np.testing.assert_allclose(outputs['im2col'], outputs['xla'], rtol=1e-4, atol=1e-4)


def test_unknown_conv_impl_is_a_one_line_error():
    with pytest.raises(ValueError, match=r"model.conv_impl='cudnn' is not valid"):
        models.create('resnet18', conv_impl='cudnn')
