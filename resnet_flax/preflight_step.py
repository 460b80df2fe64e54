"""Compiles the real train and eval steps for a target's devices, and reads what XLA reports.

The step is the trainer's own (`train.build_step_parts` on `sharding.create_mesh(devices)`),
lowered with abstract inputs (`jax.ShapeDtypeStruct`s carrying their shardings): no data, no
weights, no workdir. What comes back is XLA's memory analysis (argument, output, aliased and
temporary bytes per device), its cost analysis (FLOPs, where the backend gives them) and the
collectives in the compiled HLO.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from resnet_flax import sharding, train
from resnet_flax.data import info as data_info

GIB = 2**30
# A slice's stand-in epoch length, for the learning-rate schedule's constants only: the compiled
# program's shape and memory do not depend on it (ImageNet's train split, as synthetic data has).
_NOMINAL_TRAIN_EXAMPLES = 1_281_167
_OUT_OF_MEMORY = ('RESOURCE_EXHAUSTED', 'Ran out of memory', 'out of memory')


@dataclasses.dataclass(frozen=True)
class Collective:
    kind: str  # 'all-reduce', 'all-gather', 'reduce-scatter', 'collective-permute', 'all-to-all'
    count: int
    bytes: int  # the results' bytes, summed over the ops, per device


@dataclasses.dataclass(frozen=True)
class StepReport:
    """One compile of one step at one batch size."""

    batch_per_device: int
    compile_seconds: float
    fits: bool
    error: str = ''  # the compiler's out-of-memory message, when it refused the program
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    flops: float | None = None  # per device per step, from XLA's cost analysis
    collectives: tuple[Collective, ...] = ()

    @property
    def per_device_bytes(self) -> int:
        """What the step holds on a device at its peak: inputs + outputs - donated + temp."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


def for_target(config: ml_collections.ConfigDict) -> tuple[ml_collections.ConfigDict, list[str]]:
    """`config` as it resolves on an accelerator, with a note for each field that changed.

    `model.conv_impl='auto'` means XLA's convolution off the CPU (resnet_flax/conv.py), but
    here the compiling process's own backend is a CPU, so it is pinned to 'xla'.
    """
    config = copy.deepcopy(config)
    notes = []
    if config.model.conv_impl == 'auto':
        config.model.conv_impl = 'xla'
        notes.append("model.conv_impl='auto' compiles as 'xla', as it runs on a TPU or GPU.")
    return config, notes


def with_batch(config: ml_collections.ConfigDict, global_batch: int) -> ml_collections.ConfigDict:
    config = copy.deepcopy(config)
    config.batch_size = global_batch
    return config


def step_parts(config: ml_collections.ConfigDict, devices: Sequence[Any]) -> train.StepParts:
    """The trainer's step parts on a mesh over `devices`, after the trainer's own checks."""
    train.validate_config(config, device_count=len(devices))
    size = int(config.data.image_size)
    steps_per_epoch = max(1, _NOMINAL_TRAIN_EXAMPLES // config.batch_size)
    return train.build_step_parts(config, (size, size, data_info.CHANNELS), steps_per_epoch,
                                  sharding.create_mesh(devices=devices))


def _batch(mesh, global_batch: int, image_size: int, with_mask: bool) -> dict[str, Any]:
    spec = sharding.batch_sharding(mesh)
    batch = {
        'image': jax.ShapeDtypeStruct((global_batch, image_size, image_size, data_info.CHANNELS),
                                      jnp.uint8, sharding=spec),
        'label': jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=spec),
    }
    if with_mask:
        batch['mask'] = jax.ShapeDtypeStruct((global_batch,), jnp.bool_, sharding=spec)
    return batch


def compile_train_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                       budget_bytes: float) -> StepReport:
    """Compiles `config`'s train step for `devices`; fits when XLA accepts it within budget."""
    parts = step_parts(config, devices)
    batch = _batch(parts.mesh, config.batch_size, int(config.data.image_size), False)
    return _compile(parts.train_step, (parts.target, batch), config.batch_size // len(devices),
                    budget_bytes)


def compile_eval_step(config: ml_collections.ConfigDict, devices: Sequence[Any],
                      budget_bytes: float) -> StepReport:
    parts = step_parts(config, devices)
    global_batch = config.eval_batch_size or config.batch_size
    batch = _batch(parts.mesh, global_batch, data_info.eval_image_size(config.data), True)
    return _compile(parts.eval_fn, (parts.target.variables(), batch),
                    global_batch // len(devices), budget_bytes)


def _compile(jitted, args, batch_per_device: int, budget_bytes: float) -> StepReport:
    start = time.perf_counter()
    try:
        compiled = jitted.lower(*args).compile()
    except Exception as error:  # noqa: BLE001 - XLA's error type varies by backend
        if not any(text in str(error) for text in _OUT_OF_MEMORY):
            raise
        return StepReport(batch_per_device, time.perf_counter() - start, fits=False,
                          error=_first_line(str(error)))
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    report = StepReport(
        batch_per_device, seconds, fits=True,
        argument_bytes=memory.argument_size_in_bytes, output_bytes=memory.output_size_in_bytes,
        alias_bytes=memory.alias_size_in_bytes, temp_bytes=memory.temp_size_in_bytes,
        flops=_flops(compiled), collectives=tuple(collectives(compiled.as_text())))
    return dataclasses.replace(report, fits=report.per_device_bytes <= budget_bytes)


def _first_line(message: str) -> str:
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    useful = [line for line in lines if any(t in line for t in _OUT_OF_MEMORY)]
    return (useful or lines or ['out of memory'])[0][:300]


def _flops(compiled) -> float | None:
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older JAX: one dict per program
        analysis = analysis[0] if analysis else None
    flops = (analysis or {}).get('flops')
    return float(flops) if flops and flops > 0 else None


# ---------------------------------------------------------------------------------------------
# Collectives in the compiled HLO

_COLLECTIVE = re.compile(
    r'=\s*(?P<shape>.+?)\s+(?P<kind>all-reduce|all-gather|reduce-scatter|collective-permute|'
    r'all-to-all)(?P<start>-start)?\(')
_ARRAY = re.compile(r'\b(pred|[subf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]')
_BYTES = {'pred': 1, 'bf16': 2, 'c64': 8, 'c128': 16}


def _array_bytes(dtype: str, dims: str) -> int:
    size = _BYTES.get(dtype) or (1 if dtype.startswith('f8') else max(1, int(dtype[1:]) // 8))
    return size * math.prod(int(d) for d in dims.split(',') if d)


def collectives(hlo_text: str) -> list[Collective]:
    """Collective ops of a compiled module, by kind: count and result bytes per device.

    An async `-start` op's result also holds its operands (all-gather, collective-permute):
    there only the second half of the tuple, the results, is counted.
    """
    found: dict[str, list[int]] = {}
    for match in _COLLECTIVE.finditer(hlo_text):
        arrays = [_array_bytes(*a) for a in _ARRAY.findall(match['shape'])]
        if match['start'] and match['kind'] != 'all-reduce' and len(arrays) > 1:
            arrays = arrays[len(arrays) // 2:]
        count_bytes = found.setdefault(match['kind'], [0, 0])
        count_bytes[0] += 1
        count_bytes[1] += sum(arrays)
    return [Collective(kind, n, b) for kind, (n, b) in sorted(found.items())]


# ---------------------------------------------------------------------------------------------
# The largest batch that fits


@dataclasses.dataclass(frozen=True)
class Search:
    """The largest per-device batch found to fit, and the smallest found not to."""

    fits: int | None  # largest per-device batch that compiled within budget (None: none did)
    does_not_fit: int | None  # smallest that did not (None: none tried failed)
    step: int  # batches tried are multiples of this
    compiles: int
    seconds: float


def _next_probe(reports: dict[int, StepReport], lo: int | None, hi: int | None,
                budget: float, step: int) -> int:
    """The next batch to compile: where the memory line of the compiles so far meets the
    budget (memory is affine in the batch), kept strictly between the known bounds."""
    measured = sorted((b, r.per_device_bytes) for b, r in reports.items() if r.per_device_bytes)
    if len(measured) >= 2:
        (b1, m1), (b2, m2) = measured[0], measured[-1]
        slope = max((m2 - m1) / (b2 - b1), 1.0)
        guess = b2 + (budget - m2) / slope
    elif measured:
        b1, m1 = measured[0]
        guess = b1 * budget / m1  # no second point yet: proportional (over-estimates a little)
    else:
        guess = (hi or step * 2) / 2
    probe = max(step, int(guess) // step * step)
    if lo is not None and probe <= lo:
        probe = lo + step
    if hi is not None and probe >= hi:
        probe = max(step, (hi - step) // step * step)
        if lo is not None and (hi - lo) > 2 * step:
            probe = (lo + hi) // 2 // step * step
    return probe


def largest_fitting_batch(compile_at, first: StepReport, budget: float, step: int,
                          max_compiles: int, limit: int = 8192) -> Search:
    """Compiles at most `max_compiles` more batch sizes (`compile_at(per_device_batch)`),
    narrowing the largest that fits down to `step` examples per device; batches above `limit`
    per device are not tried."""
    start = time.perf_counter()
    reports = {first.batch_per_device: first}
    lo = first.batch_per_device if first.fits else None
    hi = None if first.fits else first.batch_per_device
    compiles = 0
    while compiles < max_compiles and not (lo and hi and hi - lo <= step) and (lo or 0) < limit:
        probe = min(_next_probe(reports, lo, hi, budget, step), limit)
        if probe in reports or (hi is not None and probe >= hi) or (lo and probe <= lo):
            break
        reports[probe] = report = compile_at(probe)
        compiles += 1
        if report.fits:
            lo = max(lo or 0, probe)
        else:
            hi = min(hi or probe, probe)
    return Search(lo, hi, step, compiles, time.perf_counter() - start)


def search_step(config: ml_collections.ConfigDict) -> int:
    """Per-device batches are tried in multiples of 8 (and of grad_accum_steps)."""
    return math.lcm(8, max(1, int(config.grad_accum_steps)))
