"""Where a case's time goes: named phases (read, percentiles, normalise, network, gate, ...).

The pipeline marks its phases with ``phase(name)``; nothing is recorded unless a ``PhaseTimer``
is active (``bench/profile_inference.py`` activates one), so production pays one global lookup
per phase and tile. Timings are wall-clock and inclusive; phases are leaves of the work (none
nests inside another), so their sum is the case's accounted time. On CUDA the timer synchronises
the device at each phase's end, so asynchronous kernels are charged to the phase that launched
them (which serialises the overlap that production would have: a profile, not a timing).
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Self

_lock = threading.Lock()
_active: PhaseTimer | None = None


class PhaseTimer:
    """Seconds, calls and voxels per phase while active (``with PhaseTimer() as timer:``)."""

    def __init__(self, sync: Callable[[], None] | None = None) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.voxels: dict[str, int] = defaultdict(int)
        self.sync = sync

    def __enter__(self) -> Self:
        global _active
        with _lock:
            if _active is not None:
                raise RuntimeError("a PhaseTimer is already active")
            _active = self
        return self

    def __exit__(self, *exc: object) -> None:
        global _active
        with _lock:
            _active = None

    def add(self, name: str, seconds: float, voxels: int = 0) -> None:
        with _lock:
            self.seconds[name] += seconds
            self.calls[name] += 1
            self.voxels[name] += voxels


@contextmanager
def phase(name: str, voxels: int = 0) -> Iterator[None]:
    """Charge the enclosed work to ``name`` (``voxels``: how many it processed) if a timer is on."""
    timer = _active
    if timer is None:
        yield
        return
    begin = time.perf_counter()
    try:
        yield
    finally:
        if timer.sync is not None:
            timer.sync()
        timer.add(name, time.perf_counter() - begin, voxels)
