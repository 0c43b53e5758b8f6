"""The node on separate hosts (network namespaces, tests/faults/hosts_rig.py): PostgreSQL, SeaweedFS,
Redis and Orthanc each on a host of their own, a listener host, two GPU-worker hosts and a sender
host, with nothing in common but the network. Each scenario prints its figure line
``sent=N delivered=N lost=0 duplicates=0`` and asserts it.

One set of hosts for the module (starting them takes a minute); each scenario sends phantoms of
its own seed, so their UIDs are its own.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from models.bundle import read_card
from tests.conftest import wait_for
from tests.faults.harness import figure_line, read_sources
from tests.faults.hosts_rig import Hosts
from tests.hosts import available

pytestmark = pytest.mark.skipif(available() is not None, reason=str(available()))


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, tiny_bundle) -> Iterator[Hosts]:
    rig = Hosts(tmp_path_factory.mktemp("hosts"), tiny_bundle)
    try:
        rig.start_services()
        rig.start_listener()
        rig.start_gpu("gpu1")
        rig.start_gpu("gpu2")
        yield rig
    finally:
        rig.close()


@pytest.fixture(scope="module")
def digest(tiny_bundle) -> str:
    return read_card(tiny_bundle)["digest"]


def _batch(tmp_path: Path, n: int, seed: int) -> list:
    from phantoms import generate

    generate(n, tmp_path, seed=seed, size=256)
    return read_sources(tmp_path / "images")


def _finish(hosts: Hosts, sources, digest: str, scenario: str, t0: float, done_before: int) -> dict[str, int]:
    hosts.wait_settled(done_before + len(sources), 900)
    figures = hosts.account(sources, digest)
    print(f"[{scenario}] {figure_line(figures)} in {time.monotonic() - t0:.0f} s; job states {hosts.counts()}")
    assert figures["lost"] == 0 and figures["duplicates"] == 0, figures
    return figures


def test_a_burst_spread_over_two_gpu_hosts_and_one_killed_whole(hosts, tmp_path, digest):
    """200 images; both GPU hosts infer; mid-inference gpu2 loses power and its cable (every process
    SIGKILLed, its link cut): the jobs it held are taken again by gpu1 when their leases run out.

    The rates are of inference on a backlog, so that they compare the GPU hosts and not the sender:
    the burst is taken with both GPU workers stopped, then both start, each pinned to a core of its
    own (the namespaces share this machine's cores; a host of its own has its own), with the io
    worker held meanwhile so that nothing else computes. Images/s with two hosts is counted (from
    each host's audit times) from when both infer until the kill, with one host from the kill until
    gpu1 has inferred what was queued and not held by gpu2 (before those leases expire). CPU seconds
    per image are over the same windows. Then the io worker encodes and sends every result."""
    sources = _batch(tmp_path, 200, seed=4101)
    base = {name: len(hosts.inferred_on(name)) for name in ("gpu1", "gpu2")}

    def times(name: str) -> list[float]:
        return hosts.inferred_on(name)[base[name]:]

    def inferred(name: str) -> int:
        return len(times(name))

    for name in ("gpu1", "gpu2"):
        hosts[name].stop("gpu")
    t0, cpu_listen0 = time.monotonic(), hosts["listen"].cpu_seconds()
    hosts.send_until_stored([s.path for s in sources])
    t_stored = time.monotonic()
    print(f"[gpu host killed whole] {len(sources)} taken by the listener host in {t_stored - t0:.0f} s, "
          f"{len(sources) / (t_stored - t0):.2f} images/s, with the GPU workers stopped ({hosts.counts()})")
    hosts["listen"].stop("io")
    cores = os.cpu_count() or 1
    for i, name in enumerate(("gpu1", "gpu2")):
        hosts.start_gpu(name, cpu=i % cores)
    wait_for(lambda: inferred("gpu1") >= 1 and inferred("gpu2") >= 1, 600,
             lambda: f"both GPU hosts inferring (gpu1 {inferred('gpu1')}, gpu2 {inferred('gpu2')}; {hosts.counts()})",
             step=0.2)
    w0 = time.time()
    n0 = {name: inferred(name) for name in ("gpu1", "gpu2")}
    cpu0 = {name: hosts[name].cpu_seconds() for name in ("gpu1", "gpu2")}
    wait_for(lambda: inferred("gpu1") + inferred("gpu2") >= 100 and inferred("gpu2") >= n0["gpu2"] + 10, 600,
             lambda: f"100 inferred (gpu1 {inferred('gpu1')}, gpu2 {inferred('gpu2')}; {hosts.counts()})", step=0.2)
    cpu_gpu = {name: hosts[name].cpu_seconds() - cpu0[name] for name in ("gpu1", "gpu2")}
    hosts.net.cut(hosts["gpu2"])
    killed = hosts["gpu2"].kill_all()
    w_kill = time.time()
    held = hosts.counts().get("inferring", 0)
    at_kill = {name: inferred(name) for name in ("gpu1", "gpu2")}  # gpu2's audit file outlives it
    cpu1 = hosts["gpu1"].cpu_seconds()
    queued = len(sources) - sum(at_kill.values()) - held  # what gpu1 finds waiting, before any lease runs out
    wait_for(lambda: inferred("gpu1") >= at_kill["gpu1"] + queued, 600,
             lambda: f"gpu1 to infer the queued rest (gpu1 {inferred('gpu1')}; {hosts.counts()})", step=0.2)
    one = queued / (times("gpu1")[at_kill["gpu1"] + queued - 1] - w_kill) if queued else float("nan")
    cpu_one = hosts["gpu1"].cpu_seconds() - cpu1
    hosts.start_io()
    wait_for(lambda: inferred("gpu1") + at_kill["gpu2"] >= len(sources), 600,
             lambda: f"gpu1 to infer what gpu2 held (gpu1 {inferred('gpu1')}; {hosts.counts()})", step=0.5)
    figures = _finish(hosts, sources, digest, "gpu host killed whole", t0, 0)
    in_window = {name: sum(1 for t in times(name) if w0 < t <= w_kill) for name in ("gpu1", "gpu2")}
    two = sum(in_window.values()) / (w_kill - w0)
    print(f"[gpu host killed whole] {killed} processes killed on gpu2, {held} job(s) in inference on the two "
          f"hosts then; inferred before the kill: gpu1 {at_kill['gpu1']}, gpu2 {at_kill['gpu2']}; after it "
          f"gpu1 {inferred('gpu1') - at_kill['gpu1']}")
    print(f"[rates] inference on a backlog: two GPU hosts {two:.2f} images/s ({in_window['gpu1']} + "
          f"{in_window['gpu2']} in {w_kill - w0:.1f} s); one GPU host {one:.2f} images/s ({queued} in "
          f"{queued / one:.1f} s); each GPU host on a core of its own ({cores} cores here)")
    print(f"[cpu per image] listen {(hosts['listen'].cpu_seconds() - cpu_listen0) / len(sources):.2f} s "
          f"(listener + io worker, whole run); with two hosts gpu1 {cpu_gpu['gpu1'] / max(in_window['gpu1'], 1):.2f} s, "
          f"gpu2 {cpu_gpu['gpu2'] / max(in_window['gpu2'], 1):.2f} s; gpu1 alone {cpu_one / max(queued, 1):.2f} s")
    assert figures["delivered"] == len(sources)
    assert in_window["gpu1"] > 0 and in_window["gpu2"] > 0, f"the burst was not spread over both GPU hosts: {in_window}"
    # gpu2 back for the next scenarios: its cable and a fresh worker (what a supervisor does)
    hosts.net.mend(hosts["gpu2"])
    hosts.start_gpu("gpu2")


def test_the_listener_host_cut_from_the_database_for_30_s(hosts, tmp_path, digest):
    """The listener host cannot reach PostgreSQL for 30 s: every C-STORE meanwhile is refused Out of
    Resources, the PACS sends those again, and once the database is reachable all are taken."""
    sources = _batch(tmp_path, 30, seed=4102)
    done_before = hosts.counts().get("done", 0)
    t0 = time.monotonic()
    hosts["listen"].block(hosts["db"])
    try:
        refused = hosts.send([s.path for s in sources[:10]])
    finally:
        threading.Timer(30, hosts["listen"].unblock, args=(hosts["db"],)).start()
    print(f"[listener cut from the database] {len(refused.ok)} stored, {len(refused.refused)} refused "
          f"({sorted(set(refused.refused.values()))}) while cut")
    assert not refused.ok and refused.refused, refused
    assert all("OutOfResources" in r or "A7" in r.upper() for r in refused.refused.values()), refused.refused
    rounds = hosts.send_until_stored([s.path for s in sources], deadline_s=180)
    print(f"[listener cut from the database] taken after {len(rounds)} rounds, {time.monotonic() - t0:.0f} s")
    _finish(hosts, sources, digest, "listener cut from the database 30 s", t0, done_before)


def test_postgresql_the_object_store_and_the_broker_restarted(hosts, tmp_path, digest):
    """Each server stopped and started again mid-burst, one after the other: PostgreSQL (the job
    table is on disk), SeaweedFS (the objects are), Redis (keeps nothing: the reconciler sends the
    queued jobs again from the job table)."""
    sources = _batch(tmp_path, 45, seed=4103)
    done_before = hosts.counts().get("done", 0)
    t0 = time.monotonic()
    sender = threading.Thread(target=hosts.send_until_stored, args=([s.path for s in sources], 600))
    sender.start()
    for step, (stop, start) in enumerate(((hosts.stop_postgres, hosts.start_postgres),
                                          (hosts.stop_s3, hosts.start_s3),
                                          (hosts.stop_redis, hosts.start_redis)), start=1):
        wait_for(lambda step=step: hosts.counts().get("done", 0) >= done_before + 5 * step, 600,
                 lambda step=step: f"results before restart {step} (now {hosts.counts()})", step=1)
        stop()
        time.sleep(5)
        start()
    sender.join()
    _finish(hosts, sources, digest, "postgresql, object store and broker restarted", t0, done_before)


def test_one_instance_to_two_listeners_on_two_hosts_at_once(hosts, tmp_path, digest):
    """A PACS retry to the other listener: the same SOP Instance UID reaches both listener hosts at
    once; one job, one set of results."""
    sources = _batch(tmp_path, 3, seed=4104)
    hosts.add_listener("listen2")
    done_before = hosts.counts().get("done", 0)
    t0 = time.monotonic()
    files = [s.path for s in sources]
    both = [threading.Thread(target=hosts.send, args=(files,), kwargs={"to": to}) for to in ("listen", "listen2")]
    for t in both:
        t.start()
    for t in both:
        t.join()
    figures = _finish(hosts, sources, digest, "same instances to two listeners", t0, done_before)
    assert figures["delivered"] == len(sources)
