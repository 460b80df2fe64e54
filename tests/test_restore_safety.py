"""A workdir that had checkpoints never silently starts over (checkpoint.restore_latest).

Real orbax checkpoints of a small state. Faults are real damage to the files, or, where the
scenario is an orbax error (a changed layout, a mount that has not caught up, a path bug), the
orbax read itself raising that error at its boundary (`StandardCheckpointHandler.restore`).
The 2-process case (one host's view of the storage lagging) is in tests/test_pod.py.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from resnet_flax import checkpoint
from tests.tiny import tiny_config

STEPS = (10, 20, 30)


@pytest.fixture(autouse=True)
def quick_rereads(monkeypatch):
    """The pause before a read again (2 s and doubling) matters on real storage only."""
    monkeypatch.setattr(checkpoint, 'READ_FIRST_WAIT_SECONDS', 0.01)


def _saved(tmp_path: Path, steps=STEPS):
    """A manager holding `steps` of {'step', 'w'}, and the restore target. `w` is noise, so
    that its file is the largest and does not compress."""
    manager = checkpoint.create_manager(tmp_path / 'checkpoints', keep=10, keep_best=False)
    for step in steps:
        state = {'step': jnp.int32(step), 'w': jax.random.normal(jax.random.key(step), (4096,))}
        checkpoint.save(manager, step, state, tiny_config())
        manager.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    return manager, target


def _fingerprint(directory: Path) -> dict[str, str]:
    """Every file under `directory` by its bytes: 'nothing moved or changed' is equality."""
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob('*')) if p.is_file()}


def _restored_step(state) -> int:
    return int(state['step'])


def _refused_with_nothing_changed(manager, target, directory: Path, match: str) -> Exception:
    """restore_latest stops with CheckpointRestoreError matching `match`, and every file under
    `directory` is as it was."""
    before = _fingerprint(directory)
    with pytest.raises(checkpoint.CheckpointRestoreError, match=match) as raised:
        checkpoint.restore_latest(manager, target)
    assert _fingerprint(directory) == before
    return raised.value


def _garbage(step_dir: Path) -> None:
    """64 bytes of noise in the middle of the largest array file: only a checksum sees it."""
    files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    target = max(files, key=lambda p: p.stat().st_size)
    content = bytearray(target.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = np.random.default_rng(0).bytes(64)
    target.write_bytes(bytes(content))


def _orbax_raises(monkeypatch, error: Exception, steps=None):
    """The orbax array read raises `error` (for the steps in `steps`, or for every step)."""
    real = ocp.StandardCheckpointHandler.restore

    def restore(self, directory, *args, **kwargs):
        if steps is None or int(Path(directory).parent.name) in steps:
            raise error
        return real(self, directory, *args, **kwargs)

    monkeypatch.setattr(ocp.StandardCheckpointHandler, 'restore', restore)


def test_the_same_not_found_on_every_step_stops_and_moves_nothing(tmp_path, monkeypatch):
    """The reproduction of issue 22: orbax raising NOT_FOUND for every step used to move all
    three aside and start over from step 0."""
    manager, target = _saved(tmp_path)
    before = _fingerprint(tmp_path)
    _orbax_raises(monkeypatch, FileNotFoundError(
        'NOT_FOUND: Error opening "ocdbt" driver: manifest.ocdbt not found'))
    for fallback in ('one', 'all'):
        with pytest.raises(checkpoint.CheckpointRestoreError) as raised:
            checkpoint.restore_latest(manager, target, fallback=fallback)
        message = str(raised.value)
        print(message)
        assert '\n' not in message
        assert 'steps 30, 20, 10 all fail the same way: NOT_FOUND' in message
        assert 'same error on every step' in message and 'nothing was moved' in message
        assert '--config.checkpoint_fallback=scratch' in message
        assert _fingerprint(tmp_path) == before  # checkpoints/ intact, no quarantine folder
        assert manager.all_steps() == list(STEPS)


def test_scratch_moves_every_step_aside_and_starts_over(tmp_path, monkeypatch, capsys):
    manager, target = _saved(tmp_path)
    before = _fingerprint(tmp_path / 'checkpoints')
    _orbax_raises(monkeypatch, FileNotFoundError('NOT_FOUND: manifest.ocdbt'))
    assert checkpoint.restore_latest(manager, target, fallback='scratch') is None
    assert manager.all_steps() == []
    moved = sorted((tmp_path / checkpoint.QUARANTINE_DIR).iterdir())
    assert sorted(int(p.name.split('-')[0]) for p in moved) == list(STEPS)
    # Moved whole, not altered: the same files under their new names.
    after = {f'{p.name.split("-")[0]}/{name}': digest for p in moved
             for name, digest in _fingerprint(p).items()}
    assert after == before
    out = capsys.readouterr().out
    assert out.count('training from step 0 (--config.checkpoint_fallback=scratch)') == 3


def test_one_truly_damaged_newest_step_falls_back_once_and_says_where_it_went(
        tmp_path, capsys):
    manager, target = _saved(tmp_path)
    _garbage(tmp_path / 'checkpoints' / '30')
    assert _restored_step(checkpoint.restore_latest(manager, target)) == 20
    moved = list((tmp_path / checkpoint.QUARANTINE_DIR).iterdir())
    assert [p.name.split('-')[0] for p in moved] == ['30']
    assert manager.all_steps() == [10, 20]
    out = capsys.readouterr().out
    assert f'Checkpoint at step 30 is unreadable; moved it to {moved[0]} and resuming from ' \
           'step 20' in out and 'does not match the checksum' in out


def test_two_damaged_steps_are_not_walked_past_without_the_flag(tmp_path):
    manager, target = _saved(tmp_path)
    for step in (30, 20):
        _garbage(tmp_path / 'checkpoints' / str(step))
    _refused_with_nothing_changed(
        manager, target, tmp_path,
        r'steps 30, 20 all fail the same way: .*checksum.*step 10 does, but '
        r'nothing was moved: more than one.*checkpoint_fallback=all')
    # Asked for: both moved aside, step 10 restored.
    assert _restored_step(checkpoint.restore_latest(manager, target, fallback='all')) == 10
    assert sorted(p.name.split('-')[0] for p in
                  (tmp_path / checkpoint.QUARANTINE_DIR).iterdir()) == ['20', '30']


def test_the_only_checkpoint_damaged_stops_instead_of_starting_over(tmp_path):
    manager, target = _saved(tmp_path, steps=(10,))
    _garbage(tmp_path / 'checkpoints' / '10')
    _refused_with_nothing_changed(
        manager, target, tmp_path,
        'No checkpoint.*step 10: .*checksum.*checkpoint_fallback=scratch')


def test_an_error_that_is_not_damage_is_neither_retried_nor_moved(tmp_path, monkeypatch):
    """A software error (here orbax raising a TypeError, as an API change would) on the newest
    step: the older step reads, but the newest shows no evidence of damage, so it stays."""
    manager, target = _saved(tmp_path)
    before = _fingerprint(tmp_path)
    sleeps = []
    monkeypatch.setattr(checkpoint.time, 'sleep', sleeps.append)
    _orbax_raises(monkeypatch, TypeError('restore() got an unexpected keyword argument'),
                  steps={30})
    with pytest.raises(checkpoint.CheckpointRestoreError,
                       match=r'step 30: restore\(\) got an unexpected.*step 20 does, '
                             r'but nothing was moved: that is no evidence of damage') as raised:
        checkpoint.restore_latest(manager, target)
    assert sleeps == [] and _fingerprint(tmp_path) == before
    print(raised.value)


def test_a_missing_file_in_a_step_written_by_other_library_versions_is_not_damage(tmp_path):
    """The newest step's meta names another orbax: its unreadable files say more about the
    software than about the disk, so it is not moved."""
    manager, target = _saved(tmp_path)
    step_dir = tmp_path / 'checkpoints' / '30'
    meta_file = next(p for p in (step_dir / 'meta').iterdir() if p.is_file()
                     and 'libraries' in p.read_text())
    meta = json.loads(meta_file.read_text())
    meta['libraries']['orbax-checkpoint'] = '0.0.1'
    meta_file.write_text(json.dumps(meta))
    (step_dir / 'state' / 'manifest.ocdbt').unlink()
    _refused_with_nothing_changed(
        manager, target, tmp_path,
        r'step 30: written by other versions \(orbax-checkpoint 0.0.1 there')


def test_an_unknown_fallback_is_a_one_line_error(tmp_path):
    manager, target = _saved(tmp_path, steps=(10,))
    with pytest.raises(ValueError, match="checkpoint_fallback='everything'; choose one of"):
        checkpoint.restore_latest(manager, target, fallback='everything')
