"""One process of a multi-process job that records what the TFDS pipeline gives it.

    python tests/pod_pipeline.py --coordinator_address=127.0.0.1:PORT --num_processes=2 \
        --process_id=I --data_dir=DIR --out=OUT

Started by tests/test_pod.py once per process, with real `jax.distributed` on localhost. It
asks for batches the way the training loop does (`train._host_batches`, which takes the
process index and count from jax) and the eval split the way `evaluate.evaluate` does, and
saves what it got to OUT/process-I.npz for the test to compare across processes:
- `order_*`: 2 epochs from step 0, with the default random crop;
- `resumed_*`: the batches from RESUME_STEP on, as a resumed run asks for them;
- `share_*`: one epoch with a deterministic recipe, so each image is recognisable by its pixels;
- `eval_*`: the eval split, padding and mask included.
"""

from __future__ import annotations

import itertools

import numpy as np

from tests import pod_process

STEPS_PER_EPOCH = 3  # the test's split: 12 train images, global batch 4
RESUME_STEP = 4  # inside the second epoch
GLOBAL_BATCH = 4
# No random crop or flip: every image can be recognised by its pixels.
DETERMINISTIC = {'train_crop': 'none', 'random_flip': False, 'eval_crop': 'resize'}


def config_for(data_dir: str, **data_overrides):
    import configs.base

    config = configs.base.get_config()
    config.data.update(dataset='imagenet2012', data_dir=data_dir, eval_split='validation',
                       image_size=24, shuffle_buffer_size=64, threadpool_size=2)
    config.data.update(data_overrides)
    config.batch_size = GLOBAL_BATCH
    config.eval_batch_size = GLOBAL_BATCH
    return config


def _stacked(batches: list[dict]) -> dict[str, np.ndarray]:
    return {key: np.stack([b[key] for b in batches]) for key in batches[0]}


def record(data_dir: str) -> dict[str, np.ndarray]:
    """What this process's pipeline yields, by array name (see the module docstring)."""
    import jax

    from resnet_flax import data, evaluate, train

    config = config_for(data_dir)
    deterministic = config_for(data_dir, **DETERMINISTIC)
    wanted = {
        'order': train._host_batches(config, 0),
        'resumed': train._host_batches(config, RESUME_STEP),
        'share': train._host_batches(deterministic, 0),
    }
    counts = {'order': 2 * STEPS_PER_EPOCH, 'resumed': 2 * STEPS_PER_EPOCH - RESUME_STEP,
              'share': STEPS_PER_EPOCH}
    out = {}
    for name, batches in wanted.items():
        for key, value in _stacked(list(itertools.islice(batches, counts[name]))).items():
            out[f'{name}_{key}'] = value
    evaluated = data.eval_batches(
        deterministic.data, global_batch_size=evaluate.eval_batch_size(deterministic),
        process_index=jax.process_index(), process_count=jax.process_count())
    for key, value in _stacked(list(evaluated)).items():
        out[f'eval_{key}'] = value
    out['process_index'] = np.int32(jax.process_index())
    return out


def main() -> None:
    args = pod_process.join('data_dir', 'out')
    np.savez(f'{args.out}/process-{args.process_id}.npz', **record(args.data_dir))


if __name__ == '__main__':
    main()
