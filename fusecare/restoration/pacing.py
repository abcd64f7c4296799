"""The time budget: each tile predicted in the best mode that still finishes in time.

A case over its budget is lost, so ``Pacer`` projects the remaining tiles after every tile and
steps down to a cheaper mode (fewer members, then the input itself) when they would not end
before the case's ``Deadline``. Kept apart from ``restore_volume``, which gives it the modes,
because it needs nothing of volumes: modes are callables and time an injectable clock.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

BUDGET_SAFETY = 1.15
"""Projected seconds for the remaining tiles are multiplied by this before comparing them with
the time left: tile times vary with content only a little, but a case over budget is lost."""


@dataclass(frozen=True)
class Deadline:
    """When a case's processing must be done; ``clock`` is injectable so tests need no sleeping."""

    at: float
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def after(cls, seconds: float, clock: Callable[[], float] = time.monotonic) -> Deadline:
        return cls(clock() + seconds, clock)

    def remaining(self) -> float:
        return self.at - self.clock()


@dataclass(frozen=True)
class Cheaper:
    """A cheaper way to predict a block (e.g. fewer members), used when the full one will not
    finish in time; ``relative_cost`` (per tile, against the full mode) projects it before it ran."""

    description: str
    predict_block: Callable[[np.ndarray], object]
    relative_cost: float


@dataclass
class Mode:
    """One way the ``Pacer`` may predict a tile: its cost per tile against the full mode's, and the
    seconds its tiles took."""

    description: str
    predict: Callable[[np.ndarray], object]
    relative_cost: float
    seconds: list[float] = field(default_factory=list)
    tiles: int = 0


class Pacer:
    """Predicts each tile in the best mode whose projected time for the remaining tiles fits.

    Modes go from best to cheapest and the last one, the input itself, costs nothing; the pacer
    only ever steps down. After every tile (the first one included, so before the case really
    starts) it projects the remaining tiles at the current mode's measured seconds per tile (an
    unmeasured mode from its ``relative_cost``) times ``BUDGET_SAFETY``, and steps down to the
    first mode that fits. Each step is one loud line naming the case and why.
    """

    def __init__(self, modes: list[Mode], deadline: Deadline | None, name: str) -> None:
        self.modes, self.deadline, self.name = modes, deadline, name
        self.level, self.total, self.done = 0, 0, 0
        self.last: Mode | None = None
        """The mode that predicted the latest tile (the level may have stepped down since)."""

    def start(self, tiles: int) -> None:
        """A (new) pass over ``tiles`` tiles; an out-of-memory retry starts over with a new grid."""
        self.total, self.done = tiles, 0
        for mode in self.modes:
            mode.tiles = 0
        if self.deadline is not None and self.deadline.remaining() <= 0:
            self._step(len(self.modes) - 1, "its time budget was spent before the first tile")

    def __call__(self, block: np.ndarray) -> object:
        mode = self.modes[self.level]
        clock = self.deadline.clock if self.deadline is not None else time.monotonic
        begin = clock()
        out = mode.predict(block)
        self.last = mode
        mode.seconds.append(clock() - begin)
        mode.tiles += 1
        self.done += 1
        self._replan()
        return out

    def _per_tile(self, level: int) -> float:
        mode = self.modes[level]
        if mode.seconds:
            return float(np.mean(mode.seconds))
        current = self.modes[self.level]
        reference = float(np.mean(current.seconds)) / max(current.relative_cost, 1e-9)
        return reference * mode.relative_cost

    def _replan(self) -> None:
        left = self.total - self.done
        if self.deadline is None or left <= 0 or self.level == len(self.modes) - 1:
            return
        remaining = self.deadline.remaining()
        projected = self._per_tile(self.level) * left * BUDGET_SAFETY
        if projected <= remaining:
            return
        level = next(k for k in range(self.level + 1, len(self.modes))
                     if k == len(self.modes) - 1 or self._per_tile(k) * left * BUDGET_SAFETY <= remaining)
        self._step(level, f"{left} tile(s) left at {self._per_tile(self.level):.2f} s each project "
                          f"{projected:.0f} s, {max(remaining, 0):.0f} s of its budget left")

    def _step(self, level: int, why: str) -> None:
        self.level = level
        left = self.total - self.done
        if level == len(self.modes) - 1:
            log.error("case %s over its time budget: %s; the remaining %d of %d tile(s) are written as "
                      "the input itself", self.name, why, left, self.total)
        else:
            log.warning("case %s over its time budget: %s; the remaining %d of %d tile(s) with %s",
                        self.name, why, left, self.total, self.modes[level].description)

    @property
    def summary(self) -> dict[str, int]:
        """Tiles per mode in the last pass (only modes that ran)."""
        return {m.description: m.tiles for m in self.modes if m.tiles}
