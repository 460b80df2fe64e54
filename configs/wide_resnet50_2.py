"""Wide ResNet-50-2 (Zagoruyko & Komodakis 2016; torchvision's, 68.9M parameters) on ImageNet.

    python train.py --config=configs/wide_resnet50_2.py --workdir=DIR

ResNet-50 with the inner (3x3) width of every bottleneck doubled; block outputs keep the
ResNet-50 widths, as in torchvision. 'v1.5' stride placement (stride on the 3x3 conv), as
torchvision, so its checkpoints map 1:1.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 50
    config.model.width_multiplier = 2.0
    return config
