"""Training: `finetune` (fit.py) is the one entry; loop.py trains one process, step.py one step, state.py
keeps what a resume needs, optim.py the optimizer and schedule, launch.py / distributed.py the DDP ranks."""

from .fit import DATA_REPORT_NAME, finetune
from .state import CHECKPOINT_NAME, TrainingDiverged, TrainResult

__all__ = ["CHECKPOINT_NAME", "DATA_REPORT_NAME", "TrainResult", "TrainingDiverged", "finetune"]
