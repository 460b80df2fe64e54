"""Accelerators a run can be compiled for without having them: chips, slices and GPU nodes.

A target names the hardware (`v5p-128`, `v5e-16`, `v5p:4x4x4`, `h200`, `8xh100`, ...); `devices`
turns it into JAX's compile-only devices for `jax.jit(...).lower(...).compile()`, through
`jax.experimental.topologies` (TPU: libtpu, `pip install 'jax[tpu]'`; GPU: the CUDA plugin,
`pip install 'jax[cuda12]'`, and a GpuTargetConfig kept in `gpu_targets/`). No accelerator,
driver or network is needed.

Names follow Google Cloud's accelerator types: the number after v4 and v5p counts TensorCores,
two per chip (v5p-128 is 64 chips, 4x4x4), while after v5e (v5litepod) and v6e it counts
chips, which have one TensorCore each (cloud.google.com/tpu/docs/v5p: "--accelerator-type
specifies the number of TensorCores"; .../v5e and .../v6e: one TensorCore per chip).
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re


@dataclasses.dataclass(frozen=True)
class Chip:
    """One accelerator chip's published figures."""

    name: str
    platform: str  # 'tpu' or 'gpu'
    memory_gib: float  # HBM per chip
    peak_bf16_tflops: float  # dense bf16 matrix-unit peak per chip
    dcn_gbps: float | None  # data-centre network per chip, Gbit/s (TPU multi-slice)
    source: str


# Published figures, read 2026-12-04. TPU memory is what Google lists per chip (GB or GiB; XLA's
# TPU compiler itself refuses a program that does not fit). GPU memory is the target config's
# device_memory_size (what the CUDA driver reports), in GiB.
CHIPS = {
    'v4': Chip('v4', 'tpu', 32, 275, None, 'cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('v5e', 'tpu', 16, 197, 50, 'cloud.google.com/tpu/docs/v5e (2 x 100 Gbps NICs '
                'per 4-chip host)'),
    'v5p': Chip('v5p', 'tpu', 95, 459, 50, 'cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('v6e', 'tpu', 32, 918, None, 'cloud.google.com/tpu/docs/v6e'),
    'a100-40gb': Chip('a100-40gb', 'gpu', 39.4, 312, None,
                      'NVIDIA A100 datasheet (bf16 dense); OpenXLA gpu_specs/a100_sxm_40'),
    'a100-80gb': Chip('a100-80gb', 'gpu', 79.3, 312, None,
                      'NVIDIA A100 datasheet (bf16 dense); OpenXLA gpu_specs/a100_sxm_80'),
    'h100': Chip('h100', 'gpu', 79.1, 989, None,
                 'NVIDIA H100 SXM datasheet (bf16 dense); OpenXLA gpu_specs/h100_sxm'),
    'h200': Chip('h200', 'gpu', 140.4, 989, None,
                 'NVIDIA H200 datasheet: 141 GB HBM3e, bf16 dense as H100 SXM'),
    'b200': Chip('b200', 'gpu', 179.1, 2250, None,
                 'NVIDIA HGX B200 datasheet: bf16 2.25 PFLOPS dense, ~180 GB usable'),
}
GPU_ALIASES = {'a100': None, 'h100-80gb': 'h100', 'h100-sxm': 'h100', 'h200-141gb': 'h200'}
GPUS_PER_HOST = 8  # HGX/DGX nodes; more GPUs than this are several hosts
# libtpu's topology names, by the generation names users type.
_TPU_TOPOLOGY_PREFIX = {'v4': 'v4', 'v5p': 'v5p', 'v5e': 'v5e', 'v5litepod': 'v5e', 'v6e': 'v6e'}
_TENSORCORES_PER_CHIP = {'v4': 2, 'v5p': 2, 'v5e': 1, 'v6e': 1}


@dataclasses.dataclass(frozen=True)
class Target:
    """What preflight compiles for: a chip, how many, and how they are laid out."""

    name: str  # as the user typed it
    chip: Chip
    topology: str  # libtpu's 'v5p:4x4x4', or the GPU plugin's 'slices x hosts x per-host'
    num_slices: int = 1
    chips_per_host_bounds: tuple[int, ...] | None = None  # TPU single-host 8-chip v5e/v6e

    @property
    def platform(self) -> str:
        return self.chip.platform


def _grow(start: tuple[int, ...], chips: int) -> tuple[int, ...]:
    """The slice shape Google uses for `chips` (a power of two): double the smallest side."""
    dims = sorted(start)
    while math.prod(dims) < chips:
        dims[0] *= 2
        dims.sort()
    return tuple(dims)


def _tpu_from_name(name: str, generation: str, count: int, num_slices: int) -> Target:
    per_chip = _TENSORCORES_PER_CHIP[_TPU_TOPOLOGY_PREFIX[generation]]
    chips = count // per_chip
    three_d = per_chip == 2
    smallest = 4 if three_d else 1
    if count % per_chip or chips < smallest or chips & (chips - 1):
        unit = 'TensorCores (2 per chip)' if three_d else 'chips'
        raise ValueError(
            f'--target={name}: {generation}-N counts {unit}; N must be a power of two of at '
            f'least {smallest * per_chip} (e.g. {generation}-{8 if three_d else 16}), or give the '
            f'shape: --target={_TPU_TOPOLOGY_PREFIX[generation]}:'
            f'{"4x4x12" if three_d else "8x16"}.')
    # 3-D slices: 2x2x1 (one host), then 2x2x2, 2x2x4, 2x4x4, 4x4x4, ... as Google lists them.
    shape = ((2, 2, 1) if chips == 4 else _grow((2, 2, 2), chips)) if three_d else _grow(
        (1, 1), chips)
    prefix = _TPU_TOPOLOGY_PREFIX[generation]
    host_bounds = _single_host_bounds(prefix, chips)
    return Target(name, CHIPS[prefix], f'{prefix}:{"x".join(map(str, shape))}', num_slices,
                  host_bounds)


def _single_host_bounds(prefix: str, chips: int) -> tuple[int, ...] | None:
    """v5e and v6e slices of up to 8 chips are one host (ct5lp-hightpu-8t, ct6e-standard-8t);
    libtpu's default would split 8 chips over two 4-chip hosts."""
    if prefix in ('v5e', 'v6e') and chips <= 8:
        return {1: (1, 1, 1), 2: (1, 2, 1), 4: (2, 2, 1), 8: (2, 4, 1)}[chips]
    return None


def _tpu_from_topology(name: str, num_slices: int) -> Target:
    prefix, _, shape = name.partition(':')
    generation = _TPU_TOPOLOGY_PREFIX.get(prefix)
    dims = shape.split('x')
    if generation is None or not all(d.isdigit() and int(d) > 0 for d in dims):
        raise ValueError(f'--target={name}: a TPU topology is GENERATION:AxB[xC] with GENERATION '
                         f'one of {sorted(set(_TPU_TOPOLOGY_PREFIX.values()))}, e.g. v5p:4x4x4.')
    wanted = 3 if _TENSORCORES_PER_CHIP[generation] == 2 else 2
    if len(dims) != wanted:
        raise ValueError(f'--target={name}: {generation} slices have {wanted} dimensions '
                         f'(e.g. {"v5p:4x4x4" if wanted == 3 else "v5e:4x8"}).')
    chips = math.prod(int(d) for d in dims)
    return Target(name, CHIPS[generation], f'{generation}:{shape}', num_slices,
                  _single_host_bounds(generation, chips))


def _gpu(name: str, count: int, model: str, num_slices: int) -> Target:
    if model in GPU_ALIASES:
        if GPU_ALIASES[model] is None:
            raise ValueError(f'--target={name}: say which {model}: {model}-40gb or {model}-80gb.')
        model = GPU_ALIASES[model]
    if num_slices != 1:
        raise ValueError(f'--target={name}: --num_slices is for TPU slices; for more GPUs give '
                         f'the count, e.g. --target=16x{model} (two 8-GPU hosts).')
    if count > GPUS_PER_HOST and count % GPUS_PER_HOST:
        raise ValueError(f'--target={name}: more than {GPUS_PER_HOST} GPUs are whole '
                         f'{GPUS_PER_HOST}-GPU hosts; use a multiple of {GPUS_PER_HOST}.')
    hosts = max(1, count // GPUS_PER_HOST)
    return Target(name, CHIPS[model], f'1x{hosts}x{count // hosts}')


def parse_target(name: str, num_slices: int = 1) -> Target:
    """`v5p-128`, `v5e-16`, `v6e-8`, `v4-32`, `v5p:4x4x4`, `h200`, `8xh100`, `a100-80gb`, ..."""
    text = name.strip().lower()
    if num_slices < 1:
        raise ValueError(f'--num_slices={num_slices} must be >= 1.')
    if ':' in text:
        return _tpu_from_topology(text, num_slices)
    tpu = re.fullmatch(r'(v4|v5p|v5e|v5litepod|v6e)-(\d+)', text)
    if tpu:
        return _tpu_from_name(text, tpu[1], int(tpu[2]), num_slices)
    gpu = re.fullmatch(r'(?:(\d+)\s*x\s*)?([a-z0-9-]+)', text)
    model = gpu[2] if gpu else ''
    if gpu and (model in GPU_ALIASES or (model in CHIPS and CHIPS[model].platform == 'gpu')):
        count = int(gpu[1] or 1)
        if count < 1:
            raise ValueError(f'--target={name}: the GPU count must be >= 1.')
        return _gpu(name, count, model, num_slices)
    gpus = ', '.join(k for k, c in CHIPS.items() if c.platform == 'gpu')
    raise ValueError(
        f'--target={name} is not a known accelerator: give a TPU slice (v4-32, v5e-16, v5p-128, '
        f'v6e-8, or a topology like v5p:4x4x4) or a GPU model with an optional count '
        f'(8xh100; models: {gpus}).')


def gpu_target_config(chip: Chip) -> str:
    """The GpuTargetConfig text proto kept for `chip` (resnet_flax/gpu_targets/)."""
    return (importlib.resources.files('resnet_flax') / 'gpu_targets' / f'{chip.name}.txtpb'
            ).read_text()


def devices(target: Target) -> list:
    """JAX's compile-only devices of `target` (every host's, in one process)."""
    from jax.experimental import topologies

    if target.platform == 'tpu':
        # libtpu takes a machine-wide lock (/tmp/libtpu_lockfile) for the TPU it would drive;
        # compiling drives none, so several compiles (tests, a table) may run side by side.
        os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
        extra = {'num_slices': target.num_slices} if target.num_slices > 1 else {}
        if target.chips_per_host_bounds:
            extra['chips_per_host_bounds'] = target.chips_per_host_bounds
        if _TENSORCORES_PER_CHIP[target.chip.name] == 2:
            # One JAX device per chip, its two TensorCores together, as on a v4 or v5p VM
            # (libtpu's default for v4 would be one device per TensorCore).
            extra['chip_config_name'] = 'megacore'
        try:
            return topologies.get_topology_desc(target.topology, platform='tpu', **extra).devices
        except RuntimeError as error:
            if 'TPU support not installed' in str(error):
                raise RuntimeError("Compiling for TPUs needs libtpu (no TPU): pip install -e "
                                   "'.[tpu]' (or pip install 'jax[tpu]').") from None
            raise
    try:
        return topologies.get_topology_desc(
            platform='cuda', target_config=gpu_target_config(target.chip),
            topology=target.topology).devices
    except (RuntimeError, NotImplementedError) as error:
        raise RuntimeError(
            "Compiling for GPUs needs JAX's CUDA plugin (no GPU or driver): pip install -e "
            f"'.[cuda12]' (or pip install 'jax[cuda12]'); JAX said: {str(error)[:120]}"
        ) from None
