"""The import graph (grimp, import-linter's graph library): no module imports itself through
others, and the layers import downwards only, so a newcomer can read the data flow off the
folders: dicom_node (the DICOM edge) and models (what a worker loads) never reach up into the
worker, the index, the RIS or the console; training and the phantoms stay out of serving.

Imports under ``if TYPE_CHECKING:`` are left out (they never run); lazy imports inside
functions count, as they run."""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("dicom_node", "worker", "models", "training", "phantoms", "imagedata", "index", "ris", "console",
            "deploy", "bench")

# package -> what it must never import (directly or through others)
FORBIDDEN = {
    "dicom_node": ("worker", "index", "ris", "console", "training", "bench"),
    "models": ("dicom_node", "worker", "index", "ris", "console", "training", "phantoms", "imagedata", "bench"),
    "imagedata": ("dicom_node", "worker", "index", "ris", "console", "training", "bench"),
    "phantoms": ("dicom_node", "worker", "index", "ris", "console", "training", "imagedata", "bench"),
    "training": ("dicom_node", "worker", "index", "ris", "console", "bench"),
    "ris": ("worker", "console", "training", "bench"),
    "index": ("worker", "ris", "console", "bench"),
    "console": ("bench",),
    "worker": ("bench",),  # bench imports the product (python -m bench), never the reverse
    "deploy": ("bench",),
}


@pytest.fixture(scope="module")
def graph() -> grimp.ImportGraph:
    return grimp.build_graph(*PACKAGES, include_external_packages=False, exclude_type_checking_imports=True)


def _cycles(graph: grimp.ImportGraph) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def visit(m: str) -> None:
        index[m] = low[m] = len(index)
        stack.append(m)
        on_stack.add(m)
        for d in sorted(graph.find_modules_directly_imported_by(m)):
            if d not in index:
                visit(d)
                low[m] = min(low[m], low[d])
            elif d in on_stack:
                low[m] = min(low[m], index[d])
        if low[m] == index[m]:
            group = []
            while True:
                x = stack.pop()
                on_stack.discard(x)
                group.append(x)
                if x == m:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    return groups


def test_no_module_imports_itself_through_others(graph: grimp.ImportGraph) -> None:
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle() -> None:
    graph = grimp.ImportGraph()
    for importer, imported in (("p.a", "p.b"), ("p.b", "p.c"), ("p.c", "p.a"), ("p.c", "p.d")):
        graph.add_import(importer=importer, imported=imported)
    assert _cycles(graph) == [["p.a", "p.b", "p.c"]]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layers_import_downwards_only(graph: grimp.ImportGraph, package: str) -> None:
    offenders = []
    for other in FORBIDDEN[package]:
        chain = graph.find_shortest_chain(importer=package, imported=other, as_packages=True)
        if chain:
            offenders.append(" -> ".join(chain))
    assert offenders == [], f"{package} reaches up into: {offenders}"
