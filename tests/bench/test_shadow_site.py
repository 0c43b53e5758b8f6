"""bench/shadow_site.py at a small n on an intentionally over-confident bundle, then the
`medsam2-cxr validate` and `recalibrate` commands on the spool it leaves: the calibration gap
shows, recalibration does not worsen ECE or Brier on the held-back patients, the new bundle
version loads and records its local data without identifiers, and the drift figures move when the
device changes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bench import shadow_site
from models.bundle import CARD, card_digest, load_bundle, read_card
from models.labels import LABELS

pytestmark = pytest.mark.bench

OVERCONFIDENT = 0.35  # temperatures times this: probabilities pushed towards 0 and 1


@pytest.fixture(scope="module")
def overconfident_bundle(tiny_bundle, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("overconfident") / "bundle"
    shutil.copytree(tiny_bundle, out)
    card = read_card(out)
    card["temperatures"] = {k: v * OVERCONFIDENT for k, v in card["temperatures"].items()}
    card["version"] = "0.1.0-overconfident"
    card["digest"] = card_digest(card)
    (out / CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
    return out


@pytest.fixture(scope="module")
def site(overconfident_bundle, tmp_path_factory) -> tuple[dict, Path]:
    work = tmp_path_factory.mktemp("shadow-site")
    result = shadow_site.run(overconfident_bundle, n=48, baseline=12, seed=7, shift=1.75, per_day=24, n_boot=50,
                             out=work / "out", work=work)
    return result, work


def test_the_site_runs_in_shadow_mode_with_every_report_in(site) -> None:
    result, work = site
    assert result["jobs"] == {"done": 60}  # every job ended "done" (shadow): nothing sent
    assert result["reports"]["reports"] == 60 and result["reports"]["waiting"] == 0
    assert result["validation"]["overall"]["images"] == 60
    v = json.loads((work / "out" / "validation" / "metrics.json").read_text())
    assert set(v["by_calling_aet"]) == {shadow_site.MAIN_AE, shadow_site.SITE_AE}
    assert v["by_device"][f"Phantom Devices {shadow_site.SITE_DEVICE_NAME} / {shadow_site.SITE_DEVICE_NAME}"]["n_images"] == 48
    page = (work / "out" / "validation" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2 and "model card" in page
    for k in LABELS:
        row = v["overall"]["labels"][k]
        assert (row["auroc"] is None) == ("too_few" in row)  # a figure, or the sentence saying why not


def test_the_calibration_gap_shows_and_recalibration_closes_it(site, overconfident_bundle) -> None:
    result, work = site
    said = result["validation"]["disagreements"]
    assert any("local ECE" in s and "worse here" in s for s in said), said
    rec = result["recalibration"]
    # the bundle is over-confident on purpose: a recalibration that changed nothing would fail here
    assert rec["after"]["ece"] < rec["before"]["ece"], rec
    assert rec["after"]["brier"] <= rec["before"]["brier"] + 1e-9, rec
    new = load_bundle(Path(rec["new_bundle"]["path"]))  # verifies every digest
    assert new.card["version"] != "0.1.0-overconfident" and new.digest != read_card(overconfident_bundle)["digest"]
    assert new.card["local_recalibration"]["data"]["calling_aets"] == {shadow_site.SITE_AE: 48}
    text = json.dumps(new.card)
    assert "P0007" not in text and "A0007" not in text  # no patient id, no accession number


def test_drift_moves_when_the_device_changes(site) -> None:
    result, _ = site
    sites = result["drift"]["sites"]
    main, island = sites[shadow_site.MAIN_AE], sites[shadow_site.SITE_AE]
    assert min(island["mean_radius"]) > max(main["mean_radius"])
    assert min(island["ood_rate"]) > max(main["ood_rate"])


def test_the_commands_on_the_sites_spool(site, overconfident_bundle, tmp_path) -> None:
    from worker.cli import app

    _, work = site
    config = tmp_path / "node.toml"
    config.write_text(f'[paths]\nspool = "{work / "spool"}"\n[model]\nbundle = "{overconfident_bundle}"\n')
    runner = CliRunner()
    r = runner.invoke(app, ["validate", "--since", "2026-11-01", "--out", str(tmp_path / "v"), "--bootstrap", "30",
                            "--calling-aet", shadow_site.SITE_AE, "--config", str(config)])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["images"] == 48
    assert (tmp_path / "v" / "metrics.json").is_file() and (tmp_path / "v" / "report.html").is_file()
    r = runner.invoke(app, ["recalibrate", "--since", "2026-11-01", "--out", str(tmp_path / "r"),
                            "--version", "0.1.0+site7", "--config", str(config)])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert out["bundle"]["version"] == "0.1.0+site7" and "[model] bundle" in out["use"]
    assert load_bundle(tmp_path / "r" / "bundle").card["version"] == "0.1.0+site7"
    r = runner.invoke(app, ["recalibrate", "--since", "2030-01-01", "--out", str(tmp_path / "none"),
                            "--config", str(config)])
    assert r.exit_code == 1 and "too few" in r.output
    r = runner.invoke(app, ["validate", "--since", "yesterday", "--out", str(tmp_path / "x"), "--config", str(config)])
    assert r.exit_code != 0 and "YYYY-MM-DD" in r.output
    r = runner.invoke(app, ["validate", "--since", "2030-01-01", "--out", str(tmp_path / "y"), "--config", str(config)])
    assert r.exit_code == 1 and "no study" in r.output
