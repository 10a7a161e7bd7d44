"""Fine-tuning for the training passes: early stopping, mixed precision, lr/batch search and DDP.

``fine_tune(module, train, val, config, input_names=...)`` trains a torch module in place and
returns it with a :class:`TrainingReport`. Nothing heavy is imported here: torch is imported
inside the functions that use it.
"""

from optimizer.training.early_stopping import EarlyStopping
from optimizer.training.loop import EpochRecord
from optimizer.training.search import FinetuneConfig, TrainingReport, TrialRecord, fine_tune

__all__ = ["EarlyStopping", "EpochRecord", "FinetuneConfig", "TrainingReport", "TrialRecord", "fine_tune"]
