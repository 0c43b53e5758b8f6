"""`medsam2-cxr model pull`: the MedSAM2 weights the default bundle can be built on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker.cli import common
from worker.cli.common import ConfigOpt

app = typer.Typer()

model_app = typer.Typer(add_completion=False, no_args_is_help=True, help="MedSAM2 weights.")
app.add_typer(model_app, name="model")


@model_app.command("pull")
def model_pull(config: ConfigOpt = None,
               dest: Annotated[Path | None, typer.Option(help="file to write (default: <spool>/models/MedSAM2_latest.pt)")] = None,
               sha256: Annotated[str | None, typer.Option(help="expected sha256 (default: the one Hugging Face states)")] = None,
               timeout: float = 30.0) -> None:
    """Fetch MedSAM2_latest.pt (HF wanglab/MedSAM2), verify its sha256, or say where to put it."""
    from models.pull import FILENAME, PullError, pull

    settings = common.settings_for(config)
    target = dest or settings.layout.models / FILENAME
    try:
        got = pull(target, sha256=sha256, timeout=timeout)
    except PullError as exc:
        typer.echo(f"model pull failed: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(json.dumps({"path": str(got.path), "sha256": got.sha256, "verified_against": got.verified_against,
                           "downloaded": got.downloaded}))
    typer.echo(f"Set model.encoder_checkpoint = \"{got.path}\" to build bundles on MedSAM2's weights.", err=True)
