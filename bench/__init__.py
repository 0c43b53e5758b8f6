"""Benchmarks that put each stage of the node beside the best that exists for it, in the same run.

Each module has one ``run(...) -> dict`` that ``python -m bench <name>`` prints as one JSON
object: ``ingest`` (the listener against DCMTK storescp), ``infer`` (the full model step against
the encoder forward alone), ``e2e`` (storescu -> node -> Orthanc against ``infer``'s rate),
``train`` (the evaluation on cached features) and ``operating-points`` (B5's accuracy at its
bundle thresholds against the baselines', over several phantom seeds). Timings on a shared
machine are noisy, so both sides of every ratio are measured in the same run, back to back or
interleaved; compare ratios across machines, not seconds. ``bench/gpu.sh`` runs ``bench.gpu`` on a GPU machine.

Run them with ``python -m bench NAME`` (bench/__main__.py). The benchmarks import the product;
the product never imports them.
"""

from worker.errors import Medsam2Error


class PeerMissing(Medsam2Error):
    """A program or server a benchmark runs against (DCMTK, Orthanc, Redis) is not there."""
