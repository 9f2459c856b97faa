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

    def store_error(self, exception: str) -> None:
        """The C-STORE handler raised an unexpected exception (a bug: its class name, e.g. ``KeyError``);
        the image was answered 0xA700 and ``image_rejected`` follows."""

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

    def store_error(self, exception: str) -> None:
        pass

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        pass

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        pass

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        pass


class CompositeObserver:
    """Forwards every event to each of ``observers`` in turn (in the order given)."""

    def __init__(self, *observers: Observer) -> None:
        self._observers: tuple[Observer, ...] = observers

    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        for observer in self._observers:
            observer.association(calling_aet, peer, accepted, reason)

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        for observer in self._observers:
            observer.image_received(job_id, sop_instance_uid, size, duplicate)

    def image_rejected(self, status: int, reason: str) -> None:
        for observer in self._observers:
            observer.image_rejected(status, reason)

    def store_error(self, exception: str) -> None:
        for observer in self._observers:
            observer.store_error(exception)

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        for observer in self._observers:
            observer.job_finished(job_id, state, inference_s, cam_s)

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        for observer in self._observers:
            observer.delivered(job_id, destination, end_to_end_s)

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        for observer in self._observers:
            observer.delivery_failed(job_id, destination, reason, dead)
