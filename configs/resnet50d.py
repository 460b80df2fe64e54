"""ResNet-50-D (He et al. 2019, "Bag of tricks"; 25.6M parameters) on ImageNet.

    python train.py --config=configs/resnet50d.py --workdir=DIR

ResNet-50 with two of the paper's tweaks: the deep stem (ResNet-C: three 3x3 convs of width
32, 32, 64 instead of the 7x7) and average-pool downsampling in the shortcut (ResNet-D: a 2x2
average pool, then a stride-1 1x1 projection). The 'v1.5' stride placement is the paper's
ResNet-B tweak, so this is the full ResNet-D. `layers` in the summary reports 50: the stem counts
as one layer, as in the name (its three convs make 52 weight layers).
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 50
    config.model.stem = 'deep'
    config.model.avg_down = True
    return config
