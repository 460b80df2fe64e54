"""ResNet-200 (64.7M parameters, He et al. 2016's depth, here post-activation) on ImageNet.

    python train.py --config=configs/resnet200.py --workdir=DIR

Bottleneck blocks with the 'v1.5' stride placement (stride on the 3x3 conv), as the other
ImageNet configs (torchvision/NVIDIA's placement, ~0.5% better top-1 than the paper's 'v1' for a
few % more MACs; 15.0G MACs at 224). The 2016 paper trained this depth with pre-activation
blocks: add `--config.model.preactivation=True` for that network, and
`--config.model.stride_placement=v1` for the paper's stride placement.
"""

import ml_collections

from configs import imagenet


def get_config() -> ml_collections.ConfigDict:
    config = imagenet.get_config()
    config.model.depth = 200
    return config
