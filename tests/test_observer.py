"""CompositeObserver calls each observer's named method in turn, with the arguments given (no dispatch by name)."""

from __future__ import annotations

from pacs_ai.ops.events import CompositeObserver, NullObserver, Observer


class Recorder(NullObserver):
    def __init__(self, name: str, log: list[tuple[str, str, tuple[object, ...]]]) -> None:
        self.name, self.log = name, log

    def association(self, calling_aet: str, peer: str, accepted: bool, reason: str = "") -> None:
        self.log.append((self.name, "association", (calling_aet, peer, accepted, reason)))

    def image_received(self, job_id: int, sop_instance_uid: str, size: int, duplicate: bool) -> None:
        self.log.append((self.name, "image_received", (job_id, sop_instance_uid, size, duplicate)))

    def image_rejected(self, status: int, reason: str) -> None:
        self.log.append((self.name, "image_rejected", (status, reason)))

    def store_error(self, exception: str) -> None:
        self.log.append((self.name, "store_error", (exception,)))

    def job_finished(self, job_id: int, state: str, inference_s: float, cam_s: float) -> None:
        self.log.append((self.name, "job_finished", (job_id, state, inference_s, cam_s)))

    def delivered(self, job_id: int, destination: str, end_to_end_s: float) -> None:
        self.log.append((self.name, "delivered", (job_id, destination, end_to_end_s)))

    def delivery_failed(self, job_id: int, destination: str, reason: str, dead: bool) -> None:
        self.log.append((self.name, "delivery_failed", (job_id, destination, reason, dead)))


def test_composite_fans_every_event_out_in_order() -> None:
    log: list[tuple[str, str, tuple[object, ...]]] = []
    composite: Observer = CompositeObserver(Recorder("a", log), Recorder("b", log))
    composite.association("MOD", "127.0.0.1:1", False, "calling AE title not allowed")
    composite.image_received(1, "2.25.1", 100, False)
    composite.image_rejected(0xA900, "SOP class mismatch")
    composite.store_error("KeyError")
    composite.job_finished(1, "done", 0.5, 0.25)
    composite.delivered(1, "pacs", 3.0)
    composite.delivery_failed(1, "pacs", "refused", True)
    expected = [
        ("association", ("MOD", "127.0.0.1:1", False, "calling AE title not allowed")),
        ("image_received", (1, "2.25.1", 100, False)),
        ("image_rejected", (0xA900, "SOP class mismatch")),
        ("store_error", ("KeyError",)),
        ("job_finished", (1, "done", 0.5, 0.25)),
        ("delivered", (1, "pacs", 3.0)),
        ("delivery_failed", (1, "pacs", "refused", True)),
    ]
    assert log == [(who, event, args) for event, args in expected for who in ("a", "b")]

