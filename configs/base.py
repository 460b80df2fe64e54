"""Defaults shared by every experiment. Each field is overridable from the command line.

    python train.py --config=configs/resnet50.py --workdir=DIR --config.batch_size=512

Experiment configs import this file and change a few fields. Configs are plain data:
they import ml_collections and each other, never the package.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # ---- Model: the ResNet family (resnet_flax/models.py). '' / () / 0 mean "as the family says".
    config.model = model = ml_collections.ConfigDict()
    model.family = 'imagenet'  # 'imagenet' or 'cifar': which depth table, stem and widths apply
    model.depth = 50  # imagenet: 18, 34, 50, 101, 152, 200; cifar: 6n+2 (20, 32, 44, 56, 110)
    model.num_classes = 1000
    model.block = ''  # '' (from depth) | 'basic' | 'bottleneck'
    model.stage_sizes = ()  # blocks per stage, any length; () = from depth
    model.stage_widths = ()  # base width of each stage; () = family default
    model.stem = ''  # '' (family default) | 'imagenet' | 'cifar' | 'deep'
    model.stem_width = 0  # 0 = family default
    model.shortcut = ''  # '' (family default: B imagenet, A cifar) | 'A' | 'B' | 'C'
    # Where a downsampling bottleneck puts its stride. 'v1.5' (3x3 conv) is what torchvision,
    # NVIDIA and flax train, and is ~0.5% more accurate; 'v1' (first 1x1) is the paper's.
    model.stride_placement = 'v1.5'
    model.preactivation = False  # ResNet v2 (He et al. 2016): BN-ReLU before each conv
    model.avg_down = False  # ResNet-D: average-pool then 1x1 conv in downsampling shortcuts
    model.zero_init_last_bn = False  # each block starts as the identity
    model.width_multiplier = 1.0  # Wide ResNet: scales the width of the 3x3 convs in each block
    model.groups = 1  # ResNeXt cardinality of the 3x3 conv
    model.base_width = 64  # ResNeXt width per group (64 with groups=1 is a plain ResNet)
    model.se_ratio = 0.0  # squeeze-and-excitation reduction ratio; 0 = off (SENet uses 1/16)
    model.dtype = 'float32'  # compute dtype; 'bfloat16' for mixed precision
    model.param_dtype = 'float32'  # parameters, optimizer state and BN statistics stay float32
    model.bn_momentum = 0.9
    model.bn_epsilon = 1e-5
    # BN statistics over the global batch (0, synced across devices under jit), or over
    # groups of this many examples ("ghost" BN; the per-device batch gives per-device BN).
    model.bn_group_size = 0

    # ---- Data (resnet_flax/data/).
    config.data = data = ml_collections.ConfigDict()
    # A TFDS name ('imagenet2012', 'cifar10', 'cifar100', ...), 'image_folder', 'digits'
    # (built in, no download) or 'synthetic' (random device-resident batches).
    data.dataset = 'digits'
    data.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the image folder root
    data.train_split = 'train'
    data.eval_split = 'test'
    data.image_size = 224  # train and eval crop size

    # ---- Optimizer and schedule (resnet_flax/optim.py).
    config.optimizer = opt = ml_collections.ConfigDict()
    opt.name = 'sgd'  # 'sgd' | 'lars' | 'lamb' | 'adamw'
    opt.learning_rate = 0.1  # per 256 images: the peak rate is learning_rate * batch_size / 256
    opt.momentum = 0.9
    opt.nesterov = False

    # ---- Training loop (resnet_flax/train.py).
    config.batch_size = 256  # global batch per optimizer update, over all devices and processes
    config.grad_accum_steps = 1  # split each batch into this many sequential micro-batches
    config.num_epochs = 90.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.label_smoothing = 0.0
    config.ema_decay = 0.0  # > 0 keeps an exponential moving average of the weights
    config.log_every_steps = 100
    config.eval_every_epochs = 1.0
    config.eval_every_steps = 0  # > 0 overrides eval_every_epochs
    config.eval_batch_size = 0  # 0 = batch_size
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the newest K, plus the best by eval top-1
    config.profile_start_step = -1  # >= 0 writes a profiler trace of a few steps to the workdir
    config.profile_num_steps = 5
    config.halt_on_nan = True
    config.debug_nan_at_step = -1  # tests only: replace the loss by NaN at this step
    return config
