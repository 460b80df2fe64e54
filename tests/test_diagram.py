"""The diagram tool: pictures drawn from the traced model, for ResNet-18 and ResNet-50."""

import functools
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest
from PIL import Image

from resnet_flax import diagram, models, summary

REPO = Path(__file__).resolve().parents[1]

# torchvision's resnet18 / resnet50: output channels of the main-path convs of layer1's blocks
# and of layer2's first block (torchvision.models.resnet, BasicBlock / Bottleneck, v1.5).
TORCHVISION_CHANNELS = {
    'resnet18': {'stage1_block1': (64, 64), 'stage2_block1': (128, 128)},
    'resnet50': {'stage1_block2': (64, 64, 256), 'stage2_block1': (128, 128, 512)},
}


@functools.cache
def network(name: str, **overrides) -> diagram.Network:
    return diagram.trace(models.create(name, **overrides), name=name)


def run_diagram(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    return subprocess.run([sys.executable, '-m', 'resnet_flax.diagram', *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize('name', ['resnet18', pytest.param('resnet50', marks=pytest.mark.slow)])
def test_diagram_command_writes_a_picture_of_the_blocks_and_stages(name, tmp_path):
    out = tmp_path / f'{name}.png'
    result = run_diagram(name, '--text', f'--out={out}')
    assert result.returncode == 0, result.stderr[-2000:]
    with Image.open(out) as image:
        assert image.format == 'PNG'
        width, height = image.size
        assert width > 800 and height > 400
        colours = image.convert('RGB').getcolors(maxcolors=1 << 16)
    assert colours is None or len(colours) > 50  # boxes, text, arrows: not a blank canvas
    assert 20_000 < out.stat().st_size < 150_000
    # The printed text is the same network the picture shows.
    for block, channels in TORCHVISION_CHANNELS[name].items():
        assert f'{block} (' in result.stdout
        assert network(name).block(block).channels == channels


def test_resnet50_bottleneck_is_drawn_with_the_models_channels():
    net = network('resnet50')
    identity = net.block('stage1_block2')
    assert identity.channels == (64, 64, 256)
    assert [op.label for op in identity.main] == [
        '1x1 conv, 64', 'BN', 'ReLU', '3x3 conv, 64', 'BN', 'ReLU', '1x1 conv, 256', 'BN']
    assert identity.shortcut == () and [op.label for op in identity.after] == ['ReLU']
    drawn = diagram.labels(diagram.figure(net))
    for label in ('1x1 conv, 64', '3x3 conv, 64', '1x1 conv, 256', '3x3 conv, 128, /2',
                  '1x1 conv, 512, /2', 'identity', '56x56x256', '7x7x2048'):
        assert label in drawn
    # Other widths give other labels: the channels come from the model, not from the name.
    narrow = network('resnet50', stage_widths=(16, 32, 64, 128))
    drawn = diagram.labels(diagram.figure(narrow))
    assert narrow.block('stage1_block2').channels == (16, 16, 64)
    assert '1x1 conv, 64' in drawn and '3x3 conv, 16' in drawn and '3x3 conv, 64' not in drawn


def test_resnet18_basic_block_and_its_projection_shortcut():
    net = network('resnet18')
    down = net.block('stage2_block1')
    assert [op.label for op in down.main] == ['3x3 conv, 128, /2', 'BN', 'ReLU', '3x3 conv, 128',
                                              'BN']
    assert [op.label for op in down.shortcut] == ['1x1 conv, 128, /2', 'BN']
    assert down.shortcut_kind == 'projection' and down.stride == 2
    assert net.block('stage1_block1').shortcut_kind == 'identity'


def test_every_drawn_conv_matches_its_kernel_in_the_parameters():
    model = models.create('resnet50')
    params = summary.trace(model, 224)['variables']['params']
    checked = 0
    for block in network('resnet50').blocks:
        for op in block.main + block.shortcut:
            if op.kind == 'conv':
                kh, kw, _, out = params[block.name][op.name]['kernel'].shape
                assert op.label.startswith(f'{kh}x{kw} conv, {out}')
                assert op.params == kh * kw * params[block.name][op.name]['kernel'].shape[2] * out
                checked += 1
    assert checked == 3 * 16 + 4  # three convs per block, four projections


def test_stage_shapes_agree_with_the_summary():
    for name in ('resnet18', 'resnet50'):
        rows = summary.summarize(name)['stages']  # a second tracer (method interception)
        net = network(name)
        assert net.stem_shape == rows[0]['output_shape']
        assert [s.out_shape for s in net.stages] == [r['output_shape'] for r in rows[1:-1]]
        assert sum(b.params for b in net.blocks) == sum(r['params'] for r in rows[1:-1])
        assert net.head[-1].out_shape == (1000,)


@pytest.mark.parametrize('shortcut, kinds', [('A', ['subsample', 'pad']), ('B', ['conv', 'norm']),
                                             ('C', ['conv', 'norm'])])
def test_the_shortcut_is_read_from_the_dataflow(shortcut, kinds):
    net = diagram.trace(models.create('resnet20', shortcut=shortcut, stage_sizes=(1, 1, 1)))
    assert [op.kind for op in net.block('stage2_block1').shortcut] == kinds
    first = net.block('stage1_block1')  # same shape in and out: only C projects
    assert (first.shortcut_kind == 'projection') == (shortcut == 'C')


def test_preactivation_shortcut_taps_the_normalised_input():
    net = diagram.trace(models.create('resnet18', preactivation=True, stage_sizes=(1, 1)))
    down = net.block('stage2_block1')
    assert [op.label for op in down.main[:3]] == ['BN', 'ReLU', '3x3 conv, 128, /2']
    assert [op.label for op in down.shortcut] == ['1x1 conv, 128, /2']  # no BN: v2 projects
    assert down.shortcut_from == 'ReLU' and down.after == ()


def test_svg_keeps_the_labels_as_text(tmp_path):
    path = diagram.save(diagram.figure(network('resnet18')), str(tmp_path / 'r18.png'), svg=True)
    text = Path(path).read_text()
    assert path.endswith('.svg') and '3x3 conv, 128, /2' in text


def test_unknown_model_is_one_line_error():
    result = run_diagram('resnet19', '--out=/dev/null')
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("Error: unknown model 'resnet19'")


def test_trace_needs_no_compute():
    # make_jaxpr on abstract inputs: tracing ResNet-50 at 224x224 allocates no activations.
    before = len(jax.live_arrays())
    diagram.trace(models.create('resnet34'))
    assert len(jax.live_arrays()) == before
