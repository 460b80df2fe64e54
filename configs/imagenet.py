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
    return config
