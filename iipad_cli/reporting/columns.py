"""The metric columns of a metrics document: their keys, labels and the table caption.

A new column is a key here, its label, and its computation in `document.evaluate_class`.
"""

SCHEMA = "iipad-metrics/1"
IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_aupr_sklearn_stepwise_ap"
PIXEL_AUROC = "pixel_auroc"
AU_PRO = "au_pro"
LEGACY_PRO = "legacy_pro_released_code_not_comparable"
LABELS = {
    IMAGE_AUROC: "image AUROC",
    IMAGE_AP: "image AUPR (sklearn step-wise AP)",
    PIXEL_AUROC: "pixel AUROC",
    AU_PRO: "AU-PRO (MVTec definition)",
    LEGACY_PRO: "PRO legacy (released-code variant, not comparable)",
}
CAPTION = (
    "values in %; n/a = NaN (one label in the class) or no masks; "
    "AUPR = sklearn average_precision_score (step-wise average precision, no interpolation)"
)


def metric_keys(pro_variant: str) -> tuple[str, ...]:
    """The columns of a document, in order; the PRO column depends on the variant."""
    pro = AU_PRO if pro_variant == "exact" else LEGACY_PRO
    return (IMAGE_AUROC, IMAGE_AP, PIXEL_AUROC, pro)
