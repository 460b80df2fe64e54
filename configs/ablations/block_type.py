"""Block type: basic vs bottleneck blocks at matched compute (MACs), on the small digits setup.

    python -m resnet_flax.sweep --sweep=configs/ablations/block_type.py \
        --workdir=/tmp/ablations/block_type
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/block_type

Two compute budgets, each spent two ways (python -m resnet_flax.summary gives the numbers):

    variant            layers  widths (inner / out)     params   MACs at 16x16
    basic-8                 8  8,16,32                   19,954  0.809M
    bottleneck-29-w4       29  4,8,16 / 16,32,64         21,266  0.806M
    basic-14               14  8,16,32                   44,370  1.694M
    bottleneck-29-w6       29  6,12,24 / 24,48,96        46,022  1.712M

The bottleneck nets (9n+2 layers, n=3) spend the same MACs on 3.6x (2x) the depth with thinner
3x3 convs and 4x wider block outputs, as ResNet-50 does against ResNet-34. Both block types use
option-B shortcuts (projection where the shape changes; option A cannot widen a bottleneck's
output), so only the block differs. Two seeds each: 8 runs. Results: docs/ablations.md.

Measured (docs/figures.json, by docs/build_figures.py): the file's 8 runs (seeds 0, 1) took 21
minutes one after another on 2 CPU cores at load average 15 to 18 (shared with other jobs, so
slower than on free cores).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.model.shortcut = 'B'
    config.axes = [
        {'name': 'basic-8', 'model.block': 'basic', 'model.depth': 8},
        {'name': 'bottleneck-29-w4', 'model.block': 'bottleneck', 'model.depth': 29,
         'model.stage_widths': (4, 8, 16)},
        {'name': 'basic-14', 'model.block': 'basic', 'model.depth': 14},
        {'name': 'bottleneck-29-w6', 'model.block': 'bottleneck', 'model.depth': 29,
         'model.stage_widths': (6, 12, 24)},
    ]
    config.seeds = (0, 1)
    return config
