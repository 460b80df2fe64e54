"""Evaluate a checkpoint over a whole split, or predict the classes of image files.

    python eval.py --workdir=/tmp/resnet50 [--checkpoint_step=best] [--ema]
    python eval.py --config=configs/resnet50.py --checkpoint=/tmp/converted --json
    python eval.py --config=configs/resnet50.py --checkpoint=/tmp/converted --image=cat.jpg

--checkpoint takes a train workdir, one of its checkpoints/<step> directories, or a directory
written by `python -m resnet_flax.convert`. With --workdir, --config may be left out: the run's
own config.json is used. A --config given must describe the checkpoint's network.
"""

from absl import app, flags
from ml_collections import config_flags

from resnet_flax import cli

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file('config', None, 'Experiment config file; default with '
                                '--workdir: the config.json the run saved there.',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'A train workdir; evaluates its --checkpoint_step.')
flags.DEFINE_string('checkpoint', None, 'A converted checkpoint, a step directory or a workdir.')
flags.DEFINE_string('checkpoint_step', 'latest', "With --workdir: a step, 'latest' or 'best'.")
flags.DEFINE_string('split', None, "Split to evaluate; default: the config's data.eval_split.")
flags.DEFINE_bool('ema', False, 'Evaluate the moving average of the weights (ema_decay > 0).')
flags.DEFINE_multi_string('image', [], 'Image file to classify (repeatable): prints top-k.')
flags.DEFINE_integer('top_k', 5, 'Classes shown per --image.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of text.')
cli.define_distributed_flags()


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    cli.setup(FLAGS)
    from resnet_flax import eval_checkpoint

    config = FLAGS.config
    if config is None:
        config = eval_checkpoint.saved_config(FLAGS.workdir)
    eval_checkpoint.run(
        config, workdir=FLAGS.workdir, checkpoint=FLAGS.checkpoint,
        checkpoint_step=FLAGS.checkpoint_step, split=FLAGS.split, use_ema=FLAGS.ema,
        images=FLAGS.image, as_json=FLAGS.json, top_k=FLAGS.top_k)


if __name__ == '__main__':
    cli.run(main)
