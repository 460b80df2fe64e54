"""Compile time of the weight initializers: the library's draw in the kernel's shape vs ours.

    python -m bench.init_compile --json

With JAX's default `jax_threefry_partitionable=True`, XLA:CPU compiles some multi-dimensional
`jax.random` draws for seconds. `blocks.conv_kernel_init` and `blocks.dense_kernel_init` draw
the same numbers as a flat vector and reshape them. For every distinct kernel shape of a model
(its params traced with `jax.eval_shape`, nothing computed), this compiles one draw with each
initializer, alternating, a fresh `jax.jit` each time (no cache hit), and reports the compile
seconds of each side (process CPU time, robust to other load), their ratio, and whether the
numbers are equal.
"""

from __future__ import annotations

import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from resnet_flax import blocks, models

FLAGS = flags.FLAGS
flags.DEFINE_list('models', ['tiny_resnet18', 'resnet50'], 'Models whose kernel shapes to draw.')
flags.DEFINE_bool('json', False, 'Print one JSON object instead of the table.')

TINY = dict(num_classes=5, stage_sizes=(2, 1), stage_widths=(8, 16), stem_width=8)  # the tests'
LIBRARY = {'conv': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
           'dense': nn.initializers.lecun_normal()}
OURS = {'conv': blocks.conv_kernel_init, 'dense': blocks.dense_kernel_init}


def kernel_shapes(name: str) -> dict[tuple[int, ...], str]:
    """Distinct kernel shapes of a model -> 'conv' (4-D) or 'dense' (2-D)."""
    model = (models.create('resnet18', **TINY) if name == 'tiny_resnet18'
             else models.create(name))
    size = 16 if name == 'tiny_resnet18' else 224
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)),
                                               train=False))['params']
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {tuple(x.shape): 'conv' if x.ndim == 4 else 'dense'
            for path, x in leaves if getattr(path[-1], 'key', '') == 'kernel'}


def compile_seconds(init, shape: tuple[int, ...]) -> tuple[float, jax.Array]:
    key = jax.random.key(1)
    start = time.process_time()
    compiled = jax.jit(lambda k: init(k, shape)).lower(key).compile()
    seconds = time.process_time() - start
    return seconds, compiled(key)


def measure(name: str) -> dict:
    library_s = ours_s = 0.0
    equal = True
    for shape, kind in sorted(kernel_shapes(name).items()):
        a, library_values = compile_seconds(LIBRARY[kind], shape)
        b, our_values = compile_seconds(OURS[kind], shape)
        library_s, ours_s = library_s + a, ours_s + b
        equal &= bool(np.array_equal(library_values, our_values))
    return dict(model=name, kernel_shapes=len(kernel_shapes(name)),
                library_compile_s=round(library_s, 2), ours_compile_s=round(ours_s, 2),
                ratio=round(library_s / ours_s, 2), same_numbers=equal,
                backend=jax.default_backend())


def main(argv: list[str]) -> None:
    del argv
    rows = [measure(name) for name in FLAGS.models]
    if FLAGS.json:
        print(json.dumps(rows))
        return
    print(f"{'model':16} {'shapes':>6} {'library s':>10} {'ours s':>8} {'ratio':>6} same")
    for r in rows:
        print(f"{r['model']:16} {r['kernel_shapes']:6d} {r['library_compile_s']:10.2f} "
              f"{r['ours_compile_s']:8.2f} {r['ratio']:6.2f} {r['same_numbers']}")


if __name__ == '__main__':
    app.run(main)
