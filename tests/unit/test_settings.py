from pathlib import Path

import pytest

from worker.errors import ConfigError
from worker.settings import load_settings


def test_defaults_work_without_a_file():
    s = load_settings(None)
    assert (s.node.ae_title, s.node.port, s.destination.port, s.broker.url) == ("MEDSAM2CXR", 11112, 4242, "")
    assert s.bundle_path == s.spool / "models" / "default"


def test_toml_then_environment(tmp_path, monkeypatch):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[node]\nport = 2000\nallowed_calling_aets = ["A"]\n[destination.routes.ISLAND]\n'
                   'ae_title = "ISL"\nhost = "127.0.0.2"\nport = 104\n')
    monkeypatch.setenv("MEDSAM2_CXR_NODE__PORT", "3000")
    monkeypatch.setenv("MEDSAM2_CXR_BROKER__URL", "redis://127.0.0.1:6379/1")
    s = load_settings(cfg)
    assert s.node.port == 3000 and s.node.allowed_calling_aets == ["A"]
    assert s.broker.url.startswith("redis://")
    assert s.destination.for_caller("ISLAND").ae_title == "ISL"
    assert s.destination.for_caller("OTHER").ae_title == "PACS"


def test_the_shipped_config_is_valid():
    s = load_settings(Path(__file__).parents[2] / "deploy" / "medsam2-cxr.toml")
    assert s.node.ae_title == "MEDSAM2CXR"


def test_a_wrong_key_names_the_file(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[node]\nprot = 1\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        load_settings(cfg)


def test_store_url_is_empty_or_postgresql(tmp_path, monkeypatch):
    assert load_settings(None).store.url == ""
    monkeypatch.setenv("MEDSAM2_CXR_STORE__URL", "postgresql://medsam2@db:5432/medsam2")
    with pytest.raises(ConfigError, match=r"set \[node\] lookup_secret too"):  # one key for every host's hashes
        load_settings(None)
    monkeypatch.setenv("MEDSAM2_CXR_NODE__LOOKUP_SECRET", "site-key")
    assert load_settings(None).store.url.startswith("postgresql://")
    monkeypatch.setenv("MEDSAM2_CXR_STORE__URL", "mysql://u:secret@db/x")
    with pytest.raises(ConfigError, match="mysql:// is not supported"):
        load_settings(None)


def test_an_empty_store_url_opens_the_spools_sqlite_file(tmp_path):
    import sys

    from dicom_node.stores import open_database, open_jobs

    db = open_database("", tmp_path / "jobs.sqlite")
    assert (db.kind, db.shared, db.describe()) == ("sqlite", False, f"sqlite:{tmp_path / 'jobs.sqlite'}")
    jobs = open_jobs("", tmp_path / "jobs.sqlite")
    assert jobs.path == tmp_path / "jobs.sqlite" and jobs.path.is_file() and jobs.counts() == {}
    import subprocess

    code = ("import sys; from pathlib import Path; from dicom_node.stores import open_jobs; "
            f"open_jobs('', Path({str(tmp_path / 'j2.sqlite')!r})); print('psycopg' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # the embedded default loads no PostgreSQL driver
