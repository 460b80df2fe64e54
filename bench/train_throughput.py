"""Images/s and ms/step of the trainer's jitted train step on device-resident synthetic data.

    python -m bench.train_throughput --config=configs/resnet50.py --batch_size_per_device=256 \
        --dtype=bfloat16 --peak_tflops=790 --json

The step is `resnet_flax.train.jit_train_step`: forward, backward, the config's optimizer and
schedule, BN statistics updates and weight decay, with the state donated. Reports the compile
time, the median of `--windows` timed windows, the peak device memory (where the backend tracks
it), and the model FLOPs utilisation against `--peak_tflops` (train FLOPs = 3 x forward FLOPs,
forward = 2 x the multiply-accumulates of `resnet_flax.summary`).
"""

from __future__ import annotations

from absl import app

from bench import common
from resnet_flax import cli


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    common.run_step_benchmark(inference=False)


if __name__ == '__main__':
    common.define_flags()
    cli.run(main)  # bad input: a one-line error, no traceback
