"""NVIDIA DALI loader (data.loader='dali'): JPEG decode and crop on the GPU.

UNTESTED: nvidia-dali is not installed where this project's tests run (no GPU), so this
module is only checked to fail with a one-line error when DALI is missing. Treat it as a
starting point, measure it against data.loader='grain' on your machine before relying on it.

What it does: the same records and the same order as the grain loader (grain_source.py:
index-level epochs from (seed, epoch), this process's slice of each global batch, exact
eval with masked padding), fed to DALI with `fn.external_source` as encoded bytes; DALI
decodes on the GPU ('mixed' decoders, nvJPEG): a random-area crop for training
(data.inception_area_range / inception_aspect_range, DALI's sampler, keyed by its own seed
rather than per example) or the centre crop for eval, resized to the train / eval size.
Batches are uint8 [B_local, S, S, 3] jax arrays already on this process's first GPU (the
DALI JAX plugin), 'label' int32 numpy; flips and normalisation stay in the step as for the
other loaders. Resuming skips the consumed batches without decoding them; the crops after
a resume differ from the uninterrupted run's (DALI's random state is not per example).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

import ml_collections
import numpy as np

from resnet_flax.data import budget as budget_lib
from resnet_flax.data import grain_source
from resnet_flax.data import info as info_lib

Batch = info_lib.Batch


def available() -> bool:
    try:
        return importlib.util.find_spec('nvidia.dali') is not None
    except ModuleNotFoundError:  # no 'nvidia' namespace package at all
        return False


def _dali():
    if not available():
        raise ValueError("data.loader='dali' needs NVIDIA DALI: pip install "
                         'nvidia-dali-cuda120 (GPU machines), or set data.loader=grain.')
    from nvidia import dali
    from nvidia.dali.plugin import jax as dali_jax

    return dali, dali_jax


def get_info(data_cfg: ml_collections.ConfigDict) -> info_lib.DatasetInfo:
    _dali()
    return grain_source.get_info(data_cfg)


def _pipeline(data_cfg, feed, local: int, size: int, train: bool, seed: int):
    dali, _ = _dali()
    fn, types = dali.fn, dali.types
    threads = budget_lib.compute(data_cfg).threads

    @dali.pipeline_def(batch_size=local, num_threads=threads, device_id=0, seed=seed,
                       prefetch_queue_depth=max(int(data_cfg.prefetch_batches), 1))
    def pipe():
        encoded, label = fn.external_source(source=feed, num_outputs=2, batch=True,
                                            dtype=[types.UINT8, types.INT32])
        if train:
            images = fn.decoders.image_random_crop(
                encoded, device='mixed', output_type=types.RGB,
                random_area=list(data_cfg.inception_area_range),
                random_aspect_ratio=list(data_cfg.inception_aspect_range))
            images = fn.resize(images, resize_x=size, resize_y=size)
        else:
            images = fn.decoders.image(encoded, device='mixed', output_type=types.RGB)
            short = size / float(data_cfg.eval_crop_fraction)
            images = fn.resize(images, resize_shorter=short)
            images = fn.crop(images, crop=(size, size))
        return images, label

    return pipe()


def _feed(source, planned: list[list[int]]):
    """external_source callback: batch i of `planned` record indices as bytes + labels."""
    def batch(info):
        if info.iteration >= len(planned):
            raise StopIteration
        pairs = [source[i] for i in planned[info.iteration]]
        return ([np.frombuffer(encoded, np.uint8) for encoded, _ in pairs],
                [np.int32(label) for _, label in pairs])

    return batch


def _run(pipe, steps: int, masks: list[np.ndarray] | None) -> Iterator[Batch]:
    _, dali_jax = _dali()
    iterator = dali_jax.DALIGenericIterator([pipe], ['image', 'label'], size=-1)
    for step, batch in zip(range(steps), iterator, strict=False):
        out = {'image': batch['image'], 'label': np.asarray(batch['label']).reshape(-1)}
        if masks is not None:
            out['mask'] = masks[step]
        yield out


def train_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, seed: int,
                  start_step: int, process_index: int, process_count: int) -> Iterator[Batch]:
    source = grain_source.records(data_cfg, data_cfg.train_split)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    plan = grain_source.TrainPlan(len(source), global_batch_size, local, process_index, seed)
    step = start_step
    while True:  # one DALI pipeline per epoch, fed this process's slices in our order
        epoch, first = divmod(step, plan.steps_per_epoch)
        planned = [[plan[(epoch * plan.steps_per_epoch + k) * local + j][0] for j in range(local)]
                   for k in range(first, plan.steps_per_epoch)]
        pipe = _pipeline(data_cfg, _feed(source, planned), local, int(data_cfg.image_size),
                         train=True, seed=int(info_lib.rng(seed, epoch, process_index)
                                              .integers(2**31)))
        yield from _run(pipe, len(planned), None)
        step += len(planned)


def eval_batches(data_cfg: ml_collections.ConfigDict, *, global_batch_size: int, split: str,
                 process_index: int, process_count: int) -> Iterator[Batch]:
    if data_cfg.get('eval_preset', '') == 'torchvision':
        raise ValueError("data.eval_preset='torchvision' is implemented by the 'tf' and 'grain' "
                         "loaders; evaluate with data.loader='grain' (or 'tf').")
    source = grain_source.records(data_cfg, split)
    local = info_lib.local_batch_size(global_batch_size, process_count)
    num_batches = info_lib.eval_batch_count(len(source), global_batch_size)
    positions = (np.arange(num_batches)[:, None] * global_batch_size + process_index * local
                 + np.arange(local)[None])
    masks = list(positions < len(source))
    planned = [[int(p) if p < len(source) else 0 for p in row] for row in positions]
    pipe = _pipeline(data_cfg, _feed(source, planned), local,
                     info_lib.eval_image_size(data_cfg), train=False, seed=0)
    for batch in _run(pipe, num_batches, masks):
        # Padding slots decoded record 0; the mask drops them, their labels read 0.
        batch['label'] = np.where(batch['mask'], batch['label'], 0)
        yield batch
