"""The local validation (and recalibration) as one self-contained HTML page: tables, the model
card's figures beside the local ones, a sentence wherever they disagree, and the plots embedded
as PNG (model_training.plots), so the page can be mailed or archived as one file."""

from __future__ import annotations

import base64
import datetime as dt
import html
from collections.abc import Mapping
from pathlib import Path

from models.labels import LABELS

_CSS = """body{font-family:sans-serif;margin:1.5em;max-width:80em;color:#222}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #bbb;padding:.25em .5em;font-size:.9em}
th{background:#eee}td.n{text-align:right}.warn{color:#a30}.muted{color:#777}img{max-width:100%}"""


def _fmt(fig: Mapping | None) -> str:
    if not fig or fig.get("value") is None:
        return '<span class="muted">-</span>'
    ci = fig.get("ci")
    return f"{fig['value']:.3f}" + (f' <span class="muted">({ci[0]:.3f}-{ci[1]:.3f})</span>' if ci else "")


def _num(v: float | None) -> str:
    return '<span class="muted">-</span>' if v is None else f"{v:.3f}"


def _img(path: Path, alt: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<p><img alt="{html.escape(alt)}" src="data:image/png;base64,{data}"></p>'


def _date(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).date().isoformat()


def _data_table(summary: Mapping) -> str:
    span = summary.get("received")
    rows = [("images", summary["images"]), ("patients (or studies)", summary["patients_or_studies"]),
            ("received", f"{_date(span[0])} to {_date(span[1])}" if span else "-"),
            ("calling AEs", ", ".join(f"{k} ({v})" for k, v in summary["calling_aets"].items())),
            ("devices", ", ".join(f"{k} ({v})" for k, v in summary["devices"].items())),
            ("left out", ", ".join(f"{k}: {v}" for k, v in summary.get("left_out", {}).items()) or "none")]
    return "<table>" + "".join(f"<tr><th>{html.escape(str(a))}</th><td>{html.escape(str(b))}</td></tr>"
                               for a, b in rows) + "</table>"


def _groups_table(title: str, groups: Mapping[str, Mapping]) -> str:
    if not groups:
        return ""
    head = ("<tr><th>" + html.escape(title) + "</th><th>images</th><th>macro-AUROC</th><th>Brier</th><th>ECE</th>"
            "<th>OOD rate</th></tr>")
    body = "".join(
        f"<tr><td>{html.escape(name)}</td><td class=n>{g['n_images']}</td>"
        + "".join(f"<td>{_fmt(g.get('overall', {}).get(m))}</td>" for m in ("macro_auroc", "brier", "ece", "ood_rate"))
        + "</tr>" for name, g in groups.items())
    return f"<table>{head}{body}</table>"


def validation_html(result: Mapping, summary: Mapping, bundle: Mapping, plots: Mapping[str, Path]) -> str:
    """The page for one `medsam2-cxr validate` run (result: local_validation.validate's dict)."""
    o, card = result["overall"], result["card"]
    says = result.get("disagreements", {})
    parts = [f"<h1>Local validation: {html.escape(bundle['name'])} {html.escape(bundle['version'])}</h1>",
             f"<p>Bundle digest <code>{html.escape(bundle['digest'][:12])}</code>. Reference: "
             f"{html.escape(result['truth'])}. Intervals: {100 * result['bootstrap']['level']:.0f}% bootstrap, "
             f"{result['bootstrap']['resamples']} resamples of whole patients (seed {result['bootstrap']['seed']}).</p>",
             "<h2>Local data</h2>", _data_table(summary),
             "<h2>Overall</h2><table><tr><th></th><th>local (95% CI)</th><th>model card</th></tr>"]
    for m, words in (("macro_auroc", "macro-AUROC"), ("brier", "Brier"), ("ece", "ECE"), ("ood_rate", "OOD rate")):
        parts.append(f"<tr><th>{words}</th><td>{_fmt(o['overall'].get(m))}</td><td>{_num(card['overall'].get(m))}</td></tr>")
    parts.append("</table>")
    parts += [f'<p class="warn">{html.escape(s)}</p>' for s in says.get("overall", [])]
    parts.append(f"<p class=muted>The model card's figures: {html.escape(str(card.get('data', '')))}"
                 f" ({card.get('n_test') or '?'} test images).</p>")
    parts.append("<h2>Per label</h2><table><tr><th>label</th><th>pos / neg (left out)</th><th>threshold</th>"
                 "<th>AUROC</th><th>card</th><th>sensitivity</th><th>card</th><th>specificity</th><th>card</th>"
                 "<th>Brier</th><th>ECE</th></tr>")
    for k in LABELS:
        r, c = o["labels"][k], card["labels"][k]
        counts = f"{r['n_positive']} / {r['n_negative']} ({r['n_left_out']})"
        thr = ", ".join(f"{t:g}" for t in r["thresholds"])
        if r.get("too_few"):
            parts.append(f"<tr><td>{html.escape(k)}</td><td class=n>{counts}</td><td>{thr}</td>"
                         f'<td colspan=8 class="muted">too few: {html.escape(r["too_few"])}</td></tr>')
            continue
        parts.append(f"<tr><td>{html.escape(k)}</td><td class=n>{counts}</td><td>{thr}</td>"
                     f"<td>{_fmt(r['auroc'])}</td><td>{_num(c['auroc'])}</td><td>{_fmt(r['sensitivity'])}</td>"
                     f"<td>{_num(c['sensitivity'])}</td><td>{_fmt(r['specificity'])}</td><td>{_num(c['specificity'])}</td>"
                     f"<td>{_fmt(r['brier'])}</td><td>{_fmt(r['ece'])}</td></tr>")
    parts.append("</table>")
    said = [s for k in LABELS for s in says.get(k, [])]
    parts += ([f'<p class="{"muted" if "too few to hold" in s else "warn"}">{html.escape(s)}</p>' for s in said]
              or ["<p>No label's local interval excludes the model card's figure.</p>"])
    parts += ["<h2>By calling AE</h2>", _groups_table("calling AE", result["by_calling_aet"]),
              "<h2>By device</h2>", _groups_table("device", result["by_device"])]
    parts += ["<h2>Plots</h2>"] + [_img(p, name) for name, p in plots.items()]
    return _page("Local validation", parts)


def recalibration_html(result: Mapping, summary: Mapping, plots: Mapping[str, Path]) -> str:
    """The page for one `medsam2-cxr recalibrate` run (model_training.recalibrate.recalibrate's dict)."""
    b, a = result["held"]["before"], result["held"]["after"]
    parts = [f"<h1>Recalibration: {html.escape(result['from']['version'])} &rarr; "
             f"{html.escape(result['to']['version'])}</h1>",
             f"<p>New bundle <code>{html.escape(result['to']['path'])}</code>, digest "
             f"<code>{html.escape(result['to']['digest'][:12])}</code>. Fitted on {result['fit']['images']} images of "
             f"{result['fit']['patients']} patients; figures on the {result['held']['images']} held-back images of "
             f"{result['held']['patients']} other patients.</p>", "<h2>Local data</h2>", _data_table(summary),
             "<h2>Held-back part</h2><table><tr><th></th><th>before</th><th>after</th></tr>"]
    for m, words in (("ece", "ECE"), ("brier", "Brier"), ("macro_auroc", "macro-AUROC")):
        parts.append(f"<tr><th>{words}</th><td>{_num(b[m])}</td><td>{_num(a[m])}</td></tr>")
    parts.append("</table><h2>Per label</h2><table><tr><th>label</th><th>temperature before</th><th>after</th>"
                 "<th>bias before</th><th>after</th><th>threshold before</th><th>after</th><th>criterion</th></tr>")
    for k in LABELS:
        r = result["labels"][k]
        parts.append(f"<tr><td>{html.escape(k)}</td><td>{r['temperature'][0]:.3f}</td><td>{r['temperature'][1]:.3f}</td>"
                     f"<td>{r['bias'][0]:+.2f}</td><td>{r['bias'][1]:+.2f}</td>"
                     f"<td>{r['threshold'][0]:.3f}</td><td>{r['threshold'][1]:.3f}</td>"
                     f"<td>{html.escape(r['criterion'])}{' (' + html.escape(r['note']) + ')' if r.get('note') else ''}"
                     "</td></tr>")
    parts.append("</table>")
    parts += ["<h2>Plots</h2>"] + [_img(p, name) for name, p in plots.items()]
    return _page("Recalibration", parts)


def _page(title: str, parts: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset=utf-8><title>{html.escape(title)}</title>"
            f"<style>{_CSS}</style></head><body>" + "\n".join(parts) + "</body></html>\n")
