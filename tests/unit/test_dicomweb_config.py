"""DICOMweb settings and tokens: a dicomweb destination (and its routes) keeps its type and URL,
takes host and port from the URL, and opens as a WebDestination; bearer tokens match only their
own digest."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from dicom_node.destinations import open_destination
from dicom_node.dicomweb import WebDestination
from dicom_node.sender import Destination
from dicom_node.stow import Tokens, hash_token, new_token
from worker.settings import Settings


def test_a_dicomweb_destination_and_its_routes():
    s = Settings(destination={"type": "dicomweb", "ae_title": "VNA", "url": "https://vna.example:8443/dicom-web",
                              "token": "t0k", "tls": {"ca": "/etc/ca.pem"},
                              "routes": {"SITE_B": {"ae_title": "PACSB", "host": "10.0.0.2", "port": 104}}})
    default = s.destination.for_caller("SITE_A")
    assert (default.type, default.url, default.host, default.port, default.token) == (
        "dicomweb", "https://vna.example:8443/dicom-web", "vna.example", 8443, "t0k")
    web = open_destination(default)
    assert isinstance(web, WebDestination) and (web.host, web.port, web.ca) == ("vna.example", 8443, "/etc/ca.pem")
    assert "t0k" not in repr(web) and "t0k" not in str(web)
    dimse = open_destination(s.destination.for_caller("SITE_B"))
    assert isinstance(dimse, Destination) and (dimse.ae_title, dimse.port) == ("PACSB", 104)
    assert Settings(destination={"type": "dicomweb", "url": "http://pacs/dicom-web"}).destination.port == 80


@pytest.mark.parametrize("url", ["", "pacs:8042/dicom-web", "ftp://pacs/dicom-web"])
def test_a_dicomweb_destination_needs_an_http_url(url):
    with pytest.raises(ValidationError, match="dicomweb needs url"):
        Settings(destination={"type": "dicomweb", "url": url})


def test_tokens_match_their_own_digest_only():
    (a, da), (b, db) = new_token(), new_token()
    assert len(a) >= 43 and da == hash_token(a) and da != db
    s = Settings(dicomweb={"clients": [{"name": "VNA", "token_sha256": da}, {"name": "CLOUD", "token_sha256": db}]})
    tokens = Tokens(s.dicomweb.clients)
    assert tokens.client(f"Bearer {a}") == "VNA" and tokens.client(f"bearer {b}") == "CLOUD"
    for header in (None, "", a, f"Basic {a}", "Bearer ", f"Bearer {a}x"):
        assert tokens.client(header) is None
    with pytest.raises(ValidationError, match="64 hex digits"):
        Settings(dicomweb={"clients": [{"name": "X", "token_sha256": a}]})
