"""The one canonical list of the 14 CheXpert labels, in the order every head and file uses."""

LABELS: tuple[str, ...] = (
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
)
N_LABELS = len(LABELS)

# CheXpert's hierarchy: Lung Opacity is the parent of these (in LABELS order). A positive child
# makes Lung Opacity positive in the phantoms, the MeSH-derived Open-i labels and the report labelers.
OPACITY_CHILDREN: tuple[str, ...] = ("Lung Lesion", "Edema", "Consolidation", "Pneumonia", "Atelectasis")
# The labels whose presence makes a study abnormal: all but No Finding and Support Devices.
PATHOLOGIES: tuple[str, ...] = tuple(k for k in LABELS if k not in ("No Finding", "Support Devices"))
