"""Two processes on localhost (jax.distributed), as on a pod: every process restores the same
checkpoint when only one of them fails to read the newest, a preemption (SIGTERM to both, or
to one) or a Ctrl-C on one stops both at the same saved step, and the TFDS pipeline gives each
process its own share of the data, through the whole loop.

The read failures are real failures of the real read path, in one process only:
$RESNET_FLAX_INJECT_READ_FAULT (checkpoint.py) makes that process's reads raise a dropped
connection, or flips a bit of what it read so that the checksum check finds it.
"""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from resnet_flax import checkpoint, peer_watch, workdir_lock
from tests.tiny import (
    REPO,
    TINY_FLAGS,
    cpu_env,
    override_flags,
    run_script,
    tiny_config,
    train_losses,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


class _Pod:
    """train.py (or `command`) started as processes 0 and 1 of one run, as on a pod; their
    output goes to temporary files (a full pipe would block a process that is not read)."""

    def __init__(self, flags: list[str], workdir, env_of_process=None,
                 command: tuple[str, ...] = ('train.py',)):
        """`workdir`: one for both, or a list: each process's own view of it."""
        port = _free_port()
        workdirs = workdir if isinstance(workdir, list) else [workdir] * 2
        self.logs = [tempfile.TemporaryFile('w+') for _ in range(2)]  # noqa: SIM115 - __exit__
        self.procs = [
            subprocess.Popen(
                [sys.executable, *command, *flags,
                 *([f'--workdir={workdirs[i]}'] if workdirs[i] is not None else []),
                 f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2',
                 f'--process_id={i}'],
                cwd=REPO, env=cpu_env(1, **(env_of_process or {}).get(i, {})),
                stdout=log, stderr=subprocess.STDOUT, text=True)
            for i, log in enumerate(self.logs)
        ]

    def __enter__(self) -> _Pod:
        return self

    def __exit__(self, *exc_info) -> None:  # none outlives a failed test
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        for log in self.logs:
            log.close()

    def wait(self, timeout: float) -> list[int]:
        """The exit codes, once both have ended; fails after `timeout` s, with their output."""
        deadline = time.monotonic() + timeout
        for i, proc in enumerate(self.procs):
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f'process {i} still running after {timeout} s:\n'
                            + '\n'.join(o[-1500:] for o in self.outputs()))
        return [proc.returncode for proc in self.procs]

    def outputs(self) -> list[str]:
        texts = []
        for log in self.logs:
            log.flush()
            log.seek(0)
            texts.append(log.read())
        return texts

    def finish(self, timeout: float = 900) -> list[str]:
        """Waits for a normal end (exit 0 on both); returns their output."""
        codes = self.wait(timeout)
        outputs = self.outputs()
        for code, output in zip(codes, outputs, strict=True):
            assert code == 0, output[-3000:]
        return outputs


def _two_processes(flags: list[str], workdir, env_of_process=None,
                   command: tuple[str, ...] = ('train.py',)) -> list[str]:
    """train.py (or `command`) as processes 0 and 1 of one run; returns their output."""
    with _Pod(flags, workdir, env_of_process, command) as pod:
        return pod.finish()


def _resumed_from(output: str) -> int:
    line = next(line for line in output.splitlines() if 'Resumed from step' in line)
    return int(line.split('Resumed from step ')[1].split()[0].rstrip('.'))


@pytest.mark.slow
def test_one_process_failing_to_read_the_newest_checkpoint_does_not_split_the_restore(tmp_path):
    """Damaged on process 1 only: both fall back to the same older step. A dropped connection
    on process 1 only: both retry and resume from the newest. Losses then match the original."""
    flags = ['--config=configs/digits.py',
             *override_flags({**TINY_FLAGS, 'num_train_steps': 9, 'eval_every_steps': 9})]
    original = tmp_path / 'original'
    run_script('train.py', [*flags, f'--workdir={original}'], env=cpu_env(2), timeout=900)
    reference = train_losses(original)  # steps 1..9, one uninterrupted run
    shutil.rmtree(original / 'checkpoints' / '9')  # as if killed after step 9's metrics

    cases = {'damaged': ('damaged:1', 3), 'unavailable': ('unavailable:2', 6)}
    for case, (fault, expected_step) in cases.items():
        workdir = tmp_path / case
        shutil.copytree(original, workdir)
        outputs = _two_processes(flags, workdir,
                                 {1: {checkpoint.FAULT_ENV: fault}})
        assert [_resumed_from(o) for o in outputs] == [expected_step] * 2, outputs[1][-2000:]
        resumed = train_losses(workdir)
        assert resumed == pytest.approx(reference, rel=1e-4), case
        quarantined = workdir / checkpoint.QUARANTINE_DIR
        if case == 'damaged':
            assert 'unreadable on process(es) [1]' in outputs[0]
            assert [p.name.split('-')[0] for p in quarantined.iterdir()] == ['6']
        else:
            assert not quarantined.exists()
            assert 'retrying' in outputs[1] or 'retrying' in outputs[0]


def _views_with_a_lagging_host(tmp_path) -> tuple:
    """Steps 10, 20, 30 saved once, copied as each process's view of the workdir; process 1's
    copy of step 30 lacks its state's manifest, as a host whose cache has not caught up."""
    from tests.test_restore_safety import _saved

    manager, _ = _saved(tmp_path / 'saved')
    manager.close()
    for i in range(2):
        shutil.copytree(tmp_path / 'saved', tmp_path / f'process-{i}')
    manifest = tmp_path / 'process-1' / 'checkpoints' / '30' / 'state' / 'manifest.ocdbt'
    away = tmp_path / 'manifest.lagging'
    manifest.rename(away)
    return manifest, away


def _restored_on_two_processes(tmp_path, env_of_process=None) -> list[dict]:
    _two_processes([f'--views={tmp_path}'], None, env_of_process,
                   command=('-m', 'tests.pod_restore'))
    return [json.loads((tmp_path / f'process-{i}.json').read_text()) for i in range(2)]


@pytest.mark.slow
def test_a_file_one_host_misses_while_process_0_reads_it_is_not_damage(tmp_path):
    """Process 1's view of the newest step lacks a file that process 0 reads. That is a lagging
    cache, not damage: both retry; when the view catches up both restore the newest step;
    when it does not, both stop in one line naming process 1, and nothing is moved."""
    manifest, away = _views_with_a_lagging_host(tmp_path / 'lagging')
    before = {i: sorted(p.relative_to(tmp_path / 'lagging')
                        for p in (tmp_path / 'lagging' / f'process-{i}').rglob('*'))
              for i in range(2)}
    results = _restored_on_two_processes(tmp_path / 'lagging')
    assert [r.get('error') for r in results] == ['CheckpointReadError'] * 2, results
    for result in results:
        assert 'Process(es) [1] could not find files of checkpoint step 30' in result['message']
        assert 'process(es) [0] read' in result['message'] and '\n' not in result['message']
    after = {i: sorted(p.relative_to(tmp_path / 'lagging')
                       for p in (tmp_path / 'lagging' / f'process-{i}').rglob('*'))
             for i in range(2)}
    assert after == before  # nothing moved, on either view

    manifest, away = _views_with_a_lagging_host(tmp_path / 'catching_up')
    results = _restored_on_two_processes(
        tmp_path / 'catching_up', {1: {'POD_RESTORE_PUT_BACK': f'{away}:{manifest}:2'}})
    assert results == [{'step': 30}, {'step': 30}]
    assert not any((tmp_path / 'catching_up' / f'process-{i}' / checkpoint.QUARANTINE_DIR)
                   .exists() for i in range(2))


# ---- Preemption of a 2-process run: real signals to real processes, as a pod gets them.

PREEMPT_TOTAL_STEPS = 60  # far more than the few steps a stop takes once signalled
PREEMPT_FLAGS = ['--config=configs/digits.py', *override_flags({
    **TINY_FLAGS, 'num_train_steps': PREEMPT_TOTAL_STEPS,
    'eval_every_steps': 1000, 'checkpoint_every_steps': 1000})]  # both only at the end
START_TIMEOUT = 240.0  # s for both processes to reach their first step (slow shared CI)
STOP_DEADLINE = 120.0  # s from the signal to both processes having exited


@pytest.fixture(scope='module')
def xla_cache(tmp_path_factory) -> dict[int, dict[str, str]]:
    """One persistent compilation cache for every process started here (the user's
    --compilation_cache_dir), so that a restart does not compile again."""
    cache = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('xla_cache')),
             'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
    return {0: cache, 1: cache}


def _logged_train_steps(workdir) -> list[int]:
    """Steps of the complete train records in metrics.jsonl (it may be mid-write)."""
    path = workdir / 'metrics.jsonl'
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    records = [json.loads(line) for line in lines if line.endswith('\n')]
    return [r['step'] for r in records if r['split'] == 'train']


def _wait_until_training(pod: _Pod, workdir) -> None:
    """Until both processes are in the loop: a step needs both, and process 0 logs each."""
    deadline = time.monotonic() + START_TIMEOUT
    while not _logged_train_steps(workdir):
        assert all(p.poll() is None for p in pod.procs), '\n'.join(pod.outputs())[-3000:]
        assert time.monotonic() < deadline, '\n'.join(pod.outputs())[-3000:]
        time.sleep(0.05)


def _signal(pod: _Pod, signals: dict[int, signal.Signals]) -> tuple[list[int], list[str], float]:
    """Sends each process its signal; returns the exit codes, outputs and seconds to exit."""
    sent = time.monotonic()
    for index, signum in signals.items():
        pod.procs[index].send_signal(signum)
    codes = pod.wait(STOP_DEADLINE)
    return codes, pod.outputs(), time.monotonic() - sent


def _saved_at(output: str, why: str) -> int:
    """The step of `why: saved a checkpoint at step N` (why: Preempted or Interrupted)."""
    found = re.findall(rf'{why}: saved a checkpoint at step (\d+);', output)
    assert found, output[-3000:]
    return int(found[-1])


def _committed_steps(workdir) -> list[int]:
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        return manager.all_steps()
    finally:
        manager.close()


def _eval_records(workdir) -> list[dict]:
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return [r for r in records if r['split'] == 'eval']


@pytest.mark.slow
def test_sigterm_to_both_processes_saves_one_step_and_the_same_command_resumes_exactly(
        tmp_path, xla_cache):
    """A pod preemption: SIGTERM to every process mid-training. Both exit 0 in bounded time
    after saving the same step; the same command resumes from it and ends exactly where an
    uninterrupted 2-process run ends."""
    reference = tmp_path / 'reference'
    _two_processes(PREEMPT_FLAGS, reference, xla_cache)  # also fills the compilation cache

    workdir = tmp_path / 'preempted'
    with _Pod(PREEMPT_FLAGS, workdir, xla_cache) as pod:
        _wait_until_training(pod, workdir)
        codes, outputs, seconds = _signal(pod, {0: signal.SIGTERM, 1: signal.SIGTERM})
    assert codes == [0, 0], '\n'.join(o[-2000:] for o in outputs)
    step = _saved_at(outputs[0], 'Preempted')
    assert _saved_at(outputs[1], 'Preempted') == step < PREEMPT_TOTAL_STEPS
    assert _committed_steps(workdir) == [step] and max(_logged_train_steps(workdir)) == step
    assert not (workdir / workdir_lock.LOCK_FILE).exists()

    outputs = _two_processes(PREEMPT_FLAGS, workdir, xla_cache)
    assert [_resumed_from(o) for o in outputs] == [step, step], outputs[0][-2000:]
    assert train_losses(workdir) == train_losses(reference)  # every step, bit for bit
    assert _eval_records(workdir) == _eval_records(reference)
    print(f'\nPOD sigterm to both: stopped at step {step} in {seconds:.1f} s', flush=True)


@pytest.mark.slow
@pytest.mark.parametrize('signum, target', [(signal.SIGTERM, 1), (signal.SIGINT, 0)],
                         ids=['sigterm-on-process-1', 'ctrl-c-on-process-0'])
def test_a_signal_to_one_process_stops_both_at_the_same_step_with_a_checkpoint(
        tmp_path, xla_cache, signum, target):
    """A host's maintenance event (SIGTERM on one host), or a Ctrl-C in one terminal: JAX's
    coordination service tells the other process, so both save the same step and exit, the
    interrupted one with 130. (A lone Ctrl-C used to leave both waiting for good.)"""
    workdir = tmp_path / 'run'
    with _Pod(PREEMPT_FLAGS, workdir, xla_cache) as pod:
        _wait_until_training(pod, workdir)
        codes, outputs, seconds = _signal(pod, {target: signum})
    interrupted = signum == signal.SIGINT
    assert codes == [130 if interrupted and i == target else 0 for i in range(2)], (
        '\n'.join(o[-2000:] for o in outputs))
    whys = ['Interrupted' if interrupted and i == target else 'Preempted' for i in range(2)]
    step = _saved_at(outputs[0], whys[0])
    assert _saved_at(outputs[1], whys[1]) == step < PREEMPT_TOTAL_STEPS
    assert _committed_steps(workdir) == [step] and max(_logged_train_steps(workdir)) == step
    print(f'\nPOD {signal.Signals(signum).name} on process {target}: both stopped at step '
          f'{step} in {seconds:.1f} s', flush=True)


@pytest.mark.slow
def test_when_one_process_dies_the_other_stops_within_seconds_in_one_line(tmp_path, xla_cache):
    """SIGKILL to process 1 mid-training (a crashed host): process 0 used to wait about 100 s
    for it (JAX's shutdown barrier, then an abort with a page of C++ log). Now it stops
    within seconds, exit 1, its last line naming the dead process."""
    workdir = tmp_path / 'run'
    with _Pod(PREEMPT_FLAGS, workdir, xla_cache) as pod:
        _wait_until_training(pod, workdir)
        killed = time.monotonic()
        pod.procs[1].kill()
        try:
            code = pod.procs[0].wait(timeout=STOP_DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail('process 0 still running:\n' + pod.outputs()[0][-3000:])
        seconds = time.monotonic() - killed
        output = pod.outputs()[0]
    lines = [line for line in output.splitlines() if line.strip()]
    assert code == 1, output[-3000:]
    assert lines[-1].startswith('Error: process 1 of 2 stopped responding'), output[-3000:]
    assert 'Fatal Python error' not in output and 'Traceback' not in output
    assert seconds < peer_watch.DEAD_AFTER_SECONDS + 10, seconds
    assert not (workdir / workdir_lock.LOCK_FILE).exists()  # released on the way out
    print(f'\nPOD process 1 killed: process 0 stopped in {seconds:.1f} s', flush=True)


SAVE_FAILURE_FLAGS = ['--config=configs/digits.py', *override_flags({
    **TINY_FLAGS, 'num_train_steps': 40, 'eval_every_steps': 1000,
    'checkpoint_every_steps': 5})]


def _views_of_one_store(tmp_path) -> list:
    """Each process's workdir, whose checkpoints/ is a link to one shared store (as each host
    mounts the same bucket): replacing a process's link breaks the storage for it alone."""
    store = tmp_path / 'store'
    store.mkdir()
    views = [tmp_path / f'process-{i}' for i in range(2)]
    for view in views:
        view.mkdir()
        (view / checkpoint.CHECKPOINT_DIR).symlink_to(store, target_is_directory=True)
    return views


@pytest.mark.slow
@pytest.mark.parametrize('failing', [0, 1])
def test_a_save_that_fails_on_one_process_stops_both_within_seconds_in_one_line(
        tmp_path, xla_cache, failing):
    """The checkpoint directory stops being writable on one host of two (it lost its storage
    mount) while the run saves every 5 steps. The other processes used to wait in orbax's
    barriers for that host's part of the save (20 minutes), and it for theirs: the run hung.
    Now the host whose save failed stops in one line saying what is intact, the other stops
    within seconds in one line naming it and that error, and once the storage is back the
    same command resumes from the intact step."""
    views = _views_of_one_store(tmp_path)
    broken = views[failing] / checkpoint.CHECKPOINT_DIR
    with _Pod(SAVE_FAILURE_FLAGS, views, xla_cache) as pod:
        while not (tmp_path / 'store' / '5').is_dir():  # committed: renamed from its tmp name
            assert all(p.poll() is None for p in pod.procs), '\n'.join(pod.outputs())[-3000:]
            time.sleep(0.05)
        broken.unlink()
        broken.write_text('not a directory')  # the next save fails here, with ENOTDIR
        started = time.monotonic()
        codes = pod.wait(STOP_DEADLINE)
        seconds = time.monotonic() - started
        outputs = pod.outputs()
    lines = [[line for line in output.splitlines() if line.strip()][-1] for output in outputs]
    assert codes == [1, 1], '\n'.join(o[-2000:] for o in outputs)
    own = lines[failing]
    assert own.startswith('Error: Could not save the checkpoint of step '), outputs[failing][-3000:]
    assert 'the checkpoints up to step ' in own and 'run the same command to resume.' in own
    other = lines[1 - failing]
    assert other.startswith(f'Error: process {failing} of 2 stopped on an error'), other
    assert other.endswith(f"Process {failing}'s error: {own[len('Error: '):]}"), other
    for output in outputs:
        assert 'Traceback' not in output, output[-5000:]
    assert seconds < 2 * peer_watch.DEAD_AFTER_SECONDS + 30, seconds
    intact = int(own.split('the checkpoints up to step ')[1].split()[0])

    broken.unlink()
    broken.symlink_to(tmp_path / 'store', target_is_directory=True)  # the storage is back
    outputs = _two_processes(SAVE_FAILURE_FLAGS, views, xla_cache)
    assert [_resumed_from(o) for o in outputs] == [intact, intact], outputs[0][-2000:]
    print(f'\nPOD save failed on process {failing}: both stopped in {seconds:.1f} s, '
          f'resumed from step {intact}', flush=True)


def _two_saved_steps(tmp_path):
    """A manager holding steps 1 and 2 of {'w': arange(64) * step}, and their restore target."""
    manager = checkpoint.create_manager(tmp_path / 'checkpoints', keep_best=False)
    for step in (1, 2):
        state = {'w': jnp.arange(64.0) * step}
        checkpoint.save(manager, step, state, tiny_config())
        manager.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    return manager, target


def test_storage_errors_are_retried_and_only_damage_is_moved_aside(tmp_path, monkeypatch):
    """One process: a dropped connection is retried and the newest step restores; one that
    lasts stops with a one-line error and moves nothing; bad bytes are moved aside."""
    manager, target = _two_saved_steps(tmp_path)
    monkeypatch.setattr(checkpoint, 'READ_FIRST_WAIT_SECONDS', 0.05)
    quarantine = tmp_path / checkpoint.QUARANTINE_DIR

    monkeypatch.setenv(checkpoint.FAULT_ENV, 'unavailable:2')
    assert float(checkpoint.restore_latest(manager, target)['w'][1]) == 2.0
    monkeypatch.setenv(checkpoint.FAULT_ENV, f'unavailable:{checkpoint.READ_ATTEMPTS}')
    with pytest.raises(checkpoint.CheckpointReadError, match='left in place'):
        checkpoint.restore_latest(manager, target)
    assert not quarantine.exists() and manager.all_steps() == [1, 2]

    monkeypatch.setenv(checkpoint.FAULT_ENV, 'damaged:1')
    restored = checkpoint.restore_latest(manager, target)
    np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(64.0))
    assert [p.name.split('-')[0] for p in quarantine.iterdir()] == ['2']


def test_a_file_missing_on_one_read_only_is_not_damage(tmp_path, monkeypatch):
    """Orbax reports some storage errors as a missing item (it swallows an OSError listing a
    step), so a missing file is believed only when a second read, while the storage answers,
    finds it missing again. Here the file is back by the second read: nothing is moved."""
    manager, target = _two_saved_steps(tmp_path)
    manifest = tmp_path / 'checkpoints' / '2' / 'state' / 'manifest.ocdbt'
    away = tmp_path / 'manifest.away'
    waits = []

    def wait_then_put_back(seconds: float) -> None:  # the read-again pause of _read_agreed
        waits.append(seconds)
        if away.exists():
            away.rename(manifest)

    monkeypatch.setattr(checkpoint, 'time', types.SimpleNamespace(sleep=wait_then_put_back,
                                                                  time=time.time))
    manifest.rename(away)
    assert float(checkpoint.restore_latest(manager, target)['w'][1]) == 2.0
    assert len(waits) == 1 and not (tmp_path / checkpoint.QUARANTINE_DIR).exists()

    manifest.unlink()  # now for good: seen on two reads, so moved aside
    assert float(checkpoint.restore_latest(manager, target)['w'][1]) == 1.0
    assert [p.name.split('-')[0] for p in (tmp_path / checkpoint.QUARANTINE_DIR).iterdir()] == [
        '2']
    assert len(waits) == 2


def test_a_checkpoint_of_another_network_with_the_same_shapes_is_refused_and_kept(tmp_path):
    """Another bn_epsilon (or v1 strides for v1.5) gives arrays of the same shapes; the config
    saved in the checkpoint tells them apart, also in a workdir without config.json."""
    manager = checkpoint.create_manager(tmp_path / 'checkpoints', keep_best=False)
    state = {'w': jnp.arange(64.0)}
    checkpoint.save(manager, 1, state, tiny_config())
    manager.wait_until_finished()
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          state)
    other = tiny_config(**{'model.bn_epsilon': 1e-3, 'model.stride_placement': 'v1'})
    with pytest.raises(checkpoint.CheckpointMismatchError,
                       match='another network.*bn_epsilon.*stride_placement'):
        checkpoint.restore_latest(manager, target, model_config=other.model)
    assert manager.all_steps() == [1]
    assert not (tmp_path / checkpoint.QUARANTINE_DIR).exists()
    restored = checkpoint.restore_latest(manager, target, model_config=tiny_config().model)
    np.testing.assert_array_equal(np.asarray(restored['w']), np.arange(64.0))


# ---- The TFDS source on 2 processes: each reads its own disjoint share of the split.

@pytest.fixture(scope='module')
def imagenet_dir(tmp_path_factory):
    from tests.imagenet_fixture import make_imagenet

    # 12 train images (3 steps of 4 per epoch), 9 validation images: shares of 5 and 4.
    return make_imagenet(tmp_path_factory.mktemp('imagenet'), num_classes=3, train_per_class=4,
                         val_per_class=3, image_size=(40, 48))


def _fingerprints(images: np.ndarray) -> list[bytes]:
    """One key per image (the fixture's images are noisy, so no two are alike)."""
    return [bytes(image) for image in images.reshape(-1, *images.shape[-3:])]


@pytest.mark.slow
def test_two_processes_read_disjoint_shares_in_a_resumable_order_and_eval_counts_once(
        imagenet_dir, tmp_path):
    """Each process of a real 2-process job asks for batches as the loop and the eval do."""
    from resnet_flax import data
    from tests import pod_pipeline

    _two_processes([f'--data_dir={imagenet_dir}', f'--out={tmp_path}'], None,
                   command=('-m', 'tests.pod_pipeline'))
    got = [dict(np.load(tmp_path / f'process-{i}.npz')) for i in range(2)]
    assert [int(g['process_index']) for g in got] == [0, 1]

    # (a) One epoch: the two shares are disjoint and together are the whole train split.
    deterministic = pod_pipeline.config_for(imagenet_dir, **pod_pipeline.DETERMINISTIC)
    split = np.concatenate([b['image'] for b in data.eval_batches(
        deterministic.data, global_batch_size=4, split='train')])
    shares = [_fingerprints(g['share_image']) for g in got]
    assert not set(shares[0]) & set(shares[1])
    assert sorted(shares[0] + shares[1]) == sorted(_fingerprints(split))

    # (c) A resumed run asks for the batches from its step on: the same ones, on each process.
    for g in got:
        np.testing.assert_array_equal(g['resumed_image'],
                                      g['order_image'][pod_pipeline.RESUME_STEP:])
        np.testing.assert_array_equal(g['resumed_label'],
                                      g['order_label'][pod_pipeline.RESUME_STEP:])
    assert not np.array_equal(got[0]['order_image'], got[1]['order_image'])

    # (b) Eval: the same number of batches everywhere, every example exactly once, padding
    # masked out.
    assert got[0]['eval_mask'].shape == got[1]['eval_mask'].shape
    assert sum(int(g['eval_mask'].sum()) for g in got) == 9
    evaluated = [image for g in got for image in _fingerprints(g['eval_image'][g['eval_mask']])]
    single = np.concatenate([b['image'][b['mask']] for b in data.eval_batches(
        deterministic.data, global_batch_size=4)])
    assert sorted(evaluated) == sorted(_fingerprints(single))


@pytest.mark.slow
def test_train_py_on_two_processes_trains_on_tfds_and_evaluates_every_example(
        imagenet_dir, tmp_path):
    flags = ['--config=configs/digits.py', *override_flags({
        **TINY_FLAGS, 'data.dataset': 'imagenet2012', 'data.data_dir': imagenet_dir,
        'data.eval_split': 'validation', 'data.train_crop': 'inception',
        'data.shuffle_buffer_size': 16, 'model.num_classes': 1000, 'batch_size': 4,
        'eval_batch_size': 4})]
    workdir = tmp_path / 'run'
    outputs = _two_processes(flags, workdir)
    assert 'Training on 2 x cpu (cpu), 2 processes.' in outputs[0], outputs[0][-2000:]
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in records if r['split'] == 'train'] == [1, 2, 3, 4, 5, 6]
    evals = [r for r in records if r['split'] == 'eval']
    assert [(r['step'], r['num_examples']) for r in evals] == [(3, 9), (6, 9)]
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    assert manager.all_steps() == [3, 6]
