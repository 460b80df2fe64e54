"""ResNet-20 on CIFAR-10 (He et al. 2015, section 4.2): the recipe the CIFAR configs share.

    python train.py --config=configs/cifar.py --workdir=DIR

The paper's CIFAR nets: a 3x3 stem of width 16, three stages of n basic blocks of widths
16/32/64 (6n+2 layers), option-A shortcuts (parameter-free: strided identity, zero-padded
channels), global average pool, 10-way dense layer. Basic blocks stride their first 3x3 conv;
the v1/v1.5 stride placement only concerns bottlenecks. ResNet-20 has 0.27M parameters.
Training as in the paper: SGD with momentum, learning rate 0.1 at batch 128, 64k iterations.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = 'cifar10'
    config.data.train_split = 'train'
    config.data.eval_split = 'test'
    config.data.image_size = 32

    config.model.family = 'cifar'
    config.model.depth = 20
    config.model.num_classes = 10
    config.model.shortcut = 'A'

    # The paper's schedule: 0.1 at batch 128, divided by 10 at 32k and 48k iterations, stopped
    # at 64k (391 iterations per epoch: epochs 82, 123 and 164); weight decay 1e-4.
    config.batch_size = 128
    config.num_epochs = 164.0
    config.optimizer.learning_rate = 0.2  # per 256 images: 0.1 at batch 128
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = 'step'
    config.optimizer.step_epochs = (82, 123)
    config.optimizer.warmup_epochs = 0.0
    config.log_every_steps = 100
    config.eval_every_epochs = 4.0
    config.checkpoint_every_steps = 2000
    return config
