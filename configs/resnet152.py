"""ResNet-152 (60.2M parameters, 11.5G multiply-accumulates at 224) on ImageNet.

    python train.py --config=configs/resnet152.py --workdir=DIR

Bottleneck blocks with the 'v1.5' stride placement (stride on the 3x3 conv): what
torchvision trains, so parameters map 1:1 onto its checkpoints, and ~0.5% better top-1 than the
paper's 'v1' (stride on the first 1x1) for a few % more MACs.
`--config.model.stride_placement=v1` gives the paper's network.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 152
    return config
