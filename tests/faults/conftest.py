"""Fixtures of the fault suite: one phantom batch per session, a fresh rig per scenario."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from models.bundle import read_card
from tests.faults.harness import Node, Orthanc, RabbitMQ, Redis, read_sources

BATCH = 100  # phantom frontal CXRs per scenario


@pytest.fixture(scope="session")
def batch(tmp_path_factory) -> Path:
    """100 small phantom chest radiographs (256 x 256) with phantom patient names and IDs."""
    from phantoms import generate

    out = tmp_path_factory.mktemp("batch")
    generate(BATCH, out, seed=23, size=256)
    return out / "images"


@pytest.fixture(scope="session")
def sources(batch):
    return read_sources(batch)


@pytest.fixture(scope="session")
def digest(tiny_bundle) -> str:
    return read_card(tiny_bundle)["digest"]


@pytest.fixture
def rig(tmp_path, tiny_bundle) -> Iterator[Callable[..., Node]]:
    """rig(**overrides) -> a started Node with its own broker (a private Redis, or with
    broker="rabbitmq" a private vhost on the machine's RabbitMQ) and Orthanc; all stopped after."""
    made: list[tuple[Node, Redis | RabbitMQ, Orthanc]] = []

    def build(start: bool = True, orthanc_port: int | None = None, gpu_workers: int = 2, broker: str = "redis",
              **overrides) -> Node:
        redis: Redis | RabbitMQ = RabbitMQ(tmp_path) if broker == "rabbitmq" else Redis(tmp_path)
        redis.start()
        orthanc = Orthanc(tmp_path, port=orthanc_port)
        orthanc.start()
        node = Node(tmp_path, tiny_bundle, orthanc, redis, overrides=overrides, gpu_workers=gpu_workers)
        made.append((node, redis, orthanc))
        if start:
            node.start()
        return node

    t0 = time.monotonic()
    yield build
    for node, redis, orthanc in made:
        node.stop()
        orthanc.stop()
        redis.stop()
    print(f"[rig] scenario wall time {time.monotonic() - t0:.0f} s")
