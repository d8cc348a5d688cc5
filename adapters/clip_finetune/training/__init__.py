"""Training: `finetune` (fit.py) is the one entry (`plan_run` fits a configuration to its run); loop.py trains
one process, step.py one step; its parts: sampler.py (the batches), selection.py (best epoch, early stopping),
checkpoint.py (writes and reads what a resume needs; state.py holds the run's live objects), optim.py the
optimizer and schedule, launch.py / distributed.py the DDP ranks."""

from .fit import DATA_REPORT_NAME, finetune
from .state import CHECKPOINT_NAME, TrainingDiverged, TrainResult

__all__ = ["CHECKPOINT_NAME", "DATA_REPORT_NAME", "TrainResult", "TrainingDiverged", "finetune"]
