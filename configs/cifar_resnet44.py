"""ResNet-44 on CIFAR-10 (He et al. 2015; 0.66M parameters): configs/cifar.py with n=7.

    python train.py --config=configs/cifar_resnet44.py --workdir=DIR

Basic blocks (no stride placement choice), option-A shortcuts, widths 16/32/64, as the paper.
"""

import ml_collections

from configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.model.depth = 44  # 6n+2
    return config
