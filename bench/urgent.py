"""bench urgent: how often the default urgency rules flag phantoms that are urgent, and how often
they flag ones that are not, with a bundle predicting phantoms whose findings are known.

Reference standard (what a triage product is meant to flag): a pneumothorax of any size, or a
*large* pleural effusion; the phantom generator draws each with a size (small, moderate, large).
The rules cannot see size (the CheXpert label has none), so the false flags are split by cause:
a small or moderate effusion (flagged by design: the label has no size), or a finding that is not
there at all (a real false alarm). The same run also gives the figures against "any effusion".

The phantoms come from a seed of their own (not the bundle's training seed), rendered in memory as
the generator writes them (phantoms.render, to_dicom) and read back as the node reads an
image (models.preprocess.read_image). Usage (prints one JSON object):

    python -m bench.urgent --bundle BUNDLE --n 400 --seed 1001 [--rules '{"Pneumothorax": "high"}']
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from models.urgency import DEFAULT_RULES, assess, check_rules

EFFUSION, PNEUMOTHORAX = "Pleural Effusion", "Pneumothorax"


def reference(case) -> tuple[bool, str]:
    """(urgent by the reference standard, why): a pneumothorax, or a large pleural effusion."""
    if case.labels[PNEUMOTHORAX]:
        return True, f"pneumothorax ({case.findings[PNEUMOTHORAX]['size']})"
    if case.labels[EFFUSION] and case.findings[EFFUSION]["size"] == "large":
        return True, "large effusion"
    if case.labels[EFFUSION]:
        return False, f"{case.findings[EFFUSION]['size']} effusion"
    return False, "neither"


def _rate(a: int, b: int) -> float | None:
    return round(a / b, 4) if b else None


def run(bundle: Path, n: int = 400, seed: int = 1001, rules: Mapping[str, str] = DEFAULT_RULES,
        render_size: int = 512, batch: int = 16, device: str | None = None) -> dict:
    """The measurement; returns its JSON-able result."""
    import phantoms
    from models.bundle import load_bundle
    from models.predictor import Predictor
    from models.preprocess import read_image

    rules = check_rules(rules)
    t0 = time.perf_counter()
    predictor = Predictor(load_bundle(Path(bundle)), device=device)
    cases = phantoms.sample_cases(n, seed)
    rows: list[dict[str, Any]] = []
    for start in range(0, n, batch):
        chunk = cases[start:start + batch]
        images = []
        for i, case in enumerate(chunk, start):
            px, meta = phantoms.render(case, seed=seed * 1000003 + i, size=render_size)
            images.append(read_image(phantoms.to_dicom(px, meta, case, uid_seed=f"bench-urgent:{seed}")))
        for case, prediction in zip(chunk, predictor.predict(images)):
            urgency = assess(prediction, rules)
            truth, why = reference(case)
            rows.append({"truth": truth, "why": why, "flagged": urgency.is_urgent, "by": urgency.labels,
                         "ood": prediction.out_of_distribution, "validated": urgency.confidence_validated,
                         "effusion": bool(case.labels[EFFUSION])})
    seconds = time.perf_counter() - t0

    urgent = [r for r in rows if r["truth"]]
    routine = [r for r in rows if not r["truth"]]
    by_cause = {}
    for why in sorted({r["why"] for r in rows}):
        group = [r for r in rows if r["why"] == why]
        by_cause[why] = {"n": len(group), "flagged": sum(r["flagged"] for r in group)}
    any_effusion = [r for r in rows if r["truth"] or r["effusion"]]
    neither = [r for r in rows if not (r["truth"] or r["effusion"])]
    model = predictor.bundle.identity()
    return {
        "benchmark": "urgent",
        "rules": rules,
        "reference": "urgent = pneumothorax (any size) or large pleural effusion",
        "bundle": {"name": model.name, "digest": model.short_digest, "synthetic_training": model.synthetic_training},
        "phantoms": {"n": n, "seed": seed, "render_size": render_size},
        "urgent": {"n": len(urgent), "flagged": sum(r["flagged"] for r in urgent),
                   "fraction_flagged": _rate(sum(r["flagged"] for r in urgent), len(urgent))},
        "not_urgent": {"n": len(routine), "flagged": sum(r["flagged"] for r in routine),
                       "fraction_flagged_by_mistake": _rate(sum(r["flagged"] for r in routine), len(routine))},
        "by_cause": by_cause,
        "against_any_effusion": {
            "urgent_n": len(any_effusion),
            "fraction_flagged": _rate(sum(r["flagged"] for r in any_effusion), len(any_effusion)),
            "not_urgent_n": len(neither),
            "fraction_flagged_by_mistake": _rate(sum(r["flagged"] for r in neither), len(neither)),
        },
        "flags_by_rule": dict(Counter(label for r in rows for label in r["by"])),
        "out_of_distribution": sum(r["ood"] for r in rows),
        "flags_with_confidence_not_validated": sum(r["flagged"] and not r["validated"] for r in rows),
        "seconds": round(seconds, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.urgent", description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--seed", type=int, default=1001)
    parser.add_argument("--rules", type=json.loads, default=dict(DEFAULT_RULES), help="JSON: label -> tier")
    parser.add_argument("--render-size", type=int, default=512)
    parser.add_argument("--device", default=None)
    a = parser.parse_args(argv)
    print(json.dumps(run(a.bundle, a.n, a.seed, a.rules, a.render_size, device=a.device)))


if __name__ == "__main__":
    main()
