"""Optax optimizers and learning-rate schedules, built from the config's `optimizer` section.

Every optimizer is one chain with the same shape, so the options combine the same way:

    clip by global norm -> [l2 decay] -> direction -> [decoupled decay] -> [lamb trust ratio]
    -> scale by the scheduled rate

where the direction is momentum (sgd), trust ratio then momentum (lars) or Adam moments
(adamw, lamb). The rate comes last, as in optax.sgd/adamw/lamb; at a constant rate the LARS
chain equals optax.lars (which puts the rate inside the momentum). 'l2' decay adds
weight_decay * w to the gradient, so it passes through momentum and Adam moments; 'decoupled'
decay adds it after them (AdamW). Weight decay and the LARS/LAMB trust ratio skip 1-D
parameters (BN scale/bias, biases) unless the config says otherwise.

The rate is scaled with the batch size (the linear scaling rule, Goyal et al. 2017): the peak
is learning_rate * batch_size / reference_batch_size.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import optax

OPTIMIZERS = ('sgd', 'lars', 'lamb', 'adamw')
SCHEDULES = ('cosine', 'step', 'polynomial', 'constant')
WEIGHT_DECAY_TYPES = ('l2', 'decoupled')
# What '' means for optimizer.weight_decay_type: what each optimizer's paper does.
DEFAULT_WEIGHT_DECAY_TYPE = {'sgd': 'l2', 'lars': 'l2', 'lamb': 'decoupled', 'adamw': 'decoupled'}


def weight_decay_mask(params: optax.Params) -> optax.Params:
    """True for parameters to decay: kernels. False for 1-D ones: BN scale/bias and biases.

    Works on arrays and on `jax.ShapeDtypeStruct`s (shapes from `jax.eval_shape`).
    """
    return jax.tree.map(lambda p: p.ndim > 1, params)


def peak_learning_rate(config: ml_collections.ConfigDict) -> float:
    """The linear scaling rule: learning_rate is given per reference_batch_size images."""
    opt = config.optimizer
    return opt.learning_rate * config.batch_size / opt.reference_batch_size


def total_train_steps(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int:
    """The run length in optimizer steps: num_train_steps if > 0, else num_epochs worth of
    steps, rounded up (a fractional epoch gets its last partial epoch's steps).

    The one source of the run length: the loop runs this many steps and the learning-rate
    schedule ends exactly here.
    """
    if config.num_train_steps > 0:
        return int(config.num_train_steps)
    # Rounding to 6 places first keeps float noise (0.3 * 10 = 3.0000000000000004) from
    # adding a step.
    steps = math.ceil(round(config.num_epochs * steps_per_epoch, 6))
    if steps <= 0:
        raise ValueError(
            f'training has {steps} steps (num_epochs={config.num_epochs}, '
            f'steps_per_epoch={steps_per_epoch}); set num_epochs or num_train_steps > 0'
        )
    return steps


def _all_true(params: optax.Params) -> optax.Params:
    return jax.tree.map(lambda _: True, params)


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f'unknown {what} {value!r}; valid: {", ".join(choices)}')


def create_learning_rate_schedule(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.Schedule:
    """Linear warmup from 0 to the peak, then cosine, step, polynomial decay or constant.

    The warmup ends at the peak exactly at step warmup_steps (or warmup_epochs worth of steps);
    the decay spans the rest of the run. Step decay multiplies by step_factor from the first
    step of each epoch in step_epochs on.
    """
    opt = config.optimizer
    _check_choice('optimizer.schedule', opt.schedule, SCHEDULES)
    peak = peak_learning_rate(config)
    total = total_train_steps(config, steps_per_epoch)
    warmup = opt.warmup_steps
    if warmup <= 0:
        warmup = round(opt.warmup_epochs * steps_per_epoch)
    if warmup >= total:
        raise ValueError(
            f'warmup ({warmup} steps) must be shorter than training ({total} steps); '
            'lower optimizer.warmup_epochs / warmup_steps'
        )
    decay_steps = total - warmup  # the decay schedules count from the end of warmup
    end = opt.end_learning_rate_factor * peak

    if opt.schedule == 'cosine':
        decay = optax.cosine_decay_schedule(
            peak, decay_steps, alpha=opt.end_learning_rate_factor
        )
    elif opt.schedule == 'polynomial':
        decay = optax.polynomial_schedule(peak, end, opt.polynomial_power, decay_steps)
    elif opt.schedule == 'step':
        boundaries = jnp.array(
            [round(e * steps_per_epoch) for e in opt.step_epochs], dtype=jnp.int32
        )

        def decay(count):
            num_decays = jnp.sum(count + warmup >= boundaries)  # boundaries count from step 0
            return peak * jnp.asarray(opt.step_factor, jnp.float32) ** num_decays
    else:
        decay = optax.constant_schedule(peak)

    if warmup == 0:
        return decay
    return optax.join_schedules(
        [optax.linear_schedule(0.0, peak, warmup), decay], boundaries=[warmup]
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The optimizer named by optimizer.name, with the scheduled rate, decay and clipping."""
    opt = config.optimizer
    _check_choice('optimizer.name', opt.name, OPTIMIZERS)
    decay_type = opt.weight_decay_type or DEFAULT_WEIGHT_DECAY_TYPE[opt.name]
    _check_choice('optimizer.weight_decay_type', decay_type, WEIGHT_DECAY_TYPES)
    if opt.weight_decay < 0 or opt.grad_clip_norm < 0:
        raise ValueError(
            f'optimizer.weight_decay ({opt.weight_decay}) and grad_clip_norm '
            f'({opt.grad_clip_norm}) must be >= 0'
        )
    schedule = create_learning_rate_schedule(config, steps_per_epoch)
    decay_mask = None if opt.decay_norm_and_bias else weight_decay_mask
    trust_mask = _all_true if opt.adapt_norm_and_bias else weight_decay_mask

    def decay(kind: str) -> list[optax.GradientTransformation]:
        if opt.weight_decay == 0 or decay_type != kind:
            return []
        return [optax.add_decayed_weights(opt.weight_decay, mask=decay_mask)]

    def momentum() -> list[optax.GradientTransformation]:
        return [optax.trace(opt.momentum, nesterov=opt.nesterov)] if opt.momentum else []

    if opt.name == 'sgd':
        direction = momentum()
    elif opt.name == 'lars':
        # The layer-wise rate trust_coefficient * |w| / |g| (You et al. 2017); as usual, BN
        # parameters and biases keep the plain gradient.
        trust = optax.scale_by_trust_ratio(trust_coefficient=opt.trust_coefficient)
        direction = [optax.masked(trust, trust_mask), *momentum()]
    else:
        direction = [optax.scale_by_adam(b1=opt.b1, b2=opt.b2, eps=opt.eps)]
    # LAMB (You et al. 2020) takes the trust ratio of the Adam step plus the decoupled decay.
    lamb_trust = []
    if opt.name == 'lamb':
        lamb_trust = [optax.masked(optax.scale_by_trust_ratio(), trust_mask)]

    clip = [optax.clip_by_global_norm(opt.grad_clip_norm)] if opt.grad_clip_norm > 0 else []
    return optax.chain(
        *clip,
        *decay('l2'),
        *direction,
        *decay('decoupled'),
        *lamb_trust,
        optax.scale_by_learning_rate(schedule),
    )


def describe(config: ml_collections.ConfigDict, steps_per_epoch: int) -> str:
    """One line for the log: optimizer, peak rate, schedule, decay."""
    opt = config.optimizer
    decay_type = opt.weight_decay_type or DEFAULT_WEIGHT_DECAY_TYPE.get(opt.name, '?')
    return (
        f'{opt.name} peak_lr={peak_learning_rate(config):.4g} {opt.schedule} over '
        f'{total_train_steps(config, steps_per_epoch)} steps, weight_decay={opt.weight_decay:g} '
        f'({decay_type}{"" if opt.decay_norm_and_bias else ", kernels only"})'
    )
