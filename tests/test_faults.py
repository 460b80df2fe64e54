"""Fault injection: train.py as a real subprocess, killed, preempted, given broken checkpoints,
NaNs, a busy workdir and a missing dataset, on the tiny digits config.

Every faulty run is compared with one uninterrupted run of the same command (`reference`):
training losses and the final train state must match bit for bit (1e-6 at most).

    python -m pytest -m fault -s                   # the CI size, with the figures printed
    RF_FAULT_ROUNDS=30 python -m pytest -m fault -s  # more kills (and steps)
    RF_FAULT_SEED=123 ...                           # replay the kill moments of a failed run

Each test prints one `FAULTS` line and writes it as JSON under its tmp dir (and appends it to
$RF_FAULT_REPORT when set), for RELIABILITY.md.
"""

from __future__ import annotations

import ast
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from resnet_flax import checkpoint, data, models, optim, sharding, train, workdir_lock
from resnet_flax.state import abstract_state
from tests.tiny import REPO, TINY_FLAGS, cpu_env, override_flags, tiny_config, train_losses

pytestmark = [pytest.mark.fault, pytest.mark.slow]

ROUNDS = int(os.environ.get('RF_FAULT_ROUNDS', '5'))
SEED = int(os.environ.get('RF_FAULT_SEED', str(random.SystemRandom().randrange(2**31))))
TOTAL_STEPS = max(30, 6 * ROUNDS)  # room for ROUNDS kills between checkpoints
CHECKPOINT_EVERY = 3
EVAL_EVERY = 10
FAULT_FLAGS = {**TINY_FLAGS, 'num_train_steps': TOTAL_STEPS,
               'checkpoint_every_steps': CHECKPOINT_EVERY, 'eval_every_steps': EVAL_EVERY}
START_TIMEOUT = 240  # s for one train.py to start and reach a given moment (slow shared CI)
TMP_SUFFIX = '.orbax-checkpoint-tmp'
# One persistent XLA cache for every train.py started here: a restart then skips most of its
# ~10 s of compiling (the user's --compilation_cache_dir). Set by the `compilation_cache` fixture.
COMPILATION_CACHE: dict[str, str] = {}


STARTED: list[Run] = []  # every train.py started here, so that none outlives a failed test


def _stop(runs: list[Run]) -> None:
    for run in runs:
        if run.proc.poll() is None:
            run.kill()


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
    COMPILATION_CACHE.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp('xla_cache')),
                             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
                             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
    yield
    COMPILATION_CACHE.clear()
    _stop(STARTED)


@pytest.fixture(autouse=True)
def stop_leftover_runs():
    before = len(STARTED)
    yield
    _stop([run for run in STARTED[before:] if not run.shared])


# ---- Running train.py in the background.

class Run:
    """train.py in a subprocess, its output in files (a full pipe would block it)."""

    def __init__(self, workdir: Path, logs: Path, name: str, shared: bool = False, **overrides):
        self.workdir = workdir
        self.shared = shared  # outlives the test that started it (the reference run)
        env = cpu_env(**COMPILATION_CACHE) if COMPILATION_CACHE else cpu_env()
        self.stdout_path, self.stderr_path = logs / f'{name}.out', logs / f'{name}.err'
        flags = override_flags({**FAULT_FLAGS, **overrides})
        with self.stdout_path.open('w') as out, self.stderr_path.open('w') as err:
            self.proc = subprocess.Popen(
                [sys.executable, str(REPO / 'train.py'), '--config=configs/digits.py',
                 f'--workdir={workdir}', *flags],
                cwd=REPO, env=env, stdout=out, stderr=err,
            )
        STARTED.append(self)
        metrics = workdir / 'metrics.jsonl'
        self._offset = metrics.stat().st_size if metrics.exists() else 0

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def records(self) -> list[dict]:
        """The metrics records this run appended (complete lines only)."""
        path = self.workdir / 'metrics.jsonl'
        if not path.exists():
            return []
        with path.open('rb') as f:
            f.seek(self._offset)
            text = f.read().decode()
        return [json.loads(line) for line in text.splitlines(keepends=True) if line.endswith('\n')]

    def train_steps(self) -> list[int]:
        return [r['step'] for r in self.records() if r['split'] == 'train']

    def wait_for(self, condition, timeout: float = START_TIMEOUT, poll: float = 0.02) -> bool:
        """True once `condition()` holds; False if the run ended first."""
        deadline = time.time() + timeout
        while self.proc.poll() is None:
            if condition():
                return True
            assert time.time() < deadline, f'timed out; stderr:\n{self.stderr[-3000:]}'
            time.sleep(poll)
        return condition()

    def finish(self, timeout: float = START_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def last_line(self) -> str:
        lines = [line for line in self.stderr.splitlines() if line.strip()]
        return lines[-1] if lines else ''


def _committed_steps(workdir: Path) -> list[int]:
    directory = workdir / checkpoint.CHECKPOINT_DIR
    if not directory.exists():
        return []
    return sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit())


def _unfinished_saves(workdir: Path) -> list[str]:
    """Temporary directories of asynchronous saves that have not been committed (yet)."""
    directory = workdir / checkpoint.CHECKPOINT_DIR
    if not directory.exists():
        return []
    return sorted(p.name for p in directory.iterdir() if TMP_SUFFIX in p.name)


def _restore(workdir: Path, step: int | None = None):
    """(step, train state) of a checkpoint, read and checksum-verified by the checkpoint module."""
    config = tiny_config(num_train_steps=TOTAL_STEPS)
    mesh = sharding.create_mesh()
    model = models.from_config(config.model)
    info = data.get_info(config.data)
    optimizer = optim.create_optimizer(
        config, train.make_schedule(config, info.num_train_examples).steps_per_epoch)
    target = abstract_state(model, optimizer, info.image_shape, False, mesh)
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    try:
        step = manager.latest_step() if step is None else step
        return step, jax.device_get(checkpoint.restore_step(manager, step, target))
    finally:
        manager.close()


def _compare_states(a, b) -> dict:
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    diffs = [float(np.max(np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64))))
             if np.size(x) else 0.0 for x, y in zip(leaves_a, leaves_b, strict=True)]
    identical = all(np.array_equal(np.asarray(x), np.asarray(y))
                    for x, y in zip(leaves_a, leaves_b, strict=True))
    return {'arrays': len(leaves_a), 'max_abs_diff': max(diffs), 'bitwise_equal': identical}


def _eval_top1(workdir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / 'metrics.jsonl').read_text().splitlines()]
    return {r['step']: r['top1'] for r in records if r['split'] == 'eval'}  # later ones win


def _compare_losses(got: dict[int, float], want: dict[int, float]) -> dict:
    assert sorted(got) == sorted(want), f'logged steps differ: {sorted(got)} vs {sorted(want)}'
    diffs = [abs(got[s] - want[s]) for s in want]
    return {'steps': len(want), 'max_abs_diff': max(diffs),
            'bitwise_equal': sum(got[s] == want[s] for s in want)}


def _report(tmp_path: Path, name: str, figures: dict) -> None:
    line = json.dumps({'test': name, **figures})
    print(f'\nFAULTS {line}', flush=True)
    (tmp_path / f'{name}.json').write_text(line + '\n')
    if os.environ.get('RF_FAULT_REPORT'):
        with open(os.environ['RF_FAULT_REPORT'], 'a') as f:
            f.write(line + '\n')


class Reference:
    """The uninterrupted run, started once in the background and shared by the tests."""

    def __init__(self, root: Path):
        self.workdir = root / 'reference'
        self.run = Run(self.workdir, root, 'reference', shared=True)
        self._done = False

    def wait(self) -> Path:
        if not self._done:
            assert self.run.finish() == 0, self.run.stderr[-3000:]
            self._done = True
        return self.workdir


@pytest.fixture(scope='module')
def reference(tmp_path_factory) -> Reference:
    return Reference(tmp_path_factory.mktemp('reference'))


def _assert_matches_reference(workdir: Path, reference: Reference) -> dict:
    want = reference.wait()
    losses = _compare_losses(train_losses(workdir), train_losses(want))
    assert losses['max_abs_diff'] <= 1e-6, losses
    assert _eval_top1(workdir) == _eval_top1(want)
    (step, state), (want_step, want_state) = _restore(workdir), _restore(want)
    assert step == want_step == TOTAL_STEPS
    states = _compare_states(state, want_state)
    assert states['max_abs_diff'] <= 1e-6, states
    return {'losses': losses, 'final_state': states}


# ---- (1) SIGKILL at random moments, again and again.

def _kill_during(run: Run, phase: str, resumed_from: int, leftovers: set[str],
                 rng: random.Random) -> dict:
    """Waits until `run` is in `phase`, SIGKILLs it, and says what the kill interrupted.

    `leftovers` are the unfinished saves of earlier kills, there until `run` cleans them up.
    """
    next_eval = resumed_from + EVAL_EVERY - resumed_from % EVAL_EVERY
    if phase == 'eval' and next_eval < TOTAL_STEPS:
        # The eval (and on a fresh start its compile) follows the train record of an eval step.
        run.wait_for(lambda: next_eval in run.train_steps())
        run.kill()
        evaluated = any(r['split'] == 'eval' and r['step'] == next_eval for r in run.records())
        return {'phase': 'eval', 'step': next_eval, 'interrupted_eval': not evaluated}
    if phase == 'checkpoint':
        # The first or the second asynchronous save of this run, as soon as it is under way.
        first = resumed_from + CHECKPOINT_EVERY * rng.randint(1, 2)

        def saving() -> list[int]:
            steps = [int(name.split('.')[0]) for name in _unfinished_saves(run.workdir)
                     if name not in leftovers]
            return [s for s in steps if first <= s < TOTAL_STEPS]

        if run.wait_for(lambda: saving() or TOTAL_STEPS - 2 in run.train_steps(), poll=0.005):
            writing = saving()
            run.kill()
            return {'phase': 'checkpoint', 'step': writing[0] if writing else None,
                    'interrupted_write': bool(set(_unfinished_saves(run.workdir)) - leftovers)}
    # Somewhere inside a step, one or two checkpoints after the resume point.
    target = min(resumed_from + rng.randint(CHECKPOINT_EVERY + 1, 2 * CHECKPOINT_EVERY + 1),
                 TOTAL_STEPS - 3)
    run.wait_for(lambda: any(s >= target for s in run.train_steps()))
    time.sleep(rng.uniform(0.0, 0.2))
    run.kill()
    steps = run.train_steps()
    return {'phase': 'step', 'step': max(steps) if steps else None}


def _lock_holder(workdir: Path) -> int | None:
    path = workdir / workdir_lock.LOCK_FILE
    return json.loads(path.read_text())['pid'] if path.exists() else None


def _took_over(run: Run, dead_pid: int | None) -> bool:
    """`run` says it took over the lock that the killed `dead_pid` left (if any was left)."""
    if dead_pid is None:
        return False
    said = [line for line in run.stderr.splitlines() if 'Took over the stale lock' in line]
    assert said and f'(process {dead_pid} on' in said[0], run.stderr[-2000:]
    return True


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted_run(tmp_path, reference):
    rng = random.Random(SEED)
    workdir = tmp_path / 'killed'
    phases = []
    while len(phases) < ROUNDS:  # each phase once in every three rounds, in a random order
        phases += rng.sample(['step', 'checkpoint', 'eval'], 3)
    kills, takeovers, started = [], 0, time.time()
    left_by = None  # pid of the killed run whose lock is still in the workdir
    for round_index, phase in enumerate(phases[:ROUNDS]):
        resumed_from = max(_committed_steps(workdir), default=0)
        leftovers = set(_unfinished_saves(workdir))
        run = Run(workdir, tmp_path, f'round{round_index}')
        kill = _kill_during(run, phase, resumed_from, leftovers, rng)
        assert run.proc.returncode == -signal.SIGKILL, 'the run ended before it could be killed'
        takeovers += _took_over(run, left_by)
        left_by = _lock_holder(workdir)
        assert left_by == run.proc.pid, 'the killed run did not hold the workdir lock'
        kills.append({**kill, 'resumed_from': resumed_from})
    final = Run(workdir, tmp_path, 'final')
    assert final.finish() == 0, final.stderr[-3000:]
    takeovers += _took_over(final, left_by)

    assert not _unfinished_saves(workdir), 'temporary directories of killed saves remain'
    assert not (workdir / checkpoint.QUARANTINE_DIR).exists(), 'a kill left an unreadable step'
    assert not (workdir / workdir_lock.LOCK_FILE).exists(), 'the finished run kept its lock'
    comparison = _assert_matches_reference(workdir, reference)
    by_phase = {p: sum(k['phase'] == p for k in kills) for p in ('step', 'checkpoint', 'eval')}
    _report(tmp_path, 'sigkill', {
        'seed': SEED, 'total_steps': TOTAL_STEPS, 'kills': len(kills), 'kills_by_phase': by_phase,
        'interrupted_checkpoint_writes': sum(k.get('interrupted_write', False) for k in kills),
        'interrupted_evals': sum(k.get('interrupted_eval', False) for k in kills),
        'stale_locks_taken_over': takeovers, 'kill_log': kills, **comparison,
        'wall_s': round(time.time() - started, 1),
    })


# ---- (2) SIGTERM: a checkpoint of the current step, exit 0, in bounded time.

SIGTERM_DEADLINE = 30.0


def _preempted_step(run: Run) -> int:
    lines = [line for line in run.stderr.splitlines() if 'Preempted: saved a checkpoint' in line]
    assert lines, run.stderr[-3000:]
    return int(lines[-1].split('at step ')[1].split(';')[0])


def _terminate(run: Run) -> dict:
    sent = time.time()
    run.proc.send_signal(signal.SIGTERM)
    code = run.finish(timeout=SIGTERM_DEADLINE + 30)
    seconds = time.time() - sent
    assert code == 0, run.stderr[-3000:]
    assert seconds <= SIGTERM_DEADLINE, f'SIGTERM took {seconds:.1f} s to end the run'
    step = _preempted_step(run)
    assert max(_committed_steps(run.workdir)) == step == max(run.train_steps())
    assert _restore(run.workdir)[0] == step  # readable, checksums verified
    assert not (run.workdir / workdir_lock.LOCK_FILE).exists()
    return {'step': step, 'exit_code': code, 'seconds_to_exit': round(seconds, 1)}


def test_sigterm_saves_the_current_step_and_exits_zero_in_bounded_time(tmp_path, reference):
    workdir = tmp_path / 'preempted'
    rng = random.Random(SEED + 1)
    # During the first eval, at a step that also saves a checkpoint: the step must be saved once.
    first = Run(workdir, tmp_path, 'term1')
    first.wait_for(lambda: EVAL_EVERY in first.train_steps(), poll=0.005)
    during_eval = _terminate(first)
    assert during_eval['step'] == EVAL_EVERY
    # At a random moment of a resumed run.
    second = Run(workdir, tmp_path, 'term2')
    target = EVAL_EVERY + rng.randint(1, 6)
    second.wait_for(lambda: any(s >= target for s in second.train_steps()))
    time.sleep(rng.uniform(0.0, 0.3))
    random_moment = _terminate(second)
    assert random_moment['step'] >= target
    final = Run(workdir, tmp_path, 'term3')
    assert final.finish() == 0, final.stderr[-3000:]
    assert f"Resumed from step {random_moment['step']}" in final.stderr
    comparison = _assert_matches_reference(workdir, reference)
    _report(tmp_path, 'sigterm', {'seed': SEED, 'sigterms': [during_eval, random_moment],
                                  'deadline_s': SIGTERM_DEADLINE, **comparison})


# ---- (3) A damaged newest checkpoint: moved aside, the newest good one resumes.

def _largest_array_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / 'state').rglob('*') if p.is_file() and p.parent.name == 'd']
    return max(files, key=lambda p: p.stat().st_size)


def _truncate(step_dir: Path) -> str:
    target = _largest_array_file(step_dir)
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    return str(target.relative_to(step_dir))


def _delete(step_dir: Path) -> str:
    target = _largest_array_file(step_dir)
    target.unlink()
    return str(target.relative_to(step_dir))


def _garbage(step_dir: Path) -> str:
    # Same length, valid framing around it: only a checksum of the values can notice.
    target = _largest_array_file(step_dir)
    content = bytearray(target.read_bytes())
    middle = len(content) // 2
    content[middle:middle + 64] = np.random.default_rng(SEED).bytes(64)
    target.write_bytes(bytes(content))
    return str(target.relative_to(step_dir))


def _files(directory: Path) -> dict[str, int]:
    return {str(p.relative_to(directory)): p.stat().st_size
            for p in directory.rglob('*') if p.is_file()}


def test_damaged_newest_checkpoint_is_moved_aside_and_the_newest_good_one_resumes(
        tmp_path, reference):
    source = reference.wait()
    good = _committed_steps(source)
    newest, fallback = good[-1], good[-2]
    runs, damaged = {}, {}
    for corrupt in (_truncate, _delete, _garbage):
        case = corrupt.__name__.strip('_')
        workdir = tmp_path / case
        shutil.copytree(source, workdir)
        damaged[case] = {'file': corrupt(workdir / 'checkpoints' / str(newest))}
        damaged[case]['files_left'] = _files(workdir / 'checkpoints' / str(newest))
        runs[case] = Run(workdir, tmp_path, case)  # all three at once: they are independent
    for case, run in runs.items():
        assert run.finish() == 0, run.stderr[-3000:]
        assert f'Checkpoint at step {newest} is unreadable; moved it to' in run.stdout, run.stdout
        assert f'Resumed from step {fallback}' in run.stderr
        moved = list((run.workdir / checkpoint.QUARANTINE_DIR).iterdir())
        assert [p.name.split('-')[0] for p in moved] == [str(newest)]
        assert _files(moved[0]) == damaged[case]['files_left'], 'the damaged step was altered'
        # Every good checkpoint is still there, and the redone newest step equals the original.
        assert _committed_steps(run.workdir) == good
        assert run.train_steps() == list(range(fallback + 1, newest + 1))
        damaged[case].update(_assert_matches_reference(run.workdir, reference))
        damaged[case]['resumed_from'] = fallback
        del damaged[case]['files_left']
    _report(tmp_path, 'corruption', {'corruptions': len(damaged), 'newest_step': newest,
                                     'cases': damaged})


def test_a_workdir_whose_checkpoints_all_fail_stops_and_starts_over_only_when_asked(
        tmp_path, reference):
    """Every step unreadable the same way (its state's manifest gone, as a changed orbax
    layout or a wrong mount would show it): train.py stops in one line naming the steps and
    the flag, moving nothing; with --config.checkpoint_fallback=scratch it moves them all
    aside, trains from step 0 and ends where the reference ends."""
    workdir = tmp_path / 'run'
    shutil.copytree(reference.wait(), workdir)
    steps = _committed_steps(workdir)
    for step in steps:
        (workdir / 'checkpoints' / str(step) / 'state' / 'manifest.ocdbt').unlink()
    before = _files(workdir / 'checkpoints')
    stopped = Run(workdir, tmp_path, 'stopped')
    assert stopped.finish() == 1, stopped.stderr[-3000:]
    line = stopped.last_line()
    assert line.startswith('Error: No checkpoint in ') and 'nothing was moved' in line, line
    assert f"steps {', '.join(str(s) for s in reversed(steps))} all fail the same way" in line
    assert '--config.checkpoint_fallback=scratch' in line
    assert 'Traceback' not in stopped.stderr and not stopped.train_steps()
    assert _files(workdir / 'checkpoints') == before
    assert not (workdir / checkpoint.QUARANTINE_DIR).exists()

    fresh = Run(workdir, tmp_path, 'scratch', checkpoint_fallback='scratch')
    assert fresh.finish() == 0, fresh.stderr[-3000:]
    moved = sorted(int(p.name.split('-')[0])
                   for p in (workdir / checkpoint.QUARANTINE_DIR).iterdir())
    assert moved == steps and fresh.stdout.count('training from step 0') == len(steps)
    assert fresh.train_steps() == list(range(1, TOTAL_STEPS + 1))
    figures = _assert_matches_reference(workdir, reference)
    _report(tmp_path, 'all_unreadable', {'steps': steps, 'stop_line': line[:200], **figures})


# ---- (4) A NaN loss: a clear stop, the previous checkpoint intact.

def test_nan_loss_stops_with_one_line_and_the_last_checkpoint_resumes_exactly(
        tmp_path, reference):
    workdir = tmp_path / 'nan'
    nan_at = 2 * CHECKPOINT_EVERY + 1  # poisons the update from step 7 to 8
    run = Run(workdir, tmp_path, 'nan', debug_nan_at_step=nan_at)
    assert run.finish() == 1
    expected = (f'Error: Training loss is nan by step {nan_at + 1}; stopped, and the last '
                f'checkpoint (step {nan_at - 1}) is intact.')
    assert run.last_line().startswith(expected), run.stderr[-2000:]
    assert 'Traceback' not in run.stderr
    assert _committed_steps(workdir) == [CHECKPOINT_EVERY, nan_at - 1]  # nothing after the NaN
    step, state = _restore(workdir)
    assert step == int(state.step) == nan_at - 1
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(state.params))
    assert not (workdir / workdir_lock.LOCK_FILE).exists()
    # The kept checkpoint is the real one: resuming without the NaN ends exactly as the reference.
    resumed = Run(workdir, tmp_path, 'nan_resumed')
    assert resumed.finish() == 0, resumed.stderr[-3000:]
    comparison = _assert_matches_reference(workdir, reference)
    _report(tmp_path, 'nan', {'nan_at_step': nan_at, 'message': run.last_line()[:120],
                              'kept_step': step, **comparison})


# ---- (5) The workdir lock: a live run refuses a second one; a killed run's lock does not stick.

def test_second_run_on_a_live_workdir_is_refused_and_a_killed_runs_lock_is_taken_over(tmp_path):
    workdir = tmp_path / 'busy'
    forever = {'num_train_steps': 100_000, 'checkpoint_every_steps': 100_000,
               'eval_every_steps': 100_000}
    live = Run(workdir, tmp_path, 'live', **forever)
    live.wait_for(lambda: (workdir / workdir_lock.LOCK_FILE).exists())
    second = Run(workdir, tmp_path, 'second', **forever)
    assert second.finish() == 1
    message = second.last_line()
    assert message.startswith(f'Error: Workdir {workdir} is in use by another run '
                              f'(pid {live.proc.pid} on host'), second.stderr[-2000:]
    assert live.proc.poll() is None and live.wait_for(lambda: len(live.train_steps()) >= 2)
    live.kill()
    assert (workdir / workdir_lock.LOCK_FILE).exists()
    after = Run(workdir, tmp_path, 'after_kill', num_train_steps=2)
    assert after.finish() == 0, after.stderr[-3000:]
    assert f'process {live.proc.pid} on' in after.stderr and 'Took over the stale lock' in \
        after.stderr
    _report(tmp_path, 'lock', {'refusal': message[:160], 'stale_lock_taken_over': True})


def _sleeper() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])


def _hold_as(workdir: Path, **holder) -> Path:
    """A lock file written as if by another process."""
    lock = workdir_lock.WorkdirLock(workdir)
    path = Path(lock.path)
    path.write_text(json.dumps({**lock.record, **holder}))
    return path


def test_lock_of_a_live_local_process_refuses_and_of_a_dead_one_is_taken_over(tmp_path):
    other = _sleeper()
    try:
        started = workdir_lock._process_start_time(other.pid)
        _hold_as(tmp_path, pid=other.pid, started=started or time.time())
        with pytest.raises(workdir_lock.WorkdirLockedError, match=f'pid {other.pid} on host'):
            workdir_lock.WorkdirLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    with workdir_lock.WorkdirLock(tmp_path) as lock:
        assert json.loads(Path(lock.path).read_text())['pid'] == os.getpid()
    assert not Path(lock.path).exists()


def test_lock_whose_pid_was_reused_by_a_newer_process_is_stale(tmp_path):
    other = _sleeper()
    try:
        _hold_as(tmp_path, pid=other.pid, started=time.time() - 3600)  # before `other` began
        with workdir_lock.WorkdirLock(tmp_path):
            pass
    finally:
        other.kill()
        other.wait()


def test_lock_from_another_host_is_stale_only_after_its_heartbeat_times_out(tmp_path):
    path = _hold_as(tmp_path, host='elsewhere', pid=1)
    kwargs = {'heartbeat_seconds': 1.0, 'stale_after_seconds': 60.0}
    with pytest.raises(workdir_lock.WorkdirLockedError, match='host elsewhere'):
        workdir_lock.WorkdirLock(tmp_path, **kwargs).acquire()
    old = time.time() - 61
    os.utime(path, (old, old))
    with workdir_lock.WorkdirLock(tmp_path, **kwargs) as lock:
        os.utime(path, (old, old))
        deadline = time.time() + 20
        while time.time() - path.stat().st_mtime > 30:  # until a heartbeat moves it to now
            assert time.time() < deadline, 'no heartbeat'
            time.sleep(0.1)
    assert not lock.held and not path.exists()


def _wait_for_loss(lock: workdir_lock.WorkdirLock, seconds: float = 20.0) -> None:
    """Idles in the main thread, as the loop does between steps, until the lock is lost."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        time.sleep(0.05)
    pytest.fail(f'still running {seconds} s after the lock was lost ({lock.lost!r})')


def test_a_run_whose_lock_was_taken_over_stops_in_one_line_and_leaves_the_new_lock(tmp_path):
    """A takeover (here by a second lock of this process, as a restart on this host that found
    the lock stale would do): the old holder's next heartbeat notices, stops its run with one
    line naming the new holder, and never rewrites or deletes the new holder's lock."""
    kwargs = {'heartbeat_seconds': 0.2, 'stale_after_seconds': 1.0}
    old = workdir_lock.WorkdirLock(tmp_path, **kwargs)
    old.acquire()
    new = workdir_lock.WorkdirLock(tmp_path, **kwargs)
    try:
        new.acquire()  # the old one's record names this pid: taken over as stale
        started = time.time()
        with pytest.raises(workdir_lock.WorkdirLockLostError) as lost:
            _wait_for_loss(old)
        seconds = time.time() - started
        message = str(lost.value)
        assert '\n' not in message and message.startswith(f'Lost the lock on workdir {tmp_path}')
        assert f'another run took it over (pid {os.getpid()} on host' in message
        assert seconds < 3 * kwargs['heartbeat_seconds'] + 1.0, seconds
        old.release()
        assert json.loads(Path(new.path).read_text()) == new.record  # untouched
    finally:
        old.release()
        new.release()
    assert not Path(new.path).exists()

    deleted = workdir_lock.WorkdirLock(tmp_path, **kwargs)
    deleted.acquire()
    Path(deleted.path).unlink()
    with pytest.raises(workdir_lock.WorkdirLockLostError, match='train.lock was deleted'):
        _wait_for_loss(deleted)
    deleted.release()
    assert not Path(deleted.path).exists()  # not written back
    _report(tmp_path, 'lock_lost', {'seconds_to_stop': round(seconds, 2)})


def test_the_lost_lock_signal_still_reaches_the_handler_that_was_there(tmp_path):
    received = []
    previous = signal.signal(workdir_lock.LOST_SIGNAL, lambda signum, frame: received.append(1))
    try:
        with workdir_lock.WorkdirLock(tmp_path):
            os.kill(os.getpid(), workdir_lock.LOST_SIGNAL)
            time.sleep(0.1)
        assert received == [1]
    finally:
        signal.signal(workdir_lock.LOST_SIGNAL, previous)


# ---- Failing early and loading safely.

def test_missing_dataset_fails_in_one_line_before_anything_is_written(tmp_path):
    workdir = tmp_path / 'never'
    started = time.time()
    run = Run(workdir, tmp_path, 'missing', **{'data.dataset': 'imagenet2012',
                                               'data.data_dir': '/nonexistent'})
    assert run.finish() == 1
    seconds = time.time() - started
    assert run.last_line().startswith('Error: imagenet2012 is not prepared'), run.stderr[-2000:]
    assert '/nonexistent' in run.last_line() and 'Traceback' not in run.stderr
    assert not workdir.exists()  # nothing created, nothing compiled
    _report(tmp_path, 'missing_dataset', {'seconds': round(seconds, 1)})


def test_a_storage_error_left_after_the_clients_retries_is_one_line(tmp_path):
    """Any storage or disk error that reaches the top (here metrics.jsonl is a directory, so
    the first metrics write fails) ends in one line, not a traceback."""
    workdir = tmp_path / 'unwritable'
    (workdir / 'metrics.jsonl').mkdir(parents=True)
    run = Run(workdir, tmp_path, 'unwritable')
    assert run.finish() == 1
    line = run.last_line()
    assert line.startswith('Error: a storage error stopped it (') and 'metrics.jsonl' in line, line
    assert line.endswith('run the same command again.') and 'Traceback' not in run.stderr


def test_checkpoint_of_another_shape_fails_naming_the_parameter_and_is_kept(tmp_path, reference):
    workdir = tmp_path / 'other_shape'
    shutil.copytree(reference.wait(), workdir)
    # Its config.json would refuse the other network first (tests/test_new_user.py); without it
    # (a workdir of an older version) the arrays' shapes must.
    (workdir / 'config.json').unlink()
    before = _files(workdir / 'checkpoints')
    run = Run(workdir, tmp_path, 'other_shape', **{'model.stage_widths': '(8,32)'})
    assert run.finish() == 1
    line = run.last_line()
    assert 'does not fit this model: params/' in line and 'there but (' in line, line
    assert _files(workdir / 'checkpoints') == before  # a mismatch is not damage: nothing moved
    assert not (workdir / checkpoint.QUARANTINE_DIR).exists()


def test_corrupt_images_are_counted_in_the_train_metrics(tmp_path):
    pytest.importorskip('tensorflow')
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (('train', 8), ('test', 2)):
        for name in ('a', 'b'):
            (tmp_path / 'images' / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = (rng.random((12, 12, 3)) * 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / 'images' / split / name / f'{i}.png')
    (tmp_path / 'images' / 'train' / 'a' / 'broken.jpg').write_bytes(b'not a JPEG at all')
    config = tiny_config(**{'data.dataset': 'image_folder',
                            'data.data_dir': str(tmp_path / 'images'),
                            'data.threadpool_size': 2, 'model.num_classes': 2},
                         batch_size=8, num_train_steps=2, eval_every_steps=2,
                         checkpoint_every_steps=2)
    train.train_and_evaluate(config, str(tmp_path / 'workdir'))
    records = [json.loads(line)
               for line in (tmp_path / 'workdir' / 'metrics.jsonl').read_text().splitlines()]
    assert [r['skipped_images'] for r in records if r['split'] == 'train'] == [1, 1]


UNSAFE_LOADERS = {('pickle', 'load'), ('pickle', 'loads'), ('dill', 'load'), ('dill', 'loads'),
                  ('joblib', 'load'), ('pd', 'read_pickle'), ('pandas', 'read_pickle'),
                  ('cloudpickle', 'load'), ('cloudpickle', 'loads'), ('shelve', 'open')}


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value.value if isinstance(keyword.value, ast.Constant) else keyword.value
    return None


def _unsafe_calls(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name)):
            continue
        call = (node.func.value.id, node.func.attr)
        where = f'{path.relative_to(REPO)}:{node.lineno}'
        if call in UNSAFE_LOADERS:
            found.append(f'{where} {call[0]}.{call[1]}')
        elif call == ('torch', 'load') and _keyword(node, 'weights_only') is not True:
            found.append(f'{where} torch.load without weights_only=True')
        elif call[1] == 'load' and call[0] in ('np', 'numpy', 'jnp') and \
                _keyword(node, 'allow_pickle') not in (None, False):
            found.append(f'{where} {call[0]}.load(allow_pickle=...)')
    return found


def test_no_module_unpickles_files():
    sources = [*(REPO / 'resnet_flax').rglob('*.py'), *REPO.glob('*.py'),
               *(REPO / 'bench').rglob('*.py')]
    assert len(sources) > 10
    unsafe = [hit for path in sources for hit in _unsafe_calls(path)]
    assert not unsafe, unsafe
