"""Case index: box operations, store, FAISS vectors, retrieval, source selection, no identifiers."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from typer.testing import CliRunner

from index import boxes
from index.retrieval import STORE_FILE, VECTORS_FILE, CaseIndex, IndexMismatch, Retriever
from index.sources import BoxSet, rank_sources
from index.store import REDACTED, CaseStore, StoreError, new_case, scrub, split_sections
from index.vectors import VectorConfig, VectorIndex, recall_at_k
from models.labels import LABELS

DIGEST = "ab" * 32
REPORT = "FINDINGS: Small right pleural effusion. The heart is normal in size.\nIMPRESSION: Small right pleural effusion."


# ---------------------------------------------------------------- boxes

def test_volumes_and_containment_by_hand() -> None:
    c, r = np.zeros(2), np.array([0.5, 1.0])
    assert boxes.volume(r) == pytest.approx(2.0)  # sides 1 and 2
    assert boxes.log_volume(r) == pytest.approx(np.log(2.0))
    inner_c, inner_r = np.array([0.2, 0.0]), np.array([0.1, 0.5])
    assert boxes.contains(c, r, inner_c, inner_r)
    assert not boxes.contains(inner_c, inner_r, c, r)
    # P(outer | inner) = Vol(outer ∧ inner) / Vol(inner) = 1; P(inner | outer) = Vol(inner) / Vol(outer)
    assert boxes.log_conditional(c, r, inner_c, inner_r) == pytest.approx(0.0)
    assert np.exp(boxes.log_conditional(inner_c, inner_r, c, r)) == pytest.approx(0.2 * 1.0 / 2.0)
    lo, hi = boxes.intersection(*boxes.corners(c, r), *boxes.corners(inner_c, inner_r))
    np.testing.assert_allclose(lo, [0.1, -0.5])
    np.testing.assert_allclose(hi, [0.3, 0.5])


def test_disjoint_boxes_hard_zero_soft_graded() -> None:
    a = (np.zeros(4), np.full(4, 0.1))
    near = (np.full(4, 0.25), np.full(4, 0.1))  # gap 0.05 per axis
    far = (np.full(4, 0.5), np.full(4, 0.1))  # gap 0.3 per axis
    assert boxes.log_intersection_volume(*a, *near) == -np.inf
    s_near = boxes.log_overlap(*a, *near, beta=0.05)
    s_far = boxes.log_overlap(*a, *far, beta=0.05)
    assert np.isfinite(s_near) and np.isfinite(s_far) and s_near > s_far


def test_gumbel_intersection_tends_to_hard() -> None:
    za, Za = boxes.corners(np.zeros(3), np.full(3, 1.0))
    zb, Zb = boxes.corners(np.full(3, 0.5), np.full(3, 1.0))
    hard = boxes.intersection(za, Za, zb, Zb)
    soft = boxes.gumbel_intersection(za, Za, zb, Zb, beta=1e-4)
    np.testing.assert_allclose(soft[0], hard[0], atol=1e-3)
    np.testing.assert_allclose(soft[1], hard[1], atol=1e-3)
    with pytest.raises(ValueError, match="beta"):
        boxes.gumbel_intersection(za, Za, zb, Zb, beta=0.0)
    with pytest.raises(ValueError, match="radius"):
        boxes.corners(np.zeros(2), np.array([0.1, -0.1]))


_box = arrays(np.float64, 5, elements=st.floats(-2, 2)), arrays(np.float64, 5, elements=st.floats(0.01, 1.5))


@settings(max_examples=60, deadline=None)
@given(*_box, *_box, st.floats(0.01, 0.5))
def test_box_identities(ca, ra, cb, rb, beta) -> None:
    inter = boxes.log_intersection_volume(ca, ra, cb, rb)
    assert inter <= min(boxes.log_volume(ra), boxes.log_volume(rb)) + 1e-9
    assert boxes.log_conditional(ca, ra, cb, rb) <= 1e-9
    for b in (None, beta):  # P(a | a) = 1 and the overlap is symmetric, hard and soft
        assert boxes.log_conditional(ca, ra, ca, ra, b) == pytest.approx(0.0, abs=1e-9)
        assert boxes.log_overlap(ca, ra, cb, rb, b) == pytest.approx(boxes.log_overlap(cb, rb, ca, ra, b))
    assert bool(boxes.contains(ca, ra + 0.1, ca, ra))


# ---------------------------------------------------------------- store

def test_scrub_and_sections() -> None:
    text = "FINDINGS: Doe John seen 2021-03-04, UID 1.2.840.10008.5.1 and MRN12345. Clear lungs.\nIMPRESSION: Normal."
    out = scrub(text, ["DOE^JOHN", "MRN12345", "M"])
    assert "Doe" not in out and "John" not in out and "MRN12345" not in out and "2021" not in out
    assert "1.2.840" not in out and "Clear lungs" in out and out.count(REDACTED) >= 4
    findings, impression = split_sections("INDICATION: cough.\nFINDINGS: Clear lungs.\nIMPRESSION: Normal.")
    assert findings == "Clear lungs." and impression == "Normal."
    assert split_sections("Heart normal. Lungs clear.") == ("Heart normal. Lungs clear.", "")


def test_new_case_accepts_only_what_a_case_may_hold() -> None:
    case = new_case(REPORT, {"Pleural Effusion": 1, "Cardiomegaly": "0"}, np.zeros(4), np.ones(4), "Site A")
    assert case.labels["Pleural Effusion"] == 1 and case.labels["Cardiomegaly"] == 0 and case.labels["Edema"] is None
    assert case.positive() == ["Pleural Effusion"]
    assert case.case_id == new_case(REPORT, {"Pleural Effusion": 1, "Cardiomegaly": "0"}, np.zeros(4), np.ones(4),
                                    "Site A").case_id  # content-derived: adding twice does not duplicate
    with pytest.raises(TypeError):
        new_case(REPORT, {}, np.zeros(4), np.ones(4), "Site A", patient_id="P1")  # type: ignore[call-arg]
    with pytest.raises(StoreError, match="source"):
        new_case(REPORT, {}, np.zeros(4), np.ones(4), "../images/P0001.dcm")
    with pytest.raises(StoreError, match="CheXpert"):
        new_case(REPORT, {"Nodule": 1}, np.zeros(4), np.ones(4), "Site A")
    with pytest.raises(StoreError, match="radius"):
        new_case(REPORT, {}, np.zeros(4), -np.ones(4), "Site A")
    with pytest.raises(StoreError, match="empty report"):
        new_case("   ", {}, np.zeros(4), np.ones(4), "Site A")


def _cases(n: int, d: int = 8, seed: int = 0, source: str = "Site A") -> list:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        lab = {k: int(rng.random() < 0.2) for k in LABELS}
        out.append(new_case(f"FINDINGS: case {i} of {source}. {REPORT}", lab, rng.normal(size=d), rng.uniform(0.05, 0.3, d), source))
    return out


def test_store_round_trip_and_duplicates(tmp_path) -> None:
    store = CaseStore.create(tmp_path / "cases.sqlite", DIGEST, 8)
    cases = _cases(5)
    assert store.add(cases) == [0, 1, 2, 3, 4]
    assert store.add(cases[:2]) == []  # same content, same id: nothing new
    store.close()
    again = CaseStore.open(tmp_path / "cases.sqlite")
    assert len(again) == 5 and again.digest == DIGEST
    got = again.get([3, 0])
    assert [c.case_id for c in got] == [cases[3].case_id, cases[0].case_id]
    np.testing.assert_allclose(got[0].center, cases[3].center)
    np.testing.assert_allclose(again.radii[0], cases[0].radius)
    with pytest.raises(StoreError, match="index add"):
        CaseStore.create(tmp_path / "cases.sqlite", DIGEST, 8)
    with pytest.raises(StoreError, match="no case store"):
        CaseStore.open(tmp_path / "missing.sqlite")


# ---------------------------------------------------------------- vectors

def test_flat_is_exact_and_hnsw_recall_is_measured(tmp_path) -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(3000, 16)).astype(np.float32)
    q = rng.normal(size=(50, 16)).astype(np.float32)
    flat = VectorIndex.build(x, kind="flat")
    d, i = flat.search(q, 5)
    brute = np.argsort(((q[:, None] - x[None]) ** 2).sum(-1), axis=1)[:, :5]
    np.testing.assert_array_equal(i, brute)
    hnsw = VectorIndex.build(x, kind="hnsw")
    ivf = VectorIndex.build(x, kind="ivf")
    assert recall_at_k(hnsw.search(q, 5)[1], i) >= 0.9
    assert recall_at_k(ivf.search(q, 5)[1], i) >= 0.7
    assert recall_at_k(i, i) == 1.0
    hnsw.save(tmp_path / "h.faiss")
    loaded = VectorIndex.load(tmp_path / "h.faiss")
    assert loaded.kind == "hnsw" and loaded.ntotal == 3000
    assert VectorConfig(exact_below=100).resolve(99) == "flat" and VectorConfig(exact_below=100).resolve(100) == "hnsw"


def test_index_switches_to_hnsw_past_the_threshold_and_rebuilds_a_stale_file(tmp_path) -> None:
    cfg = VectorConfig(exact_below=30)
    index = CaseIndex.create(tmp_path / "idx", DIGEST, 8, cfg)
    index.add(_cases(20))
    assert index.vectors.kind == "flat" and len(index) == 20
    index.add(_cases(20, seed=1))
    assert index.vectors.kind == "hnsw" and len(index) == 40
    (tmp_path / "idx" / VECTORS_FILE).unlink()
    reopened = CaseIndex.open(tmp_path / "idx", cfg)
    assert len(reopened) == 40 and reopened.vectors.kind == "hnsw"


# ---------------------------------------------------------------- retrieval

def _index_with(tmp_path: Path, boxes_: list[tuple[np.ndarray, np.ndarray]], labels: list[dict]) -> CaseIndex:
    index = CaseIndex.create(tmp_path / "idx", DIGEST, len(boxes_[0][0]))
    index.add([new_case(f"FINDINGS: case {i}. {REPORT}", lab, c, r, "Site A") for i, ((c, r), lab) in enumerate(zip(boxes_, labels))])
    return index


def test_box_rerank_prefers_overlap_center_mode_prefers_distance(tmp_path) -> None:
    d = 4
    q = (np.zeros(d), np.full(d, 1.0))
    wide = (np.full(d, 0.3), np.full(d, 1.0))  # center 0.6 away, box almost the query's
    tiny = (np.full(d, 0.1), np.full(d, 0.01))  # center 0.2 away, a speck inside the query
    far = (np.full(d, 3.0), np.full(d, 1.0))
    index = _index_with(tmp_path, [tiny, wide, far], [{"Edema": 1}, {"Pleural Effusion": 1}, {"No Finding": 1}])
    by_box = Retriever(index, mode="box").search(*q, DIGEST, k=3)
    by_center = Retriever(index, mode="center").search(*q, DIGEST, k=3)
    assert [s.case.labels["Pleural Effusion"] for s in by_box][0] == 1  # the wide, overlapping box
    assert by_center[0].case.labels["Edema"] == 1  # the nearest center
    assert [s.rank for s in by_box] == [1, 2, 3] and by_box[0].similarity > by_box[-1].similarity
    assert all(0.0 <= s.similarity <= 1.0 for s in by_box + by_center)
    same = Retriever(index, mode="box").search(*wide, DIGEST, k=1)[0]
    assert same.similarity == pytest.approx(1.0, abs=1e-6)  # a box is fully similar to itself
    cond = Retriever(index, mode="box", score="conditional").search(*q, DIGEST, k=3)
    assert cond[0].case.labels["Edema"] == 1  # P(query | case) = 1 for a case box inside the query
    with pytest.raises(ValueError, match="mode"):
        Retriever(index, mode="cosine")


def test_an_index_refuses_queries_from_another_bundle(tmp_path) -> None:
    index = _index_with(tmp_path, [(np.zeros(4), np.ones(4))], [{}])
    with pytest.raises(IndexMismatch, match=r"built with model bundle abababababab.*index build"):
        Retriever(index).search(np.zeros(4), np.ones(4), "cd" * 32)


# ---------------------------------------------------------------- source selection

def test_rank_sources_prefers_the_covering_source() -> None:
    rng = np.random.default_rng(2)
    target = BoxSet(rng.normal(0, 0.3, (40, 8)), np.full((40, 8), 0.3))
    near = BoxSet(rng.normal(0, 0.3, (60, 8)), np.full((60, 8), 0.3))
    shifted = BoxSet(rng.normal(1.5, 0.3, (60, 8)), np.full((60, 8), 0.3))
    ranked = rank_sources(target, {"shifted": shifted, "near": near})
    assert [s.name for s in ranked] == ["near", "shifted"]
    assert 0 < ranked[1].coverage < ranked[0].coverage <= 1.0
    assert [s.name for s in rank_sources(target, {"shifted": shifted, "near": near}, score="overlap")] == ["near", "shifted"]
    with pytest.raises(ValueError, match="dimensions"):
        rank_sources(target, {"x": BoxSet(np.zeros((3, 4)), np.ones((3, 4)))})


# ---------------------------------------------------------------- built from phantom DICOMs

@pytest.fixture
def cli(monkeypatch):
    """The typer app, run in-process without reconfiguring this process's logging.

    (logs.configure binds structlog to sys.stderr, which CliRunner replaces and then closes.)
    """
    from worker import logs
    from worker.cli import app

    monkeypatch.setattr(logs, "configure", lambda *a, **k: None)
    runner = CliRunner()
    return lambda args: runner.invoke(app, args)


IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber", "StudyInstanceUID",
               "SeriesInstanceUID", "SOPInstanceUID", "StudyID")


def test_index_from_phantom_dicoms_holds_no_identifiers(tmp_path, tiny_bundle, phantom_dir, cli) -> None:
    out = tmp_path / "idx"
    res = cli(["index", "build", "--data", str(phantom_dir), "--bundle", str(tiny_bundle), "--out", str(out)])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["added"] == 4 and summary["cases"] == 4 and summary["vector_index"] == "flat"
    res = cli(["index", "add", "--data", str(phantom_dir), "--bundle", str(tiny_bundle), "--index", str(out),
                              "--source", "Site B"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout.strip().splitlines()[-1])["cases"] == 8  # same reports, another source
    needles: set[str] = set()
    for f in sorted((phantom_dir / "images").glob("*.dcm")):
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        for kw in IDENTIFYING:
            v = str(ds.get(kw, ""))
            needles |= {v, v.replace("^", " ")} if v else set()
        needles.add(f.stem)  # file names carry the study id
    needles.discard("")
    assert len(needles) >= 8
    files = sorted(p for p in out.iterdir() if p.is_file())
    assert {p.name for p in files} == {STORE_FILE, VECTORS_FILE}  # no journal or side files left behind
    blob = b"".join(p.read_bytes() for p in files)
    leaked = [n for n in needles if n.encode() in blob]
    assert not leaked, f"identifiers in the index files: {leaked}"
    with sqlite3.connect(out / STORE_FILE) as conn:
        columns = [r[1] for r in conn.execute("PRAGMA table_info(cases)")]
    assert columns == ["pos", "case_id", "source", "findings", "impression", "labels", "center", "radius"]


def test_index_of_one_bundle_refuses_another(tmp_path, tiny_bundle, phantom_dir) -> None:
    from index.build import add_to_index, build_index, manifest_items
    from models.bundle import load_bundle

    bundle = load_bundle(tiny_bundle)
    build_index(tmp_path / "idx", bundle, manifest_items(phantom_dir), progress=False)
    index = CaseIndex.open(tmp_path / "idx")
    assert index.digest == bundle.digest and index.dim == bundle.head.latent_dim
    # The same index stamped with another bundle's digest: adding to it or querying it is refused.
    with sqlite3.connect(tmp_path / "idx" / STORE_FILE) as conn:
        conn.execute("UPDATE meta SET value = ? WHERE key = 'bundle_digest'", ("ef" * 32,))
    with pytest.raises(IndexMismatch, match="rebuild|Rebuild"):
        add_to_index(tmp_path / "idx", bundle, manifest_items(phantom_dir), progress=False)
    with pytest.raises(IndexMismatch):
        Retriever(CaseIndex.open(tmp_path / "idx")).search(np.zeros(index.dim), np.ones(index.dim), bundle.digest)


def test_sources_rank_command(tmp_path, tiny_bundle, phantom_dir, cli) -> None:
    out = tmp_path / "idx"
    assert cli(["index", "build", "--data", str(phantom_dir), "--bundle", str(tiny_bundle), "--out", str(out)]).exit_code == 0
    res = cli(["sources", "rank", "--target", str(phantom_dir), "--sources", str(out), str(phantom_dir),
                              "--bundle", str(tiny_bundle)])
    assert res.exit_code == 0, res.output
    rows = [json.loads(line) for line in res.stdout.strip().splitlines() if line.startswith("{")]
    assert [r["rank"] for r in rows] == [1, 2] and {r["source"] for r in rows} == {out.name, phantom_dir.name}
    # The target's own boxes cover it completely.
    assert all(r["coverage"] == pytest.approx(1.0, abs=1e-3) for r in rows)


def test_a_site_manifest_of_png_images_without_labels(tmp_path, tiny_bundle) -> None:
    """A site's own de-identified cases: PNG images, report text, no label columns (labeler fills them)."""
    from PIL import Image

    from index.build import run

    rng = np.random.default_rng(4)
    rows = ["path,report,split"]
    for i, (report, split) in enumerate([("FINDINGS: Small left pleural effusion. IMPRESSION: Effusion.", "train"),
                                         ("FINDINGS: The lungs are clear. IMPRESSION: Normal chest.", "train"),
                                         ("FINDINGS: Cardiomegaly. IMPRESSION: Enlarged heart.", "test")]):
        Image.fromarray(rng.integers(0, 255, (96, 80), dtype=np.uint8)).save(tmp_path / f"img{i}.png")
        rows.append(f'img{i}.png,"{report}",{split}')
    (tmp_path / "site.csv").write_text("\n".join(rows) + "\n")
    out = run(tmp_path / "site.csv", tiny_bundle, tmp_path / "idx", split="train", progress=False)
    assert out["added"] == 2 and out["cases"] == 2
    cases = CaseIndex.open(tmp_path / "idx").store.get([0, 1])
    assert cases[0].source == cases[1].source != ""  # the manifest folder's name
    assert cases[0].labels["Pleural Effusion"] == 1 and cases[1].labels["No Finding"] == 1
    with pytest.raises(StoreError, match="split column"):
        (tmp_path / "nosplit.csv").write_text("path,report\nimg0.png,Clear lungs.\n")
        run(tmp_path / "nosplit.csv", tiny_bundle, tmp_path / "idx2", split="train", progress=False)
