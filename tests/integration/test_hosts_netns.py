"""The namespace hosts of tests/hosts.py: linked, isolated, cut and mended, killed whole, removed after."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import wait_for
from tests.hosts import Network, available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


def _namespaces() -> set[str]:
    return set(subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.split())


def test_hosts_reach_each_other_not_the_machine_and_leave_nothing(tmp_path):
    before = _namespaces()
    with Network(tmp_path) as net:
        a, b = net.host("a"), net.host("b")
        assert a.ip != b.ip and a.folder != b.folder
        a.popen("http", [sys.executable, "-m", "http.server", "--bind", a.ip, "8080"], cwd=a.folder)
        wait_for(lambda: net.connects(b, a, 8080), 30, "b to reach a's server")
        # The machine's own loopback is not the host's: a server on the machine is out of reach.
        assert not b.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', 5432), 1)"],
                         check=False).returncode == 0
        net.cut(a)
        assert not net.connects(b, a, 8080, timeout_s=1.0)
        assert a.procs["http"].poll() is None  # a cut host keeps running
        net.mend(a)
        wait_for(lambda: net.connects(b, a, 8080), 30, "b to reach a again")
        assert a.kill_all() >= 1
        assert a.procs["http"].poll() is not None
        assert not net.connects(b, a, 8080, timeout_s=1.0)
    assert _namespaces() == before
