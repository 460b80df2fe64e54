"""The input-wait metric: time blocked in next(batches) over the window, and the bound on how
far the loop runs ahead of the device (without it the wait would not mean an idle device)."""

import time

import jax
import jax.numpy as jnp
import pytest

from resnet_flax import input_wait


def _slow_batches(seconds):
    while True:
        time.sleep(seconds)
        yield {'image': None}


def test_wait_fraction_is_the_share_of_the_window_spent_in_next():
    batches = input_wait.TimedBatches(_slow_batches(0.05))
    start = time.perf_counter()
    for _ in range(4):
        next(batches)
        time.sleep(0.05)  # the "step": as long as the wait
    fraction = batches.wait_fraction(time.perf_counter() - start)
    assert 0.3 < fraction < 0.7
    assert batches.wait_fraction(1.0) == 0.0  # each call starts a new window


def test_wait_fraction_stays_in_unit_interval_and_restart_forgets():
    batches = input_wait.TimedBatches(_slow_batches(0.02))
    next(batches)
    assert batches.wait_fraction(0.001) == 1.0  # clipped, never above 1
    next(batches)
    batches.restart()
    assert batches.wait_fraction(1.0) == 0.0
    assert batches.wait_fraction(0.0) == 0.0


def test_pacer_keeps_at_most_max_steps_ahead_in_flight():
    step = jax.jit(lambda x: jnp.tanh(x @ x))
    x = jnp.ones((1000, 1000)) / 1000  # a step of tens of ms: dispatch alone takes ~0.1 ms
    step(x).block_until_ready()  # compiled
    pacer = input_wait.StepPacer(2)
    outputs = []
    for _ in range(6):
        x = step(x)
        outputs.append(x)
        pacer.dispatched(x)
    # Every step but the last two has been waited for (unpaced, the loop would be 6 ahead).
    assert all(out.is_ready() for out in outputs[:-2])


def test_negative_bound_is_a_one_line_error():
    with pytest.raises(ValueError, match='max_steps_ahead') as error:
        input_wait.StepPacer(-1)
    assert '\n' not in str(error.value)
