"""Dataset layouts (MVTec AD, VisA, Folder) -> typed `Sample` lists, with auto-detection.

Every layout is turned into the same two lists (normal training candidates and the test set) so
that shot selection, preprocessing and the feature file never know where the data came from.
Listings are sorted, so the order of `features.h5` never depends on the filesystem's order.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

from iipad_cli.errors import IipadError

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
LAYOUTS = ("auto", "mvtec", "visa", "folder")
VISA_SPLIT_CSV = Path("split_csv") / "1cls.csv"
VISA_COLUMNS = ("object", "split", "label", "image", "mask")
NORMAL_DEFECT = "good"

Split = Literal["train", "test"]


@dataclass(frozen=True)
class Sample:
    """One image of a data set.

    `label` is 0 (normal) or 1 (anomalous). `mask_path` is None for normal images (their ground
    truth is all-False by definition) and for anomalies whose layout has no mask for them; the
    latter are the only samples without a usable ground truth (`has_mask` False), which is how
    the Folder layout lets people evaluate products they never annotated pixel by pixel.
    """

    path: Path
    rel_path: str
    mask_path: Path | None
    cls: str
    defect: str
    label: int
    split: Split

    @property
    def has_mask(self) -> bool:
        return self.label == 0 or self.mask_path is not None


@dataclass(frozen=True)
class Dataset:
    """A data root read through one layout: normal training candidates and the test set."""

    root: Path
    layout: str
    classes: tuple[str, ...]
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]


def is_image(path: Path) -> bool:
    return path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS


def _images_in(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if is_image(p)), key=lambda p: p.name)


def _subdirs(directory: Path) -> list[Path]:
    return sorted((p for p in directory.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)


def _sample_order(sample: Sample) -> tuple[str, str]:
    return (sample.cls, sample.rel_path)


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _find_mask(mask_dir: Path, stem: str) -> Path | None:
    """`<stem>_mask.<ext>` in `mask_dir`, with any image extension in any case."""
    if not mask_dir.is_dir():
        return None
    wanted = f"{stem}_mask"
    for candidate in _images_in(mask_dir):
        if candidate.stem == wanted:
            return candidate
    return None


def _filter_classes(found: Sequence[str], wanted: Sequence[str] | None, root: Path) -> tuple[str, ...]:
    if not wanted:
        return tuple(found)
    unknown = [name for name in wanted if name not in found]
    if unknown:
        raise IipadError(f"{root}: no class {', '.join(unknown)} (found: {', '.join(found) or 'none'})")
    return tuple(name for name in found if name in set(wanted))


def _load_tree(root: Path, classes: Sequence[str] | None, *, masks_required: bool, layout: str) -> Dataset:
    """MVTec AD and Folder: `<cls>/train/good`, `<cls>/test/<defect>`, `<cls>/ground_truth/<defect>`.

    MVTec requires a mask for every anomaly (a missing one means a broken download); Folder
    allows anomalies without masks.
    """
    class_dirs = {d.name: d for d in _subdirs(root)}
    selected = _filter_classes(sorted(class_dirs), classes, root)
    train: list[Sample] = []
    test: list[Sample] = []
    for name in selected:
        class_dir = class_dirs[name]
        good_dir = class_dir / "train" / NORMAL_DEFECT
        if not good_dir.is_dir():
            raise IipadError(f"{class_dir}: class {name!r} has no train/good directory")
        for image in _images_in(good_dir):
            train.append(Sample(image, _rel(image, root), None, name, NORMAL_DEFECT, 0, "train"))
        test_dir = class_dir / "test"
        if not test_dir.is_dir():
            continue
        for defect_dir in _subdirs(test_dir):
            defect = defect_dir.name
            label = 0 if defect == NORMAL_DEFECT else 1
            for image in _images_in(defect_dir):
                mask = None
                if label:
                    mask = _find_mask(class_dir / "ground_truth" / defect, image.stem)
                    if mask is None and masks_required:
                        expected = class_dir / "ground_truth" / defect / f"{image.stem}_mask.png"
                        raise IipadError(
                            f"{expected}: missing mask for {_rel(image, root)} "
                            "(use --layout folder to allow anomalies without masks)"
                        )
                test.append(Sample(image, _rel(image, root), mask, name, defect, label, "test"))
    return Dataset(root=root, layout=layout, classes=selected, train=tuple(train), test=tuple(test))


def _visa_defects(root: Path, obj: str) -> dict[str, str]:
    """Defect names per image from `<obj>/image_anno.csv` when the release has it (not in 1cls.csv)."""
    anno = root / obj / "image_anno.csv"
    if not anno.is_file():
        return {}
    with anno.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"image", "label"} <= set(reader.fieldnames):
            return {}
        return {row["image"]: row["label"] for row in reader if row.get("image") and row.get("label")}


def _load_visa(root: Path, classes: Sequence[str] | None) -> Dataset:
    """VisA: rows of `split_csv/1cls.csv`; train = split "train" rows labelled normal."""
    csv_path = root / VISA_SPLIT_CSV
    with csv_path.open(newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = tuple(next(reader, ()))
        if header != VISA_COLUMNS:
            raise IipadError(f"{csv_path}: header {','.join(header)!r} is not {','.join(VISA_COLUMNS)!r}")
        rows = [(line, row) for line, row in enumerate(reader, start=2) if row]
    found = sorted({row[0] for _, row in rows})
    selected = _filter_classes(found, classes, root)
    defects = {obj: _visa_defects(root, obj) for obj in selected}
    train: list[Sample] = []
    test: list[Sample] = []
    for line, row in rows:
        if len(row) != len(VISA_COLUMNS):
            raise IipadError(f"{csv_path}:{line}: expected {len(VISA_COLUMNS)} fields, got {len(row)}")
        obj, split, label_name, image_rel, mask_rel = row
        if obj not in selected:
            continue
        if split not in ("train", "test") or label_name not in ("normal", "anomaly"):
            raise IipadError(f"{csv_path}:{line}: unknown split {split!r} or label {label_name!r}")
        label = int(label_name == "anomaly")
        if split == "train" and label:
            continue
        image = root / image_rel
        if not image.is_file():
            raise IipadError(f"{image}: listed in {csv_path}:{line} but missing")
        mask = None
        if label and mask_rel:
            mask = root / mask_rel
            if not mask.is_file():
                raise IipadError(f"{mask}: listed in {csv_path}:{line} but missing")
        defect = NORMAL_DEFECT if not label else defects[obj].get(image_rel, "anomaly")
        sample = Sample(image, _rel(image, root), mask, obj, defect, label, cast(Split, split))
        (train if split == "train" else test).append(sample)
    return Dataset(
        root=root,
        layout="visa",
        classes=selected,
        train=tuple(sorted(train, key=_sample_order)),
        test=tuple(sorted(test, key=_sample_order)),
    )


def detect_layout(root: Path) -> str:
    """`visa` when `split_csv/1cls.csv` exists; `mvtec` when every class has `ground_truth/`; else `folder`."""
    if (root / VISA_SPLIT_CSV).is_file():
        return "visa"
    class_dirs = _subdirs(root)
    if class_dirs and all((d / "ground_truth").is_dir() for d in class_dirs):
        return "mvtec"
    return "folder"


def load_dataset(root: Path, layout: str = "auto", classes: Sequence[str] | None = None) -> Dataset:
    """Read `root` through `layout` ("auto" detects it), keeping only `classes` when given."""
    if layout not in LAYOUTS:
        raise IipadError(f"{root}: unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise IipadError(f"{root}: no such directory")
    if not any(not p.name.startswith(".") for p in root.iterdir()):
        raise IipadError(f"{root}: empty directory")
    if (root / "train" / NORMAL_DEFECT).is_dir():
        raise IipadError(f"{root}: looks like a single class (it has train/good); pass its parent directory")
    chosen = detect_layout(root) if layout == "auto" else layout
    if chosen == "visa":
        if not (root / VISA_SPLIT_CSV).is_file():
            raise IipadError(f"{root / VISA_SPLIT_CSV}: missing; the VisA layout needs it")
        dataset = _load_visa(root, classes)
    else:
        dataset = _load_tree(root, classes, masks_required=chosen == "mvtec", layout=chosen)
    if not dataset.classes:
        raise IipadError(f"{root}: no class directories found")
    return dataset
