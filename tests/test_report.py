"""`pipeline status` and `pipeline report` on a real finished batch: the tables, and a
self-contained HTML report whose plots are checked by parsing the page and by
rendering it in headless Chromium."""

from __future__ import annotations

import base64
import io
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest
from PIL import Image

from pipeline.client import BatchStatus, Client
from pipeline.pipelines.screening import held_out_records
from tests.helpers import RunServices

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
PIPELINE_CLI = str(Path(sys.executable).parent / "pipeline")
ROOT = Path(__file__).resolve().parent.parent


class Page(HTMLParser):
    """What a report page holds: its images' sources, section titles, tables and any script or link."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.sections: list[str] = []
        self.tables = 0
        self.external: list[str] = []
        self._in_h2 = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "img":
            self.images[attributes.get("alt") or ""] = attributes.get("src") or ""
        elif tag == "table":
            self.tables += 1
        elif tag in ("script", "link", "iframe") or (tag == "a" and attributes.get("href")):
            self.external.append(tag)
        self._in_h2 = tag == "h2"

    def handle_data(self, data: str) -> None:
        if self._in_h2:
            self.sections.append(data.strip())
            self._in_h2 = False


def _not_blank(image: Image.Image) -> bool:
    """More than 1 % of the pixels differ from white, in more than a few colours."""
    grey = image.convert("L")
    histogram = grey.histogram()
    inked = sum(histogram[:250]) / (grey.width * grey.height)
    colours = image.convert("RGB").getcolors(maxcolors=1 << 20) or []
    return inked > 0.01 and len(colours) > 8


@pytest.fixture(scope="module")
def finished(client: Client, stack: object) -> BatchStatus:
    status = client.submit("screening", held_out_records()).wait(timeout=300)
    assert status.state == "succeeded", status.error
    return status


def _cli(services: RunServices, models_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    run = subprocess.run(
        [PIPELINE_CLI, *args],
        # PYTHONPATH: the test-only pipelines in PIPELINE_PIPELINES live in this repository's tests package.
        env=services.env(models_dir, COLUMNS="250", PYTHONPATH=str(ROOT)),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    return run


def test_status_shows_latency_and_kpis(finished: BatchStatus, services: RunServices, models_dir: Path) -> None:
    out = _cli(services, models_dir, "status", str(finished.id)).stdout
    for expected in ("batch_status", "succeeded", "compute ms p50", "screen-forest", "end-to-end"):
        assert expected in out
    assert "recall_malignant" in out and "review_rate" in out


def test_html_report_has_the_plots(
    finished: BatchStatus, services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    out = _cli(services, models_dir, "report", str(finished.id), "--html", str(report)).stdout
    assert "drift" in out and "mean radius" in out and f"report written to {report}" in out

    page = Page()
    page.feed(report.read_text(encoding="utf-8"))
    assert page.sections == ["Status", "KPIs", "Latency", "Drift"]
    assert page.external == [], "the report must load nothing from elsewhere"
    assert page.tables >= 6
    assert set(page.images) == {"KPI summary", "latency histogram per model", "drift per feature"}
    for alt, source in page.images.items():
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), alt
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix) :])))
        assert image.format == "PNG" and image.width > 300 and image.height > 100, alt
        assert _not_blank(image), alt


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed (apt-get install -y chromium)")
def test_html_report_renders_in_headless_chromium(
    finished: BatchStatus, services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    _cli(services, models_dir, "report", str(finished.id), "--html", str(report))
    screenshot = tmp_path / "report.png"
    subprocess.run(
        [
            str(CHROMIUM),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-background-networking",
            "--disable-component-update",
            "--no-first-run",
            f"--user-data-dir={tmp_path / 'chromium'}",
            "--hide-scrollbars",
            "--window-size=1200,3000",
            f"--screenshot={screenshot}",
            report.as_uri(),
        ],
        capture_output=True,
        timeout=120,
        check=True,
    )
    image = Image.open(screenshot)
    assert (image.width, image.height) == (1200, 3000)
    assert _not_blank(image)
    # The plots are drawn: the page holds far more colours than text on white would.
    assert len(image.convert("RGB").getcolors(maxcolors=1 << 22) or []) > 200
