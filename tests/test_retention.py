"""The retention check, auto WiSE-FT and the gate that guards both (docs/retention.md), on the conftest's
`retention_tuned`: the shared trained model fine-tuned again from its folder on a second domain, plainly and with
auto WiSE-FT (helpers.tune_twice)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import TrainedModel, TunedTwice, pairs_table

from adapters.clip_finetune.app.gate import decide
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.cli.report import write_report
from adapters.clip_finetune.data.load import load_splits
from adapters.clip_finetune.training.retention import GRID, Point, choose

METRIC = "text_to_image/mrr"


def _points(rows: list[tuple[float, float, float | None]]) -> list[Point]:
    return [Point(a, {METRIC: t}, {} if r is None else {METRIC: r}) for a, t, r in rows]


@pytest.mark.parametrize(
    ("rows", "tolerance", "alpha"),
    [
        # the target rises with alpha, retention falls: the last alpha within the tolerance wins
        ([(0, 0.2, 0.50), (0.5, 0.4, 0.495), (0.8, 0.5, 0.489), (1, 0.6, 0.30)], 0.01, 0.5),
        ([(0, 0.2, 0.50), (0.5, 0.4, 0.495), (0.8, 0.5, 0.489), (1, 0.6, 0.30)], 0.02, 0.8),
        ([(0, 0.2, 0.50), (0.5, 0.4, 0.495), (0.8, 0.5, 0.489), (1, 0.6, 0.30)], 1.0, 1.0),
        ([(0, 0.2, 0.50), (0.5, 0.4, 0.40), (1, 0.6, 0.30)], 0.01, 0.0),  # nothing but the base keeps it
        ([(0, 0.2, None), (0.5, 0.7, None), (1, 0.6, None)], 0.01, 0.5),  # no retention set: the target alone
        ([(0, 0.2, 0.5), (0.5, 0.6, 0.48), (0.7, 0.6, 0.49), (1, 0.6, 0.3)], 0.05, 0.7),  # a tie: more retention
        ([(0, 0.2, None), (0.4, 0.6, None), (1, 0.6, None)], 0.01, 0.4),  # a tie: closer to the base
    ],
)
def test_auto_wise_ft_picks_the_best_target_whose_retention_stays_within_the_tolerance(
    rows: list, tolerance: float, alpha: float
) -> None:
    assert choose(_points(rows), METRIC, tolerance).alpha == alpha


@pytest.mark.parametrize(
    ("new", "current", "new_kept", "current_kept", "promoted", "says"),
    [
        (0.6, 0.4, 0.30, 0.50, False, "refused on retention: text_to_image/mrr on the retention set fell from 0.5000"),
        (0.6, 0.4, 0.495, 0.50, True, ""),  # within the tolerance of 0.01
        (0.6, 0.4, None, None, True, "no retention set checked"),
        (0.3, 0.4, 0.60, 0.50, False, "not better on the target by more than the margin 0"),
    ],
)
def test_the_gate_refuses_a_model_that_wins_on_the_target_but_forgets(
    new: float, current: float, new_kept: float | None, current_kept: float | None, promoted: bool, says: str
) -> None:
    kept = ({METRIC: new_kept}, {METRIC: current_kept}) if new_kept is not None else ({}, {})
    verdict = decide({METRIC: new}, {METRIC: current}, METRIC, 0.0, *kept, tolerance=0.01)
    assert verdict.promoted is promoted
    assert says in verdict.summary() and ("kept" if not promoted else "promoted") in verdict.summary()


def test_auto_wise_ft_ships_the_alpha_that_keeps_the_retention_set_and_records_the_curve(
    retention_tuned: TunedTwice,
) -> None:
    tuned = retention_tuned
    plain = json.loads((tuned.plain / "metrics.json").read_text())
    auto = json.loads((tuned.auto / "metrics.json").read_text())
    curve, before = auto["wise_ft_curve"], auto["retention"]["before"][METRIC]
    assert [p["alpha"] for p in curve] == list(GRID)
    # plain fine-tuning forgot more than the tolerance (else this test would check nothing) and gained on the target
    assert plain["retention"]["after"][METRIC] < before - 0.01
    assert plain["after"][METRIC] > plain["before"][METRIC]
    # alpha 0 is the base as scored before training, alpha 1 the best epoch as scored when it was picked
    assert curve[0]["retention"] == before and curve[0]["target"] == auto["before"][METRIC]
    assert curve[-1]["target"] == auto["after_fine_tuned"][METRIC] == plain["after"][METRIC]
    assert curve[-1]["retention"] == pytest.approx(plain["retention"]["after"][METRIC], abs=1e-6)
    chosen = next(p for p in curve if p["alpha"] == auto["wise_ft_alpha"])
    kept = [p for p in curve if p["retention"] >= before - 0.01 - 1e-9]
    assert chosen["target"] == max(p["target"] for p in kept) and chosen in kept
    assert auto["retention"]["after"][METRIC] == chosen["retention"] >= before - 0.01 - 1e-9
    assert 0 < auto["wise_ft_alpha"] < 1 and auto["after"][METRIC] == chosen["target"] > auto["before"][METRIC]
    # the sweep scored 9 mixes and decoded no image twice: the preprocessed validation and retention images are kept
    assert auto["wise_ft_seconds"] > 0 and max(tuned.decodes.values()) == 1
    assert len(tuned.decodes) == 192 + 48 + 150  # training, validation and retention images: each decoded once
    assert "retention set (what the base model knew)" in tuned.stdout
    assert f"WiSE-FT alpha {auto['wise_ft_alpha']:g} (auto" in tuned.stdout


def test_the_report_shows_the_retention_table_and_the_alpha_curve(
    retention_tuned: TunedTwice, trained_model: TrainedModel, tmp_path: Path
) -> None:
    page = write_report(retention_tuned.auto, tmp_path / "report.html").read_text()
    assert "id='retention-table'" in page and "id='alpha-curve'" in page and "plain fine-tuning" in page
    shared = write_report(trained_model.folder, tmp_path / "shared.html").read_text()
    assert "id='no-retention'" in shared and "--retention DATA" in shared and "alpha-curve" not in shared


def test_clip_finetune_gate_keeps_out_a_model_that_forgot_and_says_why(
    retention_tuned: TunedTwice, trained_model: TrainedModel, capsys: pytest.CaptureFixture
) -> None:
    tuned = retention_tuned
    gate = ["gate", "--model", str(tuned.plain), "--current", str(trained_model.folder), "--data", str(tuned.test),
            "--retention", str(tuned.retention)]
    assert main(gate) == 1
    out = capsys.readouterr().out
    assert "refused on retention: text_to_image/mrr on the retention set fell from" in out and ": kept;" in out
    assert main([*gate, "--set", "retention_tolerance=1", "--json"]) == 0  # the same model, anything may be lost
    assert json.loads(capsys.readouterr().out)["promoted"] is True


def test_load_splits_reads_a_retention_set_and_drops_what_training_sees(trained_model: TrainedModel,
                                                                        tmp_path: Path) -> None:
    train = pairs_table(tmp_path / "train.csv", trained_model.train[:40])
    retention = pairs_table(tmp_path / "retention.csv", trained_model.train[30:40] + trained_model.test[:20])
    splits = load_splits(train, retention=retention)
    assert len(splits.retention) == 20 and splits.report("retention").total_skipped == 10
    assert load_splits(train).retention is None
