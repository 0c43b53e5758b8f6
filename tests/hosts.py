"""Several hosts on one machine: Linux network namespaces joined by veth links to one switch.

Each :class:`Host` is a network namespace with its own address (10.231.<net>.<n>/24), its own
private folder and its own processes, started with ``ip netns exec``. The switch is a bridge in a
namespace of its own, so no host reaches the machine's own interfaces or loopback, only the others:
what crosses between the roles of the node crosses a network, as on real hosts (the test process
itself may join the switch at .1, :meth:`Network.attach_controller`, to read their state). A host's link can
be cut (:meth:`Network.cut`: its veth end on the switch set down, its processes keep running and
see their connections time out) and the host killed whole (:meth:`Host.kill_all`: SIGKILL to
every process in its namespace). :meth:`Network.close` kills what is left and deletes every
namespace (their veth links go with them); nothing survives the test.

Needs root (CAP_NET_ADMIN) and iproute2's ``ip``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True)


def available() -> str | None:
    """Why namespaces cannot be made here (None: they can)."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed (Debian package iproute2)"
    if os.geteuid() != 0:
        return "making network namespaces needs root (CAP_NET_ADMIN)"
    return None


@dataclass
class Host:
    """One namespace: name, address, private folder and the processes started in it."""

    name: str
    ns: str
    ip: str
    folder: Path
    link: str  # its veth end on the switch
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    def popen(self, label: str, argv: Sequence[str], env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """argv in this host's namespace, stdout and stderr appended to <folder>/logs/<label>.log."""
        logs = self.folder / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{label}.log").open("ab")
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, **(env or {})}, cwd=cwd, start_new_session=True)
        self.procs[label] = proc
        return proc

    def run(self, argv: Sequence[str], timeout: float = 120, env: dict[str, str] | None = None,
            check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(["ip", "netns", "exec", self.ns, *argv], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, **(env or {})}, check=check)

    def log(self, label: str) -> str:
        f = self.folder / "logs" / f"{label}.log"
        return f.read_text(errors="replace") if f.exists() else ""

    def block(self, other: Host) -> None:
        """Nothing from this host reaches ``other`` (a blackhole route; every other link stays up)."""
        _ip("-n", self.ns, "route", "add", "blackhole", f"{other.ip}/32")

    def unblock(self, other: Host) -> None:
        _ip("-n", self.ns, "route", "del", "blackhole", f"{other.ip}/32")

    def cpu_seconds(self) -> float:
        """User + system CPU of every process now in the namespace, with their reaped children's."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        for pid in self.pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            total += sum(int(v) for v in fields[11:15]) / tick  # utime stime cutime cstime
        return total

    def pids(self) -> list[int]:
        out = _ip("netns", "pids", self.ns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_all(self, sig: int = signal.SIGKILL) -> int:
        """Signal every process in the namespace (a host losing power: SIGKILL); how many there were."""
        pids = self.pids()
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        for proc in self.procs.values():
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        return len(pids)

    def stop(self, label: str, timeout: float = 20, sig: int = signal.SIGTERM) -> None:
        """``sig`` to the process ``label`` started (and its group), SIGKILL after ``timeout``."""
        proc = self.procs.get(label)
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


class Network:
    """A switch and the hosts linked to it; ``with Network(folder) as net: net.host("gpu1")``."""

    def __init__(self, folder: Path, net: int = 231) -> None:
        self.folder = Path(folder)
        self.tag = f"m{os.getpid() % 100000}"  # namespaces of two test runs never collide
        self.subnet = f"10.{net}.{os.getpid() % 250}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, Host] = {}
        _ip("netns", "add", self.switch)
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        _ip("-n", self.switch, "link", "set", "lo", "up")
        self.controller = ""

    def attach_controller(self) -> str:
        """This process's own namespace on the switch at .1, as an administrator's workstation: the
        test reads the database, the object store and the PACS of the hosts directly. Only the hosts'
        addresses route there; removed with the switch."""
        inside, link = f"{self.tag}c0", f"{self.tag}c1"
        _ip("link", "add", inside, "type", "veth", "peer", "name", link, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", link, "master", "br0")
        _ip("-n", self.switch, "link", "set", link, "up")
        self.controller = f"{self.subnet}.1"
        _ip("addr", "add", f"{self.controller}/24", "dev", inside)
        _ip("link", "set", inside, "up")
        self._controller_link = inside
        return self.controller

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def host(self, name: str) -> Host:
        """A new host on the switch, at the next address; its loopback up, its folder made."""
        n = len(self.hosts) + 2
        ns = f"{self.tag}-{name}"
        link = f"{self.tag}s{n}"[:15]
        inside = f"{self.tag}h{n}"[:15]
        _ip("netns", "add", ns)
        _ip("link", "add", inside, "netns", ns, "type", "veth", "peer", "name", link, "netns", self.switch)
        _ip("-n", self.switch, "link", "set", link, "master", "br0")
        _ip("-n", self.switch, "link", "set", link, "up")
        ip = f"{self.subnet}.{n}"
        _ip("-n", ns, "link", "set", "lo", "up")
        _ip("-n", ns, "link", "set", inside, "name", "eth0")
        _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
        _ip("-n", ns, "link", "set", "eth0", "up")
        folder = self.folder / name
        folder.mkdir(parents=True, exist_ok=True)
        host = Host(name, ns, ip, folder, link)
        self.hosts[name] = host
        return host

    def cut(self, host: Host) -> None:
        """The host's cable pulled: nothing reaches it or leaves it; its processes keep running."""
        _ip("-n", self.switch, "link", "set", host.link, "down")

    def mend(self, host: Host) -> None:
        _ip("-n", self.switch, "link", "set", host.link, "up")

    @staticmethod
    def connects(src: Host, dst: Host, port: int, timeout_s: float = 2.0) -> bool:
        """Whether a TCP connection from ``src`` to ``dst``:``port`` is accepted."""
        code = (f"import socket; s = socket.socket(); s.settimeout({timeout_s}); "
                f"raise SystemExit(s.connect_ex(({dst.ip!r}, {port})))")
        return src.run([sys.executable, "-c", code], check=False, timeout=timeout_s + 10).returncode == 0

    def close(self) -> None:
        for host in self.hosts.values():
            host.kill_all()
        deadline = time.monotonic() + 10
        for host in self.hosts.values():
            while host.pids() and time.monotonic() < deadline:
                time.sleep(0.1)
            _ip("netns", "del", host.ns, check=False)
        if self.controller:
            _ip("link", "del", self._controller_link, check=False)
        _ip("netns", "del", self.switch, check=False)
        self.hosts.clear()
