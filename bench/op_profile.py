"""Where the train step's time goes: XLA's per-op times by kind, and PyTorch's for comparison.

    python -m bench.op_profile --config=configs/resnet18.py --batch_size_per_device=64 \
        --image_size=32 --dtype=float32 --steps=3 --with_torch

Runs the trainer's jitted step (`bench.common`) under `jax.profiler`, reads the trace, and adds
up the time of each compiled op (one thunk of the XLA:CPU runtime, or one kernel on a GPU) by
what it does. The kind comes from the op's HLO in the compiled step:

- `conv fwd`, `conv bwd-input`, `conv bwd-filter`: a convolution (alone or in a fusion). The
  backward ones come from `transpose(jvp(...))`; the filter gradient is the one whose window
  spans the whole input (its output has the kernel's shape).
- `dot`: matrix products in a library fusion (the GEMM convs' forward and input gradient, the
  head). Plain `dot`s (the GEMM convs' kernel gradients) run on Eigen asynchronously: the trace
  holds only their launch, so the table counts them and their GFLOP apart, and gives the
  step's wall time (ops also overlap on the threads: the sum is not the step).
- `reduce`: fusions with a reduction (BN statistics and their gradients, the loss, norms).
- `layout copy`: plain transposes and copies (operands re-laid-out for a library call).
- `transpose fusion`: elementwise work (mostly BN's backward) fused with such a transpose.
- `elementwise`: other fusions (BN normalise, ReLU, adds, the optimizer update).

With `--with_torch`, the same network's PyTorch step (`bench.torch_baseline`) runs under
`torch.profiler`, its ATen ops grouped the same way where PyTorch separates them (one
`convolution_backward` gives both gradients there). Per-op times include what other processes
take from a shared CPU, so read the shares, not the absolute milliseconds.

With `--convs`, nothing is timed: it lists each convolution of the model at the config's batch
and image size, whether `model.conv_impl` runs it as a GEMM or as XLA's convolution, and the
bytes of its im2col patches (what a kh x kw GEMM conv keeps for the backward pass).
"""

from __future__ import annotations

import collections
import gzip
import json
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import app, flags

from bench import common
from resnet_flax import cli, models
from resnet_flax import conv as conv_lib

FLAGS = common.FLAGS
flags.DEFINE_bool('with_torch', False, "Also profile PyTorch's step on the same network.")
flags.DEFINE_integer('top', 12, 'How many of the slowest single ops to list.')
flags.DEFINE_bool('convs', False, 'Only list the convs: the path model.conv_impl gives each '
                  'one (GEMM or XLA conv) and its im2col patch MiB.')


_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%(\S+) = (\S+) (\w[\w-]*)\((.*)$')
_NAME = re.compile(r'^\s*(?:ROOT )?%(\S+) = ')
_COMPUTATION = re.compile(r'^(?:ENTRY )?%(\S+) ')


def _computations(hlo: str) -> tuple[dict[str, list[str]], str]:
    """Lines of each computation of an HLO module text, and the name of the entry one."""
    comps: dict[str, list[str]] = {}
    entry, current = '', None
    for line in hlo.splitlines():
        if line and not line.startswith(' ') and '{' in line:
            match = _COMPUTATION.match(line)
            current = match.group(1) if match else None
            if current and line.startswith('ENTRY'):
                entry = current
            if current:
                comps[current] = []
        elif current and line.startswith(' '):
            comps[current].append(line)
    return comps, entry


def _conv_kind(conv: str, context: str) -> str:
    """Forward, input gradient or filter gradient, from the convolution's HLO line and the text
    around it (the fusion's body and call, whose metadata names the jax op)."""
    window = re.search(r'window=\{size=(\d+)x(\d+)', conv)
    # The filter gradient convolves over the whole activation: its window is large, while a
    # forward or input-gradient window is the kernel (at most 7x7 here).
    if window and int(window.group(1)) * int(window.group(2)) > 49:
        return 'conv bwd-filter'
    if 'lhs_dilate' in conv or ' reverse(' in context:
        return 'conv bwd-input'
    if 'transpose(' not in context:
        return 'conv fwd'
    shape = re.match(r'\s*(?:ROOT )?%\S+ = \w+\[([\d,]*)\]', conv)
    dims = [int(d) for d in shape.group(1).split(',')] if shape and shape.group(1) else []
    # A 1x1 kernel's filter gradient: output [1,1,in,out] (or a permutation with 1x1 spatial).
    return 'conv bwd-filter' if dims.count(1) >= 2 else 'conv bwd-input'


def classify(hlo: str) -> dict[str, str]:
    """The kind of each top-level op of the compiled step, by name."""
    comps, entry = _computations(hlo)
    kinds = {}
    for line in comps.get(entry, []):
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, _, opcode, rest = match.groups()
        body = [line]
        if opcode == 'fusion':
            called = re.search(r'calls=%([\w.-]+)', rest)
            body = comps.get(called.group(1), []) if called else []
        kinds[name] = _kind_of(opcode, body, line)
    return kinds


def op_source(hlo: str, name: str) -> str:
    """The jax op (and flax module path) a top-level op came from: the first op_name in its
    line or its fusion's body; for an op XLA made up (no op_name: the iotas and broadcasts it
    expands some ops into), 'feeds ' and the op_name of the first op that reads it."""
    comps, entry = _computations(hlo)
    lines = comps.get(entry, [])
    line = next((line for line in lines if f'%{name} = ' in line), '')
    source = _first_op_name(comps, line)
    frontier = [name] if line and not source else []
    for _ in range(4):  # through get-tuple-elements and other unnamed ops XLA added
        operand = re.compile('|'.join(rf'[(, ]%{re.escape(n)}[,)]' for n in frontier) or '$^')
        consumers = [c for c in lines if operand.search(c.split(' = ', 1)[-1])]
        for consumer in consumers:
            source = _first_op_name(comps, consumer)
            if source:
                return ('feeds ' + source)[-90:]
        frontier = [m.group(1) for c in consumers if (m := _NAME.match(c))]
    return source


def _first_op_name(comps: dict[str, list[str]], line: str) -> str:
    called = re.search(r'calls=%([\w.-]+)', line)
    body = comps.get(called.group(1), []) if called else []
    for text in [line, *body]:
        match = re.search(r'op_name="([^"]+)"', text)
        if match:
            return match.group(1)[-90:]
    return ''


def async_dots(hlo: str) -> dict[str, float]:
    """How many top-level `dot`s (not in a library fusion) the step holds, and their GFLOP.

    XLA:CPU runs these with Eigen asynchronously: the profile holds only their launch (0.1 ms
    for a 4.6 ms product), so their time is missing from the per-kind sums. Here they are the
    convs' kernel gradients (patches^T @ dy) and the head's."""
    comps, entry = _computations(hlo)
    shapes = {}
    count, flops = 0, 0.0
    for line in comps.get(entry, []):
        match = _INSTRUCTION.match(line)
        if not match:
            continue
        name, shape, opcode, rest = match.groups()
        inside = re.match(r'\w+\[([\d,]*)\]', shape)
        dims = [int(d) for d in inside.group(1).split(',') if d] if inside else []
        shapes[name] = dims
        if opcode != 'dot':
            continue
        lhs = shapes.get(rest.split(',')[0].strip(' %'), [])
        contracting = re.search(r'lhs_contracting_dims=\{([\d,]*)\}', rest)
        k = 1
        for d in (contracting.group(1).split(',') if contracting and contracting.group(1) else []):
            k *= lhs[int(d)] if int(d) < len(lhs) else 1
        out = 1
        for d in dims:
            out *= d
        count, flops = count + 1, flops + 2.0 * out * k
    return dict(count=count, gflop=round(flops / 1e9, 2))


def _kind_of(opcode: str, body: list[str], call: str) -> str:
    text = '\n'.join(body)
    convs = [line for line in body if ' convolution(' in line]
    if convs:
        return _conv_kind(convs[-1], text + '\n' + call)
    if ' dot(' in text:
        return 'dot'
    if ' reduce(' in text or ' reduce-window(' in text or ' select-and-scatter(' in text:
        return 'reduce'
    if ' transpose(' in text and opcode == 'fusion':
        return 'transpose fusion'  # elementwise work written in a library's layout
    if opcode in ('copy', 'transpose') or (opcode == 'fusion' and all(
            re.search(r' (parameter|copy|transpose|bitcast|constant)\(', line) for line in body)):
        return 'layout copy'
    if opcode == 'fusion' or opcode in ('add', 'multiply', 'maximum', 'select', 'broadcast'):
        return 'elementwise'
    return 'other'


def _trace_events(directory: Path) -> list[dict[str, Any]]:
    files = sorted(directory.rglob('*.trace.json.gz'))
    if not files:
        raise RuntimeError(f'jax.profiler wrote no trace under {directory}.')
    with gzip.open(files[-1]) as f:
        return json.load(f)['traceEvents']


def profile_jax(setup: common.Setup, steps: int, warmup: int) -> tuple[dict, list, dict]:
    """ms per step of each kind, the slowest single ops (from a jax.profiler trace), and the
    step's wall ms and asynchronous dots (whose time the trace misses)."""
    compiled, _ = common.compile_step(setup)
    hlo = compiled.as_text()
    kinds = classify(hlo)
    runner = common.TrainRunner(setup)
    runner(max(warmup, 1))
    with tempfile.TemporaryDirectory() as directory:
        jax.profiler.start_trace(directory)
        start = time.perf_counter()
        runner(steps)
        wall_ms = (time.perf_counter() - start) * 1e3 / steps
        jax.profiler.stop_trace()
        events = _trace_events(Path(directory))
    per_kind: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    for event in events:
        name = event.get('name', '')
        if event.get('ph') == 'X' and name in kinds:
            per_kind[kinds[name]] += event['dur'] / 1e3 / steps
            per_op[name] += event['dur'] / 1e3 / steps
    top = [dict(op=name, kind=kinds[name], ms_per_step=round(ms, 2), source=op_source(hlo, name))
           for name, ms in per_op.most_common(FLAGS.top)]
    return dict(per_kind), top, dict(wall_ms_per_step=round(wall_ms, 1),
                                     async_dots=async_dots(hlo))


_TORCH_KINDS = (  # ATen op name pieces -> kind, first match wins
    ('convolution_backward', 'conv bwd (input+filter)'),
    ('conv', 'conv fwd'),
    ('batch_norm', 'batch norm'),
    ('addmm', 'dot'), ('mm', 'dot'), ('linear', 'dot'),
    ('sgd', 'optimizer'), ('_foreach', 'optimizer'),
    ('max_pool', 'reduce'), ('mean', 'reduce'), ('sum', 'reduce'), ('softmax', 'reduce'),
    ('cross_entropy', 'reduce'), ('nll', 'reduce'),
    ('relu', 'elementwise'), ('threshold', 'elementwise'), ('add', 'elementwise'),
    ('mul', 'elementwise'), ('copy', 'layout copy'), ('clone', 'layout copy'),
)


def profile_torch(config: ml_collections.ConfigDict, steps: int, warmup: int) -> tuple[dict, list]:
    """ms per step of each kind of PyTorch's step on the same network (ATen self times)."""
    import torch

    from bench import torch_baseline

    setup = torch_baseline.TorchSetup(config, 'no', 'no', 0, True)
    setup(max(warmup, 1))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        setup(steps)
    per_kind: collections.Counter = collections.Counter()
    per_op: collections.Counter = collections.Counter()
    for item in prof.key_averages():
        if not item.key.startswith('aten::'):
            continue
        ms = item.self_cpu_time_total / 1e3 / steps
        per_op[item.key] += ms
        kind = next((k for piece, k in _TORCH_KINDS if piece in item.key), 'other')
        per_kind[kind] += ms
    top = [dict(op=name, ms_per_step=round(ms, 2)) for name, ms in per_op.most_common(FLAGS.top)]
    return dict(per_kind), top


def _conv_eqns(jaxpr: Any) -> Iterator[Any]:
    """The conv_general_dilated equations of a jaxpr, nested ones included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == 'conv_general_dilated':
            yield eqn
        for value in eqn.params.values():
            inner = getattr(value, 'jaxpr', value)
            if hasattr(inner, 'eqns'):
                yield from _conv_eqns(inner)


def conv_paths(config: ml_collections.ConfigDict) -> list[dict[str, Any]]:
    """Each conv of the model's forward pass (read from its jaxpr with XLA's convs), the path
    `model.conv_impl` gives it on this backend, and its im2col patch MiB."""
    model = models.from_config(config.model)
    size, batch = int(config.data.image_size), int(config.batch_size)
    images = jax.ShapeDtypeStruct((batch, size, size, 3), model.dtype)
    xla = model.clone(conv_impl='xla')
    variables = jax.eval_shape(lambda x: xla.init(jax.random.key(0), x, train=False), images)
    jaxpr = jax.make_jaxpr(lambda v, x: xla.apply(v, x, train=False))(variables, images)
    chosen = conv_lib.conv_function(model.conv_impl, model.conv_im2col_max_mib)
    rows = []
    for eqn in _conv_eqns(jaxpr.jaxpr):
        lhs, rhs = (jax.ShapeDtypeStruct(v.aval.shape, v.aval.dtype) for v in eqn.invars)
        p = eqn.params
        args = (p['window_strides'], p['padding'], p['lhs_dilation'], p['rhs_dilation'],
                p['dimension_numbers'], p['feature_group_count'], p['batch_group_count'])
        gemm = chosen is not None and not any(_conv_eqns(
            jax.make_jaxpr(lambda a, b, args=args: chosen(a, b, *args))(lhs, rhs).jaxpr))
        patches = conv_lib.patch_bytes(lhs.shape, rhs.shape, p['window_strides'], p['padding'],
                                       jnp.dtype(lhs.dtype).itemsize)
        rows.append(dict(input=lhs.shape, kernel=rhs.shape, stride=p['window_strides'][0],
                         path='GEMM' if gemm else 'XLA conv', patch_mib=round(patches / 2**20, 2)))
    return rows


def _conv_table(config: ml_collections.ConfigDict, rows: list[dict[str, Any]]) -> str:
    gemm = [r for r in rows if r['path'] == 'GEMM']
    kept = sum(r['patch_mib'] for r in gemm if r['kernel'][:2] != (1, 1))
    head = (f"conv_impl={config.model.conv_impl!r}, conv_im2col_max_mib="
            f"{config.model.conv_im2col_max_mib}, backend {jax.default_backend()}: "
            f"{len(gemm)} of {len(rows)} convs as GEMMs; kh x kw patches kept: {kept:,.1f} MiB")
    return head + '\n' + common.format_table(rows, ('input', 'kernel', 'stride', 'path',
                                                     'patch_mib'))


def _shares(per_kind: dict[str, float]) -> dict[str, dict[str, float]]:
    total = sum(per_kind.values()) or 1.0
    return {k: dict(ms_per_step=round(v, 2), share=round(v / total, 3))
            for k, v in sorted(per_kind.items(), key=lambda kv: -kv[1])}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
    config = common.config_from_flags()
    if FLAGS.convs:
        rows = conv_paths(config)
        if FLAGS.json:
            common.report(dict(benchmark='conv_paths', convs=rows), True)
        else:
            print(_conv_table(config, rows), flush=True)
        return
    setup = common.setup_train(config)
    per_kind, top, step = profile_jax(setup, FLAGS.steps, FLAGS.warmup)
    result = dict(benchmark='op_profile', **common.describe_config(config, setup.model),
                  jax_ms_per_step=round(sum(per_kind.values()), 1), jax=_shares(per_kind),
                  jax_top=top, jax_step=step, env=common.environment())
    if FLAGS.with_torch:
        torch_kinds, torch_top = profile_torch(config, FLAGS.steps, FLAGS.warmup)
        result.update(torch_ms_per_step=round(sum(torch_kinds.values()), 1),
                      torch=_shares(torch_kinds), torch_top=torch_top)
    if FLAGS.json:
        common.report(result, True)
        return
    print(_table(result), flush=True)


def _table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']}, batch {result['batch_size']}, {result['image_size']} px"]
    for side in ('jax', 'torch'):
        if side not in result:
            continue
        lines.append(f"\n{side}: {result[side + '_ms_per_step']} ms/step in ops")
        if side == 'jax':
            step = result['jax_step']
            lines.append(f"  (wall {step['wall_ms_per_step']} ms/step, profiled; ops overlap on "
                         f"the threads; not in the ops: {step['async_dots']['count']} Eigen dots "
                         f"run asynchronously, {step['async_dots']['gflop']} GFLOP/step)")
        lines += [f"  {k:26s} {v['ms_per_step']:10.1f} ms  {100 * v['share']:5.1f}%"
                  for k, v in result[side].items()]
        lines.append('  slowest ops:')
        lines += [f"    {t['op']:32s} {t.get('kind', ''):16s} {t['ms_per_step']:9.1f} ms  "
                  f"{t.get('source', '')}"
                  for t in result[side + '_top']]
    return '\n'.join(lines)


if __name__ == '__main__':
    common.define_flags(steps_default=3, windows_default=1)
    cli.run(main)  # bad input: a one-line error, no traceback
