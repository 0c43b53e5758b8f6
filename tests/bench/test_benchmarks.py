"""Benchmarks at tiny sizes: each runs, does the work it claims to time, and reports figures a
regression would move. No test here recomputes a ratio from the numbers the same report printed
(that cannot fail); they check what happened (images stored, jobs made, forwards run, plugins
correct) and generous bounds a hang or a leak would break (none on timing ratios: on a shared CPU
one repeat's timings vary by several times)."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from bench.__main__ import bench_app
from tests.conftest import require_peer

pytestmark = pytest.mark.bench


def _bench(args: list[str]) -> dict:
    """Run `python -m bench ...` and parse the one JSON object it prints on stdout."""
    out = CliRunner().invoke(bench_app, args)
    assert out.exit_code == 0, out.output
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    return json.loads(lines[0])


def test_bench_ingest_stores_every_image_in_both_receivers(tmp_path):
    require_peer("storescp")
    require_peer("storescu")
    r = _bench(["ingest", "--n", "4", "--rows", "64", "--cols", "48", "--senders", "2", "--repeats", "1",
                "--work", str(tmp_path)])
    assert r["benchmark"] == "ingest" and r["images"] == 4
    for mode, senders in (("sequential", 1), ("concurrent", 2)):
        m = r[mode]
        assert m["senders"] == senders
        # One timed pass per receiver and repeat, and the node recorded every image it was sent as a
        # job (one_pass also refuses a pass where a receiver stored fewer files than were sent).
        assert len(m["runs"]["node"]) == len(m["runs"]["storescp"]) == 1
        assert m["node_jobs"] == {"queued": 4}
        assert m["runs"]["node"][0]["jobs"] == {"queued": 4}
        assert m["node_s"] > 0 and m["storescp_s"] > 0
        # Four 6 kB images: seconds and a few MB of growth at most; a listener that hangs on a
        # timeout or keeps every dataset in memory breaks these.
        assert m["node_s"] < 30, m
        assert m["node_rss_growth_mb"] < 100, m
        # CPU per GB received, read from /proc: the node's Python listener spends ticks even on four
        # tiny images; storescp may stay under one 10 ms tick here, so it is only present and not negative.
        assert m["node_cpu_s_per_gb"] > 0 and m["storescp_cpu_s_per_gb"] >= 0, m
    # [node] processes: 1 and 2 listener processes on one port both stored every image (one_pass
    # checks the count) and each figure is there.
    procs = r["processes"]
    assert procs["senders"] == 2 and len(procs["runs"]["1"]) == len(procs["runs"]["2"]) == 1
    assert procs["runs"]["2"][0]["jobs"] == {"queued": 4}
    assert 0 < procs["node_s_1_processes"] < 30 and 0 < procs["node_s_2_processes"] < 30, procs
    assert procs["node_cpu_s_per_gb_2_processes"] > 0, procs
    probe = r["memory_vs_size"]
    assert probe["small_rows"] == 32 and probe["small_cols"] == 24
    assert probe["node_rss_growth_small_mb"] < 100 and probe["node_rss_growth_full_mb"] < 100
    assert isinstance(r["goal"]["met"], bool)


class CountingPredictor:
    """The real predictor, counting the forwards the benchmark asks for and their batch sizes."""

    def __init__(self, predictor) -> None:
        self.predictor, self.device, self.bundle = predictor, predictor.device, predictor.bundle
        self.encoded: list[int] = []
        self.predicted: list[int] = []

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.encoded.append(int(x.shape[0]))
        return self.predictor.encode(x)

    def predict(self, images):
        self.predicted.append(len(images))
        return self.predictor.predict(images)


def test_bench_infer_times_the_forwards_it_reports(tmp_path):
    """compare() runs, per batch size, one warm-up and ``repeats`` timed forwards of exactly that
    many images on each path (encoder; full step from the detector's matrix; worker step from
    resized inputs)."""
    from bench import infer
    from models.bundle import load_bundle
    from models.predictor import Predictor

    images = infer.cxr_arrays(3, 96, 80, tmp_path / "images")
    assert len(images) == 3 and images[0].shape == (96, 80)
    spy = CountingPredictor(Predictor(load_bundle(infer.write_bench_bundle(tmp_path / "bundle", "tiny")), device="cpu"))
    rows = infer.compare(spy, images, batches=(1, 3), repeats=2)
    assert [row["batch"] for row in rows] == [1, 3]
    assert spy.encoded == [1] * (1 + 2) + [3] * (1 + 2)
    assert spy.predicted == [1] * (1 + 2 * 2) + [3] * (1 + 2 * 2)
    for row in rows:
        assert row["encoder_images_per_s"] > 0 and row["full_images_per_s"] > 0
        assert set(row["ms_per_image"]) == {"preprocess", "encoder", "head_tta_calibration_saliency"}
        # No bound on the ratios: on a shared CPU one repeat's timings vary by several times.


def test_bench_infer_command_reports_each_spec_and_batch():
    r = _bench(["infer", "--specs", "tiny", "--batches", "1,2", "--repeats", "1", "--rows", "96", "--cols", "80"])
    rows = r["specs"]["tiny"]["batches"]
    assert [row["batch"] for row in rows] == [1, 2]
    assert r["device"] == "cpu" and r["tta_n"] == 8
    assert all(row["encoder_images_per_s"] > 0 and row["worker_step_images_per_s"] > 0 for row in rows), rows
    assert isinstance(r["goal"]["met"], bool) and isinstance(r["goal"]["met_worker_step"], bool)


def test_bench_decode_checks_every_plugin_against_the_pixels():
    r = _bench(["decode", "--rows", "64", "--cols", "48", "--repeats", "1", "--threads", "1"])
    assert r["cases"], r
    for case in r["cases"]:
        assert case["plugins"], case
        assert case["fastest_correct"] in case["plugins"]
        assert case["plugins"][case["fastest_correct"]]["correct"] is True
        rates = case["worker_decode"]
        assert all(rates[k] > 0 for k in ("one_thread_images_per_s", "threads_images_per_s", "processes_images_per_s"))


def test_bench_train_times_the_evaluation(tmp_path):
    r = _bench(["train", "--n", "60", "--encoder", "tiny", "--seeds", "1", "--variants", "B0,B5", "--n-ood", "4",
                "--epochs", "2", "--work", str(tmp_path)])
    assert r["benchmark"] == "train"
    assert r["cached_s"] > 0 and r["cold_s"] > 0
    assert r["cached_features"] is True  # the timed run extracted nothing


@pytest.mark.integration
@pytest.mark.e2e
def test_bench_e2e_small(tmp_path):
    for tool in ("Orthanc", "storescu"):
        require_peer(tool)
    r = _bench(["e2e", "--spec", "tiny", "--runs", "2", "--burst", "4", "--rows", "96", "--cols", "80",
                "--device", "cpu", "--work", str(tmp_path)])
    assert r["latency"]["runs"] == 2 and r["latency"]["p95_s"] >= r["latency"]["p50_s"] > 0
    assert r["burst"]["images"] == 4 and r["burst"]["images_per_s"] > 0 and r["burst"]["infer_images_per_s"] > 0
    assert r["jobs"].get("done") == 1 + 2 + 4
    assert sum(int(b) * n for b, n in r["burst"]["worker_batches"].items()) == 4  # every burst image, in batches
    assert 0 < r["burst"]["worker_model_busy_fraction"] <= 1
    cpu = r["burst"]["cpu_s_per_image"]
    assert set(cpu) == {"orthanc", "listen", "gpu", "io"} and cpu["gpu"] > 0 and cpu["io"] > 0


def test_gpu_benchmark_runs_on_the_cpu_at_tiny_size():
    """bench/gpu.py is only run on a GPU machine; this keeps it importable and working."""
    from bench import gpu

    r = gpu.run(spec="tiny", batches=(1, 2), repeats=1, device="cpu")
    assert set(r["batches"]) == {"1", "2"}
    for row in r["batches"].values():
        for key in ("from_model_size", "from_2500x2048"):
            assert row[key]["encoder_images_per_s"] > 0 and row[key]["full_images_per_s"] > 0
