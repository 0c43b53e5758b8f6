"""The `medsam2-cxr` command: run the node (together or apart), infer offline, make phantoms.

One module per command group; this one only puts them together:

- worker.cli.node: up, listen, worker, console, status, audit, resend (the processes of one
  node: worker.cli.serve supervises them);
- worker.cli.infer: infer (the pipeline offline, no network);
- worker.cli.training: train, evaluate, build-bundle, phantoms;
- worker.cli.index: index build/add/evaluate, sources rank;
- worker.cli.labels: label, label-eval;
- worker.cli.model: model pull;
- worker.cli.validate: validate, recalibrate (local validation against the first readers' reports).

The benchmarks have their own entry point, `python -m bench`; the product never imports them.
"""

from __future__ import annotations

import typer

from worker.cli import index, infer, labels, model, node, training, validate

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__.split("\n\n")[0])
for _group in (node, infer, training, model, index, labels, validate):  # each module's commands and sub-groups
    app.registered_commands += _group.app.registered_commands
    app.registered_groups += _group.app.registered_groups


# Exit code of a command that found [store] url's database unreachable (dicom_node.database).
STORE_UNAVAILABLE_EXIT = 3


def main() -> None:
    from dicom_node.config import configure
    from dicom_node.database import StoreUnavailable

    configure()  # every pynetdicom/pydicom process-wide switch, once, before any command runs
    try:
        app()
    except StoreUnavailable as exc:  # a database away is said, not a traceback; a running node never gets here
        typer.echo(f"medsam2-cxr: {exc}", err=True)
        raise SystemExit(STORE_UNAVAILABLE_EXIT) from None
