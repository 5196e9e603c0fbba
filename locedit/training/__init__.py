"""Training: the optimal edit at a set of heads with IPO (TRL's DPOTrainer), one edit or many in one pass."""

from .multi import EditBank, MultiEditTrainer, plan_edits, replicate_batch, train_multi_edit
from .run import train_edits
from .trainer import LocEditTrainer, require_ipo, train_and_validate, training_inputs

__all__ = [
    "EditBank",
    "LocEditTrainer",
    "MultiEditTrainer",
    "plan_edits",
    "training_inputs",
    "replicate_batch",
    "require_ipo",
    "train_and_validate",
    "train_edits",
    "train_multi_edit",
]
