"""The degradation problem (He et al. 2015, Fig. 1, 4, 6): plain vs residual nets by depth.

    python -m resnet_flax.sweep --sweep=configs/ablations/degradation.py \
        --workdir=/tmp/ablations/degradation
    python -m resnet_flax.sweep --report --workdir=/tmp/ablations/degradation

CIFAR-style nets of 6n+2 layers (n = 1, 3, 9: 8, 20 and 56 layers) on the small digits setup
(configs/ablations/small_digits.py: widths 8/16/32 at 16x16, 15 epochs of 22 steps), each one
residual (option-A shortcuts, no parameters) and plain (`model.shortcut='none'`: the same
layers, no shortcut, no addition). The two members of a pair have exactly the same parameters.
Every run logs the gradient norm of each block (`log_block_grad_norms`), which the report
draws against the block's depth. Two seeds: 12 runs, ~40 minutes on 2 shared CPU cores;
`--config.seeds=(0,1,2)` adds a third. Results: docs/ablations.md.

The paper trains plain-20..56 on CIFAR-10 for 64k steps and finds that deeper plain nets have
higher *training* error (Fig. 6, left), while deeper ResNets have lower (Fig. 6, middle).
"""

import ml_collections

from configs.ablations import small_digits

DEPTHS = (8, 20, 56)


def get_config() -> ml_collections.ConfigDict:
    config = small_digits.get_config()
    config.log_block_grad_norms = True
    config.eval_every_epochs = 5  # three points on the eval curve
    config.axes = [dict(name=f'{kind}{depth}', **{'model.depth': depth,
                                                  'model.shortcut': shortcut})
                   for depth in DEPTHS for kind, shortcut in (('plain', 'none'),
                                                              ('resnet', 'A'))]
    config.seeds = (0, 1)
    return config
