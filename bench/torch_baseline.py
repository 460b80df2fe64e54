"""The PyTorch baseline: a ResNet train step in PyTorch, optionally alternated with ours.

    # GPU: torchvision's resnet50, torch.compile, channels-last, bf16 autocast, SGD
    python -m bench.torch_baseline --config=configs/resnet50.py --batch_size_per_device=256 \
        --dtype=bfloat16 --json
    # CPU: plain eager float32, alternating windows with this project's JAX step in one process
    python -m bench.torch_baseline --config=configs/resnet50.py --batch_size_per_device=8 \
        --image_size=112 --with_jax --steps=2 --windows=3

The network is the config's (`model` section): torchvision's `resnet{depth}` when torchvision is
importable and the config is that standard member, else (also when torchvision fails to import
or to build the model, as one built for another torch does) the same architecture built here with
torch.nn (ImageNet or CIFAR stem, projection (B) or zero-padded (A) shortcuts where the shape
changes, stride on the 3x3 conv: torchvision's layout, so parameter counts match this project's
models; `configs/digits.py`, the quick start, is a CIFAR ResNet-8 with A shortcuts). The step
is the usual PyTorch one: forward under autocast, cross-entropy (with the config's label smoothing),
backward, SGD with the config's momentum, Nesterov and weight decay (1-D parameters not
decayed, as in this project's default), on one synthetic batch already on the device.

`--torch_compile` and `--channels_last` default to on with a GPU and off on CPU. If
torch.compile fails (at the call or at the first step, where it compiles), the step runs eager
and the result says why (`torch_compile_error`). With
`--with_jax`, windows of this project's jitted train step (`bench.common`) and of the PyTorch
step alternate in one process, so machine noise falls on both alike, and the ratio is printed;
each `--jax_xla_options='name=value,...'` adds one more JAX side, the same step compiled with
those XLA options (e.g. `xla_cpu_use_onednn=true`), to the same alternation.
Without `--with_jax`, JAX stays on the CPU (it only counts the model's multiply-accumulates);
with it, JAX allocates GPU memory as it goes (XLA_PYTHON_CLIENT_PREALLOCATE=false) so that
PyTorch has room too.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import time
from typing import Any

import jax
import ml_collections
from absl import app, flags, logging

from bench import common
from resnet_flax import cli, models, optim

FLAGS = common.FLAGS
flags.DEFINE_enum('torch_compile', 'auto', ['auto', 'yes', 'no'],
                  'torch.compile the model; auto = yes on a GPU, no on CPU.')
flags.DEFINE_enum('channels_last', 'auto', ['auto', 'yes', 'no'],
                  'Channels-last memory format; auto = yes on a GPU, no on CPU.')
flags.DEFINE_string('torch_compile_backend', 'inductor',
                    "torch.compile's backend (a name torch does not know exercises the eager "
                    'fallback).')
flags.DEFINE_bool('with_jax', False, "Alternate timed windows with this project's train step.")
flags.DEFINE_bool('torchvision', True, "Use torchvision's model when it is importable.")
flags.DEFINE_integer('torch_threads', 0, "PyTorch's CPU threads; 0 = its default (one per core).")
flags.DEFINE_multi_string(
    'jax_xla_options', [],
    "With --with_jax: one more JAX side per use, the same step compiled with these XLA options "
    "('name=value,...', e.g. 'xla_cpu_use_onednn=true'), timed in the same alternation.")
flags.DEFINE_bool('omp_passive', True,
                  'OMP_WAIT_POLICY=PASSIVE for PyTorch (unless set): on a shared CPU, OpenMP '
                  'threads that spin at each barrier wait for descheduled peers, and small ops '
                  'take tens of ms.')


# ---------------------------------------------------------------------------------------------
# The network in torch.nn (torchvision's layout)


def build_torch_model(model_cfg: ml_collections.ConfigDict,
                      use_torchvision: bool = True) -> tuple[Any, str]:
    """The config's ResNet as a torch module, and where it came from."""
    flax_model = models.from_config(model_cfg)
    _check_torch_can_build(flax_model)
    fallback = 'torch.nn (bench/torch_baseline.py)'
    if use_torchvision:
        try:
            model = _torchvision_model(flax_model, int(model_cfg.depth))
        except Exception as error:  # e.g. a torchvision built for another torch: own network
            logging.warning('torchvision failed, using the own torch.nn network: %r', error)
            model, fallback = None, f'{fallback}; torchvision failed: {error!r:.200}'
        if model is not None:
            return model, f'torchvision.models.resnet{int(model_cfg.depth)}'
    return _torch_nn_model(flax_model), fallback


def _check_torch_can_build(flax_model: models.ResNet) -> None:
    buildable = dict(stem=('imagenet', 'cifar'), shortcut=('A', 'B'), stride_placement=('v1.5',),
                     preactivation=(False,), avg_down=(False,), se_ratio=(0.0,))
    for field, valid in buildable.items():
        if getattr(flax_model, field) not in valid:
            raise ValueError(f'model.{field}={getattr(flax_model, field)!r}: the PyTorch '
                             f'baseline builds {field} in {valid} only.')


def _torch_nn_model(flax_model: models.ResNet) -> Any:
    """Stem, stages of blocks (stride 2 in the first block of every stage but the first), pool,
    head; convs initialised as torchvision does."""
    import torch.nn as nn

    layers = _torch_stem(flax_model)
    width = flax_model.stem_width
    for i, (size, stage_width) in enumerate(
            zip(flax_model.stage_sizes, flax_model.stage_widths, strict=True)):
        features, inner = flax_model.block_widths(stage_width)
        for j in range(size):
            layers.append(_torch_block(flax_model, width, features, inner,
                                       stride=2 if i > 0 and j == 0 else 1))
            width = features
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, flax_model.num_classes)]
    model = nn.Sequential(*layers)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode='fan_out', nonlinearity='relu')
    return model


def _torch_bn(flax_model: models.ResNet, channels: int) -> Any:
    import torch.nn as nn

    # torch's momentum weighs the new batch, flax's the running average.
    return nn.BatchNorm2d(channels, eps=flax_model.bn_epsilon,
                          momentum=1.0 - flax_model.bn_momentum)


def _torch_stem(flax_model: models.ResNet) -> list[Any]:
    import torch.nn as nn

    width = flax_model.stem_width
    if flax_model.stem == 'cifar':
        return [nn.Conv2d(3, width, 3, 1, 1, bias=False), _torch_bn(flax_model, width),
                nn.ReLU(inplace=True)]
    return [nn.Conv2d(3, width, 7, 2, 3, bias=False), _torch_bn(flax_model, width),
            nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)]


def _torch_block(flax_model: models.ResNet, in_ch: int, features: int, inner: int,
                 stride: int) -> Any:
    """A post-activation block, its stride on the 3x3 conv (v1.5) as torchvision's."""
    import torch.nn as nn

    def bn(channels):
        return _torch_bn(flax_model, channels)

    if flax_model.block == 'bottleneck':
        main = nn.Sequential(
            nn.Conv2d(in_ch, inner, 1, bias=False), bn(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, inner, 3, stride, 1, groups=flax_model.groups, bias=False),
            bn(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, features, 1, bias=False), bn(features))
    else:
        main = nn.Sequential(
            nn.Conv2d(in_ch, inner, 3, stride, 1, bias=False), bn(inner), nn.ReLU(inplace=True),
            nn.Conv2d(inner, features, 3, 1, 1, bias=False), bn(features))
    residual, zero_pad_shortcut = _torch_module_classes()
    if stride == 1 and in_ch == features:
        shortcut = nn.Identity()
    elif flax_model.shortcut == 'A':
        shortcut = zero_pad_shortcut(stride, features - in_ch)
    else:
        shortcut = nn.Sequential(nn.Conv2d(in_ch, features, 1, stride, bias=False), bn(features))
    return residual(main, shortcut)


@functools.cache
def _torch_module_classes() -> tuple[type, type]:
    """The two modules torch.nn lacks, defined on first use: torch is optional."""
    import torch.nn as nn

    class Residual(nn.Module):
        def __init__(self, main: nn.Module, shortcut: nn.Module):
            super().__init__()
            self.main, self.shortcut = main, shortcut

        def forward(self, x):
            return (self.main(x) + self.shortcut(x)).relu_()

    class ZeroPadShortcut(nn.Module):  # option A: strided identity, extra channels zero
        def __init__(self, stride: int, extra: int):
            super().__init__()
            self.stride, self.extra = stride, extra

        def forward(self, x):
            x = x[:, :, ::self.stride, ::self.stride]
            return nn.functional.pad(x, (0, 0, 0, 0, 0, self.extra))

    return Residual, ZeroPadShortcut


def _torchvision_model(flax_model: models.ResNet, depth: int):
    """torchvision's resnet{depth} if it is installed and the config is that member; raises
    what a broken torchvision raises (importing or building the model)."""
    if importlib.util.find_spec('torchvision') is None:
        return None
    import torchvision
    name = f'resnet{depth}'
    if name not in models.REGISTRY or not hasattr(torchvision.models, name):
        return None
    standard = models.create(name, num_classes=flax_model.num_classes)
    same = ('block', 'stage_sizes', 'stage_widths', 'stem', 'stem_width', 'shortcut',
            'stride_placement', 'preactivation', 'avg_down', 'width_multiplier', 'groups',
            'base_width', 'se_ratio')
    if any(tuple(getattr(standard, f)) != tuple(getattr(flax_model, f))
           if isinstance(getattr(standard, f), (list, tuple))
           else getattr(standard, f) != getattr(flax_model, f) for f in same):
        return None
    return getattr(torchvision.models, name)(num_classes=flax_model.num_classes)


def count_parameters(model: Any) -> int:  # a torch.nn.Module
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------
# The step


def _choice(flag: str, cuda: bool) -> bool:
    return {'yes': True, 'no': False}.get(flag, cuda)


class TorchSetup:
    """The model, optimizer, one synthetic batch on the device, and a train step over them."""

    def __init__(self, config, compile_model: str = 'auto', channels_last: str = 'auto',
                 threads: int = 0, use_torchvision: bool = True,
                 compile_backend: str = 'inductor'):
        import torch
        import torch.nn.functional as F  # noqa: N812 (the usual name)

        self.torch = torch
        self.cuda = torch.cuda.is_available()
        if threads:
            torch.set_num_threads(threads)
        if self.cuda:
            torch.backends.cudnn.benchmark = True  # pick the fastest conv algorithms
        self.device = torch.device('cuda' if self.cuda else 'cpu')
        dtype = str(config.model.dtype)
        if dtype not in ('float32', 'bfloat16'):
            raise ValueError(f'--dtype={dtype!r}: the PyTorch baseline runs float32 or bfloat16.')
        self.autocast_dtype = torch.bfloat16 if dtype == 'bfloat16' else None
        self.compiled = _choice(compile_model, self.cuda)
        self.channels_last = _choice(channels_last, self.cuda)
        memory_format = torch.channels_last if self.channels_last else torch.contiguous_format

        model, self.source = build_torch_model(config.model, use_torchvision)
        self.params = count_parameters(model)
        model = model.to(self.device, memory_format=memory_format).train()
        opt = config.optimizer
        if opt.name != 'sgd':
            raise ValueError(f'config.optimizer.name={opt.name!r}: the PyTorch baseline is SGD; '
                             'pass --config.optimizer.name=sgd.')
        decay = opt.weight_decay if opt.weight_decay_type in ('', 'l2') else 0.0
        params = list(model.parameters())
        groups = [
            dict(params=[p for p in params if p.ndim > 1 or opt.decay_norm_and_bias],
                 weight_decay=decay),
            dict(params=[p for p in params if p.ndim <= 1 and not opt.decay_norm_and_bias],
                 weight_decay=0.0),
        ]
        kwargs = dict(lr=optim.peak_learning_rate(config), momentum=opt.momentum,
                      nesterov=opt.nesterov and opt.momentum > 0)
        groups = [g for g in groups if g['params']]
        self.optimizer_impl = 'default'
        try:  # one fused kernel for the whole update, where this torch build has it
            self.optimizer = torch.optim.SGD(groups, fused=self.cuda, **kwargs)
            self.optimizer_impl = 'fused' if self.cuda else 'for-loop'
        except (RuntimeError, TypeError, ValueError):
            self.optimizer = torch.optim.SGD(groups, **kwargs)
        self.model = torch.compile(model, backend=compile_backend) if self.compiled else model

        size, batch = int(config.data.image_size), int(config.batch_size)
        generator = torch.Generator().manual_seed(config.seed)
        self.images = torch.randn(batch, 3, size, size, generator=generator).to(
            self.device, memory_format=memory_format)
        self.labels = torch.randint(0, config.model.num_classes, (batch,),
                                    generator=generator).to(self.device)
        self.label_smoothing = float(config.label_smoothing)
        self.cross_entropy = F.cross_entropy
        self.loss = None

    def step(self) -> None:
        with self.torch.autocast(self.device.type, dtype=self.autocast_dtype or
                                 self.torch.float32, enabled=self.autocast_dtype is not None):
            logits = self.model(self.images)
        loss = self.cross_entropy(logits.float(), self.labels,
                                  label_smoothing=self.label_smoothing)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.loss = loss

    def __call__(self, n: int) -> None:
        for _ in range(n):
            self.step()
        self.last_loss()  # waits for the device

    def last_loss(self) -> float:
        return float(self.loss.detach()) if self.loss is not None else float('nan')

    def peak_memory_bytes(self) -> int | None:
        return int(self.torch.cuda.max_memory_allocated()) if self.cuda else None

    def environment(self) -> dict[str, Any]:
        torch = self.torch
        return dict(torch=torch.__version__, device=torch.cuda.get_device_name()
                    if self.cuda else 'cpu', threads=torch.get_num_threads(),
                    omp_wait_policy=os.environ.get('OMP_WAIT_POLICY', ''),
                    cudnn=torch.backends.cudnn.version() if self.cuda else None)


def torch_result(setup: TorchSetup, config: ml_collections.ConfigDict, first_step_s: float,
                 times: list[float], flops_per_image: float,
                 compile_error: str | None = None) -> dict[str, Any]:
    result = dict(
        benchmark='torch_train',
        source=setup.source,
        params=setup.params,
        dtype='bfloat16 autocast' if setup.autocast_dtype is not None else 'float32',
        torch_compile=setup.compiled,
        torch_compile_error=compile_error,
        torch_path=f"{'compiled' if setup.compiled else 'eager'}, "
                   f"{'torchvision' if setup.source.startswith('torchvision') else 'own'}",
        sgd=setup.optimizer_impl,
        channels_last=setup.channels_last,
        image_size=int(config.data.image_size),
        batch_size=int(config.batch_size),
        first_step_s=first_step_s,
        **common.throughput(times, FLAGS.steps, config.batch_size, 1),
    )
    result.update(
        model_flops_per_image=flops_per_image,
        mfu=common.mfu(result['images_per_sec'], flops_per_image, FLAGS.peak_tflops, 1),
        peak_memory_bytes=setup.peak_memory_bytes(),
        final_loss=setup.last_loss(),
        env=setup.environment(),
    )
    return result


def start_torch(config: ml_collections.ConfigDict) -> tuple[TorchSetup, float, str | None]:
    """The PyTorch side after its first step (where torch.compile compiles), the seconds that
    took, and why torch.compile failed if it did: then the step runs eager, on a fresh model."""
    def first_step(compile_model: str) -> tuple[TorchSetup, float]:
        setup = TorchSetup(config, compile_model, FLAGS.channels_last, FLAGS.torch_threads,
                           FLAGS.torchvision, FLAGS.torch_compile_backend)
        start = time.perf_counter()
        setup(1)
        return setup, time.perf_counter() - start

    try:
        return (*first_step(FLAGS.torch_compile), None)
    except Exception as error:  # noqa: BLE001 - any compiler failure: eager is still a figure
        import torch

        if FLAGS.torch_compile == 'no' or (FLAGS.torch_compile == 'auto'
                                           and not torch.cuda.is_available()):
            raise
        logging.warning('torch.compile failed, running eager: %r', error)
        torch._dynamo.reset()  # noqa: SLF001 - drop what the failed compile cached
        return (*first_step('no'), f'{error!r:.300}')


def _xla_options(text: str) -> dict[str, Any]:
    """'a=true,b=3,c=X,Y' -> {'a': True, 'b': 3, 'c': 'X,Y'}: the compile options of one extra
    JAX side (a piece without '=' continues the previous value, for XLA's list options)."""
    pairs: list[list[str]] = []
    for item in filter(None, text.split(',')):
        name, sep, value = item.partition('=')
        if sep:
            pairs.append([name, value])
        elif pairs:
            pairs[-1][1] += ',' + item
        else:
            raise ValueError(f'--jax_xla_options={text!r} must start with name=value '
                             '(e.g. xla_cpu_use_onednn=true)')
    parse = lambda v: (v.lower() == 'true' if v.lower() in ('true', 'false')
                       else int(v) if v.lstrip('-').isdigit() else v)
    return {name: parse(value) for name, value in pairs}


def _jax_variant(config: ml_collections.ConfigDict, text: str) -> dict[str, Any]:
    """The trainer's step compiled with extra XLA options, on a fresh state (the state is
    donated, so each side carries its own)."""
    options = _xla_options(text)
    setup = common.setup_train(config)
    start = time.perf_counter()
    compiled = setup.step_fn.lower(setup.state, setup.batch).compile(compiler_options=options)
    compile_s = time.perf_counter() - start
    runner = common.TrainRunner(dataclasses.replace(setup, step_fn=compiled))
    return dict(options=text, compile_s=compile_s, runner=runner, times=[])


def _variant_result(variant: dict[str, Any], torch_images_per_sec: float,
                    config: ml_collections.ConfigDict) -> dict[str, Any]:
    out = dict(compile_s=variant['compile_s'],
               **common.throughput(variant['times'], FLAGS.steps, config.batch_size, 1),
               final_loss=variant['runner'].last_loss())
    out['jax_over_torch'] = out['images_per_sec'] / torch_images_per_sec
    return out


def _alternate_windows(jax_runner, variants: list[dict], torch_setup
                       ) -> tuple[list[float], list[float]]:
    """Times JAX (and its variants, into their own 'times') and PyTorch window by window,
    alternating which goes first, so both see the same machine. Returns (jax, torch) times."""
    torch_times, jax_times = [], []
    for window in range(FLAGS.windows):
        sides = [(jax_runner, jax_times), *((v['runner'], v['times']) for v in variants),
                 (torch_setup, torch_times)]
        for run, times in sides if window % 2 == 0 else reversed(sides):
            times.extend(common.time_windows(run, FLAGS.steps, 1, 0))
    return jax_times, torch_times


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    if FLAGS.with_jax:
        # Let PyTorch have GPU memory too: JAX takes 75% of it at start by default.
        os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
    else:
        jax.config.update('jax_platforms', 'cpu')  # JAX only does shape arithmetic here
    config = common.config_from_flags()
    if jax.device_count() != 1 and FLAGS.with_jax:
        raise ValueError(f'--with_jax compares one device; JAX sees {jax.device_count()}.')
    flops_per_image = 6 * common.model_macs(models.from_config(config.model),
                                            int(config.data.image_size))

    if FLAGS.omp_passive:
        os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')  # read when torch starts OpenMP
    setup, first_step_s, compile_error = start_torch(config)
    if FLAGS.warmup:
        setup(FLAGS.warmup)

    if not FLAGS.with_jax:
        times = common.time_windows(setup, FLAGS.steps, FLAGS.windows, 0)
        common.report(torch_result(setup, config, first_step_s, times, flops_per_image,
                                   compile_error), FLAGS.json)
        return

    jax_setup = common.setup_train(config)
    _, compile_s = common.compile_step(jax_setup)
    jax_runner = common.TrainRunner(jax_setup)
    variants = [_jax_variant(config, options) for options in FLAGS.jax_xla_options]
    if FLAGS.warmup:
        for run in [jax_runner] + [v['runner'] for v in variants]:
            run(FLAGS.warmup)
    jax_times, torch_times = _alternate_windows(jax_runner, variants, setup)
    torch_out = torch_result(setup, config, first_step_s, torch_times, flops_per_image,
                             compile_error)
    jax_out = dict(
        benchmark='jax_train',
        **common.describe_config(config, jax_setup.model),
        compile_s=compile_s,
        **common.throughput(jax_times, FLAGS.steps, config.batch_size, 1),
        mfu=None,
        final_loss=jax_runner.last_loss(),
        env=common.environment(),
    )
    jax_out['mfu'] = common.mfu(jax_out['images_per_sec'], flops_per_image, FLAGS.peak_tflops, 1)
    result = dict(
        benchmark='jax_vs_torch',
        image_size=int(config.data.image_size),
        batch_size=int(config.batch_size),
        jax_images_per_sec=jax_out['images_per_sec'],
        torch_images_per_sec=torch_out['images_per_sec'],
        jax_over_torch=jax_out['images_per_sec'] / torch_out['images_per_sec'],
        jax=jax_out,
        torch=torch_out,
    )
    if variants:
        result['jax_variants'] = {v['options']: _variant_result(v, torch_out['images_per_sec'],
                                                                config) for v in variants}
    common.report(result, FLAGS.json)


if __name__ == '__main__':
    common.define_flags(steps_default=10, windows_default=5)
    cli.run(main)  # bad input: a one-line error, no traceback
