"""A RIS (python-hl7's asyncio MLLP server) and a FHIR server (http.server) in the test process, on
real sockets, that behave as receivers do: the RIS keeps one message per MSH-10 and the FHIR server
one resource per identifier (conditional create), and either can be told to fail first."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import hl7
from hl7.mllp import start_hl7_server

from tests.conftest import free_port

# HL7 table 0211 name -> codec, written here from the table (not taken from ris.charset)
HL7_CODECS = {"": "ascii", "ASCII": "ascii", "8859/1": "latin-1", "UNICODE UTF-8": "utf-8",
              "ISO IR6~ISO IR87": "iso2022_jp"}


def msh18(raw: bytes) -> str:
    """MSH-18 of an encoded message, read from its bytes (the MSH segment is ASCII)."""
    msh = raw.split(b"\r", 1)[0].decode("ascii", "replace")
    fields = msh.split("|")
    return fields[17] if len(fields) > 17 else ""


@dataclass
class Ris:
    """MLLP receiver. ``answer``: the ACK code for the next messages (AA, AE, AR); ``drop``: how many
    connections to close after reading their message without an ACK (the sender must retry)."""

    host: str = "127.0.0.1"
    port: int = field(default_factory=free_port)
    answer: str = "AA"
    answer_text: str = ""
    drop: int = 0
    tls: ssl.SSLContext | None = None
    received: list[bytes] = field(default_factory=list)  # every message read, in order
    stored: dict[str, str] = field(default_factory=dict)  # MSH-10 -> decoded text, the messages kept

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            start_hl7_server(self._client, self.host, self.port, ssl=self.tls))
        self._ready.set()
        self._loop.run_forever()

    async def _client(self, reader, writer) -> None:
        try:
            while True:
                try:
                    raw = await reader.readblock()
                except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
                    return
                self.received.append(raw)
                if self.drop > 0:
                    self.drop -= 1
                    return  # read it, then lose the connection: no ACK
                text = raw.decode(HL7_CODECS[msh18(raw)])
                msg = hl7.parse(text)
                control = str(msg.segment("MSH")[10])
                if self.answer == "AA" and control not in self.stored:
                    self.stored[control] = text
                ack = msg.create_ack(self.answer, message_id=f"ACK{len(self.received)}",
                                     application="RIS", facility="HOSPITAL")
                if self.answer_text:
                    ack.segment("MSA").assign_field(self.answer_text, 3)
                writer.writeblock(str(ack).encode("ascii", "replace"))
                await writer.drain()
        finally:
            writer.close()

    def __enter__(self) -> Ris:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc) -> None:
        async def stop() -> None:
            self._server.close()
            await self._server.wait_closed()

        with contextlib.suppress(RuntimeError, asyncio.TimeoutError):
            asyncio.run_coroutine_threadsafe(stop(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


@dataclass
class FhirServer:
    """A FHIR transaction endpoint: ``fail``: answers for the next requests before it processes
    them ("503"), or after ("drop": processes the Bundle, then closes without an answer)."""

    token: str = "s3cret"
    fail: list[str] = field(default_factory=list)
    posts: list[dict] = field(default_factory=list)  # every Bundle received
    store: dict[tuple[str, str], dict] = field(default_factory=dict)  # (type, identifier) -> resource
    statuses: list[list[str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.headers.get("Authorization") != f"Bearer {outer.token}":
                    return self._answer(401, {"resourceType": "OperationOutcome",
                                              "issue": [{"severity": "error", "code": "login"}]})
                bundle = json.loads(body)
                outer.posts.append(bundle)
                how = outer.fail.pop(0) if outer.fail else ""
                if how == "503":
                    return self._answer(503, {"resourceType": "OperationOutcome",
                                              "issue": [{"severity": "error", "code": "transient"}]})
                answer = outer._transaction(bundle)
                if how == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self._answer(200, answer)

            def _answer(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def _transaction(self, bundle: dict) -> dict:
        """Conditional create of every entry (ifNoneExist: identifier=system|value)."""
        entries, statuses = [], []
        for e in bundle["entry"]:
            kind = e["request"]["url"]
            key = (kind, e["request"]["ifNoneExist"].removeprefix("identifier="))
            if key in self.store:
                status = "200 OK"
            else:
                self.store[key] = e["resource"]
                status = "201 Created"
            statuses.append(status)
            entries.append({"response": {"status": status, "location": f"{kind}/{len(self.store)}",
                                         "lastModified": dt.datetime.now(dt.UTC).isoformat()}})
        self.statuses.append(statuses)
        return {"resourceType": "Bundle", "type": "transaction-response", "entry": entries}

    def of_type(self, kind: str) -> list[dict]:
        return [r for (k, _), r in self.store.items() if k == kind]

    def __enter__(self) -> FhirServer:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
