"""Train a run: the one place a training run is assembled, whoever starts it (`clip-finetune train`, the Python
API's worker, the Dataloop adapter, the demo).

In order: the splits are read (data.load.load_splits), the sizes checked against them and the configuration's
process-wide settings applied, once (training.fit.plan_run), the model loaded (or the caller's taken), then
training.finetune runs with the plan.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..config import FinetuneConfig
from ..data.load import Splits, load_splits

if TYPE_CHECKING:  # torch loads when a run is planned, not on import: a bad data path fails without it
    from ..model.clip import ClipModel
    from ..retrieval.evaluate import PairEmbeddings
    from ..training.fit import RunPlan
    from ..training.loop import EpochCallback
    from ..training.state import CheckpointCallback, TrainResult


class Training:
    """One training run: the splits, the plan fitted to them (sizes checked, settings applied: once), the model."""

    def __init__(self, cfg: FinetuneConfig, splits: Splits, clip: ClipModel | None = None, applied: bool = False
                 ) -> None:
        """`applied`: the caller applied `cfg`'s process-wide settings already (training.fit.plan_run)."""
        from ..training.fit import plan_run

        self.splits = splits
        self.plan: RunPlan = plan_run(cfg, len(splits.train), applied)
        self.clip = clip

    @property
    def cfg(self) -> FinetuneConfig:
        """The configuration fitted to the data (train_batch_size at most the training set)."""
        return self.plan.cfg

    def model(self) -> ClipModel:
        """The model the run starts from: the caller's, else the configured one, loaded once."""
        if self.clip is None:
            from ..model.clip import load_model  # torch and open_clip load only when a model is needed

            self.clip = load_model(self.cfg.model, self.cfg.device, self.cfg.seed)
        return self.clip

    def embed_validation(self) -> PairEmbeddings | None:
        """The validation pairs embedded by the model as it is now (None without validation pairs)."""
        if not self.splits.validation:
            return None
        from ..retrieval.evaluate import embed_pairs

        return embed_pairs(self.model(), self.splits.validation, self.cfg.batch_size, self.cfg.num_workers)

    def run(self, out_dir: str | Path | None, *, on_epoch_end: EpochCallback | None = None,
            on_checkpoint: CheckpointCallback | None = None, progress: bool = True, resume: bool = False
            ) -> TrainResult:
        """Fine-tune (training.finetune with this run's plan); the best epoch's weights end in the model."""
        from ..training.fit import finetune

        return finetune(self.plan, self.splits, out_dir, on_epoch_end=on_epoch_end, on_checkpoint=on_checkpoint,
                        clip=self.clip, progress=progress, resume=resume)


def training_of(cfg: FinetuneConfig, data: str | Path, validation: str | Path | None = None, *,
                test: str | Path | None = None, what: str = "data", retention: str | Path | None = None,
                **read: Any) -> Training:
    """A run on the data at `data` (its train subset; validation, test and the retention set as load_splits
    chooses them); `what` names the data in messages, `read` is load_splits' (a resolver, hints)."""
    return Training(cfg, load_splits(data, validation, test=test, cfg=cfg.data, what=what, retention=retention,
                                     **read))
