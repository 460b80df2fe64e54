"""Zero-init of each block's last BN scale (Goyal et al. 2017): every block starts as the
identity, on ResNet-32 of the small digits setup.

    python -m resnet_flax.sweep --sweep=configs/ablations/zero_init.py \
        --workdir=/tmp/ablations/zero_init
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/zero_init

It matters most early in training and at large learning rates; the train-loss curves of the
report show the first epochs. Two seeds each: 4 runs, about 12 minutes on 2 shared CPU cores
(defined, not run for docs/ablations.md).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.model.depth = 32
    config.axes = [{'name': 'default-init', 'model.zero_init_last_bn': False},
                   {'name': 'zero-init', 'model.zero_init_last_bn': True}]
    config.seeds = (0, 1)
    return config
