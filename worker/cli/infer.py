"""`medsam2-cxr infer`: the pipeline offline, on files (no network, no broker, no spool)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import structlog
import typer

from worker.cli import common
from worker.cli.common import ConfigOpt

app = typer.Typer()
log = structlog.get_logger()


@app.command()
def infer(files: Annotated[list[Path], typer.Argument(exists=True, dir_okay=False)],
          out: Annotated[Path, typer.Option("--out", "-o")],
          config: ConfigOpt = None) -> None:
    """Run the pipeline offline (no network, no broker): SR, SC, GSPS (a KOS when urgent) and a JSON summary per image.

    Every file is tried; one JSON line each says what came of it (its summary, why it was
    skipped, or the error's type and message); the exit code is 1 when any file failed."""
    import pydicom

    from dicom_node.filters import classify
    from dicom_node.identifiers import describe, identifiers
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import read_image
    from models.urgency import assess
    from worker.model_build import ensure_bundle
    from worker.node import Node
    from worker.pipeline import encode_results, result_files, to_bytes

    settings = common.settings_for(config)
    node = Node(settings)
    predictor = Predictor(load_bundle(ensure_bundle(settings), settings.model.operating_points),
                          device=settings.model.device or None)
    model = predictor.bundle.identity()
    language = settings.report.language  # of the draft report and the notices
    reporter = node.reporter()  # similar cases + draft report, when an index exists
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for i, f in enumerate(files):
        stem = f"{i:04d}-{f.stem}"
        ds, stage = None, "read"
        try:
            ds = pydicom.dcmread(f)
            decision = classify(ds)
            if not decision.process:
                typer.echo(json.dumps({"file": str(f), "skipped": decision.reason}))
                continue
            image = read_image(ds)
            stage = "infer"
            pred = predictor.predict([image])[0]
            stage = "encode"
            urgency = assess(pred, settings.urgent.rules)
            results = [to_bytes(r) for r in encode_results(ds, image, pred, model, node.clock.now(),
                                                           reporter, language, urgency)]
        except Exception as exc:  # noqa: BLE001 - one file's failure is reported and the next one goes on
            failures += 1
            typer.echo(json.dumps({"file": str(f), "stage": stage,
                                   "error": describe(exc, identifiers(ds) if ds is not None else ())}))
            log.error("infer.file_failed", file=f.name, stage=stage, error=type(exc).__name__)
            continue
        kinds = [p.stem for p in result_files(out, reporter is not None, urgency.is_urgent)]  # sr, sc, (text,) pr, (ko)
        names = {kind: f"{stem}.{kind}.dcm" for kind in kinds}
        for name, result in zip(names.values(), results, strict=True):
            (out / name).write_bytes(result)
        summary = {"file": str(f), **names, "urgency": urgency.to_json(),
                   "model": {"name": model.name, "version": model.version, "digest": model.digest},
                   **pred.to_json()}
        (out / f"{stem}.json").write_text(json.dumps(summary, indent=1))
        typer.echo(json.dumps({"file": str(f), "summary": f"{stem}.json",
                               "present": [x.label for x in pred.findings if x.present],
                               "out_of_distribution": pred.out_of_distribution}))
    typer.echo(f"{len(files) - failures} of {len(files)} files ok, {failures} failed", err=True)
    raise typer.Exit(1 if failures else 0)
