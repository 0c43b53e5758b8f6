"""Unit tests talk to no peer: a TCP/UDP connect or bind from a unit test fails the test, naming
where to move it (tests/integration, with ``require_peer`` from tests/conftest.py). Local pipes
and socketpairs (event loops, multiprocessing) stay allowed."""

from __future__ import annotations

import socket

import pytest

_NETWORK = (socket.AF_INET, socket.AF_INET6)


class PeerInUnitTest(AssertionError):
    """A unit test opened a network socket."""


@pytest.fixture(autouse=True)
def _no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    real_connect, real_connect_ex, real_bind = socket.socket.connect, socket.socket.connect_ex, socket.socket.bind

    def guard(real):
        def call(self: socket.socket, address, *args):
            if self.family in _NETWORK:
                raise PeerInUnitTest(f"a unit test used the network ({real.__name__} {address!r}): "
                                     "move it to tests/integration")
            return real(self, address, *args)
        return call

    monkeypatch.setattr(socket.socket, "connect", guard(real_connect))
    monkeypatch.setattr(socket.socket, "connect_ex", guard(real_connect_ex))
    monkeypatch.setattr(socket.socket, "bind", guard(real_bind))
