"""Pure train and eval steps. No I/O and no host syncs: the loop jits these and drives them.

Batches arrive as uint8 images and int32 labels; each step first applies the device part of
the input recipe (`device_augment`: normalisation, and for training flips and Mixup/CutMix).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import NamedSharding

from resnet_flax import device_augment, precision
from resnet_flax.device_augment import AugmentConfig
from resnet_flax.state import TrainState

PyTree = Any
Batch = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """What the train step needs besides the state and the batch."""

    label_smoothing: float = 0.0
    grad_accum_steps: int = 1
    ema_decay: float = 0.0
    log_block_grad_norms: bool = False
    debug_nan_at_step: int = -1  # tests only: poison the loss at this step
    augment: AugmentConfig = AugmentConfig()  # normalisation, flips, Mixup/CutMix

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict) -> StepConfig:
        """The step options of an experiment config (top-level training fields)."""
        return cls(
            label_smoothing=config.label_smoothing,
            grad_accum_steps=config.grad_accum_steps,
            ema_decay=config.ema_decay,
            log_block_grad_norms=config.log_block_grad_norms,
            debug_nan_at_step=config.debug_nan_at_step,
            augment=AugmentConfig.from_config(config),
        )


def cross_entropy(logits: jax.Array, labels: jax.Array, label_smoothing: float) -> jax.Array:
    """Per-example softmax cross-entropy; `labels` are class ids or soft targets (mixup)."""
    num_classes = logits.shape[-1]
    dtype = jnp.promote_types(logits.dtype, jnp.float32)  # float32, or float64 kept as it is
    targets = labels if labels.ndim == 2 else jax.nn.one_hot(labels, num_classes, dtype=dtype)
    if label_smoothing > 0:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits.astype(dtype), targets)


def correct_topk(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """1.0 where the true class is among the k highest logits (k is capped at num_classes)."""
    hard_labels = labels if labels.ndim == 1 else jnp.argmax(labels, axis=-1)
    k = min(k, logits.shape[-1])
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == hard_labels[:, None], axis=-1).astype(jnp.float32)


def _model_rngs(rng: jax.Array) -> dict[str, jax.Array]:
    """The random streams of the model in training (head dropout, stochastic depth)."""
    dropout, drop_path = jax.random.split(rng)
    return {'dropout': dropout, 'drop_path': drop_path}


def _loss_and_updates(model: nn.Module, params, batch_stats, batch: Batch, cfg: StepConfig,
                      multiplier: jax.Array, rng: jax.Array):
    logits, updates = model.apply(
        {'params': params, 'batch_stats': batch_stats},
        batch['image'],
        train=True,
        mutable=['batch_stats'],
        rngs=_model_rngs(rng),
    )
    # `multiplier` is 1, or the float16 loss scale, or NaN at the test-only debug step.
    loss = jnp.mean(cross_entropy(logits, batch['label'], cfg.label_smoothing)) * multiplier
    top1 = jnp.mean(correct_topk(logits, batch['label'], 1))
    return loss, (updates['batch_stats'], top1)


def _gradients(model, params, batch_stats, batch: Batch, cfg: StepConfig, batch_sharding,
               multiplier: jax.Array, rng: jax.Array):
    """Mean loss gradient over the batch, in `grad_accum_steps` sequential micro-batches."""
    grad_fn = jax.value_and_grad(_loss_and_updates, argnums=1, has_aux=True)
    if cfg.grad_accum_steps == 1:
        (loss, (batch_stats, top1)), grads = grad_fn(model, params, batch_stats, batch, cfg,
                                                     multiplier, rng)
        return loss, top1, batch_stats, grads

    k = cfg.grad_accum_steps

    def split(x):
        # Micro-batch i takes every k-th example, so each device keeps its own rows.
        x = x.reshape(x.shape[0] // k, k, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1)

    micro_batches = jax.tree.map(split, batch)

    def accumulate(carry, indexed_micro):
        grads_sum, loss_sum, top1_sum, stats = carry
        index, micro = indexed_micro
        micro = jax.lax.with_sharding_constraint(micro, batch_sharding)
        (loss, (stats, top1)), grads = grad_fn(model, params, stats, micro, cfg, multiplier,
                                               jax.random.fold_in(rng, index))
        grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
        return (grads_sum, loss_sum + loss, top1_sum + top1, stats), None

    zeros = jax.tree.map(jnp.zeros_like, params)
    init = (zeros, jnp.zeros(()), jnp.zeros(()), batch_stats)
    (grads, loss, top1, batch_stats), _ = jax.lax.scan(accumulate, init,
                                                       (jnp.arange(k), micro_batches))
    grads = jax.tree.map(lambda g: g / k, grads)
    return loss / k, top1 / k, batch_stats, grads


def block_grad_norms(grads: PyTree) -> dict[str, jax.Array]:
    """'grad_norm/NAME' -> the L2 norm of the gradient of each top-level module of the model
    (stem_conv, stem_bn, stage1_block1, ..., head): how much signal reaches each depth."""
    return {f'grad_norm/{name}': optax.global_norm(subtree) for name, subtree in grads.items()}


def _ema(average: PyTree, new: PyTree, decay: float) -> PyTree:
    return jax.tree.map(lambda a, n: decay * a + (1.0 - decay) * n, average, new)


def train_step(
    state: TrainState,
    batch: Batch,
    *,
    model: nn.Module,
    optimizer: optax.GradientTransformation,
    learning_rate_fn: Callable[[jax.Array], jax.Array],
    cfg: StepConfig,
    batch_sharding: NamedSharding | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One optimizer update on one global batch. Returns the new state and scalar metrics."""
    # 1.0, except at the test-only debug step, where it makes the loss (and gradients) NaN.
    poison = jnp.where(state.step == cfg.debug_nan_at_step, jnp.nan, 1.0)
    scaler = state.loss_scale  # float16 compute only: the loss is scaled, the gradients unscaled
    multiplier = poison if scaler is None else poison * scaler.scale
    batch = device_augment.train_batch(batch, state.step, cfg.augment)
    rng = jax.random.fold_in(state.rng, state.step)  # a pure function of (seed, step)
    loss, top1, batch_stats, grads = _gradients(
        model, state.params, state.batch_stats, batch, cfg, batch_sharding, multiplier, rng
    )
    if scaler is not None:
        loss, grads = loss / scaler.scale, precision.unscale(scaler, grads)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(
        step=state.step + 1, params=params, batch_stats=batch_stats, opt_state=opt_state
    )
    if cfg.ema_decay > 0:
        new_state = new_state.replace(
            ema_params=_ema(state.ema_params, params, cfg.ema_decay),
            ema_batch_stats=_ema(state.ema_batch_stats, batch_stats, cfg.ema_decay),
        )
    metrics = {
        'loss': loss,
        'top1': top1,
        'learning_rate': learning_rate_fn(state.step),
        'grad_norm': optax.global_norm(grads),
    }
    if cfg.log_block_grad_norms:
        metrics.update(block_grad_norms(grads))
    if scaler is not None:
        new_state, metrics = _skip_if_not_finite(state, new_state, grads, metrics)
    return new_state, metrics


def _skip_if_not_finite(state: TrainState, new_state: TrainState, grads,
                        metrics: dict[str, jax.Array]) -> tuple[TrainState, dict[str, jax.Array]]:
    """float16: a step with non-finite gradients keeps the old weights, optimizer state (but
    for the schedule's count, which keeps pace with `state.step`), BN statistics and EMA, and
    adjusts the loss scale. Its gradient norm counts as 0 (nothing was applied), per block too;
    `skipped_updates` says how often that happened."""
    finite = precision.all_finite(grads)
    kept = precision.keep_if(
        finite,
        (new_state.params, new_state.opt_state, new_state.batch_stats,
         new_state.ema_params, new_state.ema_batch_stats),
        (state.params, state.opt_state, state.batch_stats, state.ema_params,
         state.ema_batch_stats))
    params, opt_state, batch_stats, ema_params, ema_batch_stats = kept
    opt_state = precision.schedule_in_step(opt_state, new_state.opt_state)
    new_state = new_state.replace(
        params=params, opt_state=opt_state, batch_stats=batch_stats, ema_params=ema_params,
        ema_batch_stats=ema_batch_stats,
        loss_scale=precision.adjust(state.loss_scale, finite))
    norms = {name: jnp.where(finite, value, 0.0) for name, value in metrics.items()
             if name.startswith('grad_norm')}
    metrics = {**metrics, **norms, 'loss_scale': state.loss_scale.scale,
               'skipped_updates': 1.0 - finite.astype(jnp.float32)}
    return new_state, metrics


def eval_step(variables: PyTree, batch: Batch, *, model: nn.Module,
              augment: AugmentConfig) -> dict[str, jax.Array]:
    """Sums over the real (unmasked) examples of one batch; the loop adds them up."""
    logits = model.apply(variables, device_augment.eval_batch(batch, augment)['image'],
                         train=False)
    mask = batch['mask'].astype(jnp.float32)
    return {
        'loss': jnp.sum(cross_entropy(logits, batch['label'], 0.0) * mask),
        'top1': jnp.sum(correct_topk(logits, batch['label'], 1) * mask),
        'top5': jnp.sum(correct_topk(logits, batch['label'], 5) * mask),
        'count': jnp.sum(mask),
    }


def summarize_eval(totals: dict[str, Any]) -> dict[str, float]:
    """Means over every example from the summed eval metrics."""
    count = float(totals['count'])
    means = {name: float(totals[name]) / max(count, 1.0) for name in ('loss', 'top1', 'top5')}
    return {**means, 'num_examples': int(count)}
