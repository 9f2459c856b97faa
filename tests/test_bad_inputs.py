"""The bad-input corpus against the real daemon: each case gets its expected outcome, and the daemon keeps serving.

One ``pacs-ai serve`` (tiny random-weight ResNet-50 at 64 px, an allow-list of calling AE titles, no
destination: results go to the outbox) runs for the whole module. Each case of tests/support/bad_inputs/corpus.py
is sent with a pynetdicom SCU, byte for byte as built, and must end as its table says:
refused at association/negotiation, a given C-STORE status (and no job), a job dead with the named reason
in ``last_error``, or a job done. After every case the daemon must still be alive, answer C-ECHO and
process a good image to ``done``.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from support.bad_inputs.corpus import ALLOWED_AE, CASES, HUGE_ASSOCIATION, Case, good_image
from support.daemon_harness import Daemon, file_identity, shared_model


def _data_set_bytes(path: Path) -> bytes:
    """A DICOM file's data set as encoded (after the file meta), located with pynetdicom's own parser."""
    from pynetdicom.dsutils import split_dataset

    _, start = split_dataset(path)
    return path.read_bytes()[start:]


def _spool_digest(path: Path) -> str:
    """The content digest of a spooled file's data set (the digest the job must record for it)."""
    import pydicom

    from pacs_ai.store.digest import dataset_digest

    syntax = pydicom.filereader.read_file_meta_info(path).TransferSyntaxUID
    return dataset_digest(_data_set_bytes(path), implicit_vr=syntax.is_implicit_VR,
                          little_endian=syntax.is_little_endian, deflated=syntax.is_deflated)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

JOB_TIMEOUT_S = 120.0  # a bound, not a speed goal: it includes the worker child's start on a loaded machine
HUGE_TIMEOUT_S = 150.0
MAX_DAEMON_RSS_MB = 2500  # a 20000 x 20000 image decoded would take 400 MB (8-bit) to 3.2 GB (float)

OUTCOMES: list[tuple[str, str, str, str]] = []  # (case, expected, observed, verdict)


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("bad-inputs")
    d = Daemon(root / "daemon", model=shared_model("resnet50", 64), allowed_calling_aets=[ALLOWED_AE])
    d.start()
    yield d
    d.stop()
    d.close_store()
    print("\nbad-input corpus against pacs-ai serve:")
    print(f"  {'case':26s} {'expected':42s} observed")
    for case_id, expected, observed, verdict in OUTCOMES:
        print(f"  {case_id:26s} {expected:42s} {observed}  [{verdict}]")
    print(f"  daemon peak RSS {d.peak_rss_kb / 1024:.0f} MB")


def _describe(result, jobs: dict) -> str:  # type: ignore[no-untyped-def]
    if not result.accepted:
        return f"association {result.rejected}"
    parts = []
    statuses = sorted({s.status for s in result.sent if s.status is not None})
    errors = sorted({s.error for s in result.sent if s.status is None})
    if statuses:
        parts.append("status " + "/".join(f"0x{s:04X}" for s in statuses))
    if errors:
        parts.append("; ".join(errors))
    states: dict[str, int] = {}
    for job in jobs.values():
        key = "no job" if job is None else str(job.state)
        if job is not None and str(job.state) == "dead":
            key += f" ({(job.last_error or '')[:60]})"
        states[key] = states.get(key, 0) + 1
    if states:
        parts.append(", ".join(f"{n}x {k}" for k, n in states.items()) if len(jobs) > 1 else next(iter(states)))
    return "; ".join(parts)


def _check_still_serving(daemon: Daemon, folder: Path) -> None:
    assert daemon.alive, f"the daemon died:\n{daemon.log_tail()}"
    assert daemon.echo(), "the daemon no longer answers C-ECHO"
    good = good_image(folder, "after")
    result = daemon.send([good])
    assert result.accepted and result.statuses == [0x0000], f"a good image was not acknowledged: {result}"
    uid = file_identity(good)[1]
    job = daemon.wait_settled([uid], timeout=JOB_TIMEOUT_S)[uid]
    assert job is not None and str(job.state) == "done", (
        f"a good image sent after the case did not end done: {job and (job.state, job.last_error)}"
    )
    rss_mb = daemon.peak_rss_kb / 1024
    assert rss_mb < MAX_DAEMON_RSS_MB, f"daemon peak RSS {rss_mb:.0f} MB"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, daemon: Daemon, tmp_path: Path) -> None:
    skip = case.skip_reason()
    if skip:
        OUTCOMES.append((case.id, str(case.expect), "skipped", skip))
        pytest.skip(skip)
    inp = case.build(tmp_path)
    uids = [file_identity(f)[1] for f in inp.files]
    verdict = "FAIL"
    observed = "(not sent)"
    try:
        if inp.prelude:
            first = daemon.send(inp.prelude)
            assert first.accepted and all(s.ok for s in first.sent), f"prelude not acknowledged: {first}"
            pre = daemon.wait_settled([file_identity(p)[1] for p in inp.prelude], timeout=JOB_TIMEOUT_S)
            assert all(j is not None and str(j.state) == "done" for j in pre.values()), f"prelude: {pre}"
            before = {u: daemon.job(u) for u in uids}
        started = time.monotonic()
        result = daemon.send(inp.files, calling_ae=inp.calling_ae, timeout=120)
        send_s = time.monotonic() - started
        expect = case.expect
        many = len(inp.files) > 1
        if expect.kind in ("dead", "done"):
            jobs = daemon.wait_settled(uids, timeout=HUGE_TIMEOUT_S if many else JOB_TIMEOUT_S)
        else:  # a job is committed before the answer: none may exist once the refusal has arrived
            jobs = {u: daemon.job(u) for u in uids}
        observed = _describe(result, jobs)
        if many:
            observed += f" (sent in {send_s:.1f} s)"

        if expect.kind == "refused":
            assert not result.accepted or all(
                s.status is None and "presentation context" in s.error for s in result.sent
            ), f"expected a refusal at association/negotiation, got {observed}"
            assert all(j is None for j in jobs.values()), f"a refused input created a job: {observed}"
        elif expect.kind == "status":
            assert result.accepted, f"association refused: {observed}"
            assert all(expect.matches_status(s.status) for s in result.sent), f"expected {expect}, got {observed}"
            assert all(j is None for j in jobs.values()), f"a refused instance created a job: {observed}"
        else:
            assert result.accepted, f"association refused: {observed}"
            bad = [s for s in result.sent if s.status != 0x0000]
            assert not bad, f"expected 0x0000 for every instance, got {observed}"
            stuck = {u: j and j.state for u, j in jobs.items() if j is None or str(j.state) not in ("done", "dead")}
            assert not stuck, f"{len(stuck)} job(s) did not finish: {list(stuck.items())[:5]}"
            if expect.kind == "done":
                wrong = [(u, j.state, j.last_error) for u, j in jobs.items() if str(j.state) != "done"]
                assert not wrong, f"expected done, got {wrong[:3]}"
            else:
                for j in jobs.values():
                    assert str(j.state) == "dead", f"expected dead ({expect.reason}), got {j.state}"
                    error = j.last_error or ""
                    assert error.startswith(expect.reason) or f"{expect.reason}:" in error, (
                        f"expected reason {expect.reason!r} in last_error, got {error!r}"
                    )
                    assert j.attempts <= 1, (
                        f"a permanent input error was retried: {j.attempts} attempts ({error[:80]})"
                    )
        if inp.prelude:  # the collision: same job, re-queued with the new content and processed again
            for u in uids:
                assert before[u] is not None and jobs[u] is not None and jobs[u].id == before[u].id, "a second job"
                assert jobs[u].sha256 != before[u].sha256, "the new content was not taken"
                sent = {file_identity(f)[1]: f for f in inp.files}[u]
                spooled = Path(jobs[u].spool_path)
                assert _data_set_bytes(spooled) == _data_set_bytes(sent), "the spool does not hold the new content"
                assert _spool_digest(spooled) == jobs[u].sha256, "spool file and job disagree"
        if len(inp.files) == HUGE_ASSOCIATION:
            assert len({j.id for j in jobs.values()}) == HUGE_ASSOCIATION
        verdict = "ok"
    finally:
        OUTCOMES.append((case.id, str(case.expect), observed, verdict))
    _check_still_serving(daemon, tmp_path)
