"""The retry/dead decision: one pure rule asked by every failure of a job, delivery or study delivery."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how late a failed item is tried again.

    ``max_attempts``: claims an item may use before it goes dead; ``backoff_base_s`` and ``backoff_max_s``:
    the exponential backoff in seconds (see :meth:`delay`).
    """

    max_attempts: int = 5
    backoff_base_s: float = 10.0
    backoff_max_s: float = 3600.0

    def delay(self, attempt: int) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based): base * 2**(attempt-1), capped."""
        exponent = max(attempt, 1) - 1
        if exponent > 60:
            return self.backoff_max_s
        return min(self.backoff_base_s * 2.0**exponent, self.backoff_max_s)

    def next_attempt_at(self, attempts: int, now: datetime, *, permanent: bool = False) -> datetime | None:
        """The one retry decision for jobs, deliveries and study deliveries after a failed attempt.

        ``attempts`` is how many claims the failed item has used. Returns when to try again (``now`` plus
        :meth:`delay`), or None when it goes dead: a ``permanent`` error, or ``max_attempts`` used.
        A pure function of its arguments (no clock, no database).
        """
        if permanent or self.exhausted(attempts):
            return None
        return now + timedelta(seconds=self.delay(attempts))

    def exhausted(self, attempts: int) -> bool:
        """True when an item that used ``attempts`` claims gets no further claim (a failure then, or a
        lease expiring on that attempt, makes it dead)."""
        return attempts >= self.max_attempts
