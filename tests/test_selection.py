"""training.selection: the best epoch and early stopping, and their state across a resume."""

from __future__ import annotations

import math

import pytest

from adapters.clip_finetune.training.selection import Selection

METRIC = "text_to_image/mrr"


def _record(score: float) -> dict[str, float]:
    return {"train_loss": 1.0, METRIC: score}


def test_the_best_epoch_is_the_first_to_beat_the_base_and_patience_stops_the_run() -> None:
    sel = Selection(metric=METRIC, has_validation=True, early_stopping=True, patience=2)
    sel.start({METRIC: 0.30})
    verdicts = [sel.judge(epoch, _record(score)) for epoch, score in enumerate([0.25, 0.40, 0.40, 0.39], 1)]
    assert verdicts == [(False, False), (True, False), (False, False), (False, True)]
    assert (sel.best_epoch, sel.best_score, sel.stale) == (2, 0.40, 2)


def test_nan_never_improves_and_without_validation_every_epoch_is_the_best() -> None:
    sel = Selection(metric=METRIC, has_validation=True)
    sel.start({METRIC: 0.1})
    assert sel.judge(1, _record(math.nan)) == (False, False)
    blind = Selection(metric=METRIC, has_validation=False, patience=1)
    assert [blind.judge(e, {"train_loss": 1.0}) for e in (1, 2, 3)] == [(True, False)] * 3
    assert blind.best_epoch == 3


def test_the_state_round_trips_and_a_checkpoint_of_other_settings_is_refused() -> None:
    sel = Selection(metric=METRIC, has_validation=True, patience=3)
    sel.start({METRIC: 0.2})
    sel.judge(1, _record(0.5))
    sel.judge(2, _record(0.4))
    resumed = Selection(metric=METRIC, has_validation=True, patience=3)
    resumed.load_state_dict(sel.state_dict())
    assert resumed == sel
    other = Selection(metric="image_to_text/mrr", has_validation=True, patience=3)
    with pytest.raises(ValueError, match="selects by"):
        other.load_state_dict(sel.state_dict())
