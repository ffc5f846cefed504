"""`iipad metrics`: runs written per the scores.h5/features.h5 contract, and maps of any method."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score
from test_metrics import reference_au_pro, reference_legacy_pro, sklearn_f1_max
from typer.testing import CliRunner

from iipad_cli.artifacts import METRICS_CSV, METRICS_JSON, read_manifest, sha256_file
from iipad_cli.cli import app
from iipad_cli.schema.features_writer import FeatureShapes, FeaturesWriter
from iipad_cli.schema.scores import write_scores

R = 16
NATIVE = (40, 48)  # (H, W): not square, not a multiple of R
runner = CliRunner()


def make_data(root: Path) -> dict[str, list[tuple[str, str, int, np.ndarray]]]:
    """An MVTec-layout root: classes alpha, beta (good + crack) and gamma (good only in test).

    Returns per class the test rows (rel path, defect, label, native mask).
    """
    rng = np.random.default_rng(0)
    rows: dict[str, list[tuple[str, str, int, np.ndarray]]] = {}
    for name, defects in (("alpha", ("crack", "good")), ("beta", ("crack", "good")), ("gamma", ("good",))):
        (root / name / "train" / "good").mkdir(parents=True)
        Image.new("RGB", NATIVE[::-1]).save(root / name / "train" / "good" / "000.png")
        (root / name / "ground_truth").mkdir()
        rows[name] = []
        for defect in defects:
            (root / name / "test" / defect).mkdir(parents=True)
            for index in range(3):
                stem = f"{index:03d}"
                Image.new("RGB", NATIVE[::-1]).save(root / name / "test" / defect / f"{stem}.png")
                mask = np.zeros(NATIVE, dtype=bool)
                if defect != "good":
                    r, c = rng.integers(0, 30, 2)
                    mask[r : r + 8, c : c + 10] = True
                    mask[2, 2] = True  # a second, one-pixel region
                    (root / name / "ground_truth" / defect).mkdir(exist_ok=True)
                    Image.fromarray(mask.astype(np.uint8) * 255).save(root / name / "ground_truth" / defect / f"{stem}_mask.png")
                rows[name].append((f"{name}/test/{defect}/{stem}.png", defect, int(defect != "good"), mask))
    return rows


def small_mask(mask: np.ndarray) -> np.ndarray:
    """The mask at R x R (nearest): what features.h5 stores for the 224-style evaluation."""
    rr = (np.arange(R) * mask.shape[0] / R).astype(int)
    cc = (np.arange(R) * mask.shape[1] / R).astype(int)
    return mask[np.ix_(rr, cc)]


def make_run(
    run: Path, data: Path, rows: dict, seed: int, *, constant_maps: bool = False, masks: bool = True, layout: str = "mvtec"
) -> dict:
    """features.h5 + scores.h5 following the shared contract; returns what was written."""
    rng = np.random.default_rng(seed)
    flat = [(name, *row) for name, class_rows in rows.items() for row in class_rows]
    count = len(flat)
    labels = np.array([row[3] for row in flat], dtype=np.uint8)
    gt = np.stack([small_mask(row[4]) for row in flat])
    has_mask = np.array([masks or row[3] == 0 for row in flat])
    run.mkdir(parents=True)
    attrs = {"backbone_id": "tiny", "random_weights": True, "shots": 1, "seed": seed, "data_root": str(data), "layout": layout, "resolution": R,
             "vv_layers": [1], "memory_layers": [1]}
    shapes = FeatureShapes(cls_token=(2, 4), qformer=(2, 4), vv=(1, 2, 4), mem=(1, 2, 4))
    with FeaturesWriter(run / "features.h5", attrs, shapes, R) as writer:
        columns = {
            "path": [row[1] for row in flat],
            "cls": [row[0] for row in flat],
            "defect": [row[2] for row in flat],
            "label": labels,
            "has_mask": has_mask,
            "mask": gt,
            **{name: np.zeros((count, *shapes.of(name)), dtype=np.float16) for name in ("cls_token", "qformer", "vv", "mem")},
        }
        writer.append("test", columns)
        writer.mark_complete()
    if constant_maps:
        maps = np.repeat(rng.integers(0, 5, count).astype(np.float16)[:, None, None], R, 1).repeat(R, 2)
    else:
        maps = (rng.normal(size=(count, R, R)) + 1.2 * gt).astype(np.float16)
    components = {name: rng.normal(size=count).astype(np.float32) + labels for name in ("prompt_max", "visual_max", "p_normal", "retrieval_sim")}
    components["image_score"] = (maps.reshape(count, -1).max(1) + labels).astype(np.float32)
    score_attrs = {
        "preset": json.dumps({"name": "official"}),
        "backbone_id": "tiny",
        "random_weights": True,
        "shots": 1,
        "seed": seed,
        "resolution": R,
        "top_k": 1,
        "data_root": str(data),
        "features_sha256": sha256_file(run / "features.h5"),
        "generator_sha256": "0" * 64,
        "banks_sha256": "0" * 64,
    }
    with write_scores(run / "scores.h5", count, R, 1, score_attrs) as writer:
        writer.append(
            {
                "path": columns["path"],
                "cls": columns["cls"],
                "defect": columns["defect"],
                "label": labels,
                "has_mask": has_mask,
                "maps": maps,
                "retrieved": np.zeros((count, 1), dtype=np.int32),
                **components,
            }
        )
    names = np.array(columns["cls"])
    return {"cls": names, "labels": labels, "gt": gt, "maps": maps.astype(np.float64), "native": [row[4] for row in flat], **components}


@pytest.fixture()
def data_root(tmp_path: Path) -> tuple[Path, dict]:
    root = tmp_path / "data"
    return root, make_data(root)


def invoke(*args: str) -> tuple[int, str, str]:
    result = runner.invoke(app, ["metrics", *args])
    return result.exit_code, result.stdout, result.stderr


def test_json_matches_independent_computation_and_schema(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    written = make_run(tmp_path / "run", root, rows, seed=0)
    code, out, err = invoke(str(tmp_path / "run"), "--json", "--quiet")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"schema", "source", "info", "evaluation", "metrics", "labels", "classes", "mean", "warnings", "title", "at_threshold"}
    assert doc["schema"] == "iipad-metrics/2"
    assert doc["metrics"] == [
        "image_auroc", "image_aupr_sklearn_stepwise_ap", "image_f1_max",
        "pixel_auroc", "pixel_aupr_sklearn_stepwise_ap", "pixel_f1_max", "au_pro",
    ]  # fmt: skip
    assert "step-wise" in doc["labels"]["image_aupr_sklearn_stepwise_ap"]
    assert doc["evaluation"] == {"resolution": f"{R}x{R}", "image_score": "stored", "pro_limit": 0.3, "pro_variant": "exact"}
    assert doc["info"]["random_weights"] is True and "random weights" in doc["title"]
    for name in ("alpha", "beta"):
        rows_of = written["cls"] == name
        labels, scores = written["labels"][rows_of], written["image_score"][rows_of]
        cell = doc["classes"][name]
        assert cell["image_auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-9)
        assert cell["image_aupr_sklearn_stepwise_ap"] == pytest.approx(average_precision_score(labels, scores), abs=1e-9)
        assert cell["image_f1_max"] == pytest.approx(sklearn_f1_max(labels, scores), abs=1e-9)
        gt, maps = written["gt"][rows_of], written["maps"][rows_of]
        assert cell["pixel_auroc"] == pytest.approx(roc_auc_score(gt.ravel(), maps.ravel()), abs=1e-9)
        assert cell["pixel_aupr_sklearn_stepwise_ap"] == pytest.approx(average_precision_score(gt.ravel(), maps.ravel()), abs=1e-9)
        assert cell["pixel_f1_max"] == pytest.approx(sklearn_f1_max(gt.ravel(), maps.ravel()), abs=1e-9)
        assert cell["au_pro"] == pytest.approx(reference_au_pro(list(maps), list(gt), 0.3), abs=1e-6)
        assert (cell["images"], cell["anomalous"], cell["pixel_metrics"]) == (6, 3, True)
    gamma = doc["classes"]["gamma"]
    assert all(gamma[key] is None for key in doc["metrics"]) and gamma["pixel_metrics"] is False
    assert any("gamma" in w and "one label" in w for w in doc["warnings"])
    mean = doc["mean"]["image_auroc"]
    assert mean["classes"] == 2 and mean["of"] == 3
    assert mean["value"] == pytest.approx((doc["classes"]["alpha"]["image_auroc"] + doc["classes"]["beta"]["image_auroc"]) / 2)
    assert json.loads((tmp_path / "run" / METRICS_JSON).read_text())["classes"] == doc["classes"]
    assert read_manifest(tmp_path / "run")["stages"]["metrics"]["outputs"][METRICS_CSV] == sha256_file(tmp_path / "run" / METRICS_CSV)


def test_csv_has_header_and_mean_row(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    make_run(tmp_path / "run", root, rows, seed=0)
    code, out, _ = invoke(str(tmp_path / "run"), "--csv", "-q")
    assert code == 0
    table = list(csv.reader(io.StringIO(out)))
    assert table[0] == [
        "class", "image_auroc", "image_aupr_sklearn_stepwise_ap", "image_f1_max",
        "pixel_auroc", "pixel_aupr_sklearn_stepwise_ap", "pixel_f1_max", "au_pro", "images", "anomalous",
    ]  # fmt: skip
    assert [row[0] for row in table[1:]] == ["alpha", "beta", "gamma", "mean", "mean_classes_covered"]
    assert table[3][1] == "nan"
    assert (tmp_path / "run" / METRICS_CSV).read_text() == out


def test_several_runs_give_mean_and_std(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    runs = [tmp_path / f"run{seed}" for seed in range(3)]
    for seed, run in enumerate(runs):
        make_run(run, root, rows, seed=seed)
    single = [json.loads(invoke(str(run), "--json", "-q")[1]) for run in runs]
    code, out, err = invoke(*map(str, runs), "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    for key in ("pixel_auroc", "image_f1_max", "pixel_aupr_sklearn_stepwise_ap", "pixel_f1_max"):
        values = [d["classes"]["alpha"][key] for d in single]
        cell = doc["classes"]["alpha"][key]
        assert cell["per_run"] == values
        assert cell["mean"] == pytest.approx(sum(values) / 3)
        assert cell["std"] == pytest.approx(math.sqrt(sum((v - cell["mean"]) ** 2 for v in values) / 2))
    assert doc["info"]["seed"] == [0, 1, 2]
    code, table, _ = invoke(*map(str, runs), "--table", "-q")
    table = " ".join(table.split())
    assert code == 0 and "±" in table and "seeds 0/1/2" in table and "random weights" in table
    code, out, _ = invoke(*map(str, runs), "--csv", "-q")
    assert out.splitlines()[0].startswith("class,image_auroc_mean,image_auroc_std,")
    assert ",pixel_f1_max_mean,pixel_f1_max_std," in out.splitlines()[0]
    assert table.count("F1-max") >= 3  # image and pixel column headers, and the caption


def test_missing_scores_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "run").mkdir()
    code, out, err = invoke(str(tmp_path / "run"), "--json")
    assert code == 1 and out == ""
    assert len(err.strip().splitlines()) == 1 and "scores.h5" in err and "iipad score" in err


def test_changed_features_refused_unless_forced(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    make_run(tmp_path / "run", root, rows, seed=0)
    with h5py.File(tmp_path / "run" / "features.h5", "a") as handle:
        handle.attrs["edited"] = True
    code, _, err = invoke(str(tmp_path / "run"), "--json")
    assert code == 1 and "changed after" in err
    assert invoke(str(tmp_path / "run"), "--json", "--force", "-q")[0] == 0


@pytest.mark.parametrize("formula", ["paper", "official"])
def test_image_score_recomputed_from_components(tmp_path: Path, data_root: tuple[Path, dict], formula: str) -> None:
    root, rows = data_root
    w = make_run(tmp_path / "run", root, rows, seed=1)
    doc = json.loads(invoke(str(tmp_path / "run"), "--json", "-q", "--image-score", formula)[1])
    score = w["prompt_max"].astype(np.float64) + w["visual_max"]
    if formula == "official":
        score = score - w["p_normal"] - w["retrieval_sim"]
    keep = w["cls"] == "beta"
    assert doc["classes"]["beta"]["image_auroc"] == pytest.approx(roc_auc_score(w["labels"][keep], score[keep]), abs=1e-9)
    assert doc["evaluation"]["image_score"] == formula


def test_anomalies_without_masks_get_image_metrics_only(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    make_run(tmp_path / "run", root, rows, seed=0, masks=False)
    doc = json.loads(invoke(str(tmp_path / "run"), "--json", "-q")[1])
    alpha = doc["classes"]["alpha"]
    assert alpha["image_auroc"] is not None and alpha["pixel_auroc"] is None and alpha["pixel_metrics"] is False
    assert doc["mean"]["pixel_auroc"] == {"value": None, "classes": 0, "of": 3}


def test_legacy_variant_is_labelled(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    w = make_run(tmp_path / "run", root, rows, seed=0)
    doc = json.loads(invoke(str(tmp_path / "run"), "--json", "-q", "--pro-variant", "legacy")[1])
    key = "legacy_pro_released_code_not_comparable"
    assert doc["metrics"][-1] == key and "not comparable" in doc["labels"][key]
    keep = w["cls"] == "alpha"
    expected = reference_legacy_pro(list(w["maps"][keep]), list(w["gt"][keep]))
    assert doc["classes"]["alpha"][key] == pytest.approx(expected, abs=1e-9)
    code, table, _ = invoke(str(tmp_path / "run"), "--table", "-q", "--pro-variant", "legacy")
    assert "not comparable" in " ".join(table.split())


def test_native_resolution_reads_masks_from_the_data_root(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    """Constant maps upsample to constants, so the native pixel AUROC has a closed form."""
    root, rows = data_root
    w = make_run(tmp_path / "run", root, rows, seed=2, constant_maps=True)
    doc = json.loads(invoke(str(tmp_path / "run"), "--json", "-q", "--resolution", "native")[1])
    assert doc["evaluation"]["resolution"] == "native"
    keep = np.flatnonzero(w["cls"] == "alpha")
    truth = np.concatenate([w["native"][i].ravel() for i in keep])
    scores = np.concatenate([np.full(NATIVE, w["maps"][i, 0, 0]).ravel() for i in keep])
    assert doc["classes"]["alpha"]["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)


def test_maps_of_any_method(tmp_path: Path, data_root: tuple[Path, dict]) -> None:
    root, rows = data_root
    rng = np.random.default_rng(5)
    maps_dir = tmp_path / "maps"
    truth, values, stems = [], [], []
    for rel, _, _, mask in rows["alpha"] + rows["beta"]:
        target = maps_dir / Path(rel).with_suffix(".npy" if "good" in rel else ".tiff")
        target.parent.mkdir(parents=True, exist_ok=True)
        score = (rng.normal(size=NATIVE) + mask).astype(np.float32)
        if target.suffix == ".npy":
            np.save(target, score)
        else:
            Image.fromarray(score, mode="F").save(target)
        if rel.startswith("beta"):
            truth.append(mask)
            values.append(score)
            stems.append(rel)
    code, out, err = invoke("--maps", str(maps_dir), "--data", str(root), "--json", "-q")
    assert code == 0, err
    doc = json.loads(out)
    assert sorted(doc["classes"]) == ["alpha", "beta"]
    beta = doc["classes"]["beta"]
    labels = [int("crack" in s) for s in stems]
    assert beta["image_auroc"] == pytest.approx(roc_auc_score(labels, [v.max() for v in values]), abs=1e-9)
    assert beta["pixel_auroc"] == pytest.approx(roc_auc_score(np.ravel(truth), np.ravel(values)), abs=1e-9)
    assert beta["image_f1_max"] == pytest.approx(sklearn_f1_max(np.array(labels), np.array([v.max() for v in values])), abs=1e-9)
    assert beta["pixel_aupr_sklearn_stepwise_ap"] == pytest.approx(average_precision_score(np.ravel(truth), np.ravel(values)), abs=1e-9)
    assert beta["pixel_f1_max"] == pytest.approx(sklearn_f1_max(np.ravel(truth), np.ravel(values)), abs=1e-9)
    assert beta["au_pro"] == pytest.approx(reference_au_pro(values, truth, 0.3), abs=1e-6)
    scores_csv = tmp_path / "scores.csv"
    given = rng.normal(size=len(stems))
    lines = ["path,score"] + [f"{s},{g}" for s, g in zip(stems, given)]
    lines += [f"{rel},0.5" for rel, *_ in rows["alpha"]]
    scores_csv.write_text("\n".join(lines) + "\n")
    doc = json.loads(invoke("--maps", str(maps_dir), "--data", str(root), "--scores", str(scores_csv), "--json", "-q")[1])
    assert doc["classes"]["beta"]["image_auroc"] == pytest.approx(roc_auc_score(labels, given), abs=1e-9)
    (maps_dir / rows["beta"][0][0]).with_suffix(".tiff").unlink()
    code, _, err = invoke("--maps", str(maps_dir), "--data", str(root), "--json")
    assert code == 1 and "no map for test image" in err


def test_native_resolution_on_the_visa_layout(tmp_path: Path, shared_data: Path) -> None:
    """Masks come from split_csv/1cls.csv (values are small class ids: binarised > 0)."""
    root = shared_data / "visa"
    rows: dict[str, list] = {}
    with (root / "split_csv" / "1cls.csv").open(newline="") as handle:
        for row in csv.DictReader(handle):
            if row["split"] != "test":
                continue
            with Image.open(root / row["image"]) as image:
                size = image.size[::-1]
            mask = np.asarray(Image.open(root / row["mask"])) > 0 if row["mask"] else np.zeros(size, dtype=bool)
            rows.setdefault(row["object"], []).append((row["image"], "anomaly" if row["mask"] else "good", int(bool(row["mask"])), mask))
    rows = {name: sorted(class_rows) for name, class_rows in sorted(rows.items())}
    w = make_run(tmp_path / "run", root, rows, seed=3, constant_maps=True, layout="visa")
    code, out, err = invoke(str(tmp_path / "run"), "--json", "-q", "--resolution", "native")
    assert code == 0, err
    doc = json.loads(out)
    for name in rows:
        keep = np.flatnonzero(w["cls"] == name)
        truth = np.concatenate([w["native"][i].ravel() for i in keep])
        scores = np.concatenate([np.full(w["native"][i].shape, w["maps"][i, 0, 0]).ravel() for i in keep])
        assert doc["classes"][name]["pixel_auroc"] == pytest.approx(roc_auc_score(truth, scores), abs=1e-9)
