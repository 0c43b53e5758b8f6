"""[objects] settings and the choice of backend (no store contacted: tests/integration/test_objects_store.py)."""

from __future__ import annotations

import pytest

from dicom_node.objects import Location, S3Objects, SpoolObjects, open_objects
from dicom_node.spool import Spool
from worker.errors import ConfigError
from worker.node import Node
from worker.settings import Settings, load_settings


def test_empty_url_keeps_the_spool(tmp_path):
    node = Node(Settings(paths={"spool": tmp_path / "spool"}))
    assert isinstance(node.objects, SpoolObjects) and node.objects.local is node.spool
    assert node.context().store is node.objects


def test_s3_url_opens_an_s3_store_with_its_prefix(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    store = open_objects("s3://site-objects/node-a/", "http://127.0.0.1:1", Spool(tmp_path / "scratch"))
    assert isinstance(store, S3Objects) and (store.bucket, store.prefix) == ("site-objects", "node-a/")
    assert store.client.meta.endpoint_url == "http://127.0.0.1:1"
    assert Location.parse("s3://site-objects") == Location("site-objects", "")


@pytest.mark.parametrize("url", ["http://site-objects/x", "s3://", "s3://Site_Objects", "s3://ab", "s3://b/../x",
                                 "s3://bucket/a b", "s3://bucket?x=1"])
def test_a_wrong_url_fails_with_the_key_named(tmp_path, url):
    path = tmp_path / "node.toml"
    path.write_text(f'[objects]\nurl = "{url}"\nendpoint = "http://127.0.0.1:8333"\n')
    with pytest.raises(ConfigError, match=r"objects.*url"):
        load_settings(path)
