"""Local validation: validate (the bundle's figures on the site's own reported studies) and
recalibrate (a new bundle version with local temperatures, biases and thresholds; worker.validation)."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Annotated

import typer

from worker.cli.common import ConfigOpt, require_spool, settings_for

app = typer.Typer()

SinceOpt = Annotated[str, typer.Option("--since", help="first day (UTC, YYYY-MM-DD) of the studies received")]
UntilOpt = Annotated[str | None, typer.Option("--until", help="day after the last one (UTC, YYYY-MM-DD); default: now")]
OutOpt = Annotated[Path, typer.Option("--out", help="folder for the report (created)")]
AetOpt = Annotated[list[str] | None, typer.Option("--calling-aet", help="only the studies of this calling AE (repeatable)")]
BundleOpt = Annotated[Path | None, typer.Option("--bundle", help="bundle whose results to take; default: [model] bundle")]


def _day(value: str | None, option: str) -> float | None:
    if value is None:
        return None
    try:
        day = dt.date.fromisoformat(value)
    except ValueError:
        raise typer.BadParameter(f"{option} {value!r}: give a date as YYYY-MM-DD") from None
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def _parts(config: Path | None, bundle: Path | None):
    from worker.node import Node

    settings = settings_for(config)
    require_spool(settings, config)
    node = Node(settings)
    root = Path(bundle) if bundle is not None else settings.bundle_path
    if not (root / "model_card.json").is_file():
        raise typer.BadParameter(f"{root}: no model card; give --bundle or set [model] bundle")
    return node, root


@app.command()
def validate(since: SinceOpt, out: OutOpt, until: UntilOpt = None, bundle: BundleOpt = None,
             bootstrap: Annotated[int, typer.Option(help="bootstrap resamples (patient level)")] = 500,
             seed: Annotated[int, typer.Option(help="bootstrap seed")] = 0, calling_aet: AetOpt = None,
             config: ConfigOpt = None) -> None:
    """The bundle's figures on this site's studies whose report has arrived: per label AUROC,
    sensitivity and specificity at the results' thresholds, Brier, ECE; OOD rate; with bootstrap
    intervals, overall, per calling AE and per device, beside the model card's (metrics.json, report.html)."""
    from worker.validation import NothingToValidate, run_validation

    node, root = _parts(config, bundle)
    try:
        result = run_validation(node.jobs, node.reports, node.spool, root, out, _day(since, "--since") or 0.0,
                                _day(until, "--until"), n_boot=bootstrap, seed=seed,
                                calling_aets=tuple(calling_aet or ()))
    except NothingToValidate as exc:
        typer.echo(f"medsam2-cxr validate: {exc}", err=True)
        raise typer.Exit(1) from None
    o = result["overall"]
    typer.echo(json.dumps({"images": o["n_images"], "report": str(Path(out) / "report.html"),
                           "overall": {k: v.get("value") for k, v in o["overall"].items()},
                           "disagreements": sum(len(v) for v in result["disagreements"].values())}))


@app.command()
def recalibrate(since: SinceOpt, out: OutOpt, until: UntilOpt = None, bundle: BundleOpt = None,
                version: Annotated[str | None, typer.Option(help="the new version; default <old>+local.<date>")] = None,
                new_bundle: Annotated[Path | None, typer.Option("--new-bundle", help="default: OUT/bundle")] = None,
                held: Annotated[float, typer.Option(help="fraction of patients held back to measure")] = 0.5,
                seed: Annotated[int, typer.Option(help="patient split seed")] = 0, calling_aet: AetOpt = None,
                config: ConfigOpt = None) -> None:
    """A new bundle version with temperatures, biases and thresholds fitted on this site's reported studies
    (one part of the patients), ECE, Brier and AUROC before and after on the rest. The node keeps
    its bundle until [model] bundle is pointed at the new one."""
    from model_training.recalibrate import RecalibrationError
    from worker.validation import run_recalibration

    node, root = _parts(config, bundle)
    if not 0.0 < held < 1.0:
        raise typer.BadParameter(f"--held {held}: give a fraction between 0 and 1")
    try:
        result = run_recalibration(node.jobs, node.reports, node.spool, root, out, _day(since, "--since") or 0.0,
                                   _day(until, "--until"), version=version, new_bundle=new_bundle, seed=seed,
                                   held_fraction=held, calling_aets=tuple(calling_aet or ()))
    except RecalibrationError as exc:
        typer.echo(f"medsam2-cxr recalibrate: {exc}", err=True)
        raise typer.Exit(1) from None
    b, a = result["held"]["before"], result["held"]["after"]
    typer.echo(json.dumps({"bundle": result["to"], "held_images": result["held"]["images"],
                           "before": {k: b[k] for k in ("ece", "brier", "macro_auroc")},
                           "after": {k: a[k] for k in ("ece", "brier", "macro_auroc")}, "use": result["use"]}))
