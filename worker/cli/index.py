"""The similar prior cases index (index/): index build, add, evaluate; and sources rank."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker import logs

app = typer.Typer()

index_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Similar prior cases index (index/).")
sources_app = typer.Typer(add_completion=False, no_args_is_help=True, help="Training source selection by box coverage.")
app.add_typer(index_app, name="index")
app.add_typer(sources_app, name="sources")
IndexData = Annotated[Path, typer.Option("--data", exists=True, help="manifest CSV (path, report, labels) or phantom folder")]
IndexBundle = Annotated[Path, typer.Option("--bundle", exists=True, file_okay=False, help="model bundle folder")]


@index_app.command("build")
def index_build(data: IndexData, bundle: IndexBundle, out: Annotated[Path, typer.Option("--out")],
                source: Annotated[str | None, typer.Option(help="source name (default: site/device column or folder)")] = None,
                cache: Annotated[Path | None, typer.Option("--cache-dir", help="encoder feature cache")] = None,
                extractor: Annotated[str, typer.Option(help="labeler for reports without labels")] = "lexicon",
                split: Annotated[str | None, typer.Option(help="only manifest rows of this split (e.g. train)")] = None) -> None:
    """A new index: the bundle's box per image, de-identified report text and labels per case."""
    from index.build import run

    logs.configure()
    typer.echo(json.dumps(run(data, bundle, out, source=source, cache_dir=cache, extractor=extractor, split=split)))


@index_app.command("add")
def index_add(data: IndexData, bundle: IndexBundle, index: Annotated[Path, typer.Option("--index", exists=True)],
              source: Annotated[str | None, typer.Option(help="source name (default: site/device column or folder)")] = None,
              cache: Annotated[Path | None, typer.Option("--cache-dir", help="encoder feature cache")] = None,
              extractor: Annotated[str, typer.Option(help="labeler for reports without labels")] = "lexicon") -> None:
    """Append a site's own de-identified cases to an index built with the same bundle."""
    from index.build import run

    logs.configure()
    typer.echo(json.dumps(run(data, bundle, index, add=True, source=source, cache_dir=cache, extractor=extractor)))


@index_app.command("evaluate")
def index_evaluate(out: Annotated[Path, typer.Option("--out", help="folder for metrics.json and table.md")],
                   bundle: Annotated[Path | None, typer.Option(help="bundle (default: train a tiny phantom bundle)")] = None,
                   n_index: int = 1000, n_test: int = 200, n_site: int = 160,
                   cache: Annotated[Path | None, typer.Option("--cache-dir")] = None,
                   latency_sizes: Annotated[str, typer.Option(help="comma-separated index sizes")] = "1000,10000,100000",
                   extractor: str = "lexicon", seed: int = 0) -> None:
    """Label-F1 of drafts, precision@5, latency, ANN recall and source selection on phantoms."""
    from index.evaluate import EvalConfig, run_evaluation

    logs.configure()
    cfg = EvalConfig(n_index=n_index, n_test=n_test, n_site=n_site, extractor=extractor, seed=seed,
                     latency_sizes=tuple(int(s) for s in latency_sizes.split(",") if s.strip()))
    run_evaluation(out, cfg, bundle_dir=bundle, cache_dir=cache)
    typer.echo((out / "table.md").read_text())


@sources_app.command("rank", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def sources_rank(ctx: typer.Context, target: Annotated[Path, typer.Option("--target", exists=True)],
                 sources: Annotated[str, typer.Option("--sources", help="candidate source folders: --sources A B C")],
                 bundle: IndexBundle,
                 cache: Annotated[Path | None, typer.Option("--cache-dir")] = None) -> None:
    """Rank candidate training sources (data or index folders) by how well their boxes cover the target's."""
    from index.sources import rank_folders

    logs.configure()
    folders = [Path(sources), *(Path(a) for a in ctx.args)]
    missing = [str(f) for f in folders if not f.exists()]
    if missing:
        raise typer.BadParameter(f"source folders not found: {missing}")
    for rank, s in enumerate(rank_folders(target, folders, bundle, cache), 1):
        typer.echo(json.dumps({"rank": rank, "source": s.name, "coverage": round(s.coverage, 4), "boxes": s.n_boxes}))
