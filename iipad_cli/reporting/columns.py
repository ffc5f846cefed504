"""The metric columns of a metrics document: their keys, labels and the table caption.

A new column is a key here, its label, and its computation in `document.evaluate_class`.
"""

# /2: the F1-max and pixel AP columns (a document of /1 has the first, fourth and last of them).
SCHEMA = "iipad-metrics/2"
IMAGE_AUROC = "image_auroc"
IMAGE_AP = "image_aupr_sklearn_stepwise_ap"
IMAGE_F1_MAX = "image_f1_max"
PIXEL_AUROC = "pixel_auroc"
PIXEL_AP = "pixel_aupr_sklearn_stepwise_ap"
PIXEL_F1_MAX = "pixel_f1_max"
AU_PRO = "au_pro"
LEGACY_PRO = "legacy_pro_released_code_not_comparable"
LABELS = {
    IMAGE_AUROC: "image AUROC",
    IMAGE_AP: "image AUPR (sklearn step-wise AP)",
    IMAGE_F1_MAX: "image F1-max",
    PIXEL_AUROC: "pixel AUROC",
    PIXEL_AP: "pixel AUPR (sklearn step-wise AP)",
    PIXEL_F1_MAX: "pixel F1-max",
    AU_PRO: "AU-PRO (MVTec definition)",
    LEGACY_PRO: "PRO legacy (released-code variant, not comparable)",
}
# Column headers of the table and the HTML report: short, so seven columns fit 80 characters;
# the caption says what they mean.
HEADERS = {
    IMAGE_AUROC: "image AUROC",
    IMAGE_AP: "image AP",
    IMAGE_F1_MAX: "image F1-max",
    PIXEL_AUROC: "pixel AUROC",
    PIXEL_AP: "pixel AP",
    PIXEL_F1_MAX: "pixel F1-max",
    AU_PRO: "AU-PRO",
    LEGACY_PRO: "PRO legacy (not comparable)",
}
CAPTION = (
    "values in %; n/a = NaN (one label in the class) or no masks; mean (k/n) = over the k of n classes "
    "with a value; AP = sklearn average_precision_score (step-wise, no interpolation), the paper's AUPR; "
    "F1-max = best F1 over all thresholds (chosen with the test labels: an upper bound); "
    "AU-PRO = MVTec definition"
)


def metric_keys(pro_variant: str) -> tuple[str, ...]:
    """The columns of a document, in order (the peers' order); the last, PRO, depends on the variant."""
    pro = AU_PRO if pro_variant == "exact" else LEGACY_PRO
    return (IMAGE_AUROC, IMAGE_AP, IMAGE_F1_MAX, PIXEL_AUROC, PIXEL_AP, PIXEL_F1_MAX, pro)
