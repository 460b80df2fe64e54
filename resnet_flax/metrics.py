"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and a console progress bar.

Only process 0 writes; the others get a writer that does nothing. On a local disk each record
is appended; an object store (gs://) has no append, so there the writer keeps the file's lines
and rewrites the whole object at each write (an upload replaces an object atomically, so a kill
never leaves a half file). A write that fails (a storage outage) is logged and redone by the
next one; `close` retries with back-off, so no record is dropped while the run goes on.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from typing import Any

from absl import logging
from etils import epath

from resnet_flax import storage

METRICS_FILE = 'metrics.jsonl'
CLOSE_RETRY_SECONDS = 600.0  # how long `close` retries a metrics file it could not write


class MetricWriter:
    """Writes one JSON object per (step, split) to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: epath.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        self._path = epath.Path(workdir) / METRICS_FILE
        self._lines: list[str] | None = None  # the whole file, where it is rewritten
        self._unwritten = False
        if not storage.is_local(self._path):
            self._lines = storage.retry(lambda: _read_lines(self._path), f'Reading {self._path}',
                                        deadline_seconds=CLOSE_RETRY_SECONDS)
        self._tensorboard_dir = str(epath.Path(workdir) / 'tensorboard')

    def _events(self):
        """The TensorBoard writer, opened at the first record: a run that writes nothing (a
        finished run re-run) leaves no empty event file behind."""
        if self._tensorboard is None:
            from tensorboardX import SummaryWriter  # no TensorFlow needed

            self._tensorboard = SummaryWriter(self._tensorboard_dir)
        return self._tensorboard

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in metrics.items()}}
        line = json.dumps(record) + '\n'
        if self._lines is None:
            with self._path.open('a') as f:
                f.write(line)
        else:
            self._lines.append(line)
            self._rewrite(retry_seconds=0.0)
        for name, value in record.items():
            if name not in ('step', 'split') and isinstance(value, (int, float)):
                self._events().add_scalar(f'{split}/{name}', value, int(step))
        self._flush_tensorboard()

    def _rewrite(self, retry_seconds: float) -> None:
        """The whole file as one upload; a failure is logged and left to the next write."""
        try:
            storage.retry(lambda: self._path.write_text(''.join(self._lines)),
                          f'Writing {self._path}', deadline_seconds=retry_seconds)
            self._unwritten = False
        except OSError as error:
            if retry_seconds:
                raise OSError(f'Could not write {self._path} for {retry_seconds:.0f} s ({error}); '
                              'the last records are lost. Check the storage and credentials.'
                              ) from error
            self._unwritten = True
            logging.warning('Could not write %s (%s); the next write retries with every record.',
                            self._path, error)

    def _flush_tensorboard(self) -> None:
        try:
            self._tensorboard.flush()
        except Exception as error:  # noqa: BLE001 - google-cloud-storage errors are not OSErrors
            # tensorboardX keeps the whole event file in memory on gs:// and uploads it again.
            logging.warning('Could not flush TensorBoard events (%s); retried at the next write.',
                            str(error).splitlines()[0][:200] if str(error) else type(error))

    def close(self) -> None:
        if self.enabled and self._unwritten:
            self._rewrite(retry_seconds=CLOSE_RETRY_SECONDS)
        if self._tensorboard is not None:
            self._flush_tensorboard()
            with contextlib.suppress(Exception):  # flushed above; an outage is logged there
                self._tensorboard.close()
            self._tensorboard = None


def _read_lines(path: epath.Path) -> list[str]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    return [line + '\n' for line in text.splitlines() if line.strip()]


def _plain(value: Any) -> Any:
    """JSON-friendly Python scalars; NaN stays visible as null-free string 'nan'."""
    if hasattr(value, 'item'):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def read_metrics(workdir: epath.PathLike, split: str | None = None) -> list[dict[str, Any]]:
    """The records of metrics.jsonl, optionally of one split."""
    path = epath.Path(workdir) / METRICS_FILE
    try:  # not exists(): gcsfs may answer that from a listing cached before the file was written
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in text.splitlines() if line.strip()]
    return [r for r in records if split is None or r['split'] == split]


class Progress:
    """A console progress bar: step, loss, learning rate, images/s and input wait."""

    def __init__(self, total_steps: int, initial_step: int, enabled: bool = True):
        self._bar = None
        if enabled:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total_steps,
                initial=initial_step,
                unit='step',
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        self._step = initial_step
        self.started = time.time()

    def update(self, step: int, metrics: dict[str, float]) -> None:
        if self._bar is None:
            return
        self._bar.update(step - self._step)
        self._step = step
        self._bar.set_postfix(
            loss=f"{metrics['loss']:.4f}",
            lr=f"{metrics['learning_rate']:.3g}",
            img_s=f"{metrics.get('images_per_sec', 0.0):.0f}",
            wait=f"{metrics.get('input_wait_fraction', 0.0):.0%}",
            refresh=False,
        )

    def write(self, message: str) -> None:
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
