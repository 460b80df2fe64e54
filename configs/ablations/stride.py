"""Stride placement in downsampling bottlenecks: 'v1' (first 1x1 conv, the paper) vs 'v1.5'
(the 3x3 conv; torchvision, NVIDIA, flax), on the bottleneck-29-w6 net of block_type.py.

    python -m resnet_flax.sweep --sweep=configs/ablations/stride.py \
        --workdir=/tmp/ablations/stride
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/stride

A v1 block's strided 1x1 conv reads one pixel in four and drops the rest; v1.5 strides the 3x3
conv, which sees them all, at 7% more MACs here (1.71M vs 1.60M; on ImageNet ResNet-50 it is
worth ~0.5% top-1). Two
seeds each: 4 runs, about 9 minutes on 2 shared CPU cores (defined, not run for
docs/ablations.md).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.model.block = 'bottleneck'
    config.model.depth = 29  # 9n+2, n=3
    config.model.stage_widths = (6, 12, 24)
    config.model.shortcut = 'B'
    config.axes = [('model.stride_placement', ['v1', 'v1.5'])]
    config.seeds = (0, 1)
    return config
