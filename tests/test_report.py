"""`iipad report`: the page's content against independent computations, its self-containment, its
SVG helpers, and the page opened in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import base64
import io
import json
import math
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score
from test_evaluate import make_data, make_run

from iipad_cli.reporting import page
from iipad_cli.reporting import svg_plots as svg
from iipad_cli.reporting.report import write_report
from iipad_cli.reporting.report_options import ReportOptions
from iipad_cli.schema.thresholds import THRESHOLDS_FILE, Thresholds, write_thresholds
from iipad_cli.thresholds import CategoryThreshold

BROWSERS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


class _Page(HTMLParser):
    """Collects what a self-containment check needs: tags, img sources, svg classes, texts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[dict[str, str]] = []
        self.plots = 0
        self.text: list[str] = []
        self.references: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = {k: v or "" for k, v in attrs}
        self.tags.append(tag)
        if tag == "img":
            self.images.append(values)
        if tag == "svg" and values.get("class") == "plot":
            self.plots += 1
        for name in ("src", "href", "data", "srcset", "poster", "action"):
            if name in values:
                self.references.append(values[name])

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def parse(html: str) -> _Page:
    parsed = _Page()
    parsed.feed(html)
    return parsed


@pytest.fixture()
def two_runs(tmp_path: Path) -> tuple[list[Path], list[dict]]:
    rows = make_data(tmp_path / "data")
    runs = [tmp_path / "run-a", tmp_path / "run-b"]
    written = [make_run(run, tmp_path / "data", rows, seed=seed) for seed, run in enumerate(runs)]
    return runs, written


def section(html: str, name: str) -> str:
    """The card of one class."""
    start = html.index(f'<section class="card" id="class-{name}">')
    return html[start : html.index("</section>", start)]


def write(runs: list[Path], output: Path, **options: object) -> str:
    write_report(runs, output, ReportOptions(quiet=True, **options))  # type: ignore[arg-type]
    return output.read_text(encoding="utf-8")


def test_page_is_self_contained(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, _ = two_runs
    html = write(runs, tmp_path / "report.html")
    parsed = parse(html)
    assert "script" not in parsed.tags and "link" not in parsed.tags and "iframe" not in parsed.tags
    assert "url(" not in html and "@import" not in html
    # The only references are in-page anchors and data: URIs of JPEGs that decode.
    assert all(ref.startswith("#") or ref.startswith("data:image/jpeg;base64,") for ref in parsed.references)
    assert parsed.images, "the gallery has heatmaps"
    for image in parsed.images:
        jpeg = base64.b64decode(image["src"].split(",", 1)[1], validate=True)
        with Image.open(io.BytesIO(jpeg)) as decoded:
            assert decoded.format == "JPEG"
            decoded.load()
        assert image["alt"]
    # The SVG namespace is the only http string, and it is an identifier, never fetched.
    assert set(re.findall(r"https?://[^\"' )]+", html)) == {"http://www.w3.org/2000/svg"}


def test_table_is_mean_and_std_over_runs(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    """Image AUROC per class and run from scikit-learn, then mean ± sample std, in percent."""
    runs, written = two_runs
    html = write(runs, tmp_path / "report.html", gallery=0)
    text = " ".join(parse(html).text)
    for name in ("alpha", "beta"):
        values = []
        for run in written:
            rows = run["cls"] == name
            values.append(roc_auc_score(run["labels"][rows], run["image_score"][rows]))
        expected = f"{100 * np.mean(values):.1f} ± {100 * np.std(values, ddof=1):.1f}"
        row = re.search(rf"{name}((?:\s+\S+ ± \S+|\s+n/a)+)", text)
        assert row is not None and expected in row.group(1)
    assert "mean ± std over 2 runs" in html and "random weights" in html


def test_one_curve_per_run_and_level(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, _ = two_runs
    html = write(runs, tmp_path / "report.html", gallery=0)
    alpha = html[html.index('id="class-alpha"') : html.index('id="class-beta"')]
    # ROC and PR: image (solid) + pixel (dashed) per run; PRO: one per run.
    assert alpha.count("<polyline") == 2 * 2 + 2 * 2 + 2
    assert alpha.count('stroke="#0072B2"') >= 3 and alpha.count('stroke="#D55E00"') >= 3
    gamma = html[html.index('id="class-gamma"') :]
    assert "<polyline" not in gamma and "no ROC, PR or PRO curves: only one label" in gamma


def test_gallery_shows_lowest_anomalous_and_highest_normal(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, written = two_runs
    html = write(runs, tmp_path / "report.html", gallery=2)
    first = written[0]
    paths = [f"{name}/test/{defect}/{index:03d}.png" for name in ("alpha", "beta", "gamma") for defect in (("crack", "good") if name != "gamma" else ("good",)) for index in range(3)]
    alpha = html[html.index('id="class-alpha"') : html.index('id="class-beta"')]
    rows = np.flatnonzero(first["cls"] == "alpha")
    scores = first["image_score"][rows]
    labels = first["labels"][rows]
    anomalous = sorted((s, paths[r]) for s, r, l in zip(scores, rows, labels) if l == 1)
    normal = sorted(((s, paths[r]) for s, r, l in zip(scores, rows, labels) if l == 0), reverse=True)
    shown = re.findall(r'class="(miss|alarm)">[^<]*</span> · <code>([^<]+)</code>', alpha)
    assert shown == [("miss", p) for _, p in anomalous[:2]] + [("alarm", p) for _, p in normal[:2]]
    assert len(parse(html).images) == 2 * 2 + 2 * 2 + 2  # alpha, beta: 2 + 2; gamma: no anomalies, 2 alarms


def test_label_free_thresholds_are_drawn_when_the_run_has_them(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, written = two_runs
    # Written as `iipad score` writes it: per category, and the bank rows' categories.
    thresholds = Thresholds(
        method="test",
        z=3.0,
        pooled_std=0.5,
        categories={
            "alpha": CategoryThreshold(count=2, image_mean=1.0, image_threshold=2.5, pixel_threshold=3.0),
            "beta": CategoryThreshold(count=2, image_mean=1.0, image_threshold=1000.0, pixel_threshold=3.0),
        },
        images=[],
        bank_classes=["beta"],  # make_run retrieves bank row 0 for every image
        image_score_formula="",  # make_run's scores.h5 records no formula
        top_k=1,
        sigma=4.0,
        resolution=16,
    )
    write_thresholds(runs[0] / THRESHOLDS_FILE, thresholds)
    html = write(runs[:1], tmp_path / "report.html", gallery=1)
    alpha = html[html.index('id="class-alpha"') : html.index('id="class-beta"')]
    assert "label-free 2.5</text>" in alpha and "label-free threshold (from normal images only)" in alpha
    # Verdicts use the image's category (its top-1 retrieved bank row: beta here), not its class.
    assert "judged normal by the label-free threshold 1000 of category beta" in alpha
    gamma = html[html.index('id="class-gamma"') :]
    assert "label-free" not in gamma.split("Worst misses")[0]  # no category gamma: no line
    # Without the file nothing is drawn, and the page says so.
    (runs[0] / THRESHOLDS_FILE).unlink()
    html = write(runs[:1], tmp_path / "report.html", gallery=1)
    assert "label-free " not in html.replace("no label-free thresholds", "")
    assert "no label-free thresholds" in html


def test_f1_max_threshold_marker_is_at_the_f1_max_score(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, written = two_runs
    html = write(runs[:1], tmp_path / "report.html", gallery=0)
    rows = written[0]["cls"] == "alpha"
    labels, scores = written[0]["labels"][rows], written[0]["image_score"][rows].astype(np.float64)
    best, best_threshold = -1.0, math.nan
    for threshold in sorted(set(scores.tolist())):  # written out: F1 at every threshold, highest best
        predicted = scores >= threshold
        f1 = 2 * np.sum(predicted & (labels == 1)) / (np.sum(predicted) + np.sum(labels == 1))
        if f1 >= best:
            best, best_threshold = f1, threshold
    alpha = html[html.index('id="class-alpha"') : html.index('id="class-beta"')]
    assert f"F1-max {best_threshold:.3g}</text>" in alpha


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from iipad_cli.cli import app

    result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere"), "-o", str(tmp_path / "r.html")])
    assert result.exit_code == 1
    assert "scores.h5" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "r.html").exists()
    # The output is checked first: a directory, or a file in a missing directory.
    for output, problem in ((tmp_path, "is a directory"), (tmp_path / "missing" / "r.html", "no such directory")):
        result = CliRunner().invoke(app, ["report", str(tmp_path / "nowhere"), "-o", str(output)])
        assert result.exit_code == 1 and problem in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written, no .tmp left
    assert not (tmp_path.parent / f"{tmp_path.name}.tmp").exists()


def test_report_command_imports_no_torch(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    """The whole `iipad report` command (CLI construction included) runs without importing torch."""
    runs, _ = two_runs
    output = tmp_path / "r.html"
    code = (
        "import sys\n"
        f"sys.argv = ['iipad', 'report', {str(runs[0])!r}, '-o', {str(output)!r}, '-q']\n"
        "from iipad_cli.cli import main\n"
        "try:\n    main()\nexcept SystemExit as exit:\n    assert not exit.code, exit.code\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output) and output.is_file()


# --- the SVG helpers --------------------------------------------------------------------------------


def test_thin_keeps_extremes_per_column_and_bounds_the_size() -> None:
    rng = np.random.default_rng(0)
    x = np.sort(rng.random(20000))
    y = rng.random(20000)
    tx, ty = svg.thin(x, y, 50)
    assert tx.size <= 4 * 50 and tx[0] == x[0] and tx[-1] == x[-1]
    # Written out: per pixel column, the lowest and highest y must survive.
    column = np.minimum(np.floor((x - x[0]) / (x[-1] - x[0]) * 50), 50)
    kept = set(zip(tx.tolist(), ty.tolist()))
    for c in np.unique(column):
        inside = column == c
        lowest, highest = np.argmin(np.where(inside, y, np.inf)), np.argmax(np.where(inside, y, -np.inf))
        assert (x[lowest], y[lowest]) in kept and (x[highest], y[highest]) in kept
    assert np.all(np.diff(tx) >= 0)
    short_x, short_y = svg.thin(x[:10], y[:10], 50)
    assert np.array_equal(short_x, x[:10]) and np.array_equal(short_y, y[:10])


def test_cut_at_interpolates_the_crossing_segment() -> None:
    x, y = svg.cut_at(np.array([0.0, 0.1, 0.5, 1.0]), np.array([0.0, 0.4, 0.8, 1.0]), 0.3)
    assert x.tolist() == [0.0, 0.1, 0.3] and y.tolist() == pytest.approx([0.0, 0.4, 0.6])


def test_histogram_bars_are_the_counts() -> None:
    """Bar heights in pixels divided by the pixels per image give back np.histogram's counts."""
    normal = np.array([0.0, 0.1, 0.1, 0.2, 0.9])
    anomalous = np.array([0.76, 0.78, 1.0])  # 0.76 and 0.78 share a bin of width 1.04 / 10
    drawn = svg.histogram_plot("t", normal, anomalous, bins=10)
    heights = {colour: [] for colour in (svg.NORMAL_COLOUR, svg.ANOMALOUS_COLOUR)}
    for height, colour in re.findall(r'<rect x="[^"]+" y="[^"]+" width="[^"]+" height="([^"]+)" fill="([^"]+)"', drawn):
        heights[colour].append(float(height))
    per_image = (svg.HEIGHT - svg.TOP - svg.BOTTOM) / (2 * 1.25)  # tallest bin holds 2 images
    assert sorted(round(h / per_image) for h in heights[svg.NORMAL_COLOUR]) == [1, 1, 1, 2]
    assert sorted(round(h / per_image) for h in heights[svg.ANOMALOUS_COLOUR]) == [1, 2]


def test_render_escapes_text() -> None:
    report = page.Report(
        title="<b>t</b>",
        runs=("r&d",),
        table_header=("class", "x"),
        table_rows=(("<c>", "1"), ("mean", "1")),
        caption="c",
        pro_limit=0.3,
        classes=(),
        gallery_note="",
    )
    html = page.render(report)
    assert "<b>t</b>" not in html and "&lt;b&gt;t&lt;/b&gt;" in html and "r&amp;d" in html and "&lt;c&gt;" in html


# --- the page in a real browser ----------------------------------------------------------------------

# Injected at the top of <head> of a copy of the page (the report itself carries no script): records
# console calls and load errors, then on `load` writes what it saw into <pre id="report-check">,
# which --dump-dom prints.
CHECKER = """<script>
window.__seen = [];
for (const level of ["log", "info", "warn", "error", "debug"]) {
  const original = console[level];
  console[level] = (...args) => { window.__seen.push(level + ": " + args.join(" ")); original.apply(console, args); };
}
window.addEventListener("error", (event) => {
  const target = event.target && event.target.outerHTML ? event.target.outerHTML.slice(0, 120) : "";
  window.__seen.push("error event: " + (event.message || target));
}, true);
window.addEventListener("load", () => {
  const images = [...document.images];
  const plots = [...document.querySelectorAll("svg.plot")];
  const report = {
    images: images.length,
    decoded: images.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0).length,
    plots: plots.length,
    drawn_plots: plots.filter((p) => p.getBoundingClientRect().width > 0 && p.querySelector("rect.axes")).length,
    resources: performance.getEntriesByType("resource").map((entry) => entry.name),
    seen: window.__seen,
  };
  const out = document.createElement("pre");
  out.id = "report-check";
  out.textContent = JSON.stringify(report);
  document.body.appendChild(out);
});
</script>"""


def find_browser() -> str | None:
    for name in BROWSERS:
        found = shutil.which(name)
        if found:
            return found
    return None


def browser(executable: str, profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    # --no-sandbox: CI runs as root, where Chromium's sandbox refuses to start; the page is ours.
    # The host-resolver rule makes any network fetch fail (and so show up in the checks).
    command = [
        executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={profile}",
        "--host-resolver-rules=MAP * ~NOTFOUND", "--enable-logging=stderr", "--v=0", *args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def require_browser() -> str:
    executable = find_browser()
    if executable is None:
        pytest.skip("no headless browser found (chromium): the report's browser test did NOT run; `.ci/run` installs chromium")
    return executable


def run_checker(report: Path, workdir: Path) -> tuple[dict, str]:
    """Open a copy of `report` with CHECKER injected: what the page saw once loaded, and the
    browser's stderr (where --enable-logging writes console messages as ":CONSOLE" lines)."""
    checked = workdir / "checked.html"
    checked.write_text(report.read_text(encoding="utf-8").replace("<head>", "<head>" + CHECKER, 1), encoding="utf-8")
    result = browser(require_browser(), workdir / "profile", "--dump-dom", "--virtual-time-budget=10000", checked.as_uri())
    found = re.search(r'<pre id="report-check">(.*?)</pre>', result.stdout, re.S)
    assert found is not None, f"the check did not run: {result.stderr[-2000:]}"
    text = found.group(1).replace("&quot;", '"').replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return json.loads(text), result.stderr


def check_in_browser(report: Path, workdir: Path) -> dict:
    """`run_checker`, asserting that the browser logged nothing to its console."""
    check, stderr = run_checker(report, workdir)
    assert not [line for line in stderr.splitlines() if ":CONSOLE" in line]
    return check


def screenshot(report: Path, workdir: Path, size: tuple[int, int] = (1280, 1600)) -> np.ndarray:
    """A screenshot of the page itself (unmodified), as greyscale pixels."""
    path = workdir / "report.png"
    shot = browser(require_browser(), workdir / "profile", f"--screenshot={path}", f"--window-size={size[0]},{size[1]}", report.as_uri())
    assert path.is_file(), shot.stderr[-2000:]
    with Image.open(path) as image:
        assert image.size == size
        return np.asarray(image.convert("L"), dtype=np.float64)


def assert_renders(report: Path, workdir: Path) -> None:
    """Every image decodes, every plot is laid out, nothing is fetched or logged, and the
    screenshot shows a page (text, plots and images, not a blank one)."""
    parsed = parse(report.read_text(encoding="utf-8"))
    check = check_in_browser(report, workdir)
    assert check["images"] == len(parsed.images) and check["decoded"] == len(parsed.images)
    assert check["plots"] == parsed.plots > 0 and check["drawn_plots"] == parsed.plots
    assert check["resources"] == [] and check["seen"] == []
    assert screenshot(report, workdir).std() > 10


def test_report_in_headless_chromium(tmp_path: Path, two_runs: tuple[list[Path], list[dict]]) -> None:
    runs, _ = two_runs
    write(runs, tmp_path / "report.html", gallery=2)
    assert len(parse((tmp_path / "report.html").read_text()).images) == 10
    assert_renders(tmp_path / "report.html", tmp_path)


def test_the_check_catches_a_broken_image_and_console_output(tmp_path: Path) -> None:
    """The browser check itself can fail: a page with an undecodable image and a console call."""
    bad = tmp_path / "bad.html"
    bad.write_text(
        '<!DOCTYPE html><html><head><meta charset="utf-8"></head><body>'
        '<img src="data:image/jpeg;base64,AAAA" alt="x"><script>console.warn("boom")</script></body></html>'
    )
    check, stderr = run_checker(bad, tmp_path)
    assert check["images"] == 1 and check["decoded"] == 0
    assert any("boom" in seen for seen in check["seen"])
    assert any(":CONSOLE" in line for line in stderr.splitlines())


def test_a_class_missing_from_a_run_keeps_each_runs_colour(tmp_path: Path) -> None:
    rows = make_data(tmp_path / "data")
    make_run(tmp_path / "a", tmp_path / "data", {"beta": rows["beta"]}, seed=0)
    make_run(tmp_path / "b", tmp_path / "data", rows, seed=1)
    html = write([tmp_path / "a", tmp_path / "b"], tmp_path / "report.html", gallery=0)
    alpha = section(html, "alpha")
    assert alpha.count("<polyline") == 2 + 2 + 1  # run b only: image + pixel ROC and PR, PRO
    colours = re.findall(r'<polyline points="[^"]*" fill="none" stroke="([^"]+)"', alpha)
    assert colours == ["#D55E00"] * 5  # run b's colour, as in every other class
