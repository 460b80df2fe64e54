"""gs:// end to end, on a real local GCS server (gcp-storage-emulator, tests/gcs_emulator.py).

train.py trains with --workdir=gs://... on an image-folder data set that lives in the bucket, is
SIGKILLed after a checkpoint, resumes and finishes; eval.py and `sweep --report` then read the
run back, and metrics.jsonl must hold every record. Every client (gcsfs through etils.epath,
tensorstore through orbax, google-cloud-storage through tensorboardX) talks to the emulator.

    python -m pytest -m gcs -s
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from etils import epath

from resnet_flax import checkpoint, data, metrics, models, optim, sharding, train
from resnet_flax.state import abstract_state
from tests.gcs_emulator import Emulator
from tests.tiny import REPO, TINY_FLAGS, cpu_env, override_flags, tiny_config

pytestmark = [pytest.mark.gcs, pytest.mark.slow]
pytest.importorskip('gcp_storage_emulator')  # in the `test` extra
pytest.importorskip('gcsfs')

BUCKET = 'test-bucket'
DATA = f'gs://{BUCKET}/digits_folder'
NUM_TRAIN, NUM_TEST = 64, 32  # PNGs written to the bucket, from the scikit-learn digits
START_TIMEOUT = 480  # s for a train.py to start and reach a checkpoint on a slow shared machine


@pytest.fixture(scope='module')
def gcs(tmp_path_factory):
    """A GCS emulator on a free port, with this process and its children pointed at it."""
    emulator = Emulator(str(tmp_path_factory.mktemp('gcs')), bucket=BUCKET)
    emulator.start()
    saved = {k: os.environ.get(k) for k in emulator.env()}
    os.environ.update(emulator.env())
    try:
        yield emulator
    finally:
        emulator.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope='module')
def digits_in_bucket(gcs):
    """An image folder (train/CLASS/*.png, test/CLASS/*.png) of 16x16 digits in the bucket."""
    import fsspec
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).astype(np.uint8)
    files = {}
    for i in range(NUM_TRAIN + NUM_TEST):
        split = 'train' if i < NUM_TRAIN else 'test'
        out = io.BytesIO()
        Image.fromarray(images[i]).convert('RGB').resize((16, 16)).save(out, format='PNG')
        files[f'{DATA}/{split}/{digits.target[i]}/{i:04d}.png'] = out.getvalue()
    fsspec.filesystem('gs').pipe(files)
    return DATA


@pytest.fixture(scope='module', autouse=True)
def compilation_cache(tmp_path_factory):
    """One persistent XLA cache for every train.py / eval.py here: restarts skip compiling."""
    cache = {'JAX_COMPILATION_CACHE_DIR': str(tmp_path_factory.mktemp('xla_cache')),
             'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
             'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}
    saved = {k: os.environ.get(k) for k in cache}
    os.environ.update(cache)
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def _flags(workdir: str, **overrides) -> list[str]:
    return ['--config=configs/digits.py', f'--workdir={workdir}', *override_flags({
        **TINY_FLAGS, 'data.dataset': 'image_folder', 'data.data_dir': DATA,
        'data.num_parallel_calls': 2, **overrides})]


def _fresh_listings() -> None:
    """gcsfs caches listings per process; train.py (another process) changed the bucket."""
    import fsspec

    fsspec.filesystem('gcs', finalize_on_close=True).invalidate_cache()  # epath's instance


def _checkpoint_steps(workdir: str) -> list[int]:
    """The finalized steps (on GCS orbax writes a step in place and commits it last)."""
    _fresh_listings()
    directory = checkpoint.checkpoint_dir(workdir)
    if not directory.exists():
        return []
    manager = checkpoint.create_manager(directory, read_only=True)
    try:
        return sorted(manager.all_steps())
    finally:
        manager.close()


def _records(workdir: str) -> list[dict]:
    _fresh_listings()
    return metrics.read_metrics(workdir)


def test_train_on_gcs_killed_resumed_then_eval_and_report(gcs, digits_in_bucket):
    sweep_dir = f'gs://{BUCKET}/sweep'
    workdir = f'{sweep_dir}/tiny/seed0'
    total = 8
    flags = _flags(workdir, num_train_steps=total, eval_every_steps=4)
    proc = subprocess.Popen([sys.executable, str(REPO / 'train.py'), *flags], cwd=REPO,
                            env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + START_TIMEOUT
    while not [s for s in _checkpoint_steps(workdir) if s >= 3]:
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail(f'no checkpoint in {workdir}: {proc.communicate()[1][-3000:]}')
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    killed_at = max(_checkpoint_steps(workdir))
    assert killed_at < total

    resumed = subprocess.run([sys.executable, str(REPO / 'train.py'), *flags], cwd=REPO,
                             env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 'Resumed from step' in resumed.stderr, resumed.stderr[-3000:]
    assert max(_checkpoint_steps(workdir)) == total

    records = _records(workdir)
    assert {r['step'] for r in records if r['split'] == 'train'} == set(range(1, total + 1))
    assert {r['step'] for r in records if r['split'] == 'eval'} == {4, 8}
    final = [r for r in records if r['split'] == 'eval' and r['step'] == total][-1]
    assert final['num_examples'] == NUM_TEST

    evaluated = subprocess.run(
        [sys.executable, str(REPO / 'eval.py'), *flags, '--json'], cwd=REPO, env=cpu_env(),
        capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result['num_examples'] == NUM_TEST
    assert result['top1'] == pytest.approx(final['top1'], abs=1e-6)

    reported = subprocess.run(
        [sys.executable, '-m', 'resnet_flax.sweep', '--report', f'--workdir={sweep_dir}'],
        cwd=REPO, env=cpu_env(), capture_output=True, text=True, timeout=300)
    assert reported.returncode == 0, reported.stderr[-3000:]
    assert f"{100 * final['top1']:.1f}" in reported.stdout, reported.stdout
    assert (epath.Path(sweep_dir) / 'curves.png').exists()
    events = list((epath.Path(workdir) / 'tensorboard').iterdir())
    assert events and all(e.stat().length > 0 for e in events)


def _last_train_step(workdir: str) -> int:
    return max((r['step'] for r in _records(workdir) if r['split'] == 'train'), default=0)


class _Run:
    """train.py on one workdir; a run that a storage outage stopped is started again with the
    same command, after its stop was checked to be the one-line message that says so."""

    def __init__(self, flags: list[str]):
        self.flags, self.stops, self.resumed_from = flags, [], []
        self.proc = self._start()

    def _start(self) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, str(REPO / 'train.py'), *self.flags],
                                cwd=REPO, env=cpu_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)

    def _restart_if_stopped(self, err: str | None = None) -> None:
        """If the run stopped, checks that its last line says why and what is intact, then
        starts it again."""
        if err is None:
            if self.proc.poll() is None or self.proc.returncode == 0:
                return
            err = self.proc.communicate()[1]
        last = err.strip().splitlines()[-1]
        assert 'Traceback' not in err, err[-3000:]
        assert last.startswith('Error: Could not save'), err[-3000:]
        assert last.endswith('run the same command to resume.'), last
        intact = last.split('checkpoints up to step ')[1].split()[0] if 'up to step' in last else 0
        self.stops.append(last)
        self.resumed_from.append(int(intact))
        self.proc = self._start()

    def wait_for(self, condition, what: str) -> None:
        """Until `condition()` holds, starting the run again whenever an outage stopped it."""
        deadline = time.time() + START_TIMEOUT
        while True:
            with contextlib.suppress(OSError):
                if condition():
                    return
            self._restart_if_stopped()
            if self.proc.poll() is not None or time.time() > deadline:
                self.proc.kill()
                pytest.fail(f'{what} did not happen: {self.proc.communicate()[1][-3000:]}')
            time.sleep(0.1)

    def finish(self) -> str:
        """Waits for the end (starting again once after a stop); returns the last stderr."""
        out, err = self.proc.communicate(timeout=600)
        if self.proc.returncode:
            self._restart_if_stopped(err)
            out, err = self.proc.communicate(timeout=600)
        assert self.proc.returncode == 0, err[-3000:]
        if self.resumed_from and self.resumed_from[-1]:
            assert f'Resumed from step {self.resumed_from[-1]} ' in err, err[-3000:]
        return err


def _outage(gcs, seconds: float) -> None:
    gcs.stop()
    time.sleep(seconds)
    gcs.start()


def test_storage_outages_between_and_during_checkpoint_saves_are_survived(gcs):
    """The emulator is stopped twice while train.py runs on a gs:// workdir: once between
    checkpoints, once as a checkpoint save starts. The run rides an outage out, or (when it
    outlasts the storage clients' own retries) stops with one line that says which
    checkpoints are intact, and the same command resumes from there. In the end every metrics
    record and every checkpoint is there and reads back (checksums included).

    RF_OUTAGE_SECONDS (between saves) and RF_SAVE_OUTAGE_SECONDS (during a save) set the
    lengths: 10 s each in CI; 60 s by hand (RELIABILITY.md)."""
    workdir = f'gs://{BUCKET}/outage'
    total, every = 40, 5
    between = float(os.environ.get('RF_OUTAGE_SECONDS', '10'))
    during = float(os.environ.get('RF_SAVE_OUTAGE_SECONDS', str(between)))
    flags = ['--config=configs/digits.py', f'--workdir={workdir}', *override_flags({
        **TINY_FLAGS, 'num_train_steps': total, 'checkpoint_every_steps': every,
        'eval_every_steps': 20, 'keep_checkpoints': total // every})]
    started = time.time()
    run = _Run(flags)
    outages = []
    # Between saves: just after step 7 is logged (5 is saved, 10 is not yet due).
    run.wait_for(lambda: _last_train_step(workdir) >= 7, 'step 7')
    outages.append({'when': f'after step {_last_train_step(workdir)} was logged',
                    'seconds': between})
    _outage(gcs, between)
    # During a save: the moment step 20's train record lands, its eval and save follow.
    run.wait_for(lambda: _last_train_step(workdir) >= 20, 'step 20')
    outages.append({'when': 'as the checkpoint of step 20 was being saved', 'seconds': during})
    _outage(gcs, during)
    err = run.finish()

    records = _records(workdir)
    assert {r['step'] for r in records if r['split'] == 'train'} == set(range(1, total + 1))
    assert {r['step'] for r in records if r['split'] == 'eval'} == {20, 40}
    assert _checkpoint_steps(workdir) == list(range(every, total + 1, every))
    _assert_every_checkpoint_reads_back(workdir)
    print('OUTAGES', json.dumps({
        'outages': outages, 'stops': run.stops, 'resumed_from': run.resumed_from,
        'retried': err.count('retrying'), 'test_seconds': round(time.time() - started)}))


def _assert_every_checkpoint_reads_back(workdir: str) -> None:
    config = tiny_config()
    info = data.get_info(config.data)
    optimizer = optim.create_optimizer(
        config, train.make_schedule(config, info.num_train_examples).steps_per_epoch)
    target = abstract_state(models.from_config(config.model), optimizer, info.image_shape,
                            False, sharding.create_mesh())
    manager = checkpoint.create_manager(checkpoint.checkpoint_dir(workdir), read_only=True)
    for step in manager.all_steps():
        assert int(checkpoint.restore_step(manager, step, target).step) == step
    manager.close()
