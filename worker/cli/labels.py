"""Report labels: label (the 14 CheXpert labels of reports) and label-eval (the two labelers compared)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker import logs

app = typer.Typer()


def _report_texts(path: Path) -> list[str]:
    """Report texts in a file: a text report, one Open-i XML (FINDINGS + IMPRESSION), or an Open-i archive."""
    from model_training.openi import parse_report, read_reports

    if not path.is_file():
        raise typer.BadParameter(f"{path}: no such report file")
    name = path.name.lower()
    if name.endswith((".tgz", ".tar.gz", ".tar")):
        return [r.text for r in read_reports(path)]
    if name.endswith(".xml"):
        try:
            return [parse_report(path.read_bytes(), str(path)).text]
        except ValueError as e:
            raise typer.BadParameter(str(e)) from None
    return [path.read_text(encoding="utf-8", errors="replace")]


@app.command()
def label(files: Annotated[list[Path] | None, typer.Argument(help="more report files (after --file)")] = None,
          text: Annotated[list[str] | None, typer.Option("--text", help="a report as text (repeatable)")] = None,
          file: Annotated[list[Path] | None, typer.Option(
              "--file", help="report files: .txt, Open-i .xml, or an Open-i .tgz (one line per report inside)")] = None,
          extractor: Annotated[str, typer.Option(help="lexicon or grammar")] = "lexicon") -> None:
    """Print the 14 CheXpert labels of each report as one JSON line (1, 0, -1 uncertain, null not mentioned).

    Order: the --text reports, then the files in the order given.
    """
    from index.labelers import get_extractor

    try:
        fn = get_extractor(extractor)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    paths = [*(file or []), *(files or [])]
    if not text and not paths:
        raise typer.BadParameter("give --text TEXT or --file FILE...")
    for t in text or []:
        typer.echo(json.dumps(fn(t)))
    for p in paths:
        for t in _report_texts(Path(p)):
            typer.echo(json.dumps(fn(t)))


@app.command("label-eval")
def label_eval(openi: Annotated[Path, typer.Option("--openi", help="Open-i ecgen-radiology .tgz or folder")],
               out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and table.md")],
               repeats: Annotated[int, typer.Option(help="timing runs per extractor (best is kept)")] = 3) -> None:
    """Kappa between the two report labelers, their per-label P/R/F1 against MeSH-derived labels (all
    reports, even and odd ids), the MeSH -> CheXpert mapping used, and their speed."""
    from index import label_eval as le
    from model_training.openi import read_reports

    logs.configure()
    metrics = le.evaluate(read_reports(openi), repeats=repeats)
    mj, tm = le.write(metrics, out)
    a = metrics["agreement"]
    typer.echo(json.dumps({"metrics": str(mj), "table": str(tm), "kappa_4class": round(a["kappa_4class"], 4),
                           "kappa_binary": round(a["kappa_binary"], 4),
                           "micro_f1_vs_mesh": {e: round(x["vs_mesh"]["micro"]["f1"], 4)
                                                for e, x in metrics["extractors"].items()},
                           "held_labels": metrics["held_labels"],
                           "below_f1_target": {e: {k: round(v, 4) for k, v in x["shortfalls"].items()}
                                               for e, x in metrics["extractors"].items()},
                           "reports_per_second": {e: round(x["throughput"]["reports_per_second"])
                                                  for e, x in metrics["extractors"].items()}}))
