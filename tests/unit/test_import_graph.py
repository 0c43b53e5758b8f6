"""The import graph (grimp, import-linter's graph library): no module imports itself through
others, and the layers import downwards only, so a newcomer can read the data flow off the
folders: dicom_node (the DICOM edge) and models (what a worker loads) never reach up into the
worker, the index, the RIS or the console; training and the phantoms stay out of serving.

Imports under ``if TYPE_CHECKING:`` are left out (they never run); lazy imports inside
functions count, as they run."""

from __future__ import annotations

import grimp
import pytest

PACKAGES = ("dicom_node", "worker", "models", "model_training", "phantoms", "imagedata", "index", "ris", "console",
            "deploy", "bench")

# package -> what it must never import (directly or through others)
FORBIDDEN = {
    "dicom_node": ("worker", "index", "ris", "console", "model_training", "bench"),
    "models": ("dicom_node", "worker", "index", "ris", "console", "model_training", "phantoms", "imagedata", "bench"),
    "imagedata": ("dicom_node", "worker", "index", "ris", "console", "model_training", "bench"),
    "phantoms": ("dicom_node", "worker", "index", "ris", "console", "model_training", "imagedata", "bench"),
    "model_training": ("dicom_node", "worker", "index", "ris", "console", "bench"),
    "ris": ("worker", "console", "model_training", "bench"),
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


def test_every_package_is_ours_wherever_the_command_runs(tmp_path) -> None:
    """Each first-party package resolves to this repository from any working directory, as the
    installed `medsam2-cxr` command imports it (sam2's sdist installs a top-level `training`)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    probe = ("import importlib.util, json, sys; "
             "print(json.dumps({n: importlib.util.find_spec(n).origin for n in sys.argv[1:]}))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", probe, *PACKAGES], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=60, check=True)
    import json

    origins = json.loads(out.stdout)
    assert {n: o for n, o in origins.items() if not str(o).startswith(str(repo))} == {}
