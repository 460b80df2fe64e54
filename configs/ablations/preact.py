"""Pre-activation (ResNet v2, He et al. 2016: BN-ReLU before each conv) vs v1, on ResNet-20 and
ResNet-56 of the small digits setup.

    python -m resnet_flax.sweep --sweep=configs/ablations/preact.py \
        --workdir=/tmp/ablations/preact
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/preact

The v2 paper's gains grow with depth (ResNet-1001 on CIFAR); at 20 and 56 layers expect little.
Two seeds each: 8 runs, about 30 minutes on 2 shared CPU cores (defined, not run for
docs/ablations.md).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.axes = [('model.depth', [20, 56]), ('model.preactivation', [False, True])]
    config.seeds = (0, 1)
    return config
