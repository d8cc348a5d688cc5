"""The retention check, auto WiSE-FT and the gate that guards both (docs/retention.md), on the conftest's
`retention_tuned`: the shared trained model fine-tuned again from its folder on a second domain, plainly and with
auto WiSE-FT (helpers.tune_twice)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from helpers import TrainedModel, TunedTwice, pairs_table

from adapters.clip_finetune.app.gate import decide
from adapters.clip_finetune.cli.main import main
from adapters.clip_finetune.cli.report import write_report
from adapters.clip_finetune.data.load import load_splits
from adapters.clip_finetune.training.retention import GRID, Point, choose, resolution_note

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


@pytest.mark.parametrize(("se", "queries", "tolerance", "says"), [
    (0.004, 500, 0.01, None),  # two standard errors within the tolerance: resolved
    (0.005, 500, 0.01, None),  # exactly at it
    (0.01, 500, 0.01, "its 500 queries measure the change of m to about ±0.010 (one standard error), so a loss the "
                      "size of the tolerance can pass unseen; about 2,000 retention pairs would measure it to ±0.005"),
    (0.03, 150, 0.02, "about 1,350 retention pairs would measure it to ±0.01"),
    (None, 150, 0.01, None),  # the standard error is not known (a resumed run, a median)
])
def test_a_retention_set_too_small_for_the_tolerance_is_noted_with_the_size_that_would_do(
    se: float | None, queries: int, tolerance: float, says: str | None
) -> None:
    note = resolution_note(se, queries, "m", tolerance)
    assert note is None if says is None else (note is not None and says in note)


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
    # each mix's retention change comes with its standard error (paired over the retention queries), the base's 0
    assert curve[0]["retention_se"] == 0 and all(p["retention_se"] > 0 for p in curve[1:])
    assert auto["retention"]["change_se"][METRIC] == pytest.approx(chosen["retention_se"], abs=1e-6)
    # 149 retention queries measure plain fine-tuning's change to about ±0.027: too coarse for the 0.01 tolerance,
    # and both runs say so, with the count that would do (149 x (2 x se / 0.01)^2)
    widest = curve[-1]["retention_se"]
    assert widest == pytest.approx(plain["retention"]["change_se"][METRIC], abs=1e-6) and 2 * widest > 0.01
    for run in (plain, auto):
        note = next(n for n in run["notes"] if n.startswith("the retention set is small"))
        assert f"its 149 queries measure the change of {METRIC} to about ±{widest:.3f}" in note
        assert f"about {math.ceil(149 * (2 * widest / 0.01) ** 2):,} retention pairs" in note
    assert f"is measured to ±{chosen['retention_se']:.4f}" in tuned.stdout
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
    assert "on the retention set, " in page and "(one standard error, paired over its queries)" in page
    assert "the retention set is small for retention_tolerance 0.01" in page  # the run's note, in its notes
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


def test_a_retention_set_past_a_gallery_is_scored_gallery_by_gallery_and_its_change_paired(monkeypatch) -> None:
    """_retention on a stand-in run: a score function that ranks each gallery's captions against its own images
    (query i's image is image i, so the 'model' is a score matrix per gallery)."""
    from types import SimpleNamespace

    import numpy as np

    from adapters.clip_finetune.data.pairs import CaptionPair
    from adapters.clip_finetune.retrieval import evaluation_result
    from adapters.clip_finetune.retrieval.evaluation_result import EvaluationResult, rank_pairs
    from adapters.clip_finetune.training import retention

    monkeypatch.setattr(evaluation_result, "GALLERY", 40)
    pairs = [CaptionPair(f"img{i}.png", f"caption {i}") for i in range(100)]  # 3 galleries: 34, 33, 33
    seen: list[int] = []
    made: list[EvaluationResult] = []
    noise = {"level": 0.0}

    def score(run, gallery, cache=None):
        seen.append(len(gallery))
        ids = [p.caption for p in gallery]
        rng = np.random.default_rng(len(seen))
        sims = np.eye(len(ids)) + noise["level"] * rng.normal(size=(len(ids), len(ids)))
        run.evaluation = EvaluationResult(rank_pairs(np.eye(len(ids), dtype=np.float32), sims.astype(np.float32),
                                                     np.eye(len(ids), dtype=bool), ids, ids), {}, {})
        made.append(run.evaluation)
        return run.evaluation.metrics()

    run = SimpleNamespace(is_main=True, evaluation="the validation's", retention_cache=None, retention_base=None,
                          cfg=SimpleNamespace(early_stopping_metric=METRIC))
    base, se = retention._retention(run, pairs, score, base=True)
    assert seen == [34, 33, 33] and se is None and base[METRIC] == 1.0  # the base: every caption finds its image
    assert run.evaluation == "the validation's"  # the run's latest validation result is kept
    assert len(run.retention_base.directions["text_to_image"].queries) == 100
    noise["level"] = 1.0
    after, se = retention._retention(run, pairs, score)
    assert seen == [34, 33, 33] * 2 and after[METRIC] < 1.0
    rr = np.concatenate([1.0 / r.directions["text_to_image"].first_ranks() for r in made[3:]])
    assert after[METRIC] == pytest.approx(rr.mean(), abs=1e-12)  # ranked within each gallery, over all 100
    assert se == pytest.approx(float(np.std(rr - 1.0, ddof=1) / 10), rel=1e-12)  # paired: each query vs its 1.0


def test_an_auto_wise_ft_run_resumed_after_a_crash_ships_what_an_uninterrupted_one_ships(
    trained_model: TrainedModel, tmp_path: Path
) -> None:
    """The resumed run has no per-query result of the base on the retention set (it is not in the checkpoint): it
    scores the base again, so its curve, standard errors and retention figures are the uninterrupted run's."""
    from helpers import RETUNE

    from adapters.clip_finetune.config import build_config
    from adapters.clip_finetune.data.load import Splits
    from adapters.clip_finetune.data.patterns import write_pattern_csv
    from adapters.clip_finetune.data.tables import read_table
    from adapters.clip_finetune.training import finetune

    tables = [write_pattern_csv(tmp_path / name / "b.csv", n, seed=seed)
              for name, n, seed in (("train", 96, 21), ("validation", 24, 22))]
    cfg = build_config(RETUNE, {"num_epochs": 2, "train_batch_size": 16, "base_eval_cache": False,
                                "model_name": str(trained_model.folder / "open_clip_config.json"),
                                "pretrained": str(trained_model.folder)})

    def splits() -> Splits:
        return Splits(read_table(tables[0]), read_table(tables[1]), retention=list(trained_model.test[:60]))

    whole = finetune(cfg, splits(), tmp_path / "whole", progress=False)
    assert len(whole.wise_ft_curve) == len(GRID) and whole.retention["change_se"][METRIC] > 0

    def crash(epoch: int, _record: dict) -> None:
        raise RuntimeError("preempted")

    with pytest.raises(RuntimeError, match="preempted"):
        finetune(cfg, splits(), tmp_path / "stopped", progress=False, on_epoch_end=crash)
    resumed = finetune(cfg, splits(), tmp_path / "stopped", progress=False, resume=True)
    assert resumed.wise_ft_alpha == whole.wise_ft_alpha
    for got, want in zip(resumed.wise_ft_curve, whole.wise_ft_curve, strict=True):  # retention_se too
        assert got == pytest.approx(want, abs=1e-6)
    assert resumed.retention.keys() == whole.retention.keys()
    for part, scores in whole.retention.items():
        assert resumed.retention[part] == pytest.approx(scores, abs=1e-6), part
