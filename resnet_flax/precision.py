"""Mixed precision: which dtypes train safely, and dynamic loss scaling for float16.

Parameters, optimizer state and BN statistics stay float32 ("master weights"); only the
compute dtype (`model.dtype`) may be lower. A bfloat16 or float16 weight would lose every update
smaller than its 8- or 11-bit mantissa can add (lr * grad below ~1/256 of the weight).

bfloat16 has float32's exponent range and trains as it is. float16 has 5 exponent bits:
activation gradients below ~6e-8 flush to zero and large ones overflow. Dynamic loss scaling
(Micikevicius et al. 2018; torch.amp.GradScaler and flax's DynamicScale do the same) multiplies
the loss by a scale S before the backward pass and divides the gradients by S after. A step
whose gradients are not all finite changes nothing (weights, optimizer state, BN statistics
and EMA keep their values) and halves S; after `GROWTH_INTERVAL` finite steps in a row S
doubles, so S stays near the largest value that does not overflow.

A skipped step still counts as a step of the learning-rate schedule: `state.step` advances, and
so does the schedule's own count in the optimizer state (`schedule_in_step`), so the rate the
next update applies is the scheduled rate of its step, the `learning_rate` that is logged (as
torch, whose LR scheduler steps every iteration). Moments and their counts (Adam's bias
correction) stay as they were: only applied updates move them, as in torch's skipped
`optimizer.step()`.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import optax

PyTree = Any

# The usual values (torch's GradScaler and flax's DynamicScale): S adapts within a few steps.
INITIAL_SCALE = 2.0**16
GROWTH_INTERVAL = 2000
GROWTH_FACTOR = 2.0
BACKOFF_FACTOR = 0.5


def check_training_dtypes(model_cfg: ml_collections.ConfigDict) -> None:
    """One-line errors for dtypes that would train badly."""
    if model_cfg.param_dtype != 'float32':
        raise ValueError(
            f"model.param_dtype={model_cfg.param_dtype!r}: weights must be 'float32' to train "
            '(low-precision weights lose small updates); for mixed precision set '
            "model.dtype='bfloat16' (or 'float16') and keep param_dtype='float32'.")


@flax.struct.dataclass
class LossScale:
    """The dynamic loss scale, carried in the train state (and its checkpoints)."""

    scale: jax.Array  # float32 [], multiplies the loss
    good_steps: jax.Array  # int32 [], finite steps since the scale last changed

    @classmethod
    def create(cls) -> LossScale:
        return cls(scale=jnp.asarray(INITIAL_SCALE, jnp.float32),
                   good_steps=jnp.zeros((), jnp.int32))


def needs_loss_scale(compute_dtype: Any) -> bool:
    """float16 compute needs a loss scale; float32 and bfloat16 do not."""
    return jnp.dtype(compute_dtype) == jnp.float16


def all_finite(tree: PyTree) -> jax.Array:
    """True when no leaf holds a NaN or an Inf."""
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


def unscale(loss_scale: LossScale, grads: PyTree) -> PyTree:
    inverse = 1.0 / loss_scale.scale
    return jax.tree.map(lambda g: g * inverse.astype(g.dtype), grads)


def adjust(loss_scale: LossScale, finite: jax.Array) -> LossScale:
    """Halve the scale after a non-finite step; double it after GROWTH_INTERVAL finite ones."""
    good = jnp.where(finite, loss_scale.good_steps + 1, 0)
    grow = good >= GROWTH_INTERVAL
    scale = jnp.where(finite, jnp.where(grow, loss_scale.scale * GROWTH_FACTOR, loss_scale.scale),
                      jnp.maximum(loss_scale.scale * BACKOFF_FACTOR, 1.0))
    return LossScale(scale=scale.astype(jnp.float32),
                     good_steps=jnp.where(grow, 0, good).astype(jnp.int32))


def keep_if(finite: jax.Array, new: PyTree, old: PyTree) -> PyTree:
    """`new` where the step was finite, else `old`, leaf by leaf (no host sync)."""
    return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)


def schedule_in_step(kept: PyTree, stepped: PyTree) -> PyTree:
    """The optimizer state `kept` by a skipped step, with the learning-rate schedule counts of
    `stepped` (the state the step would have made), so that the schedule keeps pace with
    `state.step` and the logged rate is the applied one."""
    def is_schedule(node) -> bool:
        return isinstance(node, optax.ScaleByScheduleState)

    return jax.tree.map(lambda old, new: new if is_schedule(old) else old, kept, stepped,
                        is_leaf=is_schedule)
