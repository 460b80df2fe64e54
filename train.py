"""Train and evaluate a ResNet.

    python train.py --config=configs/resnet50.py --workdir=/tmp/resnet50 --config.batch_size=512

Running the same command again resumes from the newest checkpoint in --workdir.
"""

import sys

from absl import app, flags
from ml_collections import config_flags

from resnet_flax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file.', lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the config go (gs:// too).')
flags.mark_flags_as_required(['config', 'workdir'])
cli.define_distributed_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    cli.setup(FLAGS)
    from resnet_flax import train

    result = train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
    if result.get('interrupted'):
        sys.exit(130)  # Ctrl-C: the shell's convention, so `train.py && eval.py` stops here


if __name__ == '__main__':
    cli.run(main)
