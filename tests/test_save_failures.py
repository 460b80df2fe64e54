"""A background save that fails is known at the next step, in one line, and nothing waits on it.

A real orbax manager saves to a directory that is then replaced by a file, so that its next
background save fails the way a lost mount does. If orbax ever words its failure report
otherwise (save_watch.py reads it), the first test here fails. The 2-process case, where
waiting on a failed save hung the run, is in test_pod.py.
"""

from __future__ import annotations

import shutil
import time

import jax
import jax.numpy as jnp
import pytest

from resnet_flax import checkpoint
from tests.tiny import tiny_config


def _state(step: int) -> dict:
    return {'step': jnp.int32(step), 'w': jax.random.normal(jax.random.key(step), (1024,))}


def test_a_background_save_that_fails_stops_at_the_next_check_and_keeps_the_older_step(
        tmp_path):
    directory = tmp_path / 'checkpoints'
    manager = checkpoint.create_manager(directory, keep=10, keep_best=False)
    checkpoint.save(manager, 10, _state(10), tiny_config())
    checkpoint.wait_until_saved(manager)
    checkpoint.check_background_save(manager)  # nothing failed: no error

    shutil.move(directory, tmp_path / 'moved')
    directory.write_text('not a directory')  # the next save cannot make its directory
    checkpoint.save(manager, 20, _state(20), tiny_config())
    deadline = time.monotonic() + 60
    with pytest.raises(checkpoint.CheckpointWriteError) as raised:
        while time.monotonic() < deadline:
            checkpoint.check_background_save(manager)  # what the trainer calls every step
            time.sleep(0.05)
    message = str(raised.value)
    assert message.startswith(f'Could not save the checkpoint of step 20 to {directory}: ')
    assert 'Not a directory' in message and '\n' not in message
    assert 'the checkpoints up to step 10 are intact' in message

    started = time.monotonic()
    checkpoint.wait_until_saved(manager)  # reported once; no second error, no long wait
    assert time.monotonic() - started < 30
    checkpoint.check_background_save(manager)
    assert (tmp_path / 'moved' / '10').is_dir()


def test_save_refuses_to_start_after_a_failed_background_save(tmp_path):
    """A failure not yet checked is raised by the next save, before it starts."""
    directory = tmp_path / 'checkpoints'
    manager = checkpoint.create_manager(directory, keep=10, keep_best=False)
    checkpoint.save(manager, 1, _state(1), tiny_config())
    checkpoint.wait_until_saved(manager)
    shutil.rmtree(directory)
    directory.write_text('not a directory')
    checkpoint.save(manager, 2, _state(2), tiny_config())
    deadline = time.monotonic() + 60
    while manager.is_saving_in_progress() and time.monotonic() < deadline:
        time.sleep(0.05)
    with pytest.raises(checkpoint.CheckpointWriteError, match='checkpoint of step 2 '):
        checkpoint.save(manager, 3, _state(3), tiny_config())
    assert not directory.is_dir()  # step 3 was not started
