"""The ImageNet recipe the ImageNet family configs share (ResNet-50 unless a config says otherwise).

    python train.py --config=configs/imagenet.py --workdir=DIR

ILSVRC-2012 from TFDS ('imagenet2012', prepared in data.data_dir): 1.28M training images,
evaluated on the 50,000-image 'validation' split at 224x224, 1000 classes. The model section
keeps the base defaults: ImageNet stem, option-B shortcuts, and the 'v1.5' stride placement
(stride on the 3x3 conv of a downsampling bottleneck), which torchvision, NVIDIA and flax train:
its parameter tree matches torchvision's checkpoints and it is ~0.5% more accurate than v1 for
~7% more multiply-accumulates. `--config.model.stride_placement=v1` gives the paper's version.
"""

import ml_collections

from configs import base


def get_config() -> ml_collections.ConfigDict:
    config = base.get_config()
    config.data.dataset = 'imagenet2012'
    config.data.train_split = 'train'
    config.data.eval_split = 'validation'
    config.data.image_size = 224

    config.model.family = 'imagenet'
    config.model.depth = 50
    config.model.num_classes = 1000
    config.model.dtype = 'bfloat16'  # float32 params, optimizer state and BN statistics
    # Goyal et al. 2017 (and flax's ImageNet example) zero-initialise the last BN of each
    # block (gamma = 0), so every residual block starts as the identity. Weights loaded with
    # init_from or eval.py replace the initial values, so converted checkpoints are unaffected.
    config.model.zero_init_last_bn = True

    # Goyal et al. 2017 with a cosine decay: lr = 0.1 * batch_size / 256, 5 warmup epochs,
    # weight decay 1e-4 on conv and dense kernels only, label smoothing 0.1, 90 epochs.
    config.batch_size = 1024
    config.num_epochs = 90.0
    config.optimizer.name = 'sgd'
    config.optimizer.learning_rate = 0.1
    config.optimizer.momentum = 0.9
    config.optimizer.nesterov = True
    config.optimizer.weight_decay = 1e-4
    config.optimizer.schedule = 'cosine'
    config.optimizer.warmup_epochs = 5.0
    config.label_smoothing = 0.1
    config.log_every_steps = 100
    config.eval_every_epochs = 1.0
    config.checkpoint_every_steps = 1250  # about one epoch at batch 1024
    return config
