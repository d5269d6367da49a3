"""The monitoring time-series page (`pipeline monitor --html`): a point per window that has
batches, each judged as `pipeline monitor --window <every>` judges that window (`--json`),
text escaped; bad `--every` / `--window` refused with one line."""

from __future__ import annotations

import html
import json
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import Engine, text

from pipeline import ledger
from pipeline.estimation import binary_sums
from pipeline.monitor import TOP_FEATURES, judge_series, judge_window
from pipeline.monitor_report import by_version, render_monitor_html, series_rows, top_features
from pipeline.windows import parse_window
from tests.helpers import RunServices
from tests.test_cli import _assert_one_line_error, _cli, _env
from tests.test_monitoring_windows import _stream

# CBPE sums of 20 inputs, so the logistic model's versions carry estimates with a band.
ESTIMATE_SUMS = binary_sums(np.array([0.9] * 15 + [0.2] * 5), np.arange(20) < 5)


def _rows(page: str, heading: str) -> list[list[str]]:
    """The cells (unescaped) of the table in the page's section whose heading starts `heading`."""
    section = next(part for part in page.split("<h2")[1:] if part.split(">", 1)[1].startswith(heading))
    body = section.split("</table>")[0]
    return [
        [html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row)]
        for row in re.findall(r"<tr>(.*?)</tr>", body)
    ][1:]


def _comparable(version: dict[str, Any]) -> dict[str, Any]:
    """A version's figures with its drift's features cut to the `pipeline monitor` top."""
    drift = version["drift"]
    top = dict(list(drift.get("top_features", {}).items())[:TOP_FEATURES])
    return {**version, "drift": {**drift, "top_features": top}}


@pytest.fixture
def monitored(quiet_engine: Engine) -> Engine:
    """The quiet database without alerts or judged windows (they outlive its batches)."""
    with quiet_engine.begin() as conn:
        conn.execute(text("TRUNCATE alerts, monitor_evaluations"))
    return quiet_engine


def test_each_window_with_batches_is_a_point_judged_as_its_window_alone(monitored: Engine, models_dir: Path) -> None:
    start = datetime(2033, 3, 1, 0, 10, tzinfo=UTC)
    # Batches in the first, third and fourth hours (the second has none), the last half folded.
    _stream(monitored, models_dir, start, 12, 20, shifted=0, seed=1, estimate_sums=ESTIMATE_SUMS)
    _stream(monitored, models_dir, start + timedelta(hours=2), 8, 20, shifted=3, seed=2, estimate_sums=ESTIMATE_SUMS)
    with monitored.begin() as conn:
        ledger.fold_contributions(conn, "screening")
    _stream(monitored, models_dir, start + timedelta(hours=3), 6, 20, shifted=0, seed=3, estimate_sums=ESTIMATE_SUMS)
    now = start + timedelta(hours=3, minutes=40)
    with monitored.connect() as conn:
        series = judge_series(conn, "screening", timedelta(hours=5), timedelta(hours=1), now)
        alone = [judge_window(conn, "screening", parse_window("1h"), until) for _, until, _ in series]
    assert [until for _, until, _ in series] == [now - timedelta(hours=4 - i) for i in range(5)]
    assert [[v["batches"] for v in figures] for _, _, figures in series] == [[], [12], [], [8], [6]]
    for (_, _, figures), single in zip(series, alone, strict=True):
        assert [_comparable(v) for v in figures] == single
    (points,) = by_version(series).values()
    assert len(points) == 3
    drifted = [v["drift"]["drifted"] for _, _, v in points]
    assert drifted == [False, True, False]
    assert all(v["estimated_kpis"]["accuracy"]["low"] < v["estimated_kpis"]["accuracy"]["high"] for _, _, v in points)

    page = render_monitor_html("screening", "5h", "1h", now, series, [])
    features = top_features(points)
    rows = _rows(page, "screening / screen-logreg")
    assert rows == series_rows(points, features)
    assert len(rows) == 3 and rows[1][1:4] == ["8", "160", "yes"]
    assert page.count("data:image/png;base64,") == 1


def test_monitor_html_matches_monitor_json_and_escapes_text(
    monitored: Engine, quiet_services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    now = datetime.now(UTC)
    _stream(monitored, models_dir, now - timedelta(minutes=150), 10, 20, shifted=0, seed=4, estimate_sums=ESTIMATE_SUMS)
    _stream(monitored, models_dir, now - timedelta(minutes=40), 10, 20, shifted=3, seed=5, estimate_sums=ESTIMATE_SUMS)
    with monitored.begin() as conn:
        (version,) = {
            row.model_version for row in ledger.window_versions(conn, ["screening"], now - timedelta(1), now, None)
        }
        condition = ledger.Condition(
            "drift", "screen-logreg", version, "1h", {"note": "<script>alert(1)</script> & co"}
        )
        ledger.record_alerts(conn, "screening", ["1h"], [condition], {})
    env = _env(quiet_services, models_dir)
    page_path = tmp_path / "monitor.html"
    run = _cli(env, "monitor", "screening", "--html", str(page_path), "--window", "3h", "--every", "1h")
    assert run.returncode == 0, run.stderr
    assert f"3 windows of 1h written to {page_path}" in run.stdout
    shown = _cli(env, "monitor", "screening", "--window", "1h", "--json")
    assert shown.returncode == 0, shown.stderr
    (newest,) = json.loads(shown.stdout)["versions"]
    page = page_path.read_text()

    rows = _rows(page, "screening / screen-logreg")
    # Two windows have batches (the middle hour has none); the newest first.
    assert len(rows) == 2 and [row[1] for row in rows] == ["10", "10"]
    header = re.findall(r"<th>PSI (.*?)</th>", page)
    expected = series_rows([(now, now, newest)], [])[0]
    assert rows[0][1:4] == expected[1:4] and rows[0][4 + len(header) :] == expected[4:]
    for feature, cell in zip(header, rows[0][4:], strict=False):
        if feature in newest["drift"]["top_features"]:
            assert cell == f"{newest['drift']['top_features'][feature]['psi']:.3f}"
    assert "estimated_kpis" in newest and newest["estimated_kpis"]["accuracy"]["value"] is not None
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; co" in page


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--every", "10rows"], "--every '10rows': a time series needs a time window"),
        (["--window", "500rows"], "--window '500rows': a time series needs a time window"),
        (["--every", "2h", "--window", "1h"], "--every 2h is longer than --window 1h"),
        (["--every", "1m", "--window", "366d"], "more than 400 windows"),
        (["--every", "1x"], "window '1x' does not parse"),
    ],
)
def test_bad_series_windows_are_one_line(
    args: list[str], expected: str, quiet_services: RunServices, models_dir: Path, tmp_path: Path
) -> None:
    page_path = tmp_path / "monitor.html"
    _assert_one_line_error(_cli(_env(quiet_services, models_dir), "monitor", "--html", str(page_path), *args), expected)
    assert not page_path.exists()


def test_every_without_html_is_one_line(quiet_services: RunServices, models_dir: Path) -> None:
    _assert_one_line_error(
        _cli(_env(quiet_services, models_dir), "monitor", "--every", "1h"), "--every goes with --html"
    )
