"""The admin dashboard in headless Chromium against a real running daemon (``pacs-ai serve``).

The daemon runs the bundled reference model, delivers to a pynetdicom Storage SCP and serves the
dashboard on its metrics port. What a person would do and see, checked in the browser:

* the page loads with no console error, shows the processed jobs with their heat-map thumbnails and
  no patient name or ID;
* three dead letters appear with their reasons: a multi-frame image (dead at once), an image whose
  results could not be written (the results folder was replaced by a file: retried, then dead) and a
  delivery the destination refused (0xC000);
* after signing in with the admin token, "Retry" on the job (its cause removed) brings it back to
  queued and then done, shown by the page's own refresh; "Retry" on the delivery (the destination
  accepting again) delivers it;
* a screenshot of the page is written to dashboard.png in the ``screenshots`` folder (tests/support/browser.py:
  a temporary folder, or ``PACS_AI_SCREENSHOTS=docs/images`` for the picture in the README).

Run: ``.venv/bin/python -m pytest tests/test_dashboard_browser.py -q`` (needs Debian ``chromium`` and
the ``playwright`` package; ``make test`` installs both; no browser is downloaded).
"""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

import pydicom
import pytest

from pacs_ai.config import BUNDLED_MODEL
from support.bad_inputs.corpus import build_multiframe
from support.browser import browser, page, screenshots  # noqa: F401
from support.common import TEST_DATA, copies, free_port
from support.daemon_harness import Daemon
from support.dest_scp import DestSCP

pytestmark = [pytest.mark.browser, pytest.mark.slow]

TOKEN = "browser-test-admin-token-42"


def _wait(condition, timeout: float, what: str, poll: float = 0.2) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_dashboard_in_a_browser(tmp_path: Path, page, screenshots: Path) -> None:  # noqa: F811
    images = tmp_path / "images"
    good = copies(TEST_DATA / "cr_hip_mono2_small.dcm", images / "hip", 2, new_study=True)
    good += copies(TEST_DATA / "cr_tibia_mono1_small.dcm", images / "tibia", 1, new_study=True)
    refused = copies(TEST_DATA / "cr_tibia_mono1_small.dcm", images / "refused", 1, new_study=True)[0]
    later = copies(TEST_DATA / "cr_hip_mono2_small.dcm", images / "later", 1, new_study=True)[0]
    multiframe = build_multiframe(images / "bad").files[0]
    uid = {p: str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in [*good, refused, later, multiframe]}
    patient_names = {str(pydicom.dcmread(p, stop_before_pixels=True).PatientName) for p in uid}
    refused_study = str(pydicom.dcmread(refused, stop_before_pixels=True).StudyInstanceUID)

    with DestSCP() as dest:
        dest.refuse_studies({refused_study}, status=0xC000)
        overrides = {
            "metrics": {"enabled": True, "host": "127.0.0.1", "port": free_port()},
            "dashboard": {"admin_token": TOKEN, "refresh_s": 1.0},
        }
        with Daemon(tmp_path / "daemon", model=BUNDLED_MODEL, destinations=[dest], overrides=overrides) as daemon:
            base = f"http://127.0.0.1:{overrides['metrics']['port']}"
            store = daemon.jobs()

            # 1. Good images, one refused by the destination, one multi-frame image.
            assert all(s.ok for s in daemon.send([*good, refused, multiframe]).sent)
            settled = daemon.wait_settled([uid[p] for p in [*good, refused, multiframe]], timeout=180)
            assert [str(settled[uid[p]].state) for p in good] == ["done"] * 3, daemon.log_tail()
            assert str(settled[uid[multiframe]].state) == "dead"
            refused_job = settled[uid[refused]]
            _wait(
                lambda: any(d.state == "dead" for d in store.list_deliveries(job_id=refused_job.id)),
                60,
                "the refused delivery to go dead",
            )

            # 2. An image whose results cannot be written: retried, then dead with the reason.
            results = daemon.data_dir / "results"
            results.rename(results.with_name("results.saved"))
            results.write_text("not a folder")
            assert daemon.send([later]).sent[0].ok
            dead_job = daemon.wait_settled([uid[later]], timeout=120)[uid[later]]
            assert str(dead_job.state) == "dead" and "writing results failed" in dead_job.last_error
            results.unlink()
            results.with_name("results.saved").rename(results)

            # 3. The page, read-only: jobs, thumbnails, dead letters with reasons, no PHI.
            response = page.goto(base + "/")
            assert response is not None and response.status == 200
            dead_letters = page.locator("#dead-letters")
            expected_reasons = {
                f"#dead-job-{dead_job.id}": "writing results failed",
                f"#dead-job-{settled[uid[multiframe]].id}": "multi_frame",
            }
            for row, reason in expected_reasons.items():
                assert reason in dead_letters.locator(row).inner_text()
            dead_delivery = next(d for d in store.list_deliveries(job_id=refused_job.id) if d.state == "dead")
            delivery_row = dead_letters.locator(f"#dead-delivery-{dead_delivery.id}").inner_text()
            assert "status 0xC000" in delivery_row and dest.ae_title.lower() in delivery_row
            assert page.locator("#dead-letters form").count() == 0  # read-only until signed in
            for job_id in (settled[uid[p]].id for p in good):
                thumb = page.locator(f"#job-{job_id} .thumb img")
                thumb.wait_for()
                page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=thumb.element_handle())
            text = page.locator("body").inner_text()
            for name in patient_names:
                assert name not in text
            assert all(uid[p] not in page.content() for p in uid)

            # 4. Sign in; screenshot with the admin's view of the dead letters.
            page.fill("#token", TOKEN)
            page.click(".sign-in button")
            page.wait_for_selector(".badge-admin")
            assert "Signed in as admin." in page.locator(".flash").inner_text()
            page.screenshot(path=str(screenshots / "dashboard.png"), full_page=True)

            # 5. Retry the dead job: queued again, then done; the page shows it by its own refresh.
            page.locator(f"#dead-job-{dead_job.id} button", has_text="Retry").click()
            page.wait_for_selector(".flash-ok")
            assert f"Job {dead_job.id} queued again." in page.locator(".flash").inner_text()
            assert str(store.get(dead_job.id).state) in ("queued", "running", "done")
            page.wait_for_selector(f"#job-{dead_job.id} .chip-done", timeout=120_000)
            assert page.locator(f"#dead-job-{dead_job.id}").count() == 0
            assert str(store.get(dead_job.id).state) == "done"
            page.locator(f"#job-{dead_job.id} .thumb img").wait_for()

            # 6. Retry the refused delivery once the destination accepts it.
            dest.clear_refusals()
            page.locator(f"#dead-delivery-{dead_delivery.id} button", has_text="Retry").click()
            page.wait_for_selector(".flash-ok")
            _wait(
                lambda: store.list_deliveries(job_id=refused_job.id)[0].state == "done",
                60,
                "the retried delivery to be delivered",
            )
            assert sum(r.study_instance_uid == refused_study for r in dest.stored()) == 2  # its SC and SR
            page.wait_for_selector(f"#dead-delivery-{dead_delivery.id}", state="detached", timeout=30_000)

            page.console_log.assert_clean()
            # A refresh in flight when a form is submitted is cancelled by the navigation (ERR_ABORTED):
            # expected; any other failed request is not.
            failed = [r for r in page.console_log.failed_requests if not r.endswith("net::ERR_ABORTED")]
            assert not failed, failed
            audit = (daemon.data_dir / "audit.log").read_text()
            assert re.search(r'"action": "retry_job".*"ok": true', audit)
            assert TOKEN not in audit and TOKEN not in daemon.log_text()
            assert "Traceback" not in daemon.log_text(), daemon.log_tail()
    shutil.rmtree(images, ignore_errors=True)
