"""Depth: CIFAR ResNet-8/14/20/32 (He et al. 2015, section 4.2) on the small digits setup.

    python -m resnet_flax.sweep --sweep=configs/ablations/depth.py --workdir=/tmp/ablations/depth
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/depth

6n+2 layers with n = 1, 2, 3, 5 basic blocks per stage, option-A shortcuts, widths 8/16/32 at
16x16 (configs/ablations/small_digits.py); 0.8M to 4.3M MACs per image. Two seeds each: 8 runs.
`--config.seeds=(0,1,2,3,4)` adds seeds. Results: docs/ablations.md.

On CIFAR-10: add --config.data.dataset=cifar10 (and --config.data.image_size=32 for the paper's
input size).

Measured (docs/figures.json, by docs/build_figures.py): the file's 8 runs (seeds 0, 1) took 18
minutes one after another on 2 CPU cores at load average 11 to 15 (shared with other jobs, so
slower than on free cores).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.model.shortcut = 'A'  # the paper's CIFAR nets: parameter-free shortcuts
    config.axes = [dict(name=f'resnet{depth}', **{'model.depth': depth})
                   for depth in (8, 14, 20, 32)]
    config.seeds = (0, 1)
    return config
