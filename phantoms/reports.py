"""Free-text reports for phantom radiographs, consistent with their labels.

Rules (checked by tests/unit/test_phantoms.py):
- every sentence is purely positive, purely negative, or hedged; none mixes them;
- a label is mentioned in a plain positive sentence only when it is 1 and not uncertain;
- a hedged sentence ("may represent", "cannot exclude", "possible", "questionable") is used only
  for a positive label listed in the case's `uncertain` set (manifest value -1);
- a negated mention ("no", "without", "free of", "negative for", "normal", "clear") only for a 0.
"""

from __future__ import annotations

import numpy as np

from models.labels import OPACITY_CHILDREN

_LOBE = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
         "LUL": "left upper lobe", "LINGULA": "lingula", "LLL": "left lower lobe"}


def _pick(r: np.random.Generator, options):
    return options[int(r.integers(len(options)))]


def _side_word(side: str, plural_noun: str, noun: str) -> str:
    return f"bilateral {plural_noun}" if side == "bilateral" else f"{side} {noun}"


def _positive_sentences(lab, unc, f, r, view) -> tuple[list[str], list[str]]:
    """(findings sentences, impression items) for the positive labels, in reading order: heart and
    mediastinum, pleural spaces, lung parenchyma, then pleural other, bones and devices. The order
    is fixed: every phrase choice draws from the one report generator `r`."""
    fs: list[str] = []
    imp: list[str] = []
    for part in (_heart_and_mediastinum, _pleural_spaces, _lung_parenchyma, _other_findings):
        part(lab, unc, f, r, view, fs, imp)
    return fs, imp


def _heart_and_mediastinum(lab, unc, f, r, view, fs: list[str], imp: list[str]) -> None:
    """Cardiomegaly, enlarged cardiomediastinum."""
    if lab["Cardiomegaly"]:
        fs.append(_pick(r, ["The heart is enlarged.", "The cardiac silhouette is enlarged.",
                            "Cardiomegaly is present."]))
        imp.append(_pick(r, ["Cardiomegaly.", "Enlarged cardiac silhouette."]))
    if lab["Enlarged Cardiomediastinum"]:
        fs.append(_pick(r, ["The superior mediastinum is widened.",
                            "Widened upper mediastinal contour.",
                            "The cardiomediastinal silhouette is enlarged at the level of the upper mediastinum."]))
        imp.append("Widened mediastinum; correlate with CT as clinically indicated.")


def _pleural_spaces(lab, unc, f, r, view, fs: list[str], imp: list[str]) -> None:
    """Pleural effusion and pneumothorax (hedged when uncertain)."""
    if lab["Pleural Effusion"]:
        e = f.get("Pleural Effusion", {"side": "right", "size": "small"})
        where = _side_word(e["side"], "pleural effusions", "pleural effusion")
        if "Pleural Effusion" in unc:
            fs.append(_pick(r, [f"Blunting of the {e['side'].replace('bilateral', 'bilateral')} costophrenic angle; cannot exclude small effusion.",
                                f"Possible small {where}.",
                                "Subtle costophrenic angle blunting may represent a small effusion."]))
            imp.append("Possible small pleural effusion.")
        else:
            fs.append(_pick(r, [f"{e['size'].capitalize()} {where} with a meniscus.",
                                f"There is a {e['size']} {where}.",
                                f"{e['size'].capitalize()} {where}, blunting the costophrenic angle."]))
            imp.append(f"{e['size'].capitalize()} {where}.")
    if lab["Pneumothorax"]:
        p = f.get("Pneumothorax", {"side": "right", "size": "small", "apical": True})
        loc = "apical" if p["apical"] else "lateral"
        if "Pneumothorax" in unc:
            fs.append(_pick(r, [f"A faint {p['side']} {loc} pleural line may represent a small pneumothorax.",
                                f"Questionable small {p['side']} {loc} pneumothorax."]))
            imp.append(f"Possible small {p['side']} pneumothorax.")
        else:
            fs.append(_pick(r, [f"{p['size'].capitalize()} {p['side']} {loc} pneumothorax with a visible visceral pleural line.",
                                f"There is a {p['size']} {p['side']} pneumothorax."]))
            imp.append(f"{p['size'].capitalize()} {p['side']} pneumothorax.")


def _lung_parenchyma(lab, unc, f, r, view, fs: list[str], imp: list[str]) -> None:
    """Consolidation, pneumonia, edema, atelectasis, lesions, and an opacity without a named child."""
    sp = f.get("airspace")
    lobe = _LOBE[sp["lobe"]] if sp else "right lower lobe"
    bron = " with air bronchograms" if sp and sp.get("bronchogram") else ""
    if lab["Consolidation"]:
        if "Consolidation" in unc:
            fs.append(f"Hazy opacity in the {lobe} may represent early consolidation.")
            imp.append(f"Possible {lobe} consolidation.")
        else:
            fs.append(_pick(r, [f"Airspace consolidation in the {lobe}{bron}.",
                                f"There is consolidation of the {lobe}{bron}."]))
            imp.append(f"{lobe.capitalize()} consolidation.")
    if lab["Pneumonia"]:
        if "Pneumonia" in unc:
            fs.append(_pick(r, [f"Patchy opacity in the {lobe}; pneumonia cannot be excluded.",
                                f"Patchy {lobe} opacity may represent pneumonia."]))
            imp.append("Findings may represent pneumonia in the appropriate clinical setting.")
        else:
            fs.append(_pick(r, [f"Patchy airspace opacity in the {lobe}{bron}, compatible with pneumonia.",
                                f"Focal {lobe} airspace opacity consistent with pneumonia."]))
            imp.append(f"{lobe.capitalize()} pneumonia.")
    if lab["Edema"]:
        kl = f.get("Edema", {}).get("kerley")
        fs.append(_pick(r, ["Bilateral perihilar haziness consistent with pulmonary edema.",
                            "Interstitial edema with perihilar haziness."]) +
                  (" Kerley B septal lines at the lung bases." if kl and view == "frontal" else ""))
        imp.append(_pick(r, ["Pulmonary edema.", "Interstitial pulmonary edema."]))
    if lab["Atelectasis"]:
        a = f.get("Atelectasis", {"type": "plate", "side": "left"})
        if "Atelectasis" in unc:
            fs.append(f"Linear opacity at the {a['side']} lung base may represent atelectasis.")
            imp.append(f"Possible {a['side']} basilar atelectasis.")
        elif a["type"] == "plate":
            fs.append(_pick(r, [f"Plate-like atelectasis at the {a['side']} lung base.",
                                f"Linear {a['side']} basilar opacity compatible with subsegmental atelectasis."]))
            imp.append(f"{a['side'].capitalize()} basilar atelectasis.")
        else:
            fs.append(f"{a['side'].capitalize()} lower lobe atelectasis with volume loss and elevation of the hemidiaphragm.")
            imp.append(f"{a['side'].capitalize()} lower lobe collapse.")
    if lab["Lung Lesion"]:
        les = f.get("Lung Lesion", {"mass": False, "nodules": [{"side": "right", "r": 0.03}]})
        nd = les["nodules"]
        cm = 2 * nd[0]["r"] * 21.5
        if les["mass"]:
            fs.append(f"A {cm:.1f} cm mass in the {nd[0]['side']} lung.")
            imp.append(f"{nd[0]['side'].capitalize()} lung mass; CT recommended.")
        elif len(nd) == 1:
            fs.append(_pick(r, [f"A {cm:.1f} cm well-circumscribed nodule in the {nd[0]['side']} lung.",
                                f"Round {cm:.1f} cm nodule projecting over the {nd[0]['side']} lung."]))
            imp.append("Pulmonary nodule; CT recommended for further characterization.")
        else:
            fs.append(f"{len(nd)} well-defined pulmonary nodules, the largest {cm:.1f} cm.")
            imp.append("Multiple pulmonary nodules.")
    if lab["Lung Opacity"] and not any(lab[k] for k in OPACITY_CHILDREN):
        fs.append("Patchy lung opacity.")
        imp.append("Lung opacity.")


def _other_findings(lab, unc, f, r, view, fs: list[str], imp: list[str]) -> None:
    """Pleural plaques or thickening, rib fracture, support devices."""
    if lab["Pleural Other"]:
        po = f.get("Pleural Other", {"type": "thickening", "side": "right"})
        if po["type"] == "plaque":
            fs.append(f"Calcified pleural plaques, {po['side']}.")
            imp.append("Calcified pleural plaques, likely sequela of asbestos exposure.")
        else:
            fs.append(f"Pleural thickening along the {po['side']} lateral chest wall.")
            imp.append("Pleural thickening.")
    if lab["Fracture"]:
        fx = f.get("Fracture", {"side": "right", "rib": 5})
        n = fx["rib"] + 2
        suf = {1: "st", 2: "nd", 3: "rd"}.get(n, "th")
        fs.append(_pick(r, [f"Displaced fracture of the {fx['side']} posterior {n}{suf} rib with step-off.",
                            f"Acute {fx['side']} {n}{suf} rib fracture with cortical step-off."]))
        imp.append(f"{fx['side'].capitalize()} rib fracture.")
    if lab["Support Devices"]:
        kinds = f.get("Support Devices", {"kinds": ["ecg"]})["kinds"]
        words = {"ett": "Endotracheal tube with tip above the carina.",
                 "cvc": "Central venous catheter with tip in the superior vena cava.",
                 "ng": "Enteric tube courses below the diaphragm with tip in the stomach.",
                 "pacemaker": "Left chest wall pacemaker with leads in the right atrium and right ventricle.",
                 "ecg": "ECG monitoring electrodes overlie the chest."}
        for k in kinds:
            fs.append(words[k])
        imp.append("Support devices as described.")


def _negative_sentences(lab, r, view) -> list[str]:
    """Negations only of labels that are 0."""
    out: list[str] = []
    z = {k for k, v in lab.items() if v == 0}
    if "Cardiomegaly" in z and "Enlarged Cardiomediastinum" in z:
        out.append(_pick(r, ["The heart is normal in size.", "The cardiomediastinal silhouette is within normal limits.",
                             "Normal heart size and mediastinal contours."]))
    elif "Cardiomegaly" in z:
        out.append(_pick(r, ["The heart is normal in size.", "No cardiomegaly."]))
    elif "Enlarged Cardiomediastinum" in z:
        out.append("Mediastinal contours are normal.")
    if {"Lung Opacity", "Edema", "Consolidation", "Pneumonia", "Lung Lesion", "Atelectasis"} <= z:
        out.append(_pick(r, ["The lungs are clear.", "The lungs are clear without focal consolidation.",
                             "Lungs are free of focal airspace opacity.",
                             "No focal consolidation, edema or suspicious pulmonary nodule."]))
    else:
        if "Consolidation" in z and "Pneumonia" in z and "Lung Opacity" in z:
            out.append("No focal consolidation.")
        if "Edema" in z:
            out.append(_pick(r, ["No pulmonary edema.", "Negative for pulmonary edema."]))
        if "Lung Lesion" in z and r.random() < 0.5:
            out.append("No suspicious pulmonary nodule.")
    if "Pleural Effusion" in z and "Pneumothorax" in z:
        out.append(_pick(r, ["No pleural effusion or pneumothorax.", "No effusion or pneumothorax.",
                             "Negative for pleural effusion and pneumothorax.",
                             "The costophrenic angles are sharp without pleural effusion or pneumothorax."]))
    elif "Pleural Effusion" in z:
        out.append(_pick(r, ["No pleural effusion.", "Without pleural effusion."]))
    elif "Pneumothorax" in z:
        out.append(_pick(r, ["No pneumothorax.", "Negative for pneumothorax."]))
    if "Fracture" in z and r.random() < 0.6:
        out.append(_pick(r, ["No acute osseous abnormality.", "No displaced rib fracture.",
                             "Osseous structures are unremarkable."]))
    return out


def write_report(lab: dict, unc, f: dict, r: np.random.Generator, view: str = "frontal",
                 kind: str = "chest", part: str = "HAND", left_out: frozenset[str] = frozenset()) -> str:
    """The report of a case. ``left_out``: positive labels the report is silent on (no positive
    sentence, and no negation either), as a first reader who missed them writes it (bench.second_read);
    leaving out every opacity child also needs "Lung Opacity" left out, or the opacity is still named."""
    if kind == "nonchest":
        what = "hand" if part == "HAND" else "pelvis"
        return ("FINDINGS: Radiograph of the " + what + ". " +
                _pick(r, ["Osseous structures are intact.", "Bones are unremarkable.",
                          "Alignment is normal."]) +
                " No acute osseous abnormality.\nIMPRESSION: Negative " + what + " radiograph.")
    unc = set(unc)
    shown = {k: (0 if k in left_out else v) for k, v in lab.items()}
    pos, imp = _positive_sentences(shown, unc, f, r, view)
    neg = _negative_sentences(lab, r, view)  # negations only of labels that are 0: a left-out finding stays silent
    head = _pick(r, ["PA view of the chest.", "Frontal view of the chest.", "Single frontal radiograph of the chest."]) \
        if view == "frontal" else "Lateral view of the chest."
    body = pos + neg
    if len(pos) > 1:  # vary order but keep the heart first when present
        order = list(r.permutation(len(pos)))
        body = [pos[i] for i in order] + neg
    findings = " ".join([head] + body)
    if not imp:
        impression = _pick(r, ["No acute cardiopulmonary process.", "No acute cardiopulmonary abnormality.",
                               "Normal chest radiograph."])
    elif len(imp) == 1:
        impression = imp[0]
    else:
        impression = " ".join(f"{i + 1}. {s}" for i, s in enumerate(imp))
    return f"FINDINGS: {findings}\nIMPRESSION: {impression}"
