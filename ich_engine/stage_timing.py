"""Seconds and peak resident memory per named stage of a run, for benchmarks (``sam3d-bench --predict``).

Code marks its stages with ``with stage("encoder"):``; that costs nothing unless a :class:`StageTimes`
is active around the call, so the prediction code carries its marks in every run and the benchmark
reads them without a second, instrumented copy of the pipeline. A stage may be entered many times
(the encoder once per sliding window): its seconds add up. Stages may nest; a nested stage's seconds
are then also in its parent's. Memory is the process's resident set,
sampled every few milliseconds by a thread and charged to the innermost stage running at the time,
so a stage's peak includes what earlier stages still hold (the scan, the model).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import psutil

__all__ = ["StageTimes", "stage"]

_ACTIVE: ContextVar[StageTimes | None] = ContextVar("sam3d_stage_times", default=None)
SAMPLE_INTERVAL_S = 0.005


class StageTimes:
    """Collects :func:`stage` marks while entered: ``seconds[name]``, ``calls[name]``, ``peak_gb[name]``."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self.peak_gb: dict[str, float] = {}
        self._running: list[str] = []
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._sampler = threading.Thread(target=self._sample, daemon=True)

    def _charge(self) -> None:
        if self._running:
            name = self._running[-1]
            gb = self._process.memory_info().rss / 1024**3
            self.peak_gb[name] = max(self.peak_gb.get(name, 0.0), gb)

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            self._charge()

    def __enter__(self) -> StageTimes:
        self._token = _ACTIVE.set(self)
        self._sampler.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._sampler.join()
        _ACTIVE.reset(self._token)

    @contextmanager
    def _stage(self, name: str) -> Iterator[None]:
        self._running.append(name)
        self._charge()
        start = time.perf_counter()
        try:
            yield
        finally:
            self._charge()
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
            self.calls[name] = self.calls.get(name, 0) + 1
            self._running.pop()

    def table(self) -> list[dict[str, float | int | str]]:
        """One row per stage in the order first entered: name, seconds, calls, peak_gb."""
        return [
            {"stage": name, "seconds": s, "calls": self.calls[name], "peak_gb": self.peak_gb.get(name, 0.0)}
            for name, s in self.seconds.items()
        ]


@contextmanager
def stage(name: str) -> Iterator[None]:
    """Mark a stage of the current run; a no-op unless a :class:`StageTimes` is active."""
    times = _ACTIVE.get()
    if times is None:
        yield
        return
    with times._stage(name):
        yield
