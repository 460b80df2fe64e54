"""ResNet-110 on CIFAR-10 (He et al. 2015; 1.7M parameters): configs/cifar.py with n=18.

    python train.py --config=configs/cifar_resnet110.py --workdir=DIR

Basic blocks (no stride placement choice), option-A shortcuts, widths 16/32/64, as the paper.
The paper warms up at learning rate 0.01 for the first ~400 iterations at this depth.
"""

import ml_collections

from configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.model.depth = 110  # 6n+2
    return config
