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


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    common.run_step_benchmark(inference=True)


if __name__ == '__main__':
    common.define_flags()
    cli.run(main)  # bad input: a one-line error, no traceback
