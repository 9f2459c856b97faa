"""A clock the tests move by hand, for code that takes ``clock: Callable[[], datetime]`` (the job store)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta


class Clock:
    """Returns ``now`` (timezone-aware, UTC) when called; ``advance(seconds)`` moves it forward."""

    def __init__(self, start: datetime = datetime(2026, 1, 1, 12, 0, tzinfo=UTC)) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)
