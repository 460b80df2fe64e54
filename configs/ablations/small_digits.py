"""The small digits experiment every ablation sweep starts from, sized for 2 shared CPU cores.

    python train.py --config=configs/ablations/small_digits.py --workdir=/tmp/small_digits

configs/digits.py (CIFAR-style 3x3 stem, three stages, ResNet-8) made ~16x cheaper: the images
are upsampled to 16x16 instead of 32x32 (the digits are 8x8, so nothing is lost) and the widths
are halved (stem 8, stages 8/16/32). 15 epochs of 22 steps at batch 64, cosine schedule with one
warmup epoch, eval every 3 epochs.

Measured (docs/figures.json, by docs/build_figures.py): its ResNet-20 (shortcut=A of
configs/ablations/shortcut.py) reaches 96.1 +- 0.8% top-1 on the 360 test digits (2 seeds) and
took 149 to 188 s per run (start-up and compilation included) on 2 CPU cores at load average 14
to 18 (shared with other jobs, so slower than on free cores).

On CIFAR-10 (one override, `--config.data.dataset=cifar10`) the same nets train on 16x16
crops; add `--config.data.image_size=32 --config.num_epochs=180` for the paper's recipe.
"""

import ml_collections

from configs import digits


def get_config() -> ml_collections.ConfigDict:
    config = digits.get_config()
    config.data.image_size = 16  # the digits are 8x8: 16x16 keeps all of them at 1/4 the cost
    # The sweeps were measured before the quick start gained shifts, smoothing and EMA.
    config.data.train_crop = 'none'
    config.label_smoothing = 0.0
    config.ema_decay = 0.0
    config.model.stem_width = 8
    config.model.stage_widths = (8, 16, 32)  # half of the CIFAR ResNets' 16/32/64
    config.num_epochs = 15
    config.eval_every_epochs = 3  # five points on the eval curve; each eval also checkpoints
    config.log_every_steps = 11  # two train-loss points per epoch
    config.checkpoint_every_steps = 10_000  # checkpoints come with the evals
    return config
