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
