"""Training and evaluation: train, evaluate, build-bundle (models/ on frozen encoder features) and
phantoms (the synthetic radiographs they are fitted and measured on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from worker import logs

app = typer.Typer()


@app.command("build-bundle")
def build_bundle(out: Annotated[Path, typer.Option("--out")], n: int = 400, seed: int = 0,
                 encoder: Annotated[str, typer.Option(help="t512 (MedSAM2) or tiny (tests)")] = "t512",
                 checkpoint: Annotated[Path | None, typer.Option(help="MedSAM2 checkpoint")] = None) -> None:
    """Train the phantom B5 bundle (what `up` builds on first start) into a folder."""
    from model_training.default_bundle import build_default_bundle

    logs.configure()
    card = build_default_bundle(out, n=n, seed=seed, spec=encoder, checkpoint=checkpoint)
    typer.echo(json.dumps({"bundle": str(out), "digest": card["digest"], "metrics": card["metrics"],
                           "validation": card["validation"]}, indent=1))


DataOpt = Annotated[str, typer.Option("--data", help="phantoms:N[:SEED] (rendered in memory), "
                                                    "openi:REPORTS,IMAGES[,METADATA_CSV], a manifest CSV, "
                                                    "or a folder with manifest.csv")]
EncoderOpt = Annotated[str, typer.Option("--encoder", help="t512 (the MedSAM2 graph) or tiny (tests)")]
SizeOpt = Annotated[int | None, typer.Option("--image-size", help="encoder input px (default: the spec's, 512 "
                                                                      "for t512; 224 tiles Hiera's windows exactly)")]
CkptOpt = Annotated[Path | None, typer.Option("--checkpoint", help="MedSAM2 checkpoint (MedSAM2_latest.pt)")]
CacheOpt = Annotated[Path, typer.Option("--cache", help="feature cache folder")]
PrecisionOpt = Annotated[str, typer.Option("--precision", help="feature precision: auto (bf16 on CUDA, fp32 on CPU), "
                                                               "bf16 or fp32")]
OodOpt = Annotated[list[str] | None, typer.Option("--ood", help="NAME=MANIFEST, repeatable; default: phantom "
                                                                    "lateral and non-chest sets of --n-ood images")]
_CACHE = Path.home() / ".cache" / "medsam2-cxr" / "features"


def _dataset(data: str, render_size: int, n_ood: int, ood: list[str] | None, split_seed: int = 0):
    from model_training.data import load_dataset

    named = {}
    for spec in ood or []:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise typer.BadParameter(f"--ood {spec!r}: expected NAME=MANIFEST_OR_FOLDER")
        named[name] = Path(path)
    return load_dataset(data, size=render_size, n_ood=n_ood, ood=named, split_seed=split_seed)


@app.command()
def train(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="bundle folder to write")],
          variant: Annotated[str, typer.Option(help="B0, B1, B3, B4 or B5")] = "B5",
          seed: int = 0, split_seed: int = 0, encoder: EncoderOpt = "t512", image_size: SizeOpt = None,
          checkpoint: CkptOpt = None, cache: CacheOpt = _CACHE,
          render_size: Annotated[int, typer.Option(help="phantom render size")] = 512,
          n_ood: Annotated[int, typer.Option(help="phantom OOD images per set, measured into the card")] = 0,
          ood: OodOpt = None, epochs: int = 60, precision: PrecisionOpt = "auto",
          device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None) -> None:
    """Train one variant on frozen (cached) features and write a bundle whose card says how it was built."""
    import torch

    from model_training.train import train_bundle

    logs.configure()
    ds = _dataset(data, render_size, n_ood, ood, split_seed)
    card = train_bundle(ds, variant, seed, out, spec=encoder, image_size=image_size, checkpoint=checkpoint,
                        cache_dir=cache, split_seed=split_seed, epochs=epochs, precision=precision,
                        device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    typer.echo(json.dumps({"bundle": str(out), "digest": card["digest"], "variant": card["variant"],
                           "test": card["metrics"]["test"]}, indent=1))


@app.command()
def evaluate(data: DataOpt, out: Annotated[Path, typer.Option("--out", help="folder for metrics.json, table.md, plots")],
             seeds: Annotated[int, typer.Option(help="seeds per variant")] = 5,
             variants: Annotated[str, typer.Option(help="comma-separated")] = "B0,B1,B3,B4,B5",
             split_seed: int = 0, encoder: EncoderOpt = "t512", image_size: SizeOpt = None,
             checkpoint: CkptOpt = None, cache: CacheOpt = _CACHE,
             render_size: Annotated[int, typer.Option(help="phantom render size")] = 512,
             n_ood: Annotated[int, typer.Option(help="phantom OOD images per set when no --ood is given")] = 256,
             ood: OodOpt = None,
             shift_pairs: Annotated[float, typer.Option(help="share of training images with a shifted copy (B5)")] = 1.0,
             epochs: int = 60, precision: PrecisionOpt = "auto",
             device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda when available)")] = None) -> None:
    """Every variant over --seeds seeds: metrics.json, table.md (paper's Table 2 layout) and PNG plots."""
    import torch

    from model_training.evaluate import EvalConfig, run_evaluation
    from model_training.train import load_encoder
    from models.encoder import SPECS
    from models.features import FeatureExtractor

    logs.configure()
    cfg = EvalConfig(seeds=seeds, variants=tuple(v.strip() for v in variants.split(",") if v.strip()),
                     split_seed=split_seed, shift_pair_fraction=shift_pairs, epochs=epochs)
    ds = _dataset(data, render_size, n_ood, ood, split_seed)
    enc_model, digest, weights = load_encoder(encoder, checkpoint)
    size = int(image_size or SPECS[encoder].image_size)
    dev = device or ("cuda" if torch.cuda.is_available() else "cpu")
    extract = FeatureExtractor(enc_model, size, digest, cache, batch_size=32 if dev == "cuda" else 8, device=dev,
                               precision=precision)
    report = run_evaluation(ds, extract, out, {"spec": encoder, "image_size": size, "weights": weights,
                                               "digest": digest, "render_size": render_size,
                                               "precision": extract.precision}, cfg)
    typer.echo((out / "table.md").read_text())
    typer.echo(f"metrics: {out / 'metrics.json'}; total {report['timing']['total_s'] / 60:.1f} min", err=True)


@app.command()
def phantoms(n: Annotated[int, typer.Option("--n")], out: Annotated[Path, typer.Option("--out")],
             seed: Annotated[int, typer.Option("--seed")] = 0,
             shift: Annotated[float, typer.Option(help="device shift intensity: 0 none, 1 training max, 2 twice")] = 0.0,
             view: Annotated[str, typer.Option(help="frontal or lateral")] = "frontal",
             kind: Annotated[str, typer.Option(help="chest or nonchest")] = "chest",
             size: int = 1024) -> None:
    """Synthetic phantom radiographs with known findings: DICOM files, reports and a manifest."""
    from phantoms import generate

    manifest = generate(n, out, seed=seed, shift=shift, view=view, kind=kind, size=size, progress=True)
    typer.echo(str(manifest))
