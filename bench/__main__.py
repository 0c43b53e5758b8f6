"""`python -m bench NAME`: the benchmarks' own entry point, outside the product.

The benchmarks import the product (the listener, the workers, the models); the product never
imports them. Each command prints one JSON object (see bench/__init__.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from bench import PeerMissing

bench_app = typer.Typer(add_completion=False, no_args_is_help=True,
                        help="Benchmarks against the best that exists for each stage; each prints one JSON object.")
WorkOpt = Annotated[Path | None, typer.Option("--work", help="scratch folder (default: a temporary one, removed)")]


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def _print(run, **kwargs: object) -> None:
    """The benchmark's one JSON object on stdout; a missing peer is said on stderr, exit code 1."""
    try:
        result = run(**kwargs)
    except PeerMissing as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    typer.echo(json.dumps(result))


@bench_app.command("ingest")
def bench_ingest(n: Annotated[int, typer.Option("--n", help="images")] = 40, rows: int = 2500, cols: int = 2048,
                 senders: Annotated[int, typer.Option(help="concurrent storescu processes in the second pass")] = 8,
                 repeats: int = 2,
                 probe_scale: Annotated[float, typer.Option(help="node-only pass at this scale per side (0: none)")] = 0.5,
                 work: WorkOpt = None) -> None:
    """storescu -> the node's listener against storescu -> DCMTK storescp: wall time, ratio, memory."""
    from bench import ingest

    _print(ingest.run, n=n, rows=rows, cols=cols, senders=senders, repeats=repeats, probe_scale=probe_scale,
           work=work)


@bench_app.command("infer")
def bench_infer(specs: Annotated[str, typer.Option(help="encoders, comma-separated")] = "t512,tiny",
                batches: Annotated[str, typer.Option(help="batch sizes, comma-separated")] = "1,8,32",
                repeats: int = 3, device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
                rows: int = 2500, cols: int = 2048, work: WorkOpt = None) -> None:
    """Full model step (Predictor.predict) against the encoder forward alone: images/s per batch size."""
    from bench import infer

    typer.echo(json.dumps(infer.run(specs=tuple(s.strip() for s in specs.split(",") if s.strip()),
                                    batches=_ints(batches), repeats=repeats, device=device, rows=rows, cols=cols,
                                    work=work)))


@bench_app.command("decode")
def bench_decode(rows: int = 2500, cols: int = 2048, repeats: int = 5,
                 threads: Annotated[int, typer.Option(help="threads for the overlap check (0: skip it)")] = 2,
                 work: WorkOpt = None) -> None:
    """pydicom's decoder plugins on JPEG 2000 and JPEG lossless radiographs: speed and exactness."""
    from bench import decode

    typer.echo(json.dumps(decode.run(rows=rows, cols=cols, repeats=repeats, threads=threads, work=work)))


@bench_app.command("e2e")
def bench_e2e(spec: Annotated[str, typer.Option(help="encoder of the benchmark bundle")] = "t512",
              bundle: Annotated[Path | None, typer.Option(help="a bundle to use instead")] = None,
              runs: Annotated[int, typer.Option(help="single-image latency runs")] = 20,
              burst: Annotated[int, typer.Option(help="images in the throughput burst")] = 200,
              rows: int = 2500, cols: int = 2048, device: Annotated[str, typer.Option(help="cpu or cuda")] = "",
              redis_url: str = "redis://127.0.0.1:6379/8", work: WorkOpt = None) -> None:
    """storescu -> node (Redis, gpu + io workers) -> Orthanc: latency p50/p95 and burst throughput."""
    from bench import e2e

    _print(e2e.run, spec=spec, bundle=bundle, runs=runs, burst=burst, rows=rows, cols=cols, device=device,
           redis_url=redis_url, work=work)


@bench_app.command("train")
def bench_train(n: Annotated[int, typer.Option("--n", help="phantom images")] = 300,
                encoder: Annotated[str, typer.Option(help="t512 or tiny")] = "t512", seeds: int = 5,
                variants: str = "B0,B1,B3,B4,B5", n_ood: Annotated[int, typer.Option("--n-ood")] = 64,
                epochs: int = 60, device: Annotated[str | None, typer.Option(help="cpu or cuda")] = None,
                work: WorkOpt = None) -> None:
    """The whole `medsam2-cxr evaluate` run with cached features (after one run that fills the cache)."""
    from bench import train

    typer.echo(json.dumps(train.run(n=n, encoder=encoder, seeds=seeds, variants=variants, n_ood=n_ood,
                                    epochs=epochs, device=device, work=work)))


@bench_app.command("operating-points")
def bench_operating_points(seeds: Annotated[str, typer.Option(help="phantom seeds no rule was tuned on, comma-separated")],
                           n: Annotated[int, typer.Option("--n", help="phantom images per seed")] = 800,
                           head_seeds: Annotated[int, typer.Option(help="head seeds per variant")] = 2,
                           work: WorkOpt = None) -> None:
    """Issue 16's done-when (B5 at least as accurate as B0, B1, B3 at their bundle thresholds) over several seeds."""
    from bench import operating_points

    _print(operating_points.run, seeds=_ints(seeds), n=n, head_seeds=head_seeds, work=work)


def main() -> None:
    from dicom_node.config import configure
    from worker import logs

    configure()  # as the product's command line does
    logs.configure()  # structlog JSON on stderr: stdout carries the one JSON object
    bench_app()


if __name__ == "__main__":
    main()
