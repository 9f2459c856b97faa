"""The admin dashboard as an application (Starlette's TestClient): what it shows, who may act, no PHI.

The job store is a real SQLite JobStore driven through its public API (the worker's and the delivery
loop's calls), the overlay a real PNG, the spooled images real DICOM files; expected values come from
what the test put in (result dicts, reasons, names) and from models/reference/model.json read directly.
The same page in a real browser against a real daemon: tests/test_dashboard_browser.py.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from PIL import Image
from starlette.testclient import TestClient

from pacs_ai.config import BUNDLED_MODEL, ConfigError, parse_config
from pacs_ai.dashboard import dashboard_app
from pacs_ai.dashboard.app import SESSION_COOKIE, THUMBNAIL_PX
from pacs_ai.ops.audit import AuditLog
from pacs_ai.ops.health import HealthCheck
from pacs_ai.ops.metrics import Metrics, metrics_app
from pacs_ai.queue.jobstore import JobStore
from support.common import REPO_ROOT, TEST_DATA
from support.job_results import job_result

TOKEN = "s3cret-admin-token-0123456789"
PATIENT_NAME = "DOE^JANE"
PATIENT_ID = "PID-0047-XYZ"
OWNER = "test:1:worker"


def _config(tmp_path: Path, **dashboard):  # type: ignore[no-untyped-def]
    table = {
        "storage": {"data_dir": str(tmp_path / "data")},
        "destinations": [{"name": "pacs", "ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}],
        "dashboard": {"refresh_s": 0.0, **dashboard},
    }
    return parse_config(table, tmp_path)


def _spool(tmp_path: Path, n: int) -> list[tuple[Path, pydicom.Dataset]]:
    """``n`` real DICOM files carrying a patient name and ID, each with its own UIDs."""
    out = []
    for i in range(n):
        ds = pydicom.dcmread(TEST_DATA / "cr_hip_mono2_small.dcm")
        ds.PatientName, ds.PatientID = PATIENT_NAME, PATIENT_ID
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID = pydicom.uid.generate_uid(), pydicom.uid.generate_uid()
        path = tmp_path / "spool" / f"{i}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        out.append((path, ds))
    return out


def _enqueue(store: JobStore, path: Path, ds: pydicom.Dataset) -> int:
    return store.enqueue(
        sop_instance_uid=ds.SOPInstanceUID,
        study_instance_uid=ds.StudyInstanceUID,
        series_instance_uid=ds.SeriesInstanceUID,
        sop_class_uid=ds.SOPClassUID,
        calling_aet="MODALITY1",
        spool_path=str(path),
        sha256="0" * 64,
        size=path.stat().st_size,
    ).job_id


def _result(probability: float, threshold: float = 0.3) -> dict:
    return {
        "probability": probability,
        "fractured": probability >= threshold,
        "label": "fractured" if probability >= threshold else "not_fractured",
        "threshold": threshold,
        "model_name": "unit-model",
        "model_version": "9.9.1",
        "architecture": "resnet50",
        "timings": {"preprocess": 0.0123, "forward": 0.0456, "cam": 0.0031},
        "files": {},
    }


@pytest.fixture
def world(tmp_path: Path):  # type: ignore[no-untyped-def]
    """A store with one positive and one negative done job (with overlays), a dead job whose reason
    names the patient and its UID, and a dead delivery."""
    config = _config(tmp_path)
    store = JobStore(f"sqlite:///{tmp_path / 'jobs.db'}", upgrade=True)
    files = _spool(tmp_path, 4)
    ids = [_enqueue(store, p, ds) for p, ds in files]
    claimed = store.claim(OWNER, limit=4)
    assert [j.id for j in claimed] == ids
    routing = {"action": "skip", "rule": "intended_use", "reason": "body part CHEST is not in the model's intended use"}
    store.skip(ids[3], OWNER, job_result({"routing": routing}))
    store.complete(ids[0], OWNER, job_result(_result(0.86)), ["pacs"])
    store.complete(ids[1], OWNER, job_result(_result(0.07)), ["pacs"])
    dead_reason = f"undecodable_pixel_data: PatientName={PATIENT_NAME} in {files[2][1].SOPInstanceUID}.dcm"
    store.fail(ids[2], OWNER, dead_reason, permanent=True)
    (delivery,) = store.claim_deliveries(OWNER, limit=1)
    store.fail_delivery(delivery.id, OWNER, "C-STORE refused: 0xA700 out of resources", permanent=True)
    for job_id, colour in ((ids[0], (200, 40, 40)), (ids[1], (40, 160, 60))):
        folder = config.storage.results / str(job_id)
        folder.mkdir(parents=True)
        Image.new("RGB", (1024, 800), colour).save(folder / "overlay.png")
    yield {"config": config, "store": store, "ids": ids, "files": files, "delivery": delivery, "tmp": tmp_path}
    store.close()


def _client(world: dict, audit: AuditLog | None = None, **dashboard) -> TestClient:  # type: ignore[no-untyped-def]
    config = _config(world["tmp"], **dashboard) if dashboard else world["config"]
    app = dashboard_app(config, world["store"], audit=audit.admin_action if audit else None)
    return TestClient(app, base_url="http://127.0.0.1:9110")


def _csrf(html: str) -> str:
    match = re.search(r'name="csrf" value="([^"]+)"', html)
    assert match, "no CSRF field on the page"
    return match.group(1)


def _sign_in(client: TestClient) -> str:
    csrf = _csrf(client.get("/").text)
    response = client.post("/sign-in", data={"token": TOKEN, "csrf": csrf}, follow_redirects=False)
    assert response.status_code == 303
    return _csrf(client.get("/").text)  # a new session gets a new CSRF token


def test_page_shows_queue_results_dead_letters_deliveries_and_model(world):
    ids = world["ids"]
    with _client(world) as client:
        page = client.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        html = page.text
    card = json.loads((BUNDLED_MODEL / "model.json").read_text())
    row = lambda job_id: re.search(rf'<tr id="job-{job_id}">(.*?)</tr>', html, re.S).group(1)  # noqa: E731
    positive, negative, dead = row(ids[0]), row(ids[1]), row(ids[2])
    assert "Fracture suspected" in positive and "86.0 %" in positive and "threshold 30.0 %" in positive
    assert "No fracture detected" in negative and "7.0 %" in negative
    assert "unit-model 9.9.1" in positive and "prep 12 ms" in positive and "model 46 ms" in positive
    assert f'src="/jobs/{ids[0]}/thumbnail.png"' in positive and "thumbnail.png" not in dead
    assert "dead" in dead
    skipped = row(ids[3])
    assert "Not analysed: intended_use: body part CHEST is not in the model&#39;s intended use" in skipped
    assert "chip-skipped" in skipped and "1 skipped by routing" in html
    dead_letters = re.search(r'<section class="panel" id="dead-letters">(.*?)</section>', html, re.S).group(1)
    assert f"#{ids[2]}" in dead_letters and "undecodable_pixel_data" in dead_letters
    assert "C-STORE refused: 0xA700 out of resources" in dead_letters and "pacs" in dead_letters
    deliveries = re.search(r'<section class="panel" id="deliveries">(.*?)</section>', html, re.S).group(1)
    assert "ORTHANC@127.0.0.1:4242" in deliveries
    numbers = re.findall(r'<td class="num[^"]*">(\d+)</td>', deliveries)
    assert numbers == ["1", "0", "0", "0", "1"]  # pending, sending, failed, done, dead for "pacs"
    model = re.search(r'<section class="panel" id="model-card">(.*?)</section>', html, re.S).group(1)
    assert card["name"] in model and card["version"] in model
    assert f"{card['metrics']['validation']['auc']:.3f}" in model
    assert re.search(r'id="stat-dead">1<', html) and re.search(r'id="stat-waiting">0<', html)
    assert "2 in 5 min" in html  # throughput: the two done jobs (the dead one is not counted)
    # Read-only: no action forms, and no sign-in form either since no token is configured.
    assert "/retry" not in html and "/sign-in" not in html and "no admin token configured" in html


def test_thumbnail_is_small_png_and_missing_overlay_is_404(world):
    ids = world["ids"]
    with _client(world) as client:
        thumb = client.get(f"/jobs/{ids[0]}/thumbnail.png")
        full = client.get(f"/jobs/{ids[0]}/overlay.png")
        assert client.get(f"/jobs/{ids[2]}/thumbnail.png").status_code == 404
        assert client.get("/jobs/99999/overlay.png").status_code == 404
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    with Image.open(io.BytesIO(thumb.content)) as image:
        assert max(image.size) == THUMBNAIL_PX and image.getpixel((10, 10))[:3] == (200, 40, 40)
    with Image.open(io.BytesIO(full.content)) as image:
        assert image.size == (1024, 800)
    with _client(world, thumbnails=False) as client:
        assert client.get(f"/jobs/{ids[0]}/thumbnail.png").status_code == 404
        assert "thumbnail.png" not in client.get("/").text


def _identifiers(world: dict) -> list[str]:
    ds = world["files"][2][1]
    return [PATIENT_NAME, PATIENT_ID, ds.SOPInstanceUID, ds.StudyInstanceUID]


def test_no_patient_data_unless_allowed_and_then_only_for_an_admin(world):
    with _client(world) as client:
        for path in ("/", "/panels"):
            text = client.get(path).text
            for secret in _identifiers(world):
                assert secret not in text, (path, secret)
            assert "patient data hidden" in text
        # The dead job's reason is still there, with the identifiers masked.
        assert "undecodable_pixel_data: PatientName=[REDACTED] in [UID].dcm" in client.get("/").text
    with _client(world, show_phi=True) as client:  # loopback, no token: whoever can reach it is trusted
        text = client.get("/").text
        for secret in _identifiers(world):
            assert secret in text, secret
    with _client(world, show_phi=True, admin_token=TOKEN) as client:
        text = client.get("/").text
        assert PATIENT_NAME not in text and PATIENT_ID not in text
        _sign_in(client)
        text = client.get("/").text
        assert PATIENT_NAME in text and PATIENT_ID in text


def test_read_only_without_token(world):
    dead = world["ids"][2]
    with _client(world) as client:
        html = client.get("/").text
        assert 'name="csrf"' not in html and "<form" not in html  # nothing to act with
        for path in (f"/jobs/{dead}/retry", "/jobs/retry-dead", f"/deliveries/{world['delivery'].id}/retry"):
            assert client.post(path).status_code == 403
        assert client.post("/sign-in", data={"token": "anything-at-all-1234"}).status_code == 403
        assert client.post(f"/jobs/{dead}/retry", headers={"Authorization": "Bearer anything-at-all-1234"}).status_code == 403
    assert world["store"].get(dead).state == "dead"
    assert world["store"].list_deliveries(state="dead")[0].id == world["delivery"].id


def test_actions_need_the_admin_token_and_csrf(world, tmp_path):
    store, ids, delivery = world["store"], world["ids"], world["delivery"]
    dead = ids[2]
    audit = AuditLog(tmp_path / "audit.log")
    with _client(world, audit, admin_token=TOKEN) as client:
        html = client.get("/").text
        assert "/sign-in" in html and f"/jobs/{dead}/retry" not in html
        csrf = _csrf(html)
        # Not signed in: refused even with a good CSRF token.
        assert client.post(f"/jobs/{dead}/retry", data={"csrf": csrf}).status_code == 403
        # A wrong token does not sign in.
        wrong = client.post("/sign-in", data={"csrf": csrf, "token": TOKEN[:-1] + "X"}, follow_redirects=False)
        assert wrong.status_code == 403 and "/retry" not in client.get("/").text
        # Sign-in itself is CSRF-protected (login CSRF).
        assert client.post("/sign-in", data={"token": TOKEN}).status_code == 403
        csrf = _sign_in(client)
        html = client.get("/").text
        assert f'action="/jobs/{dead}/retry"' in html and f'action="/deliveries/{delivery.id}/retry"' in html
        # Signed in, but no / a wrong CSRF token / another origin: refused, nothing changes.
        assert client.post(f"/jobs/{dead}/retry").status_code == 403
        assert client.post(f"/jobs/{dead}/retry", data={"csrf": csrf[:-2] + "xx"}).status_code == 403
        evil = {"Origin": "http://evil.example"}
        assert client.post(f"/jobs/{dead}/retry", data={"csrf": csrf}, headers=evil).status_code == 403
        cross = {"Sec-Fetch-Site": "cross-site"}
        assert client.post(f"/jobs/{dead}/retry", data={"csrf": csrf}, headers=cross).status_code == 403
        assert client.get(f"/jobs/{dead}/retry").status_code == 405  # actions are POST only
        assert store.get(dead).state == "dead"
        # The real thing: retried, flash shown once.
        ok = client.post(
            f"/jobs/{dead}/retry", data={"csrf": csrf}, headers={"Origin": "http://127.0.0.1:9110"}, follow_redirects=False
        )
        assert ok.status_code == 303 and ok.headers["location"] == "/"
        job = store.get(dead)
        assert job.state == "queued" and job.attempts == 0
        assert f"Job {dead} queued again." in client.get("/").text
        assert f"Job {dead} queued again." not in client.get("/").text
        # A job that is not dead or failed cannot be retried: a clear message, not a crash.
        shown = client.post(f"/jobs/{ids[0]}/retry", data={"csrf": csrf}).text  # the redirect followed
        assert re.search(rf"job {ids[0]} is done: only failed, dead.* jobs can be retried", shown)
        assert client.post(f"/deliveries/{delivery.id}/retry", data={"csrf": csrf}).status_code == 200
        assert store.list_deliveries(job_id=delivery.job_id)[0].state == "pending"
        # Signing out ends the admin session.
        client.post("/sign-out", data={"csrf": csrf})
        assert "/sign-in" in client.get("/").text
    entries = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    admin = [(e["action"], e["ok"]) for e in entries if e["event"] == "admin"]
    assert ("sign_in", False) in admin and ("sign_in", True) in admin
    assert ("retry_job", False) in admin and ("retry_job", True) in admin and ("retry_delivery", True) in admin
    assert TOKEN not in (tmp_path / "audit.log").read_text()


def test_bearer_token_for_scripts(world):
    dead = world["ids"][2]
    with _client(world, admin_token=TOKEN) as client:
        client.cookies.clear()
        refused = client.post(f"/jobs/{dead}/retry", headers={"Authorization": "Bearer wrong-token-wrong-token"})
        assert refused.status_code == 403
        done = client.post(f"/jobs/{dead}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
        assert done.status_code == 200 and done.text.strip() == f"Job {dead} queued again."
        again = client.post(f"/jobs/{dead}/retry", headers={"Authorization": f"Bearer {TOKEN}"})
        assert again.status_code == 409 and f"job {dead} is queued: only failed" in again.text
    assert world["store"].get(dead).state == "queued"


def test_security_headers_and_session_cookie(world):
    with _client(world, admin_token=TOKEN) as client:
        page = client.get("/")
        css = client.get("/static/dashboard.css")
    for response in (page, css):
        csp = response.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp and "'unsafe-inline'" not in csp
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-store"
    cookie = page.headers["set-cookie"]
    assert cookie.startswith(SESSION_COOKIE + "=") and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert css.status_code == 200 and "text/css" in css.headers["content-type"]


def test_metrics_and_health_share_the_port_with_the_dashboard(world):
    metrics = Metrics()
    metrics.image_received(1, "1.2.3", 10, False)
    health = HealthCheck({"worker": 30.0})
    dash = dashboard_app(world["config"], world["store"], health=health)
    with TestClient(metrics_app(metrics, health, dash)) as client:
        assert "pacs_ai_images_received_total 1.0" in client.get("/metrics").text
        assert client.get("/healthz").json()["status"] == "ok"
        assert 'class="stat stat-ok"' in client.get("/").text
        assert client.get("/metrics").headers.get("set-cookie") is None  # no session on scrapes
        assert client.get("/nothing").status_code == 404


@pytest.mark.parametrize(
    ("host", "token", "enabled", "error"),
    [
        ("0.0.0.0", "", True, "dashboard.admin_token"),
        ("::", "", True, "dashboard.admin_token"),
        ("192.0.2.7", "", True, "dashboard.admin_token"),
        ("pacs-ai.example.org", "", True, "dashboard.admin_token"),
        ("0.0.0.0", "short", True, "dashboard.admin_token"),
        ("0.0.0.0", TOKEN, True, None),
        ("0.0.0.0", "", False, None),  # metrics only: as before the dashboard
        ("127.0.0.1", "", True, None),
        ("127.0.0.2", "", True, None),
        ("::1", "", True, None),
        ("localhost", "", True, None),
    ],
)
def test_refuses_to_serve_beyond_loopback_without_a_token(tmp_path, host, token, enabled, error):
    table = {"metrics": {"host": host}, "dashboard": {"admin_token": token, "enabled": enabled}}
    if error is None:
        config = parse_config(table, tmp_path)
        assert config.dashboard.admin_token == token
        return
    with pytest.raises(ConfigError) as caught:
        parse_config(table, tmp_path)
    assert caught.value.key == error


@pytest.mark.parametrize(("key", "value"), [("recent_jobs", 0), ("refresh_s", 0.5), ("show_phi", "yes"), ("colour", 1)])
def test_dashboard_keys_are_checked(tmp_path, key, value):
    with pytest.raises(ConfigError) as caught:
        parse_config({"dashboard": {key: value}}, tmp_path)
    assert caught.value.key == f"dashboard.{key}"


def test_serve_refuses_to_start_beyond_loopback_without_token_and_check_masks_the_token(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(f'[storage]\ndata_dir = "{tmp_path / "d"}"\n[metrics]\nhost = "0.0.0.0"\n')
    cli = [sys.executable, "-m", "pacs_ai"]
    done = subprocess.run([*cli, "serve", "--config", str(bad)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode != 0
    assert "dashboard.admin_token" in done.stderr and "beyond loopback" in done.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was created
    good = tmp_path / "good.toml"
    good.write_text(bad.read_text() + f'[dashboard]\nadmin_token = "{TOKEN}"\n')
    done = subprocess.run([*cli, "config", "check", str(good)], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr
    assert TOKEN not in done.stdout and 'admin_token = "***"' in done.stdout


def test_retry_all_dead_jobs(world):
    dead = world["ids"][2]
    with _client(world, admin_token=TOKEN) as client:
        csrf = _sign_in(client)
        assert 'action="/jobs/retry-dead"' in client.get("/").text
        shown = client.post("/jobs/retry-dead", data={"csrf": csrf}).text
        assert "1 dead job(s) queued again." in shown
        assert 'action="/jobs/retry-dead"' not in shown  # nothing dead any more
    assert world["store"].get(dead).state == "queued"


def test_model_cards_read_without_torch_and_a_broken_card_is_named(world, tmp_path):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "model.json").write_text('{"name": "half-written"')
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from pacs_ai.dashboard.snapshot import load_models\n"
        f"rows = load_models([Path({str(BUNDLED_MODEL)!r}), Path({str(broken)!r})])\n"
        "print(rows[0].card['name'], rows[1].card is None, 'model.json' in rows[1].error, 'torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert out.returncode == 0, out.stderr
    card = json.loads((BUNDLED_MODEL / "model.json").read_text())
    assert out.stdout.split() == [card["name"], "True", "True", "False"]
    config = parse_config(
        {"storage": {"data_dir": str(tmp_path / "d")}, "model": {"path": [str(BUNDLED_MODEL), str(broken)]}}, tmp_path
    )
    with TestClient(dashboard_app(config, world["store"])) as client:
        page = client.get("/")
    assert page.status_code == 200 and card["name"] in page.text
    assert f"cannot read the model card {broken / 'model.json'}" in page.text
