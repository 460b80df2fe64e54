"""Images/s and ms/step of the evaluator's jitted forward pass on device-resident synthetic data.

    python -m bench.inference_throughput --config=configs/resnet50.py \
        --batch_size_per_device=256 --dtype=bfloat16 --peak_tflops=790 --json

The step is `resnet_flax.evaluate.make_eval_fn`'s: the model in inference mode (running BN
statistics), the loss and top-1/top-5 sums over the unmasked examples. FLOPs per image are
2 x the multiply-accumulates of `resnet_flax.summary`.
"""

from __future__ import annotations

from absl import app

from bench import common
from resnet_flax import cli

FLAGS = common.FLAGS


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = common.config_from_flags()
    setup = common.setup_eval(config)
    result = common.benchmark_step(setup, inference=True, steps_per_window=FLAGS.steps,
                                   windows=FLAGS.windows, warmup=FLAGS.warmup,
                                   peak_tflops=FLAGS.peak_tflops)
    common.report(result, FLAGS.json)


if __name__ == '__main__':
    common.define_flags()
    cli.run(main)  # bad input: a one-line error, no traceback
