"""The train state: everything a run needs to continue exactly where it stopped."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from resnet_flax import precision, sharding

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Params, BN statistics, optimizer state, step and RNG key; optionally an EMA of the weights.

    The data position is `step` itself: the input order is a pure function of (seed, step).
    """

    step: jax.Array
    params: PyTree
    batch_stats: PyTree
    opt_state: PyTree
    rng: jax.Array  # a raw uint32 key, so that it checkpoints as a plain array
    ema_params: PyTree = None  # None when config.ema_decay == 0
    ema_batch_stats: PyTree = None
    # The dynamic loss scale when the model computes in float16 (precision.py), else None.
    loss_scale: precision.LossScale | None = None

    def variables(self, use_ema: bool = False) -> dict[str, PyTree]:
        """The model variables to evaluate: the raw weights or their moving average."""
        if use_ema:
            return {'params': self.ema_params, 'batch_stats': self.ema_batch_stats}
        return {'params': self.params, 'batch_stats': self.batch_stats}


def init_variables(model: nn.Module, rng: jax.Array, image_shape: tuple[int, ...]) -> PyTree:
    """Model variables for one dummy image; batch size does not change their shapes."""
    dummy = jnp.zeros((1, *image_shape), jnp.float32)
    return model.init(rng, dummy, train=False)


def _new_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    use_ema: bool,
) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    variables = init_variables(model, init_rng, image_shape)
    params, batch_stats = variables['params'], variables.get('batch_stats', {})
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        batch_stats=batch_stats,
        opt_state=optimizer.init(params),
        rng=state_rng,
        ema_params=params if use_ema else None,
        ema_batch_stats=batch_stats if use_ema else None,
        loss_scale=(precision.LossScale.create()
                    if precision.needs_loss_scale(getattr(model, 'dtype', jnp.float32)) else None),
    )


def abstract_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    image_shape: tuple[int, ...],
    use_ema: bool,
    mesh: Mesh,
) -> TrainState:
    """Shapes, dtypes and (replicated) shardings of the state, computed without any FLOPs."""
    shapes = jax.eval_shape(
        lambda rng: _new_state(model, optimizer, rng, image_shape, use_ema),
        jax.random.PRNGKey(0),
    )
    target = sharding.replicated(mesh)
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=target), shapes
    )


def create_train_state(
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    rng: jax.Array,
    image_shape: tuple[int, ...],
    use_ema: bool,
    mesh: Mesh,
) -> TrainState:
    """Initialises the state directly into its sharding with a jitted init (no host copy)."""
    abstract = abstract_state(model, optimizer, image_shape, use_ema, mesh)
    shardings = jax.tree.map(lambda x: x.sharding, abstract)
    init = jax.jit(
        lambda r: _new_state(model, optimizer, r, image_shape, use_ema), out_shardings=shardings
    )
    return init(rng)
