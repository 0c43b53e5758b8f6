"""The console in a real browser (Playwright, Debian's Chromium) over a real node: `up` on its
embedded defaults (no broker server) with a tiny bundle and a similar cases index, DCMTK storescp
as the destination. One browser session walks through: log in, a pushed image's job reaches
done (findings, draft, SC preview), found again by its accession number; the destination goes
down and a dead letter appears with its reason; the destination comes back, resend, and the
results are at the destination; a request without the CSRF token is refused; a viewer cannot
resend. Screenshots of every page go to $CONSOLE_SCREENSHOTS (default: the test's tmp folder)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from tests.conftest import free_port, require_module, require_peer, storescp, wait_for
from tests.console_helpers import PASSWORDS, Served, console_app, users_toml

pytestmark = pytest.mark.integration
CHROMIUM = "/usr/bin/chromium"


def _storescp(port: int, out: Path) -> subprocess.Popen:
    return storescp(out, port)


def _push(src: Path, dest: Path, port: int, accession: str) -> str:
    ds = pydicom.dcmread(src)
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.AccessionNumber = accession
    ds.save_as(dest, enforce_file_format=True)
    out = subprocess.run(["/usr/bin/storescu", "-aet", "SITE_A", "-aec", "MEDSAM2CXR", "127.0.0.1", str(port), str(dest)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return str(ds.SOPInstanceUID)


def test_console_in_a_browser(tmp_path, tiny_bundle, phantom_dir):
    playwright = require_module("playwright.sync_api")
    require_peer(CHROMIUM)
    shots = Path(os.environ.get("CONSOLE_SCREENSHOTS", tmp_path / "screenshots"))
    shots.mkdir(parents=True, exist_ok=True)
    node_port, pacs_port, web_port = free_port(), free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    spool = tmp_path / "var"
    from index.build import build_index, manifest_items
    from models.bundle import load_bundle

    build_index(spool / "index", load_bundle(tiny_bundle), manifest_items(phantom_dir), progress=False)
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
                      '[sender]\nattempts = 2\nbackoff_s = 0.5\nmax_backoff_s = 1\ntimeout_s = 5\n'
                      '[worker]\nreconcile_every_s = 2\n[console]\ndestination_timeout_s = 1\n'
                      '[urgent]\nrules = {}\n' + users_toml())  # no KOS: four results per image
    pacs = _storescp(pacs_port, received)
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT)
    from worker.settings import load_settings

    images = sorted((phantom_dir / "images").glob("*.dcm"))
    try:
        wait_for(lambda: "listening" in log.read_text(), 60, "the node to listen")
        settings = load_settings(config)
        with Served(console_app(settings), web_port) as web, playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM)
            page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
            url = web.url

            def login(user: str) -> None:
                page.goto(url + "/")
                assert page.url.startswith(url + "/login")
                page.fill("input[name=user]", user)
                page.fill("input[name=password]", PASSWORDS[user])
                page.click("button[type=submit]")
                page.wait_for_url(url + "/")

            def reload_until(path: str, check, what: str, timeout: float = 150) -> None:
                def ok():
                    page.goto(url + path)
                    return check()
                wait_for(ok, timeout, what, step=1.5)

            page.goto(url + "/")
            page.screenshot(path=shots / "login.png")
            login("operator")

            # 1. A pushed image's job reaches done; its page shows findings, draft and SC.
            _push(images[0], tmp_path / "one.dcm", node_port, "ACC-BROWSER-1")
            reload_until("/jobs", lambda: page.locator("#jobs td.state-done").count() == 1, "the job to be done")
            page.screenshot(path=shots / "jobs.png", full_page=True)
            page.click("#jobs a")
            assert page.inner_text("#job-state") == "done"
            assert page.locator("#findings tr").count() == 15  # header + the 14 labels
            assert page.locator("#draft p").count() > 0
            page.wait_for_function("document.querySelector('#sc').naturalWidth > 0")
            events = page.inner_text("#timeline")
            assert "received" in events and "inferred" in events and "sent" in events
            page.screenshot(path=shots / "job.png", full_page=True)
            # ... and found again by its accession number (the listener's keyed hash)
            page.goto(url + "/jobs")
            page.fill("input[name=accession_number]", "ACC-BROWSER-1")
            page.click("text=Find")
            assert page.locator("#jobs td.state-done").count() == 1 and "ACC-BROWSER-1" not in page.content()
            wait_for(lambda: len(list(received.iterdir())) == 4, 30, "the first results at the destination")

            # 2. The destination goes down: a dead letter with its reason, and the destination down.
            pacs.terminate()
            pacs.wait(timeout=10)
            _push(images[1], tmp_path / "two.dcm", node_port, "ACC-BROWSER-2")
            reload_until("/failures", lambda: page.locator("#failures td.state-dead").count() == 1,
                         "a dead letter on the failures page")
            assert "PACS" in page.inner_text("#failures .reason")
            page.screenshot(path=shots / "failures.png", full_page=True)
            reload_until("/", lambda: "down" in page.inner_text("#destinations"), "the destination shown down", 40)
            page.screenshot(path=shots / "today.png", full_page=True)

            # 3. A POST without the CSRF token is refused, even from a logged-in operator.
            dead = page.evaluate("fetch('/api/failures').then(r => r.json())")[0]["id"]
            refused = page.request.post(f"{url}/api/jobs/{dead}/resend")
            assert refused.status == 403 and "CSRF" in refused.text()

            # 4. The destination comes back; resend; the results arrive.
            pacs = _storescp(pacs_port, received)
            page.goto(url + "/failures")
            page.click(f"tr[data-job='{dead}'] button.resend")
            page.wait_for_url(f"{url}/jobs/{dead}?resent=*")
            assert page.is_visible("#resent")
            reload_until(f"/jobs/{dead}", lambda: page.inner_text("#job-state") == "done", "the resent job to be done", 90)
            assert "resent" in page.inner_text("#timeline") and "user=operator" in page.inner_text("#timeline")
            wait_for(lambda: len(list(received.iterdir())) == 8, 30, "the resent results at the destination")

            # 5. A viewer sees everything and cannot resend.
            page.click("text=Log out")
            page.wait_for_url(url + "/login")
            login("viewer")
            for name, path in (("sites", "/sites"), ("model", "/model"), ("config", "/config")):
                page.goto(url + path)
                page.screenshot(path=shots / f"{name}.png", full_page=True)
            page.goto(url + "/sites")
            assert "SITE_A" in page.inner_text("#sites")
            page.goto(url + "/failures")
            assert page.locator("button.resend").count() == 0
            token = page.evaluate("fetch('/api/session').then(r => r.json())")["csrf"]
            denied = page.request.post(f"{url}/api/jobs/{dead}/resend", headers={"X-CSRF-Token": token})
            assert denied.status == 403 and "operator" in denied.text()
            browser.close()
    finally:
        up.send_signal(signal.SIGTERM)
        try:
            up.wait(timeout=30)
        except subprocess.TimeoutExpired:
            up.kill()
        pacs.terminate()
        pacs.wait(timeout=10)
    sop_classes = sorted(pydicom.dcmread(f, stop_before_pixels=True).SOPClassUID.name for f in received.iterdir())
    assert sop_classes.count("Secondary Capture Image Storage") == 2 and len(sop_classes) == 8
    audit = [json.loads(line) for line in (spool / "audit.jsonl").read_text().splitlines()]
    assert {("login", "operator"), ("login", "viewer"), ("resent", "operator")} <= {(a["event"], a.get("user")) for a in audit}
    assert any(a["event"] == "access_denied" and a.get("user") == "viewer" for a in audit)
