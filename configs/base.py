"""Defaults shared by every experiment. Each field is overridable from the command line.

    python train.py --config=configs/resnet50.py --workdir=DIR --config.batch_size=512

Experiment configs import this file and change a few fields. Configs are plain data:
they import ml_collections and each other, never the package. get_config assembles the
sections below; a new field goes into the function of its section, with its default.
"""

import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
    """Every field at its default, section by section, in the order config.json lists them."""
    config = ml_collections.ConfigDict()
    config.seed = 0
    # Start a fresh run from these weights: a checkpoint directory written by train.py or by
    # `python -m resnet_flax.convert` (pretrained PyTorch weights). A head of another size is
    # re-initialised. Ignored when the workdir already has a checkpoint (that run resumes).
    config.init_from = ''
    config.model = _model_section()
    config.data = _data_section()
    config.optimizer = _optimizer_section()
    _add_training_fields(config)
    _add_eval_and_checkpoint_fields(config)
    _add_safety_and_diagnostic_fields(config)
    return config


def _model_section() -> ml_collections.ConfigDict:
    """The ResNet family (resnet_flax/models.py). '' / () / 0 mean "as the family says"."""
    model = ml_collections.ConfigDict()
    model.family = 'imagenet'  # 'imagenet' or 'cifar': which depth table, stem and widths apply
    model.depth = 50  # imagenet: 18, 34, 50, 101, 152, 200; cifar: 6n+2 (20, 32, 44, 56, 110)
    model.num_classes = 1000  # a data set with another class count overrides it (announced)
    model.block = ''  # '' (from depth) | 'basic' | 'bottleneck'
    model.stage_sizes = ()  # blocks per stage, any length; () = from depth
    model.stage_widths = ()  # base width of each stage; () = family default
    model.stem = ''  # '' (family default) | 'imagenet' | 'cifar' | 'deep'
    model.stem_width = 0  # 0 = family default
    model.shortcut = ''  # '' (family default: B imagenet, A cifar) | 'A' | 'B' | 'C' | 'none'
    # ('none': a plain network, no shortcut and no addition; the plain{18,34,20,...} members)
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
    # Compute dtype: 'bfloat16' for mixed precision (TPUs, A100 and newer); 'float16' (GPUs
    # without bf16, e.g. V100, T4) trains with dynamic loss scaling (resnet_flax/precision.py).
    model.dtype = 'float32'
    model.param_dtype = 'float32'  # parameters, optimizer state and BN statistics: float32 to train
    model.bn_momentum = 0.9
    model.bn_epsilon = 1e-5
    # BN statistics over the global batch (0, synced across devices under jit), or over
    # groups of this many examples ("ghost" BN; the per-device batch gives per-device BN).
    model.bn_group_size = 0
    # Stochastic depth (Huang et al. 2016): the residual branch of block l of L is dropped per
    # example with probability drop_path_rate * l / L in training (kept ones scaled by 1/(1-p)).
    model.drop_path_rate = 0.0
    model.head_dropout_rate = 0.0  # dropout on the pooled features, before the head
    # How convolutions are computed: 'xla' (XLA's convolution: cuDNN, the TPU), 'im2col' (image
    # patches times the kernel, one matrix product; much faster on XLA:CPU for wide layers, see
    # resnet_flax/conv.py), or 'auto': on the CPU backend every 1x1 conv as a matrix product and
    # im2col for the other convs with >= 64 input channels whose patches fit the budget below;
    # xla elsewhere. The same results to float rounding.
    model.conv_impl = 'auto'
    # 'auto' keeps a layer on XLA's conv when its im2col patches (batch x output pixels x
    # kh*kw*C_in, kept for the backward pass: kh*kw times the layer's input) exceed this many
    # MiB, so the extra memory is at most this much per kh x kw conv. 'im2col' ignores it.
    model.conv_im2col_max_mib = 64.0
    return model


def _data_section() -> ml_collections.ConfigDict:
    """Data (resnet_flax/data/). Every source yields uint8 NHWC RGB images already at the
    train (or eval) size (grayscale replicated, alpha dropped) and int32 labels. The host
    decodes, crops, resizes (and RandAugments); the jitted step casts, normalises, flips and
    mixes on the device (resnet_flax/device_augment.py): 1/4 of float32's bytes cross over."""
    data = ml_collections.ConfigDict()
    _add_data_source_fields(data)
    _add_train_augmentation_fields(data)
    _add_eval_preprocessing_fields(data)
    _add_input_throughput_fields(data)
    _add_builtin_dataset_fields(data)
    return data


def _add_data_source_fields(data: ml_collections.ConfigDict) -> None:
    """What to read, who reads it, the splits, image sizes and normalisation."""
    # A TFDS name ('imagenet2012', 'cifar10', 'cifar100', or any TFDS image-classification set),
    # 'image_folder' (data_dir/CLASS/*.jpg, or data_dir/SPLIT/CLASS/*.jpg), 'digits'
    # (scikit-learn's 8x8 digits, built in, no download) or 'synthetic' (random batches).
    data.dataset = 'digits'
    data.data_dir = config_dict.placeholder(str)  # TFDS data_dir, or the image folder root
    data.train_split = 'train'  # TFDS split syntax works: 'train[:99%]'
    # imagenet2012 calls it 'validation'; a train slice: 'train[99%:]'. Missing, with exactly
    # one other split in the data: that one is used (announced).
    data.eval_split = 'test'
    data.image_size = 224  # train crop size (and eval's unless eval_image_size is set)
    # Eval crop size; 0 = image_size. Low-resolution training (FFCV, FixRes: train 160-192,
    # test 224) sets image_size=176, eval_image_size=224.
    data.eval_image_size = 0
    # Who reads image folders and TFDS sets: 'tf' (tf.data, the TPU default), 'grain'
    # (resnet_flax/data/grain_source.py: no TensorFlow, ArrayRecord or image files), 'dali'
    # (NVIDIA DALI, GPU decode, image folders; needs nvidia-dali) or 'auto': tf where
    # TensorFlow is installed, grain where it is not. dataset='prepared' is always grain's.
    data.loader = 'auto'
    # JPEG decoder of the grain loader: 'pil', 'pil_draft' (reduced-scale decode for crops),
    # 'simplejpeg', 'libjpeg_window' (train crops decode only their window, as tf.data does;
    # resnet_flax/data/jpeg_window.c, compiled on first use: needs cc and jpeglib.h) or 'auto'
    # (libjpeg_window where it builds; simplejpeg if installed, else pil_draft).
    data.decoder = 'auto'
    # Who resizes the grain loader's train crops: 'auto' (OpenCV where installed, else PIL),
    # 'pil' or 'cv2' (~5x faster). Both follow data.antialias. Eval always resizes with PIL.
    data.train_resizer = 'auto'
    data.download = False  # True lets TFDS download and prepare a missing data set (not imagenet)
    # image_folder: > 0 holds out this fraction of each class of the train folder (fixed by
    # holdout_seed) as the eval split; 0 = the eval_split folder must exist.
    data.holdout_fraction = 0.0
    data.holdout_seed = 0
    # image_folder: open every file once (JPEGs at 1/8 scale) when indexing, so corrupt ones
    # are skipped and counted instead of failing mid-epoch. False only checks the headers.
    data.verify_images = True

    # Normalisation (on the device) in [0, 1] pixel units; () = the data set's own: ImageNet's
    # statistics for imagenet2012, image folders and other TFDS sets, CIFAR's for cifar10/100,
    # the train split's for digits, none (0, 1) for synthetic.
    data.mean_rgb = ()
    data.std_rgb = ()


def _add_train_augmentation_fields(data: ml_collections.ConfigDict) -> None:
    # Train augmentation. '' = by the images' size, for TFDS sets, image folders and prepared
    # stores alike (data/info.py crops): 'inception' for large images; 'pad' for CIFAR-sized
    # ones (typically <= 64 px); 'none' for digits.
    data.train_crop = ''  # '' | 'inception' | 'pad' | 'none'
    data.inception_area_range = (0.08, 1.0)  # Szegedy et al. 2015: crop 8%-100% of the area
    data.inception_aspect_range = (3 / 4, 4 / 3)
    data.crop_padding = 4  # 'pad': zero-pad this many pixels, then crop back (He et al. 2016)
    # Horizontal flips, on the device (never for digits: a flipped digit is no digit).
    data.random_flip = True
    data.resize_method = 'bilinear'  # tf.image.resize method: 'bilinear' | 'bicubic' | ...
    # Filter when downscaling, as PIL does: ~4x the resize time for no accuracy the flax and
    # TF ResNet recipes (plain bilinear/bicubic) ever missed.
    data.antialias = False
    data.auto_augment = ''  # '' | 'randaugment' (Cubuk et al. 2020) | 'trivialaugment'
    data.randaugment_num_ops = 2  # ops applied to each image
    data.randaugment_magnitude = 9  # 0..30, the paper's scale (ImageNet ResNet-50: 2 ops, 9)
    # Mixup (Zhang et al. 2018) and CutMix (Yun et al. 2019), on the device, mix neighbouring
    # pairs of the global batch and make the labels float32 [B, num_classes]. With both > 0
    # each batch picks one, CutMix with probability cutmix_prob. Draws depend on
    # (seed, step, example) only, not on the number of devices.
    data.mixup_alpha = 0.0
    data.cutmix_alpha = 0.0
    data.cutmix_prob = 0.5


def _add_eval_preprocessing_fields(data: ml_collections.ConfigDict) -> None:
    # Eval: '' = 'center' for large images, 'resize' for CIFAR-sized ones and digits.
    # 'center' resizes the short side to image_size / eval_crop_fraction and centre-crops
    # image_size (224 from 256 by default); 'resize' resizes the whole image to image_size.
    data.eval_crop = ''  # '' | 'center' | 'resize'
    data.eval_crop_fraction = 0.875
    # 'torchvision' evaluates as torchvision's ImageNet transforms do: accurate JPEG decoding,
    # antialiased bilinear resize of the short side to eval size / eval_crop_fraction (256),
    # centre crop of the eval size (224), with PIL's rounding (tf and grain loaders; exact on the
    # original files, not on a prepared store's re-encoded copies). '' = 'torchvision' for
    # weights converted from PyTorch (eval.py reads it from the checkpoint), else 'native':
    # the eval_crop recipe above.
    data.eval_preset = ''  # '' | 'native' | 'torchvision'


def _add_input_throughput_fields(data: ml_collections.ConfigDict) -> None:
    # Throughput and memory. Cores and buffers are shared among the processes on a host
    # (resnet_flax/data/budget.py): processes_per_host 0 = from the launcher (LOCAL_WORLD_SIZE,
    # SLURM_NTASKS_PER_NODE, ...), else 1.
    data.processes_per_host = 0
    # Raw examples held for shuffling per host (each process keeps its share); an ImageNet JPEG
    # is ~110 KB, so 16,384 take ~1.8 GB.
    data.shuffle_buffer_size = 16_384
    data.cache = False  # TFDS: keep the encoded split in memory after the first pass (small sets)
    data.num_parallel_calls = -1  # decode/augment calls in flight; -1 = tf.data autotunes
    # tf.data private thread pool / grain reader threads; 0 = this process's share of the cores
    data.threadpool_size = 0
    # grain decoding processes; -1 = one per core of this process's share less one (0 below
    # 3 cores: threads decode instead); 0 = threads only.
    data.num_workers = -1
    data.prefetch_batches = 2  # ready batches kept ahead of the step; -1 = tf.data autotunes
    data.ram_budget_gb = 0.0  # > 0 caps tf.data autotune's buffers at this many GB


def _add_builtin_dataset_fields(data: ml_collections.ConfigDict) -> None:
    """The two data sets that need no files: digits and synthetic."""
    # digits: the first 1,437 images train, the last 360 test (a fixed split, no shuffle).
    # synthetic: random images of the configured shape and uniform random labels.
    data.synthetic_num_classes = 1000
    data.synthetic_num_train_examples = 1_281_167  # sets the epoch length
    data.synthetic_num_eval_examples = 50_000


def _optimizer_section() -> ml_collections.ConfigDict:
    """Optimizer and schedule (resnet_flax/optim.py)."""
    opt = ml_collections.ConfigDict()
    opt.name = 'sgd'  # 'sgd' | 'lars' | 'lamb' | 'adamw'
    # Linear scaling rule (Goyal et al. 2017): the peak rate is
    # learning_rate * batch_size / reference_batch_size. Set reference_batch_size to
    # batch_size to give the peak rate directly.
    opt.learning_rate = 0.1
    opt.reference_batch_size = 256
    opt.momentum = 0.9  # sgd and lars; 0 = plain SGD
    opt.nesterov = False  # sgd and lars
    opt.b1 = 0.9  # adamw and lamb
    opt.b2 = 0.999  # adamw and lamb
    opt.eps = 1e-8  # adamw and lamb
    opt.trust_coefficient = 0.001  # lars: the layer-wise rate is this * |w| / |g|
    opt.weight_decay = 1e-4
    # 'l2': weight_decay * w added to the gradient, so it goes through momentum / Adam moments
    # (the classic ResNet recipe). 'decoupled': added to the optimizer's direction, then scaled
    # by the rate (AdamW, Loshchilov & Hutter). '' = the optimizer's usual one:
    # l2 for sgd and lars, decoupled for adamw and lamb.
    opt.weight_decay_type = ''
    opt.decay_norm_and_bias = False  # True also decays BN scale/bias and biases (1-D params)
    opt.adapt_norm_and_bias = False  # lars/lamb: True also applies the trust ratio to 1-D params
    opt.grad_clip_norm = 0.0  # > 0 clips the gradient to this global norm; 0 = off
    # Schedule: linear warmup from 0 to the peak, then the decay below, over the whole run.
    opt.schedule = 'cosine'  # 'cosine' | 'step' | 'polynomial' | 'constant'
    opt.warmup_epochs = 5.0
    opt.warmup_steps = 0  # > 0 overrides warmup_epochs
    # A warmup as long as the whole run is an error naming a value that fits, not clamped:
    # a clamped warmup would silently become a different schedule than the one configured.
    opt.end_learning_rate_factor = 0.0  # cosine and polynomial end at this fraction of the peak
    opt.step_epochs = (30, 60, 80)  # step: multiply the rate by step_factor at these epochs
    opt.step_factor = 0.1
    opt.polynomial_power = 2.0  # polynomial: 1 = linear decay
    return opt


def _add_training_fields(config: ml_collections.ConfigDict) -> None:
    """Training loop (resnet_flax/train.py)."""
    config.batch_size = 256  # global batch per optimizer update, over all devices and processes
    # Split each batch into this many sequential micro-batches (micro-batch i takes every k-th
    # example from i) and average their gradients: one update, less memory. BatchNorm is not
    # accumulated: each micro-batch is normalised by its own statistics (batch_size / k
    # examples, as ghost BN), and the running averages take one momentum step per micro-batch,
    # k per update (so bn_momentum m acts like m**k per update).
    config.grad_accum_steps = 1
    config.num_epochs = 90.0
    config.num_train_steps = -1  # > 0 overrides num_epochs
    config.label_smoothing = 0.0
    config.ema_decay = 0.0  # > 0 keeps an exponential moving average of the weights
    config.log_every_steps = 100
    # The loop dispatches at most this many steps ahead of the device (0 = no bound). Keeps one
    # step queued behind the running one, so the device never idles for the host, and makes
    # train/input_wait_fraction mean "the device ran out of work waiting for input".
    config.max_steps_ahead = 2


def _add_eval_and_checkpoint_fields(config: ml_collections.ConfigDict) -> None:
    """How often the loop evaluates and checkpoints."""
    config.eval_every_epochs = 1.0
    config.eval_every_steps = 0  # > 0 overrides eval_every_epochs
    config.eval_batch_size = 0  # 0 = batch_size
    config.checkpoint_every_steps = 1000
    config.keep_checkpoints = 3  # the newest K, plus the best by eval top-1


def _add_safety_and_diagnostic_fields(config: ml_collections.ConfigDict) -> None:
    """Profiling, NaN halts, resume checks and debugging aids."""
    config.profile_start_step = -1  # >= 0 writes a profiler trace of a few steps to the workdir
    config.profile_num_steps = 5
    config.halt_on_nan = True
    # A resume compares the config with the run's config.json: a different network is refused,
    # other training changes (schedule, optimizer, data...) need this set to True for that
    # resume (the earlier config is kept as config.until-step-N.json). resnet_flax/run_config.py
    config.allow_config_change = False
    # When checkpoints of the workdir do not restore (RELIABILITY.md): 'one' moves aside only
    # the newest step, only on evidence of damage (a checksum mismatch, or files missing on
    # every process), and resumes from the step before; anything else stops the run in one
    # line with nothing moved. 'all' moves aside every step newer than the newest that
    # restores; 'scratch' also, when none restores, moves them all aside and trains from step 0.
    # Checkpoints are moved to <workdir>/checkpoints_unreadable/, never deleted.
    config.checkpoint_fallback = 'one'
    # Diagnostic: also log the gradient norm of each top-level module (stem, every block, head)
    # as train metrics 'grad_norm/stage1_block1', ...; computed in the jitted step, averaged over
    # the logging window like the loss. Cheap enough for small runs (one norm per block).
    config.log_block_grad_norms = False
    config.debug_nan_at_step = -1  # tests only: replace the loss by NaN at this step
