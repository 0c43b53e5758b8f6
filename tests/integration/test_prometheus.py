"""A real Prometheus (Debian's binary, the shipped scrape configuration and rules, 1 s interval)
scrapes `medsam2-cxr up` on its embedded defaults after DCMTK storescu pushed one image; the
series from the listener, the gpu worker and the io worker's prefork children are found through
Prometheus's HTTP API. And the HTTP app over HTTPS with the node's certificate."""

from __future__ import annotations

import json
import signal
import socket
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import pytest
import yaml

from models.labels import LABELS
from tests.conftest import free_port, require_peer, stop_up, storescp, wait_for

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
PROM = REPO / "deploy" / "prometheus"


def _prometheus() -> str:
    return require_peer("prometheus")


def _get(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except (OSError, ValueError):
        return None


def _query(prom: str, expr: str) -> list[dict]:
    body = _get(f"{prom}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    return body["data"]["result"] if body and body.get("status") == "success" else []


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_prometheus_scrapes_a_running_node(tmp_path, tiny_bundle, phantom_dir):
    binary = _prometheus()
    node_port, pacs_port, http_port, prom_port = free_port(), free_port(), free_port(), free_port()
    received = tmp_path / "pacs"
    received.mkdir()
    pacs = storescp(received, pacs_port)
    spool = tmp_path / "var"
    config = tmp_path / "node.toml"
    config.write_text(f'[node]\nport = {node_port}\nmin_free_mb = 16\n[destination]\nport = {pacs_port}\n'
                      f'[paths]\nspool = "{spool}"\n[model]\nbundle = "{tiny_bundle}"\ndevice = "cpu"\n'
                      f'[console]\nport = {http_port}\n')
    log = tmp_path / "up.log"
    up = subprocess.Popen([sys.executable, "-m", "worker.cli", "up", "--config", str(config)],
                          stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=tmp_path)
    prom_cfg = yaml.safe_load((PROM / "prometheus.yml").read_text())
    prom_cfg["global"].update(scrape_interval="1s", evaluation_interval="1s")
    prom_cfg["rule_files"] = [str(PROM / "medsam2-cxr.rules.yml")]
    prom_cfg["scrape_configs"][0]["static_configs"][0]["targets"] = [f"127.0.0.1:{http_port}"]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(prom_cfg))
    prom_log = tmp_path / "prometheus.log"
    prometheus = None
    prom = f"http://127.0.0.1:{prom_port}"
    node = f"http://127.0.0.1:{http_port}"
    try:
        wait_for(lambda: "listening" in log.read_text(), 60, lambda: f"the node to listen: {log.read_text()[-2000:]}")
        assert _get(f"{node}/healthz") == {"status": "alive"}
        src = sorted((phantom_dir / "images").glob("*.dcm"))[0]
        out = subprocess.run(["/usr/bin/storescu", "-aec", "MEDSAM2CXR", "127.0.0.1", str(node_port), str(src)],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        wait_for(lambda: len(list(received.iterdir())) >= 2, 120, "the SR and SC at the destination")
        ready = httpx.get(f"{node}/readyz", timeout=10)
        assert ready.status_code == 200, ready.text

        prometheus = subprocess.Popen([binary, f"--config.file={tmp_path / 'prometheus.yml'}",
                                       f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                       f"--web.listen-address=127.0.0.1:{prom_port}"],
                                      stdout=prom_log.open("w"), stderr=subprocess.STDOUT)
        wait_for(lambda: _query(prom, 'up{job="medsam2-cxr"} == 1'), 60,
                 lambda: f"Prometheus to scrape the node: {prom_log.read_text()[-2000:]}")

        def value(expr: str) -> float | None:
            result = _query(prom, expr)
            return float(result[0]["value"][1]) if result else None

        # The listener's counters, the gpu worker's (solo) and the io worker's (prefork children).
        expected = {
            'medsam2_instances_received_total{calling_aet="STORESCU"}': 1,
            'medsam2_jobs{state="done"}': 1,
            'medsam2_jobs{state="queued"}': 0,
            'medsam2_predictions_total': 1,
            'medsam2_predictions_ood_total': 0,
            'count(medsam2_findings_positive_total)': len(LABELS),  # every label, at 0 when absent
            'medsam2_batch_size_count': 1,
            'medsam2_model_step_seconds_count': 1,
            f'medsam2_send_seconds_count{{destination="PACS@127.0.0.1:{pacs_port}"}}': 1,
            'medsam2_receipt_to_stored_seconds_count': 1,
            f'medsam2_destination_up{{destination="PACS@127.0.0.1:{pacs_port}"}}': 1,
            'min(medsam2_ready)': 1,
            'sum(medsam2_model_loaded)': 1,
            'medsam2_model_card_ood_rate': 0.01,
            'medsam2_oldest_queued_job_age_seconds': 0,
            # drift per site (models/drift.py): the storescu's calling AE, and the card's validation range
            'medsam2_drift_images_total{calling_aet="STORESCU"}': 1,
            'count(medsam2_drift_positive_total{calling_aet="STORESCU"})': len(LABELS),
            'medsam2_model_card_drift_recorded': 1,
            'count(medsam2_model_card_drift_low)': len(LABELS) + 2,
            'count(medsam2_model_card_drift_high)': len(LABELS) + 2,
        }
        wait_for(lambda: all(value(e) is not None for e in expected), 30,
                 lambda: f"series: missing {[e for e in expected if value(e) is None]}")
        got = {e: value(e) for e in expected}
        assert got == pytest.approx(expected), got
        assert value("medsam2_spool_free_bytes") > value("medsam2_spool_min_free_bytes") == 16 * 2**20
        names = _get(f"{prom}/api/v1/label/__name__/values")["data"]
        medsam2 = sorted(n for n in names if n.startswith("medsam2_"))
        (tmp_path / "series.json").write_text(json.dumps(medsam2))
        rules = _get(f"{prom}/api/v1/rules")["data"]["groups"]
        assert {r["name"] for g in rules for r in g["rules"]} >= {"MedSAM2DestinationUnreachable", "MedSAM2OODRateHigh"}
        assert all(r["health"] == "ok" for g in rules for r in g["rules"]), rules
        print("series scraped:", " ".join(medsam2))
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(timeout=20)
        stop_up(up, 30)
        pacs.terminate()
        pacs.wait(timeout=10)
    assert not _port_open(http_port), "the HTTP app outlived up"
    assert "metrics.single_process" not in log.read_text()  # every process wrote to the multiprocess folder


def test_the_http_app_serves_https_with_the_node_certificate(tmp_path):
    from console.app import ConsoleServer, create_app
    from worker.settings import Settings

    require_peer("openssl")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                    "-keyout", "node.key", "-out", "node.crt", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"], cwd=tmp_path, check=True,
                   capture_output=True)
    port = free_port()
    settings = Settings(paths={"spool": tmp_path / "var"}, console={"port": port},
                        node={"tls": {"cert": str(tmp_path / "node.crt"), "key": str(tmp_path / "node.key")}})
    server = ConsoleServer(create_app(settings), settings).start()
    try:
        assert server.scheme == "https"
        ctx = ssl.create_default_context(cafile=str(tmp_path / "node.crt"))
        r = httpx.get(f"https://127.0.0.1:{port}/healthz", verify=ctx, timeout=10)
        assert r.json() == {"status": "alive"}
        assert "medsam2_jobs" in httpx.get(f"https://127.0.0.1:{port}/metrics", verify=ctx, timeout=10).text
        with pytest.raises(httpx.HTTPError):  # plain HTTP is not served
            httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)
        # A second server on the same port cannot start, and says so.
        with pytest.raises(RuntimeError, match=f"127.0.0.1:{port}"):
            ConsoleServer(create_app(settings), settings).start()
    finally:
        server.stop()
    assert not _port_open(port)


def test_the_console_command_serves_the_app_until_sigterm(tmp_path):
    port = free_port()
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nspool = "{tmp_path / "var"}"\n[console]\nport = {port}\n')
    proc = subprocess.Popen([sys.executable, "-m", "worker.cli", "console", "--config", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: _get(f"http://127.0.0.1:{port}/healthz"), 60, "the console to answer")
        r = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=20)
        assert r.status_code == 503 and "model" in r.json()["failed"]  # no bundle built in this spool
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=20)  # uvicorn shuts down, then dies of the signal it was sent
    errors = proc.stderr.read()
    assert code in (0, -signal.SIGTERM), errors
    assert "metrics.single_process" not in errors  # its metrics folder was set before prometheus-client came
    assert not _port_open(port)
