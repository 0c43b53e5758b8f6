"""deploy/: the multi-host compose file as `docker-compose config` reads it (no daemon), and the
systemd units per role as `systemd-analyze verify` reads them. Each role runs a command the CLI
has, with settings the node accepts and a scratch folder of its own."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import require_peer

pytestmark = pytest.mark.integration
DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
COMPOSE = DEPLOY / "compose.multi-host.yml"
ROLES = {"listener": "listen", "gpu-worker": "worker", "io-worker": "worker", "reconciler": "reconcile"}


def _compose(env: dict[str, str]) -> subprocess.CompletedProcess:
    cli = shutil.which("docker-compose")
    cmd = [cli] if cli else [require_peer("docker"), "compose"]
    return subprocess.run([*cmd, "-f", str(COMPOSE), "config"], capture_output=True, text=True, timeout=120,
                          cwd=DEPLOY, env={"PATH": "/usr/bin:/bin", "HOME": "/tmp", **env})


def _compose_config() -> dict:
    r = _compose({"MEDSAM2_CXR_LOOKUP_SECRET": "a-site-secret"})
    assert r.returncode == 0, r.stderr
    return yaml.safe_load(r.stdout)


def test_the_compose_file_will_not_start_without_the_sites_lookup_secret():
    r = _compose({})
    assert r.returncode != 0 and "MEDSAM2_CXR_LOOKUP_SECRET" in r.stderr


def _mount(volume: str | dict) -> tuple[str, str]:
    """(source, target) of a volume in the short (docker-compose 1.x) or long (v2) syntax."""
    if isinstance(volume, dict):
        return volume["source"], volume["target"]
    source, target = volume.split(":")[:2]
    return source, target


def test_the_compose_file_has_every_role_on_shared_servers(monkeypatch):
    from worker.cli import app
    from worker.settings import Settings

    services = _compose_config()["services"]
    assert {"postgres", "rabbitmq", "seaweedfs", *ROLES} <= set(services)
    gpu = services["gpu-worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert gpu == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    commands = {c.name or c.callback.__name__ for c in app.registered_commands}
    scratch = set()
    for role, command in ROLES.items():
        s = services[role]
        assert s["command"][:2] == ["medsam2-cxr", command] and command in commands, s["command"]
        env = s["environment"]
        assert env["MEDSAM2_CXR_BROKER__URL"].startswith("amqp://") and env["MEDSAM2_CXR_STORE__URL"].startswith("postgresql://")
        assert env["MEDSAM2_CXR_OBJECTS__URL"].startswith("s3://") and env["MEDSAM2_CXR_OBJECTS__ENDPOINT"].startswith("http")
        mounts = [_mount(v) for v in s["volumes"]]
        here = [source for source, target in mounts if target == env["MEDSAM2_CXR_PATHS__SPOOL"]]
        assert len(here) == 1, mounts
        scratch.add(here[0])
        # The settings the role starts with, as worker/settings.py reads them from the environment.
        for key in [k for k in os.environ if k.startswith("MEDSAM2_CXR_")]:
            monkeypatch.delenv(key)
        for key, value in env.items():
            if key.startswith("MEDSAM2_CXR_"):
                monkeypatch.setenv(key, str(value))
        settings = Settings()
        assert settings.broker.url == env["MEDSAM2_CXR_BROKER__URL"]
        assert settings.store.url == env["MEDSAM2_CXR_STORE__URL"] and settings.store.url.startswith("postgresql://")
        assert settings.objects.url == env["MEDSAM2_CXR_OBJECTS__URL"]
        assert str(settings.spool) == env["MEDSAM2_CXR_PATHS__SPOOL"]
        if role == "listener":
            assert settings.node.processes == 2
    assert len(scratch) == len(ROLES), "each role keeps its own scratch folder"


def test_the_systemd_units_verify(tmp_path):
    """systemd-analyze verify checks the directives and that ExecStart is executable: the
    install path /opt/medsam2-cxr/.venv is replaced by the venv running these tests."""
    import sys

    analyze = require_peer("systemd-analyze")
    cli = Path(sys.executable).parent / "medsam2-cxr"
    if not cli.exists():
        pytest.skip(f"{cli} is not installed (pip install -e .)")
    units = sorted((DEPLOY / "systemd").glob("*.service"))
    assert {u.name for u in units} >= {"medsam2-cxr-listen.service", "medsam2-cxr-worker@.service",
                                       "medsam2-cxr-reconciler.service"}
    for unit in units:
        name = unit.name.replace("@.", "@gpu.")
        text = unit.read_text().replace("/opt/medsam2-cxr/.venv/bin/medsam2-cxr", str(cli))
        (tmp_path / name).write_text(text)
        r = subprocess.run([analyze, "verify", str(tmp_path / name)], capture_output=True, text=True, timeout=60)
        # A misspelt directive is only a warning (exit 0): any output fails the test too.
        problems = [line for line in (r.stdout + r.stderr).splitlines() if name.split("@")[0] in line or "Failed" in line]
        assert r.returncode == 0 and not problems, (name, r.stdout, r.stderr)
