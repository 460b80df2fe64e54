"""The ResNet family: structure, parameter counts, variants and errors.

Full-size models are only traced (`jax.eval_shape`); real compute runs on tiny models.
"""

import functools
import importlib
import math
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import base
from resnet_flax import blocks, models

CONFIGS = Path(__file__).resolve().parents[1] / 'configs'

# torchvision's published parameter counts (torchvision.models docs, num_params), 1000 classes.
TORCHVISION_PARAMS = {
    'resnet18': 11_689_512,
    'resnet34': 21_797_672,
    'resnet50': 25_557_032,
    'resnet101': 44_549_160,
    'resnet152': 60_192_808,
    'wide_resnet50_2': 68_883_240,
    'wide_resnet101_2': 126_886_696,
    'resnext50_32x4d': 25_028_904,
    'resnext101_32x8d': 88_791_336,
}
# He et al. 2015, Table 6 (CIFAR-10).
CIFAR_PAPER_PARAMS = {'resnet20': 0.27e6, 'resnet32': 0.46e6, 'resnet44': 0.66e6,
                      'resnet56': 0.85e6, 'resnet110': 1.7e6}  # ResNet-1202: test_summary


def size(tree) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(tree))


def flat(tree) -> dict[str, object]:
    return {'/'.join(k.key for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


@functools.cache
def traced(name: str, image_size: int = 224, **overrides):
    """Variable and intermediate shapes of a named model, without computing anything."""
    model = models.create(name, **overrides)
    images = jnp.zeros((1, image_size, image_size, 3))
    init = lambda: model.init(jax.random.key(0), images, train=False, capture_intermediates=True)
    return jax.eval_shape(init)


def block_shapes(variables, stem_output: tuple[int, ...]) -> dict[str, tuple[tuple, tuple]]:
    """block name -> (input shape, output shape) in order, from the captured intermediates."""
    inter = variables['intermediates']
    order = sorted((k for k in inter if k.startswith('stage')),
                   key=lambda k: tuple(int(n) for n in k[5:].split('_block')))
    shapes, previous = {}, stem_output
    for name in order:
        out = inter[name]['__call__'][0].shape
        shapes[name] = (previous, out)
        previous = out
    return shapes


def stem_output(variables) -> tuple[int, ...]:
    """The stem's output: after the 3x3/2 max-pool of the stem conv's output."""
    conv = variables['intermediates']['stem_conv']['__call__'][0].shape
    return (conv[0], (conv[1] + 1) // 2, (conv[2] + 1) // 2, conv[3])


def tiny(name: str = 'resnet18', **overrides) -> models.ResNet:
    """A small member of the family for real compute: 16x16 images, narrow stages."""
    defaults = dict(num_classes=5, stage_sizes=(2, 1), stage_widths=(8, 16), stem_width=8)
    return models.create(name, **{**defaults, **overrides})


def images(batch: int = 4, size: int = 16, seed: int = 0) -> jnp.ndarray:
    # NumPy draws: XLA:CPU compiles some 4-D jax.random draws for seconds; tests need no jit here.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((batch, size, size, 3), np.float32))


# ---- Parameter counts against independent references -------------------------------------


@pytest.mark.parametrize('name', sorted(TORCHVISION_PARAMS))
def test_param_count_matches_torchvision(name):
    assert size(traced(name)['params']) == TORCHVISION_PARAMS[name]


def test_resnet50d_param_count_matches_timm():
    # timm's resnet50d: ResNet-50 + deep stem (32, 32, 64) + avg-pool shortcuts = 25,576,264.
    assert size(traced('resnet50d')['params']) == 25_576_264


@pytest.mark.parametrize('name', sorted(CIFAR_PAPER_PARAMS))
def test_cifar_param_count_matches_paper(name):
    params = size(traced(name, image_size=32)['params'])
    assert params == pytest.approx(CIFAR_PAPER_PARAMS[name], rel=0.03)


def test_num_classes_sets_head_size():
    params = traced('resnet50', num_classes=10)['params']
    assert params['head']['kernel'].shape == (2048, 10)
    assert size(params) == TORCHVISION_PARAMS['resnet50'] - 2049 * 990


# ---- Structure ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnext50_32x4d', 'wide_resnet50_2'])
def test_stage_outputs_are_56_28_14_7_at_224(name):
    variables = traced(name)
    assert stem_output(variables)[1:3] == (56, 56)
    last = {b.split('_')[0]: out[1:3] for b, (_, out) in block_shapes(variables, ()).items()}
    assert last == {'stage1': (56, 56), 'stage2': (28, 28), 'stage3': (14, 14), 'stage4': (7, 7)}


@pytest.mark.parametrize('name', ['resnet34', 'resnet101', 'resnet50d'])
def test_downsampling_only_in_first_block_of_stages_2_to_4(name):
    variables = traced(name)
    # The deep stem's first conv strides, so its max-pool input is 112 there too.
    start = (1, 56, 56, 64) if name == 'resnet50d' else stem_output(variables)
    for block, (before, after) in block_shapes(variables, start).items():
        stage, index = (int(n) for n in block[5:].split('_block'))
        halved = stage > 1 and index == 1
        assert after[1:3] == ((before[1] // 2, before[2] // 2) if halved else before[1:3]), block


def _projected_blocks(variables) -> set[str]:
    return {k for k, v in variables['params'].items() if 'proj_conv' in v}


def _shape_changing_blocks(variables) -> set[str]:
    changing = set()
    for block, (before, after) in block_shapes(variables, stem_output(variables)).items():
        if before != after:
            changing.add(block)
    return changing


@pytest.mark.parametrize('name', ['resnet18', 'resnet50', 'resnet152'])
def test_option_b_projects_exactly_where_the_shape_changes(name):
    variables = traced(name)
    projected = _projected_blocks(variables)
    assert projected == _shape_changing_blocks(variables)
    expected = ({'stage2_block1', 'stage3_block1', 'stage4_block1'} if name == 'resnet18'
                else {'stage1_block1', 'stage2_block1', 'stage3_block1', 'stage4_block1'})
    assert projected == expected


def test_option_c_projects_in_every_block_and_option_a_in_none():
    every = traced('resnet18', shortcut='C')
    blocks_all = {k for k in every['params'] if k.startswith('stage')}
    assert _projected_blocks(every) == blocks_all and len(blocks_all) == 8
    cifar = traced('resnet20', image_size=32)
    assert _projected_blocks(cifar) == set()
    assert not any('proj' in path for path in flat(cifar['params']))


@pytest.mark.parametrize('name, block', [('resnet18', 'basic'), ('resnet34', 'basic'),
                                         ('resnet50', 'bottleneck'), ('resnet101', 'bottleneck'),
                                         ('resnet152', 'bottleneck'),
                                         ('resnet200', 'bottleneck'), ('resnet56', 'basic')])
def test_block_type_follows_the_depth_table(name, block):
    model = models.create(name)
    assert model.block == block
    params = traced(name, image_size=32 if model.stem == 'cifar' else 224)['params']
    kernels = {k: tuple(v['kernel'].shape[:2]) for k, v in params['stage2_block2'].items()
               if k.startswith('conv')}
    if block == 'basic':
        assert kernels == {'conv1': (3, 3), 'conv2': (3, 3)}
    else:
        assert kernels == {'conv1': (1, 1), 'conv2': (3, 3), 'conv3': (1, 1)}
        assert params['stage2_block2']['conv3']['kernel'].shape[-1] == 4 * 128


def test_stride_placement_v1_strides_first_1x1_and_v15_the_3x3():
    for placement, strided in (('v1', 'conv1'), ('v1.5', 'conv2')):
        inter = traced('resnet50', stride_placement=placement)['intermediates']['stage2_block1']
        spatial = {c: inter[c]['__call__'][0].shape[1] for c in ('conv1', 'conv2', 'conv3')}
        first_small = min(c for c in spatial if spatial[c] == 28)
        assert first_small == strided, (placement, spatial)
    assert size(traced('resnet50', stride_placement='v1')['params']) == 25_557_032


def test_stages_of_any_length_and_width():
    model = models.create('resnet18', stage_sizes=(1, 2, 1, 1, 1), stage_widths=(8, 8, 16, 32, 64))
    variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                                  train=False))
    assert {k for k in variables['params'] if k.startswith('stage5')} == {'stage5_block1'}
    assert variables['params']['head']['kernel'].shape == (64, 1000)
    default_widths = models.create('resnet18', stage_sizes=(1, 1, 1, 1, 1))
    assert default_widths.stage_widths == (64, 128, 256, 512, 1024)


def test_parameter_tree_names_map_onto_torchvision():
    names = set(flat(traced('resnet50')['params']))
    for expected in ('stem_conv/kernel', 'stem_bn/scale', 'stem_bn/bias',
                     'stage1_block1/conv1/kernel', 'stage1_block1/bn3/scale',
                     'stage1_block1/proj_conv/kernel', 'stage1_block1/proj_bn/bias',
                     'stage4_block3/conv3/kernel', 'head/kernel', 'head/bias'):
        assert expected in names
    stats = set(flat(traced('resnet50')['batch_stats']))
    assert {'stem_bn/mean', 'stem_bn/var', 'stage3_block6/bn2/var'} <= stats
    # torchvision's conv1.weight is [64, 3, 7, 7]; here it is HWIO.
    assert traced('resnet50')['params']['stem_conv']['kernel'].shape == (7, 7, 3, 64)


# ---- Precision, initialisation, train/eval --------------------------------------------------


@pytest.mark.slow
def test_bfloat16_forward_keeps_float32_params_and_batch_stats():
    x = images()
    model16 = tiny('resnet50', dtype='bfloat16')
    model32 = tiny('resnet50')
    variables = model16.init(jax.random.key(0), x, train=False)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(variables))
    logits, updates = model16.apply(variables, x, train=True, capture_intermediates=True,
                                    mutable=['batch_stats', 'intermediates'])
    conv2 = updates['intermediates']['stage1_block1']['conv2']['__call__'][0]
    assert conv2.dtype == jnp.bfloat16
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(updates['batch_stats']))
    assert logits.dtype == jnp.float32 and logits.shape == (4, 5)
    reference, _ = model32.apply(variables, x, train=True, mutable=['batch_stats'])
    assert bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(logits, reference, atol=0.1 * float(jnp.abs(reference).max()))
    assert not np.array_equal(logits, reference)  # it really computed in bfloat16


def test_conv_init_is_he_fan_out_normal_and_bn_starts_at_identity():
    model = tiny('resnet18', stage_widths=(64, 64), stem_width=64)
    params = model.init(jax.random.key(0), images(1), train=False)['params']
    kernel = params['stage1_block1']['conv2']['kernel']
    fan_out = 3 * 3 * 64
    assert float(jnp.std(kernel)) == pytest.approx(math.sqrt(2 / fan_out), rel=0.03)
    assert float(jnp.abs(kernel).max()) > 2.5 * math.sqrt(2 / fan_out)  # not truncated at 2 std
    bn = params['stage1_block1']['bn2']
    assert bool(jnp.all(bn['scale'] == 1)) and bool(jnp.all(bn['bias'] == 0))


@pytest.mark.parametrize('init, reference, shape', [
    (blocks.conv_kernel_init, nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
     (7, 7, 3, 64)),
    (blocks.conv_kernel_init, nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
     (1, 1, 64, 256)),
    (blocks.dense_kernel_init, nn.initializers.lecun_normal(), (2048, 1000)),
])
def test_kernel_inits_draw_the_same_numbers_as_the_library_initializers(init, reference, shape):
    # Kernels are drawn flat and reshaped (fast to compile on CPU); the numbers must be exactly
    # those of the library initializer each replaces.
    key = jax.random.key(7)
    np.testing.assert_array_equal(init(key, shape), reference(key, shape))


def test_train_mode_updates_batch_stats_and_eval_mode_uses_them():
    model, x = tiny(), images()
    variables = model.init(jax.random.key(0), x, train=False)
    _, updates = model.apply(variables, x, train=True, mutable=['batch_stats'])
    before, after = flat(variables['batch_stats']), flat(updates['batch_stats'])
    assert before.keys() == after.keys()
    assert not np.allclose(before['stem_bn/mean'], after['stem_bn/mean'])
    eval_before = model.apply(variables, x, train=False)
    eval_after = model.apply({**variables, **updates}, x, train=False)
    assert not np.allclose(eval_before, eval_after)


# ---- Variants: each switch changes what it claims -------------------------------------------


def test_preactivation_moves_bn_before_each_conv():
    post = traced('resnet50')['params']
    pre = traced('resnet50', preactivation=True)['params']
    # Pre-activation: bn1 normalises the block input (256 channels in stage1_block2), not the
    # output of conv1 (64); a final BN closes the net; the stem has no BN of its own.
    assert post['stage1_block2']['bn1']['scale'].shape == (64,)
    assert pre['stage1_block2']['bn1']['scale'].shape == (256,)
    assert pre['stage1_block1']['bn1']['scale'].shape == (64,)
    assert 'final_bn' in pre and 'final_bn' not in post
    assert 'stem_bn' not in pre and 'proj_bn' not in pre['stage2_block1']
    x = images()
    model = tiny('resnet18', preactivation=True)
    variables = model.init(jax.random.key(0), x, train=False)
    assert model.apply(variables, x, train=False).shape == (4, 5)


def test_avg_down_average_pools_the_shortcut_before_a_stride_1_projection():
    x = images()
    for avg_down in (False, True):
        model = tiny('resnet50', avg_down=avg_down)
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                               mutable=['intermediates'])
        inter = state['intermediates']
        block_input = inter['stage1_block2']['__call__'][0]
        projected = inter['stage2_block1']['proj_conv']['__call__'][0]
        kernel = variables['params']['stage2_block1']['proj_conv']['kernel'][0, 0]
        if avg_down:
            b, h, w, c = block_input.shape
            pooled = block_input.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))
        else:
            pooled = block_input[:, ::2, ::2, :]
        np.testing.assert_allclose(projected, pooled @ kernel, rtol=1e-4, atol=1e-5)
    assert size(traced('resnet50d')['params']) == size(traced('resnet50', stem='deep')['params'])


def test_se_adds_two_dense_layers_per_block():
    ratio = 1 / 16
    plain = size(traced('resnet50')['params'])
    se = traced('resnet50', se_ratio=ratio)['params']
    expected = 0
    for name, block in se.items():
        if name.startswith('stage'):
            c = block['conv3']['kernel'].shape[-1]
            r = round(c * ratio)
            expected += c * r + r + r * c + c
            assert block['se']['reduce']['kernel'].shape == (c, r)
    assert size(se) - plain == expected
    assert size(se) == 28_088_024  # SE-ResNet-50 (Hu et al. 2018): "28.1M"


@pytest.mark.parametrize('name, preactivation', [('resnet18', False), ('resnet50', False),
                                                 ('resnet18', True), ('resnet50', True)])
def test_zero_init_last_bn_makes_each_block_the_identity(name, preactivation):
    x = images()
    model = tiny(name, zero_init_last_bn=True, preactivation=preactivation)
    variables = model.init(jax.random.key(0), x, train=False)
    _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                           mutable=['intermediates'])
    inter = state['intermediates']
    first, second = (inter[f'stage1_block{i}']['__call__'][0] for i in (1, 2))
    np.testing.assert_array_equal(second, first)  # an identity-shortcut block passes x through
    plain = tiny(name, preactivation=preactivation)
    plain_variables = plain.init(jax.random.key(0), x, train=False)
    _, state = plain.apply(plain_variables, x, train=False, capture_intermediates=True,
                           mutable=['intermediates'])
    inter = state['intermediates']
    assert not np.allclose(inter['stage1_block2']['__call__'][0],
                           inter['stage1_block1']['__call__'][0])


def test_groups_divide_the_3x3_params_by_the_group_count():
    grouped = traced('resnext50_32x4d')['params']
    dense = traced('resnet50', base_width=128)['params']  # same inner width (4 x 32 = 128)
    for name in (k for k in grouped if k.startswith('stage')):
        g, d = grouped[name]['conv2']['kernel'], dense[name]['conv2']['kernel']
        assert g.shape[-1] == d.shape[-1]
        assert math.prod(d.shape) == 32 * math.prod(g.shape)
        assert grouped[name]['conv1']['kernel'].shape == dense[name]['conv1']['kernel'].shape


def test_width_multiplier_widens_the_3x3_convs():
    wide = traced('wide_resnet50_2')['params']['stage3_block2']
    assert wide['conv2']['kernel'].shape == (3, 3, 512, 512)
    assert wide['conv3']['kernel'].shape == (1, 1, 512, 1024)  # block outputs keep their width
    basic = models.create('resnet20', width_multiplier=4.0)
    assert basic.block_widths(16) == (64, 64)  # WRN: both 3x3 convs of a basic block


def _group_dependent_batch() -> jnp.ndarray:
    x = images(batch=8, size=4, seed=3)
    return x * jnp.repeat(jnp.arange(1.0, 5.0), 2)[:, None, None, None] + jnp.repeat(
        jnp.arange(4.0), 2)[:, None, None, None]


def test_ghost_batchnorm_normalises_each_group_on_its_own():
    x = _group_dependent_batch()
    ghost = blocks.GhostBatchNorm(group_size=2, use_running_average=False)
    glob = nn.BatchNorm(use_running_average=False, momentum=0.9)
    variables = ghost.init(jax.random.key(0), x)
    y, ghost_stats = ghost.apply(variables, x, mutable=['batch_stats'])
    per_group = jnp.concatenate([glob.apply(variables, x[i:i + 2], mutable=['batch_stats'])[0]
                                 for i in range(0, 8, 2)])
    y_global, global_stats = glob.apply(variables, x, mutable=['batch_stats'])
    np.testing.assert_allclose(y, per_group, rtol=1e-4, atol=1e-5)
    assert not np.allclose(y, y_global, atol=0.1)
    # Equal groups: the mean of the group means is the global mean.
    np.testing.assert_allclose(ghost_stats['batch_stats']['mean'],
                               global_stats['batch_stats']['mean'], rtol=1e-5, atol=1e-6)
    # A group as large as the batch is global BN.
    whole = blocks.GhostBatchNorm(group_size=8, use_running_average=False)
    np.testing.assert_allclose(whole.apply(variables, x, mutable=['batch_stats'])[0], y_global,
                               rtol=1e-4, atol=1e-5)


def test_bn_group_size_switches_the_model_to_ghost_batchnorm():
    x = jnp.concatenate([images(4, seed=1), 5 * images(4, seed=2) + 3])
    variables = tiny().init(jax.random.key(0), x, train=False)
    out = {g: tiny(bn_group_size=g).apply(variables, x, train=True, mutable=['batch_stats'])[0]
           for g in (0, 4, 8)}
    np.testing.assert_allclose(out[8], out[0], rtol=1e-4, atol=1e-4)
    assert not np.allclose(out[4], out[0], atol=1e-2)
    with pytest.raises(ValueError, match='bn_group_size=3'):
        tiny(bn_group_size=3).apply(variables, x, train=True, mutable=['batch_stats'])


def test_option_a_pads_channels_without_parameters():
    x = images(2, 32)
    model = models.create('resnet20', stage_sizes=(1, 1, 1))
    variables = model.init(jax.random.key(0), x, train=False)
    params = variables['params']['stage2_block1']
    assert set(params) == {'conv1', 'bn1', 'conv2', 'bn2'}
    assert model.apply(variables, x, train=False).shape == (2, 10)


# ---- Configs -------------------------------------------------------------------------------


def test_config_schema_matches_base_config():
    section = base.get_config().model.to_dict()
    assert section.keys() == models.CONFIG_DEFAULTS.keys()
    for key, value in section.items():
        assert value == models.CONFIG_DEFAULTS[key] or (value, models.CONFIG_DEFAULTS[key]) == (
            (), ()), key


CONFIG_MODELS = {
    'imagenet': 'resnet50', 'resnet18': 'resnet18', 'resnet34': 'resnet34',
    'resnet50': 'resnet50', 'resnet101': 'resnet101', 'resnet152': 'resnet152',
    'resnet200': 'resnet200', 'resnet50d': 'resnet50d', 'wide_resnet50_2': 'wide_resnet50_2',
    'resnext50_32x4d': 'resnext50_32x4d', 'cifar': 'resnet20', 'cifar_resnet32': 'resnet32',
    'cifar_resnet44': 'resnet44', 'cifar_resnet56': 'resnet56', 'cifar_resnet110': 'resnet110',
}


@pytest.mark.parametrize('config_name', sorted(CONFIG_MODELS))
def test_config_file_builds_its_named_model(config_name):
    config = importlib.import_module(f'configs.{config_name}').get_config()
    cifar = config.model.family == 'cifar'
    # The named architecture, at the precision the recipe trains in (bf16 for ImageNet), and
    # with Goyal et al.'s zero-init of each block's last BN gamma in the ImageNet recipe.
    expected = models.resolve(models.config_for(
        CONFIG_MODELS[config_name], dtype=config.model.dtype, zero_init_last_bn=not cifar))
    assert models.resolve(config.model.to_dict()) == expected
    assert isinstance(models.from_config(config.model), models.ResNet)
    doc = importlib.import_module(f'configs.{config_name}').__doc__
    assert f'--config=configs/{config_name}.py' in doc
    assert config.data.image_size == (32 if cifar else 224)
    assert config.data.dataset == ('cifar10' if cifar else 'imagenet2012')


def test_every_family_config_is_tested():
    files = {p.stem for p in CONFIGS.glob('*.py')}
    family = {f for f in files if f.startswith(('resnet', 'wide_', 'resnext', 'cifar', 'imagenet'))}
    assert family == set(CONFIG_MODELS)


# ---- Bad input ------------------------------------------------------------------------------


@pytest.mark.parametrize('build, match', [
    (lambda: models.create('resnet51'), "unknown model 'resnet51'; valid: .*resnet50"),
    (lambda: models.create('resnet50', stage_widths=(64, 128)),
     r'stage_widths \(64, 128\) must give one width per stage'),
    (lambda: models.create('resnet50', shortcut='A'), "shortcut='A'.*basic blocks only"),
    (lambda: models.create('resnet50', shortcut='D'), "shortcut='D' is not valid.*'A', 'B', 'C'"),
    (lambda: models.create('resnet50', width_multiplier=0.3), 'not a positive whole number'),
    (lambda: models.create('resnet18', groups=2), 'bottleneck blocks only'),
    (lambda: models.create('resnet50', stride_placement='v2'), "'v1', 'v1.5'"),
    (lambda: models.create('resnet50', depth=42), 'depth=42 has no ImageNet stage table; .*101'),
    (lambda: models.create('resnet20', depth=21), r'depth=21 is not a CIFAR depth.*6n\+2'),
    (lambda: models.create('resnet50', dropout=0.1), r"unknown model config field.*'dropout'"),
    (lambda: models.create('resnet50', stem='tiny'), "stem='tiny'.*'imagenet', 'cifar', 'deep'"),
    (lambda: models.create('resnet50', dtype='fp8'), "dtype='fp8'.*'bfloat16'"),
    (lambda: models.create('resnet20', stage_widths=(32, 16, 64)), "shortcut='A' can only widen"),
    (lambda: models.from_config({**models.CONFIG_DEFAULTS, 'family': 'mnist'}),
     "family='mnist'.*'imagenet', 'cifar'"),
])
def test_bad_input_raises_one_line_value_error(build, match):
    with pytest.raises(ValueError, match=match) as info:
        build()
    assert '\n' not in str(info.value)


def test_names_lists_the_family():
    expected = {'resnet18', 'resnet34', 'resnet50', 'resnet101', 'resnet152', 'resnet200',
                'resnet20', 'resnet32', 'resnet44', 'resnet56', 'resnet110', 'wide_resnet50_2',
                'resnext50_32x4d', 'resnet50d'}
    assert expected <= set(models.names())
    assert models.create('resnet56').num_classes == 10
    assert models.create('resnet56', num_classes=100).num_classes == 100


def test_identity_shortcut_across_a_shape_change_is_a_one_line_error():
    images = jnp.zeros((1, 32, 32, 3))
    with pytest.raises(ValueError, match=r"stride 2, 16->32 channels.*shortcut='B'") as error:
        models.create('resnet20', shortcut='identity').init(jax.random.key(0), images,
                                                            train=False)
    assert '\n' not in str(error.value)
    # Where no block changes shape, the identity shortcut is just x: no projection parameters.
    one_stage = models.create('resnet20', shortcut='identity', stage_sizes=(3,),
                              stage_widths=(16,))
    variables = one_stage.init(jax.random.key(0), images, train=False)
    assert not any('proj' in name for name in jax.tree_util.keystr(variables['params']).split())


# ---- Plain networks (shortcut='none') -------------------------------------------------------


def _projection_params(params) -> int:
    """Parameters of the projection shortcuts (`proj_conv`, `proj_bn`), counted from the tree."""
    return sum(math.prod(leaf.shape) for path, leaf in flat(params).items() if '/proj_' in path)


@pytest.mark.parametrize('name, plain, image_size', [
    ('resnet18', 'plain18', 224), ('resnet34', 'plain34', 224), ('resnet20', 'plain20', 32),
    ('resnet56', 'plain56', 32)])
def test_plain_net_is_the_residual_net_without_its_shortcuts(name, plain, image_size):
    residual = traced(name, image_size)['params']
    plain_params = traced(plain, image_size)['params']
    kept = {path: leaf.shape for path, leaf in flat(residual).items() if '/proj_' not in path}
    assert {path: leaf.shape for path, leaf in flat(plain_params).items()} == kept
    assert size(plain_params) == size(residual) - _projection_params(residual)


@pytest.mark.parametrize('name, shortcut', [('resnet50', 'B'), ('resnet50', 'C'),
                                            ('resnet20', 'B')])
def test_plain_params_are_residual_params_minus_projections(name, shortcut):
    image_size = 32 if name == 'resnet20' else 224
    residual = traced(name, image_size, shortcut=shortcut)['params']
    plain = traced(name, image_size, shortcut='none')['params']
    assert _projection_params(residual) > 0
    assert size(plain) == size(residual) - _projection_params(residual)
    assert _projection_params(plain) == 0


@pytest.mark.parametrize('name, preactivation', [('resnet18', False), ('resnet50', False),
                                                 ('resnet18', True), ('resnet50', True)])
def test_plain_block_output_is_its_last_layer_without_an_addition(name, preactivation):
    """Plain: H(x) = relu(bn(conv(...))) (post-activation) or conv(...) (pre-activation);
    residual: the same plus the block input."""
    x = images()
    outputs = {}
    for shortcut in ('none', 'B'):
        model = tiny(name, shortcut=shortcut, preactivation=preactivation)
        variables = model.init(jax.random.key(0), x, train=False)
        _, state = model.apply(variables, x, train=False, capture_intermediates=True,
                               mutable=['intermediates'])
        outputs[shortcut] = state['intermediates']
    last = ('conv2' if name == 'resnet18' else 'conv3') if preactivation else (
        'bn2' if name == 'resnet18' else 'bn3')
    finish = (lambda y: y) if preactivation else nn.relu
    for shortcut, inter in outputs.items():
        block_in = inter['stage1_block1']['__call__'][0]
        block = inter['stage1_block2']
        branch = block[last]['__call__'][0]
        expected = finish(branch if shortcut == 'none' else branch + block_in)
        np.testing.assert_allclose(block['__call__'][0], expected, rtol=1e-6, atol=1e-6)


def test_plain_members_have_the_papers_depths_and_no_shortcuts():
    for depth in (18, 34, 20, 32, 44, 56, 110):
        model = models.create(f'plain{depth}')
        assert model.shortcut == 'none'
        assert model.stage_sizes == models.create(f'resnet{depth}').stage_sizes
    assert models.create('plain56').num_classes == 10
    assert models.create('plain34').block == 'basic'


def test_plain_net_with_zero_init_last_bn_is_a_one_line_error():
    with pytest.raises(ValueError, match="zero_init_last_bn=True with shortcut='none'") as error:
        models.create('plain20', zero_init_last_bn=True)
    assert '\n' not in str(error.value)
