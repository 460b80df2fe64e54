"""Is the run input-bound? The share of the loop's time spent waiting for the next batch.

    batches = input_wait.TimedBatches(batches)
    pacer = input_wait.StepPacer(config.max_steps_ahead)
    ...  # per step: state, metrics = train_step(state, next(batches)); pacer.dispatched(metrics)
    summary['input_wait_fraction'] = batches.wait_fraction(window_seconds)

JAX dispatches steps asynchronously, so without a bound the loop would run arbitrarily far
ahead of the device (30 queued steps measured on CPU) and spend its time in next(batches)
even when the device is the bottleneck. `StepPacer` lets it run at most `max_steps_ahead`
steps ahead: it waits for the step dispatched that many steps earlier, which is still
device-side work in progress, never a copy to the host, and keeps the next steps queued so
the device does not idle. Then the loop blocks in one of two places: on the device (the
pacer; input keeps up, the fraction stays near 0) or in next(batches) (the device has run
out of queued work and waits for input). The wait is measured where the loop blocks: around
next() of the iterator it consumes, after the prefetch to the devices.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from typing import Any

import jax


class TimedBatches:
    """An iterator that adds up the seconds its consumer spends blocked in next()."""

    def __init__(self, batches: Iterable[Any]):
        self._batches = iter(batches)
        self._waited = 0.0

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        start = time.perf_counter()
        try:
            return next(self._batches)
        finally:
            self._waited += time.perf_counter() - start

    def wait_fraction(self, window_seconds: float) -> float:
        """Seconds waited since the last call (or restart) over the window, in [0, 1]."""
        waited, self._waited = self._waited, 0.0
        if window_seconds <= 0:
            return 0.0
        return min(max(waited / window_seconds, 0.0), 1.0)

    def restart(self) -> None:
        """Forget the wait so far (the loop restarts its window after eval and checkpoints)."""
        self._waited = 0.0


class StepPacer:
    """Keeps the loop at most `max_steps_ahead` dispatched steps ahead of the device."""

    def __init__(self, max_steps_ahead: int):
        if max_steps_ahead < 0:
            raise ValueError(f'config.max_steps_ahead={max_steps_ahead} must be >= 0 '
                             '(0 = no bound; 2 keeps one step queued behind the running one).')
        self.max_steps_ahead = max_steps_ahead
        self._in_flight: collections.deque = collections.deque()

    def dispatched(self, step_output: Any) -> None:
        """Call after each dispatch with any output of the step; may wait for an older one."""
        if self.max_steps_ahead == 0:
            return
        self._in_flight.append(step_output)
        if len(self._in_flight) > self.max_steps_ahead:
            jax.block_until_ready(self._in_flight.popleft())
