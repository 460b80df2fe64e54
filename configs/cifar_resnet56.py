"""ResNet-56 on CIFAR-10 (He et al. 2015; 0.85M parameters): configs/cifar.py with n=9.

    python train.py --config=configs/cifar_resnet56.py --workdir=DIR

Basic blocks (no stride placement choice), option-A shortcuts, widths 16/32/64, as the paper.
"""

import ml_collections

from configs import cifar


def get_config() -> ml_collections.ConfigDict:
    config = cifar.get_config()
    config.model.depth = 56  # 6n+2
    return config
