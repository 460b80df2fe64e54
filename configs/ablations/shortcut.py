"""Shortcut options A/B/C (He et al. 2015, Table 3) on a CIFAR ResNet-20, small digits setup.

    python -m resnet_flax.sweep --sweep=configs/ablations/shortcut.py \
        --workdir=/tmp/ablations/shortcut
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/shortcut

A: identity everywhere; where the shape changes, a strided identity with zero-padded channels
   (no parameters). B: projection (1x1 conv + BN) where the shape changes, identity elsewhere.
C: projection in every block. The paper's ImageNet ResNet-34 gets 25.03 / 24.52 / 24.19 %
top-1 error with A / B / C. ResNet-20 here (widths 8/16/32 at 16x16) has 2 shape-changing
blocks of 9: B adds 736 parameters to A's 68,050, C adds 3,728. Two seeds each: 6 runs.
Results: docs/ablations.md.

Measured (docs/figures.json, by docs/build_figures.py): the file's 6 runs (seeds 0, 1) took 23
minutes one after another on 2 CPU cores at load average 14 to 18 (shared with other jobs, so
slower than on free cores).
"""

import ml_collections

from configs.ablations import small_digits


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.model.depth = 20
    config.axes = [('model.shortcut', ['A', 'B', 'C'])]  # variants 'shortcut=A', ...
    config.seeds = (0, 1)
    return config
