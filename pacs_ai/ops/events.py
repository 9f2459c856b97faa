"""What the pipeline tells the outside world (metrics, audit log) as it works.

Components take an ``Observer`` in their constructor and call it at each event; they never import the
metrics or audit modules themselves. ``NullObserver`` is the default; ``CompositeObserver`` fans out.
"""

from __future__ import annotations

from typing import Protocol


class Observer(Protocol):
    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        """An association was requested; ``reason`` says why it was rejected."""

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        """An instance was stored durably and its job committed."""

    def image_rejected(self, status: int, reason: str) -> None:
        """A C-STORE was answered with a non-success ``status``."""

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        """A job ended an attempt in ``state`` (done, failed or dead); seconds spent per stage."""

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        """A job's results were stored at ``destination``; seconds since the image was received."""

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        """A delivery attempt failed; ``dead`` when no more attempts will be made."""


class NullObserver:
    """An observer that ignores everything."""

    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        pass

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        pass

    def image_rejected(self, status: int, reason: str) -> None:
        pass

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        pass

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        pass

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        pass


class CompositeObserver:
    """Forwards every event to each of ``observers`` in turn."""

    def __init__(self, *observers: Observer) -> None:
        self._observers = observers

    def __getattr__(self, name: str):  # type: ignore[no-untyped-def]
        def fan_out(*args: object, **kwargs: object) -> None:
            for observer in self._observers:
                getattr(observer, name)(*args, **kwargs)

        return fan_out
