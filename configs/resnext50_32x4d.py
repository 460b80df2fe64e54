"""ResNeXt-50 32x4d (Xie et al. 2017; 25.0M parameters) on ImageNet.

    python train.py --config=configs/resnext50_32x4d.py --workdir=DIR

Bottleneck blocks whose 3x3 conv has 32 groups of width 4 x (stage width / 64), i.e. inner
widths 128/256/512/1024. 'v1.5' stride placement (stride on the grouped 3x3 conv), as the paper
and torchvision do.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 50
    config.model.groups = 32
    config.model.base_width = 4
    return config
