"""`pipeline rollout report` on real services: a shadow roll-out whose batch's sub-tasks are
finished in the ledger with known outputs (no worker), so the flip matrix, agreement,
score differences and CPU per row are known exactly; the stored verdict; the HTML page
escaped, with its plots; the CLI with --json and its one-line refusals."""

from __future__ import annotations

import base64
import functools
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, text

from pipeline import rollouts
from pipeline.gate import FAIL
from pipeline.pipelines.digits import held_out_strips
from pipeline.rollout_html import render_html
from pipeline.rollout_report import RolloutReport, build
from pipeline.scratch import ScratchServices
from pipeline.settings import Settings
from pipeline.states import RolloutMode, RolloutState
from tests import test_rollouts
from tests.helpers import assert_one_line_error, run_cli, second_version, split_batch, store_batch
from tests.test_report import Page, _not_blank
from tests.test_rollouts import CLASSIFIER, OOD

# The roll-out tests' fixture: a database of its own with the champions and a second classifier version.
own = test_rollouts.own

STRIPS, CHUNK = 600, 50
# Champion and challenger seconds of predict CPU per sub-task.
CHAMPION_CPU, CHALLENGER_CPU = 0.01, 0.02


def _output(classes: np.ndarray, confidence: float | np.ndarray) -> bytes:
    """Classifier output rows (10 probabilities) deciding `classes` with `confidence` (per row)."""
    confidence = np.broadcast_to(confidence, len(classes))
    output = np.repeat((1 - confidence[:, None]) / 9, 10, axis=1).astype("<f4")
    output[np.arange(len(classes)), classes] = confidence
    return output.tobytes()


@pytest.fixture
def shadowed(own: tuple[ScratchServices, Settings, Engine], models_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shadow roll-out of a second classifier version with one batch of 600 one-digit
    strips (12 classifier sub-tasks of 50 rows), finished in the ledger: the champion decides
    row i as i mod 10 with confidence 0.9, the challenger the next class with 0.6 on every
    fourth row of a sub-task and as the champion elsewhere; the shadow twin of sub-task 0 is
    left unfinished. Returns the paired rows' (champion, challenger) decisions."""
    _, settings, engine = own
    version = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=version, mode=RolloutMode.shadow, started_by="ana")
    batch_id, _ = store_batch(engine, held_out_strips(STRIPS, max_digits=1, seed=11))
    split_batch(engine, batch_id, {CLASSIFIER: CHUNK, OOD: 1000}, step_items=STRIPS)
    finish = text(
        "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(), finished_at = clock_timestamp(),"
        " output = :output, predict_cpu_s = :cpu, champion_cpu_s = :champion_cpu WHERE id = :id"
    )
    champion, challenger = [], []
    with engine.begin() as conn:
        subtasks = conn.execute(
            text("SELECT id, seq, role, rows FROM subtasks WHERE batch_id = :b AND model = :m ORDER BY role, seq"),
            {"b": batch_id, "m": CLASSIFIER},
        ).all()
        assert len(subtasks) == 2 * STRIPS // CHUNK
        for subtask in subtasks:
            serve = subtask.role == "serve"
            seq = subtask.seq if serve else -1 - subtask.seq
            if not serve and seq == 0:
                continue
            rows = np.arange(subtask.rows)
            decided = (seq * CHUNK + rows) % 10
            flipped = rows % 4 == 0
            if serve:
                output = _output(decided, 0.9)
                if seq != 0:
                    champion.append(decided)
            else:
                output = _output(np.where(flipped, (decided + 1) % 10, decided), np.where(flipped, 0.6, 0.9))
                challenger.append(np.where(flipped, (decided + 1) % 10, decided))
            # A shadow sub-task times both versions (the serve one's own timing is not compared).
            cpu, champion_cpu = (2 * CHAMPION_CPU, None) if serve else (CHALLENGER_CPU, CHAMPION_CPU)
            conn.execute(finish, {"id": subtask.id, "output": output, "cpu": cpu, "champion_cpu": champion_cpu})
    rollouts.evaluate_batch(engine, batch_id)
    return np.concatenate(champion), np.concatenate(challenger)


def _checked(report: RolloutReport, champion: np.ndarray, challenger: np.ndarray) -> None:
    paired = len(champion)
    assert report.paired_rows == paired == (STRIPS // CHUNK - 1) * CHUNK
    assert report.flips is not None and report.flips.classes == [f"class {k}" for k in range(10)]
    counts = np.asarray(report.flips.counts)
    assert counts.sum() == paired
    expected = np.zeros((10, 10), dtype=np.int64)
    np.add.at(expected, (champion, challenger), 1)
    assert (counts == expected).all()
    assert report.agreement == pytest.approx(np.trace(counts) / paired)
    assert report.agreement == pytest.approx(np.mean(champion == challenger))
    differences = report.score_differences
    assert differences is not None and sum(differences.counts) == paired
    assert differences.unchanged == np.trace(counts)
    assert differences.mean == pytest.approx(-0.3 * (paired - np.trace(counts)) / paired, abs=1e-6)
    champion_cpu, challenger_cpu = report.cpu
    assert (champion_cpu.subtasks, challenger_cpu.subtasks) == (STRIPS // CHUNK - 1,) * 2  # the finished pairs
    assert champion_cpu.median == pytest.approx(CHAMPION_CPU / CHUNK)
    assert challenger_cpu.median == pytest.approx(CHALLENGER_CPU / CHUNK)
    assert challenger_cpu.versions == [report.rollout.version] and champion_cpu.versions == report.champion_versions


def test_report_of_a_shadow_rollout_shows_its_flips_agreement_and_verdict(
    own: tuple[ScratchServices, Settings, Engine], shadowed: tuple[np.ndarray, np.ndarray]
) -> None:
    _, _, engine = own
    report = build(engine, CLASSIFIER)
    _checked(report, *shadowed)
    gate = report.rollout.gate
    assert gate is not None and report.rollout.verdict == FAIL
    assert any(reason.startswith("agreement:") for reason in gate.reasons)
    agreement = next(check for check in gate.checks if check.name == "agreement")
    assert agreement.verdict == FAIL and agreement.n_champion == 500  # the gate judged its first milestone

    # An ended roll-out by its id: the same evidence, its reason escaped in the page.
    rollouts.abort(engine, CLASSIFIER, actor="ana", reason="<script>alert('x')</script> & more")
    ended = build(engine, CLASSIFIER, report.rollout.id)
    assert ended.rollout.state == RolloutState.aborted
    _checked(ended, *shadowed)
    page_text = render_html(ended)
    assert "<script>" not in page_text and "&lt;script&gt;" in page_text
    page = Page()
    page.feed(page_text)
    assert page.sections == ["Roll-out", "Gate checks", "KPI deltas", "Decisions and scores", "CPU per row"]
    assert page.external == []
    assert set(page.images) == {"score difference histogram", "CPU per row per version"}
    for alt, source in page.images.items():
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix), alt
        image = Image.open(io.BytesIO(base64.b64decode(source[len(prefix) :])))
        assert image.format == "PNG" and image.width > 300 and _not_blank(image), alt


def test_rollout_report_cli_json_html_and_one_line_refusals(
    own: tuple[ScratchServices, Settings, Engine], shadowed: tuple[np.ndarray, np.ndarray], tmp_path: Path
) -> None:
    services, settings, _ = own
    cli = functools.partial(run_cli, services, settings, "rollout", "report")
    shown = cli(CLASSIFIER, "--json")
    assert shown.returncode == 0, shown.stderr
    _checked(RolloutReport.model_validate(json.loads(shown.stdout)), *shadowed)

    page = tmp_path / "rollout.html"
    printed = cli(CLASSIFIER, "--html", str(page))
    assert printed.returncode == 0, printed.stderr
    for expected in ("flip matrix", "agreement", "fail:", "predict CPU per row", f"report written to {page}"):
        assert expected in printed.stdout
    assert "score difference histogram" in page.read_text(encoding="utf-8")

    assert_one_line_error(cli("no-such-model"), "unknown model 'no-such-model'")
    assert_one_line_error(cli(OOD), f"model {OOD!r} has no roll-out")
    assert_one_line_error(cli(CLASSIFIER, "--id", "999"), "has no roll-out 999")


def test_report_of_a_canary_has_no_paired_rows_and_times_each_version(
    own: tuple[ScratchServices, Settings, Engine], models_dir: Path
) -> None:
    _, settings, engine = own
    version = second_version(engine, settings, models_dir, CLASSIFIER)
    rollouts.start(engine, CLASSIFIER, version=version, mode=RolloutMode.canary, percent=30, started_by="ana")
    batch_id, _ = store_batch(engine, held_out_strips(200, max_digits=1, seed=12))
    split_batch(engine, batch_id, {CLASSIFIER: CHUNK, OOD: 1000}, step_items=200)
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE subtasks SET state = 'succeeded', started_at = clock_timestamp(),"
                " finished_at = clock_timestamp(), output = decode(repeat('00000000', rows * 10), 'hex'),"
                " predict_cpu_s = CASE WHEN model_version = :v THEN 0.02 ELSE 0.01 END"
                " WHERE batch_id = :b AND model = :m"
            ),
            {"b": batch_id, "m": CLASSIFIER, "v": version},
        )
    report = build(engine, CLASSIFIER)
    assert report.rollout.mode == RolloutMode.canary and report.rollout.gate is not None
    assert (report.paired_rows, report.agreement, report.flips, report.score_differences) == (None,) * 4
    champion_cpu, challenger_cpu = report.cpu
    assert champion_cpu.subtasks > 0 and challenger_cpu.subtasks > 0
    assert challenger_cpu.versions == [version] and champion_cpu.versions == report.champion_versions != [version]
    page = Page()
    page.feed(render_html(report))
    assert set(page.images) == {"CPU per row per version"}
