"""Where metrics go: `metrics.jsonl`, TensorBoard event files, and a console progress bar.

Only process 0 writes; the others get a writer that does nothing.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any

from etils import epath

METRICS_FILE = 'metrics.jsonl'


class MetricWriter:
    """Appends one JSON object per (step, split) to metrics.jsonl and mirrors it to TensorBoard."""

    def __init__(self, workdir: epath.PathLike, enabled: bool = True):
        self.enabled = enabled
        self._tensorboard = None
        if not enabled:
            return
        self._path = epath.Path(workdir) / METRICS_FILE
        from tensorboardX import SummaryWriter  # no TensorFlow needed

        self._tensorboard = SummaryWriter(str(epath.Path(workdir) / 'tensorboard'))

    def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {'step': int(step), 'split': split, **{k: _plain(v) for k, v in metrics.items()}}
        with self._path.open('a') as f:
            f.write(json.dumps(record) + '\n')
        for name, value in record.items():
            if name not in ('step', 'split') and isinstance(value, (int, float)):
                self._tensorboard.add_scalar(f'{split}/{name}', value, int(step))
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


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
    if not path.exists():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if split is None or r['split'] == split]


class Progress:
    """A console progress bar with step, loss, learning rate and images/s."""

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
