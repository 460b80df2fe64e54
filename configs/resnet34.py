"""ResNet-34 (21.8M parameters, 3.66G multiply-accumulates at 224) on ImageNet.

    python train.py --config=configs/resnet34.py --workdir=DIR

Basic blocks (two 3x3 convs), so the stride placement does not apply: a downsampling block
strides its first 3x3 conv, as in the paper and torchvision. Option-B shortcuts (projection only
where the shape changes), as torchvision.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 34
    return config
